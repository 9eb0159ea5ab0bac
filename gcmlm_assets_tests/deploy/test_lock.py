"""deploy/lock/: the image's dependencies, hash-locked (`make lock`), agree with pyproject.toml.

A dependency added to or re-pinned in pyproject.toml (or deploy/lock/image.in) without `make lock`
fails here, and so does a lock entry nothing needs any more. The lock must also cover what this
virtual environment has installed for the project's runtime dependencies, at the same versions (the
Makefile constrains the venv to the lock), so the tests run what the image runs. Offline: the
installed distributions' metadata, no index.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK_DIR = REPO / "deploy" / "lock"
PYPROJECT_ROOT = "gcmlm-assets (pyproject.toml)"
IMAGE_IN_ROOT = "-r deploy/lock/image.in"
BUILD_IN_ROOT = "-r deploy/lock/build.in"

ENTRY = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}( \\)?")


@dataclass(frozen=True)
class LockEntry:
    name: str  # canonical
    version: str
    hashes: frozenset[str]
    via: tuple[str, ...]


def parse_lock(text: str, source: str) -> dict[str, LockEntry]:
    """Entries of a uv/pip-compile lock with hashes and one-line `# via`; anything else is an error
    naming the line (a URL, an editable, an unpinned or unhashed requirement)."""
    entries: dict[str, LockEntry] = {}
    current: dict | None = None

    def close():
        if current is not None:
            if not current["hashes"]:
                raise ValueError(f"{source}: {current['name']}=={current['version']} has no sha256 hash")
            entries[current["name"]] = LockEntry(current["name"], current["version"],
                                                 frozenset(current["hashes"]), tuple(current["via"]))

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or (line.startswith("#") and not line.startswith("# via")):
            continue
        if current is not None and HASH.fullmatch(line):
            current["hashes"].add(line.split(":", 1)[1].split()[0])
        elif current is not None and line.startswith("# via "):
            current["via"] = [item.strip() for item in line[len("# via "):].split(",")]
        elif match := ENTRY.fullmatch(line):
            close()
            name = canonicalize_name(match.group(1))
            if name in entries:
                raise ValueError(f"{source}, line {number}: {name} twice")
            current = {"name": name, "version": match.group(2), "hashes": set(), "via": []}
        else:
            raise ValueError(f"{source}, line {number}: not `name==version \\`, a sha256 hash or `# via`: {line!r}")
    close()
    return entries


def requirements_in(text: str) -> list[Requirement]:
    """A requirements input file's requirements (comments and blank lines dropped)."""
    return [Requirement(line.split("#", 1)[0].strip()) for line in text.splitlines()
            if line.split("#", 1)[0].strip()]


def lock_problems(pyproject_text: str, image_in_text: str, lock: dict[str, LockEntry]) -> list[str]:
    """What is out of step between the inputs and the lock: a requirement missing from the lock or
    locked at a version it does not allow, and entries no input needs (directly or through another
    entry)."""
    roots = {
        PYPROJECT_ROOT: [Requirement(d) for d in tomllib.loads(pyproject_text)["project"]["dependencies"]],
        IMAGE_IN_ROOT: requirements_in(image_in_text),
    }
    problems: list[str] = []
    for root, requirements in roots.items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            if name not in lock:
                problems.append(f"{requirement} ({root}) is not in the lock: run `make lock`")
            elif not requirement.specifier.contains(lock[name].version, prereleases=True):
                problems.append(f"{requirement} ({root}) but the lock has {lock[name].version}: run `make lock`")
    root_names = {root: {canonicalize_name(r.name) for r in requirements} for root, requirements in roots.items()}
    needed = set().union(*root_names.values())
    pending = list(needed)
    while pending:  # walk down from the roots: an entry is needed if a needed entry names it as its parent
        parent = pending.pop()
        for entry in lock.values():
            if entry.name not in needed and parent in {canonicalize_name(v) for v in entry.via}:
                needed.add(entry.name)
                pending.append(entry.name)
    for entry in lock.values():
        if entry.name not in needed:
            problems.append(f"{entry.name}=={entry.version} is locked but nothing needs it: run `make lock`")
    return problems


@pytest.fixture(scope="module")
def image_lock() -> dict[str, LockEntry]:
    return parse_lock((LOCK_DIR / "image.txt").read_text(encoding="utf-8"), "deploy/lock/image.txt")


@pytest.fixture(scope="module")
def build_lock() -> dict[str, LockEntry]:
    return parse_lock((LOCK_DIR / "build.txt").read_text(encoding="utf-8"), "deploy/lock/build.txt")


def read(relative: str) -> str:
    return (REPO / relative).read_text(encoding="utf-8")


