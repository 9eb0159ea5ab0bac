"""cohort/'s layout: the computing parts (tables/, model/, explain/, card/) are plain Python beside the
Dagster wiring, and the wiring names the project's modules by ordinary imports, not through lazy()."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gcmlm_assets.cohort

COHORT = Path(gcmlm_assets.cohort.__file__).parent
PARTS = ("tables", "model", "explain", "card")


def test_the_computing_parts_import_no_dagster():
    modules = [f"gcmlm_assets.cohort.{part}.{path.stem}"
               for part in PARTS for path in sorted((COHORT / part).glob("*.py")) if path.stem != "__init__"]
    assert {name.split(".")[2] for name in modules} == set(PARTS)
    # a fresh interpreter: this one has loaded Dagster already
    probe = f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; print('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_lazy_names_only_third_party_libraries():
    proxied = []
    for path in sorted(COHORT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "lazy"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).startswith("gcmlm_assets")):
                proxied.append(f"{path.relative_to(COHORT)}: lazy({node.args[0].value!r})")
    assert proxied == []
