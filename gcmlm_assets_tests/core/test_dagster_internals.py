"""Dagster's private modules are reached from one place only, gcmlm_assets/dagster_internals.py."""

import re
from pathlib import Path

import gcmlm_assets
from gcmlm_assets import batching, dagster_internals

PACKAGE = Path(gcmlm_assets.__file__).parent
# `from dagster._x import ...`, `import dagster._x`, `from dagster import _x` at the start of a line
PRIVATE_IMPORT = re.compile(r"^\s*(from\s+dagster\._|import\s+dagster\._|from\s+dagster\s+import\s+_)", re.M)


def test_only_dagster_internals_imports_private_dagster_modules():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "dagster_internals.py" in sources
    offenders = [str(path.relative_to(PACKAGE)) for path in sources
                 if path.name != "dagster_internals.py" or path.parent != PACKAGE
                 if PRIVATE_IMPORT.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
    assert PRIVATE_IMPORT.search((PACKAGE / "dagster_internals.py").read_text(encoding="utf-8"))


def test_batching_tag_literals_are_dagsters_own():
    # batching.py restates these as strings; they must stay what Dagster writes and reads.
    assert batching.DATA_VERSION_TAG == dagster_internals.DATA_VERSION_TAG
    assert batching.DATA_VERSION_IS_USER_PROVIDED_TAG == dagster_internals.DATA_VERSION_IS_USER_PROVIDED_TAG
    assert batching.CODE_VERSION_TAG == dagster_internals.CODE_VERSION_TAG
    assert batching.BACKFILL_ID_TAG == dagster_internals.BACKFILL_ID_TAG
