"""The import contracts of pyproject.toml ([tool.importlinter]) hold: demo > definitions > the
independent domains > landing > the shared modules, and no import cycle inside a package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ("demo > definitions > independent domains > landing > shared modules",
             "No import cycle between the modules of one package")


def test_the_import_contracts_hold():
    # import-linter's own command line, from this checkout (it puts the working directory first on
    # the path), without a cache folder in the project
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--no-cache", "--config", str(PROJECT_ROOT / "pyproject.toml")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    for contract in CONTRACTS:
        assert f"{contract} KEPT" in report, report
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in report, report
