"""Dagster's private modules are reached from one place only, gcmlm_assets/dagster_internals.py."""

import re
from pathlib import Path

import gcmlm_assets

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