def test_the_lock_agrees_with_pyproject_and_image_in(image_lock):
    assert lock_problems(read("pyproject.toml"), read("deploy/lock/image.in"), image_lock) == []


def test_an_edit_without_relocking_is_caught(image_lock):
    """The check really compares: a re-pinned, an added and a removed dependency each show up."""
    pyproject = read("pyproject.toml")
    image_in = read("deploy/lock/image.in")
    dagster = image_lock["dagster"].version
    repinned = pyproject.replace(f'"dagster=={dagster}"', '"dagster==1.0.0"')
    assert repinned != pyproject
    assert any("dagster==1.0.0" in p for p in lock_problems(repinned, image_in, image_lock))
    added = pyproject.replace('dependencies = [', 'dependencies = [\n    "rich-click==1.8.0",', 1)
    assert any("rich-click" in p for p in lock_problems(added, image_in, image_lock))
    removed = image_in.replace("versioneer==", "# versioneer==")
    assert any(p.startswith("versioneer==") for p in lock_problems(pyproject, removed, image_lock))


def test_every_entry_is_an_exact_pin_with_hashes(image_lock, build_lock):
    for entries in (image_lock, build_lock):
        assert entries
        for entry in entries.values():
            assert entry.hashes and entry.via, entry.name
    with pytest.raises(ValueError, match="has no sha256 hash"):
        parse_lock("six==1.17.0 \\\n    # via x\n", "a lock")
    with pytest.raises(ValueError, match="line 1"):
        parse_lock("six>=1.17\n", "a lock")


def test_build_tools_are_the_image_locks_own(image_lock, build_lock):
    """deploy/lock/build.txt is installed first: the same files as image.txt has for them."""
    assert {"pip", "setuptools", "wheel", "versioneer", "numpy"} <= set(build_lock)
    for name, entry in build_lock.items():
        assert name in image_lock, name
        assert (entry.version, entry.hashes) == (image_lock[name].version, image_lock[name].hashes), name
    assert set(build_lock) - {"pip", "setuptools", "wheel", "versioneer", "numpy"} <= {"packaging"}, \
        "only the build tools and what they need"


def test_the_lock_is_for_linux_x86_64_with_cuda_torch(image_lock):
    """Compiled for the image's platform: torch's Linux wheel brings CUDA 13 and triton; the sdist
    of PyRadiomics and its build tools are there; SQLAlchemy is pinned with the driver the image has."""
    torch_children = {e.name for e in image_lock.values() if "torch" in e.via}
    assert {"cuda-toolkit", "triton"} <= torch_children, torch_children
    assert image_lock["cuda-toolkit"].version.startswith("13.0.")
    assert image_lock["pyradiomics"].version == "3.0.1"
    assert image_lock["sqlalchemy"].version.startswith("2.1.")
    assert "psycopg2-binary" in image_lock and "psycopg" not in image_lock


def test_the_makefile_compiles_the_lock_for_the_image():
    makefile = read("Makefile")
    assert re.search(r"^lock:", makefile, re.M)
    for option in ("--generate-hashes", "--index-url https://pypi.org/simple", "--python-version 3.11",
                   "--python-platform x86_64-manylinux_2_28", "--no-config"):
        assert option in makefile, option
    for lock in ("image.txt", "build.txt"):
        assert "#    make lock" in (LOCK_DIR / lock).read_text(encoding="utf-8").splitlines()[1], lock


def runtime_closure(roots: list[Requirement]) -> dict[str, str | None]:
    """Every distribution the roots need in this environment, by the installed metadata (extras and
    markers evaluated here): name -> installed version, None where required but not installed."""
    found: dict[str, str | None] = {}
    pending = [(r, frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        found[name] = distribution.version
        for text in distribution.requires or []:
            child = Requirement(text)
            environments = [{**default_environment(), "extra": extra} for extra in (extras or {""})]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                pending.append((child, frozenset(child.extras)))
    return found


def test_the_lock_covers_this_venvs_runtime_dependencies(image_lock):
    roots = [Requirement(d) for d in tomllib.loads(read("pyproject.toml"))["project"]["dependencies"]]
    roots += requirements_in(read("deploy/lock/image.in"))
    closure = runtime_closure(roots)
    assert "dagster" in closure and "torch" in closure
    missing = sorted(set(closure) - set(image_lock))
    assert not missing, f"installed for the runtime but not locked: {missing}"
    differing = {name: (version, image_lock[name].version) for name, version in closure.items()
                 if version is not None and version != image_lock[name].version}
    assert not differing, f"installed vs locked: {differing}: rerun `make install` or `make lock`"
