# Everything a fresh machine needs is installed from here: `make test`, `make demo`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# checkov (scans the step pods' Kubernetes jobs in the tests) in a virtualenv of its own:
# its dependencies are pinned apart from the project's.
CHECKOV_VENV := .venv-checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov
export GCMLM_TEST_DATA ?= $(abspath ../shared/data)
export GCMLM_DATA_ROOT ?= $(abspath data)
# The local SQLite instance lives under the data root (make ui, make demo, dagster CLI from make).
export DAGSTER_HOME ?= $(GCMLM_DATA_ROOT)/dagster_home

# `make lock`: uv, in a virtualenv of its own, compiles deploy/lock/ (the image's dependencies with
# their sha256 hashes) from pyproject.toml and deploy/lock/*.in, for Linux x86_64 and CPython 3.11,
# from PyPI (never this machine's local indexes: the hashes are those of the files the image's build
# downloads). Versions already in the lock are kept; `make lock UPGRADE=1` moves them to the newest.
LOCK_VENV := .venv-lock
UV := $(LOCK_VENV)/bin/uv
LOCK_COMPILE = $(UV) pip compile --no-config --index-url https://pypi.org/simple \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--annotation-style line --custom-compile-command "make lock" --quiet $(if $(UPGRADE),--upgrade)
# The lock's versions (without hashes) constrain this venv too, so development and CI run what the
# image runs.
LOCK_CONSTRAINTS := $(VENV)/lock-constraints.txt

.PHONY: install test demo ui bench validate clean lock chart-check receive

install: $(STAMP)

# torch comes from the machine's local wheel index (pip only); PyRadiomics 3.0.1
# has no 3.11 wheel and must be built against the numpy 2 already in the venv,
# without build isolation or a cached wheel.
$(STAMP): pyproject.toml Makefile deploy/lock/image.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' deploy/lock/image.txt > $(LOCK_CONSTRAINTS)
	$(PIP) install -q --upgrade pip -c $(LOCK_CONSTRAINTS)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 numpy==2.4.6 versioneer "setuptools>=77" wheel \
	  -c $(LOCK_CONSTRAINTS)
	$(PY) -c "import radiomics" 2>/dev/null || \
	  $(PIP) install -q --no-build-isolation --no-cache-dir pyradiomics==3.0.1 -c $(LOCK_CONSTRAINTS)
	$(PIP) install -q -e ".[test]" -c $(LOCK_CONSTRAINTS)
	touch $(STAMP)

$(UV):
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q uv==0.13.9

lock: $(UV)
	$(LOCK_COMPILE) pyproject.toml deploy/lock/image.in -o deploy/lock/image.txt
	$(LOCK_COMPILE) deploy/lock/build.in -c deploy/lock/image.txt -o deploy/lock/build.txt

$(CHECKOV): Makefile
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q checkov==3.3.30
	touch $(CHECKOV)

test: $(STAMP) $(CHECKOV)
	$(PY) -m pytest -q gcmlm_assets_tests

# The tests' re-statement of the dagster chart against the real one (deploy/README.md):
# make chart-check CHART=<the chart, e.g. from helm pull dagster/dagster --version 1.13.27 --untar>
chart-check: $(STAMP)
	PYTHON=$(PY) deploy/check_chart.sh $(CHART)

validate: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster definitions validate -m gcmlm_assets.definitions

# make demo and make ui use the demo settings profile unless GCMLM_PROFILE says otherwise.
demo: $(STAMP)
	GCMLM_PROFILE=$${GCMLM_PROFILE:-demo} $(PY) -m gcmlm_assets.demo

# The instance's config and databases are made before `dagster dev` starts its processes at once.
# `exec`: make passes SIGTERM to its child only, and the shell running the recipe would die of it
# and leave dagster dev, its webserver, daemon and code server running.
UI_PORT ?= 3000
ui: $(STAMP)
	$(PY) -c "from gcmlm_assets import settings; from gcmlm_assets.demo.daemon import prepare_dagster_home; prepare_dagster_home(settings.dagster_home())"
	GCMLM_PROFILE=$${GCMLM_PROFILE:-demo} exec $(VENV)/bin/dagster dev -h 127.0.0.1 -p $(UI_PORT) -w workspace.yaml

# The DICOM receiver (README "Intake from a PACS"), until Ctrl-C; its settings are the GCMLM_INTAKE_*
# variables or RECEIVE_ARGS, e.g. make receive RECEIVE_ARGS="--pseudonym-table /secure/pseudonyms.json".
# `exec`: SIGTERM reaches the receiver, which aborts open associations and stops.
receive: $(STAMP)
	exec $(PY) -m gcmlm_assets.landing.intake $(RECEIVE_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks

# Artifacts and the local instance under the data root; the landing zone is kept.
clean:
	rm -rf $(or $(GCMLM_ARTIFACTS_ROOT),$(GCMLM_DATA_ROOT)/artifacts) $(DAGSTER_HOME)
