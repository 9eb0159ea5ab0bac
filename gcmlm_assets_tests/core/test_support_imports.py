"""Shared test helpers live in gcmlm_assets_tests/support/: no test module or conftest.py is imported
by another module, the support package stands on its own, and benchmarks/ take nothing from the
tests but the support package. Read from the source (ast), so imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TESTS, SUPPORT, BENCHMARKS = "gcmlm_assets_tests", "gcmlm_assets_tests.support", "benchmarks"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `module`'s source may import; for `from X import name` both X and X.name, since
    the name can be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def is_test_module(name: str) -> bool:
    last = name.rpartition(".")[2]
    return name.startswith(TESTS + ".") and (last.startswith("test_") or last == "conftest")


def is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(module: str, imports: set[str]) -> list[str]:
    """What `module` (a dotted name under gcmlm_assets_tests or benchmarks) must not import."""
    problems = [f"{module} imports the test module {name}" for name in sorted(imports) if is_test_module(name)]
    if is_within(module, SUPPORT):
        problems += [f"{module} (support) imports {name}, outside the support package" for name in sorted(imports)
                     if is_within(name, TESTS) and not is_within(name, SUPPORT) and name != TESTS]
    if is_within(module, BENCHMARKS):
        problems += [f"{module} imports {name}: benchmarks may use only {SUPPORT}" for name in sorted(imports)
                     if is_within(name, TESTS) and not is_within(name, SUPPORT)]
    return sorted(set(problems))


def python_files() -> list[Path]:
    return sorted([*(PROJECT_ROOT / TESTS).rglob("*.py"), *(PROJECT_ROOT / BENCHMARKS).rglob("*.py")])


def test_no_module_imports_a_test_module_and_benchmarks_use_only_support():
    files = python_files()
    assert any(path.name == "fusion_rules.py" for path in files) and len(files) > 100, len(files)
    problems = []
    for path in files:
        module = module_name(path)
        imports = imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        problems += violations(module, imports)
    assert not problems, "\n".join(problems)


def test_the_scan_sees_each_kind_of_forbidden_import():
    radiology_test = "gcmlm_assets_tests.radiology.test_x"
    assert violations(radiology_test, imported_modules(
        "from .test_nnunet import Cohort\n", radiology_test)) == [
        f"{radiology_test} imports the test module gcmlm_assets_tests.radiology.test_nnunet"]
    assert violations(radiology_test, imported_modules(
        "def f():\n    from ..core import test_pictures\n", radiology_test)) == [
        f"{radiology_test} imports the test module gcmlm_assets_tests.core.test_pictures"]
    assert violations(radiology_test, imported_modules(
        "import gcmlm_assets_tests.radiology.conftest as c\n", radiology_test)) == [
        f"{radiology_test} imports the test module gcmlm_assets_tests.radiology.conftest"]
    support = "gcmlm_assets_tests.support.cohort.synthetic"
    assert violations(support, imported_modules("from gcmlm_assets_tests.corpus import inputs\n", support)) == [
        f"{support} (support) imports gcmlm_assets_tests.corpus, outside the support package",
        f"{support} (support) imports gcmlm_assets_tests.corpus.inputs, outside the support package"]
    benchmark = "benchmarks.fusion_rules"
    assert violations(benchmark, imported_modules("from gcmlm_assets_tests.cohort import synthetic\n", benchmark))
    # What is allowed: helpers beside a test, the support package, project code.
    assert not violations(radiology_test, imported_modules(
        "from . import inputs\nfrom gcmlm_assets_tests.support.run_results import metadata_of\nimport gcmlm_assets\n",
        radiology_test))
    assert not violations(benchmark, imported_modules(
        "from gcmlm_assets_tests.support.cohort.synthetic import make_cohort\n", benchmark))
