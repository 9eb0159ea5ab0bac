"""cohort/'s layout: the computing parts (tables/, model/, explain/, card/, exchange/) are plain Python beside the
Dagster wiring (that no lazy() names a project module is core/test_definitions.py's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gcmlm_assets.cohort

COHORT = Path(gcmlm_assets.cohort.__file__).parent
PARTS = ("tables", "model", "explain", "card", "exchange")


def test_the_computing_parts_import_no_dagster():
    modules = [f"gcmlm_assets.cohort.{part}.{path.stem}"
               for part in PARTS for path in sorted((COHORT / part).glob("*.py")) if path.stem != "__init__"]
    assert {name.split(".")[2] for name in modules} == set(PARTS)
    # a fresh interpreter: this one has loaded Dagster already
    probe = f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; print('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"

