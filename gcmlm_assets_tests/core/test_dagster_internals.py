"""Dagster's private modules are reached from one place only, gcmlm_assets/dagster_internals.py,
and everything it takes from them still exists, is used, and (for the tags stored on runs and
events) still has the value the stored history was written with. A Dagster upgrade that moves or
renames one of them fails here."""

import ast
import importlib
from pathlib import Path

import gcmlm_assets
from gcmlm_assets import dagster_internals

PACKAGE = Path(gcmlm_assets.__file__).parent
INTERNALS = PACKAGE / "dagster_internals.py"
# What existing instances hold: a new value would split a patient's history in two.
STORED_TAGS = {
    "ASSET_PARTITION_RANGE_END_TAG": "dagster/asset_partition_range_end",
    "ASSET_PARTITION_RANGE_START_TAG": "dagster/asset_partition_range_start",
    "BACKFILL_ID_TAG": "dagster/backfill",
    "CODE_VERSION_TAG": "dagster/code_version",
    "DATA_VERSION_IS_USER_PROVIDED_TAG": "dagster/data_version_is_user_provided",
    "DATA_VERSION_TAG": "dagster/data_version",
    "PARTITION_NAME_TAG": "dagster/partition",
    "RUN_KEY_TAG": "dagster/run_key",
    "SENSOR_NAME_TAG": "dagster/sensor_name",
}


def private_dagster_uses(source: str) -> list[int]:
    """Lines that import a private Dagster module or name, or reach one as `dagster._x` / `dg._x`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("dagster._") or
                (node.module == "dagster" and any(a.name.startswith("_") for a in node.names))):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.startswith("dagster._") for a in node.names):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and isinstance(node.value, ast.Name) and node.value.id in ("dagster", "dg")):
            lines.append(node.lineno)
    return sorted(lines)


def taken_from_dagster() -> dict[str, tuple[str, str]]:
    """Name exported by dagster_internals -> (private module, name there)."""
    taken = {}
    for node in ast.parse(INTERNALS.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module.startswith("dagster._"):
            for alias in node.names:
                taken[alias.asname or alias.name] = (node.module, alias.name)
    return taken


def test_the_scan_finds_each_way_into_private_dagster():
    source = ("import dagster as dg\nfrom dagster._core.storage.tags import RUN_KEY_TAG\nimport dagster._utils\n"
              "from dagster import _check\nx = dg._core\nfrom dagster import AssetKey\ny = dg.AssetKey\n")
    assert private_dagster_uses(source) == [2, 3, 4, 5]


def test_only_dagster_internals_imports_private_dagster_modules():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert INTERNALS in sources
    offenders = {str(path.relative_to(PACKAGE)): lines for path in sources if path != INTERNALS
                 if (lines := private_dagster_uses(path.read_text(encoding="utf-8")))}
    assert offenders == {}


def test_every_private_name_still_resolves_where_it_is_taken_from():
    taken = taken_from_dagster()
    assert set(STORED_TAGS) < set(taken)
    for exported, (module, name) in taken.items():
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} moved: update dagster_internals.py"
        assert getattr(dagster_internals, exported) is getattr(importlib.import_module(module), name)


def test_every_private_name_is_used_by_the_package():
    used: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "gcmlm_assets.dagster_internals":
                used |= {alias.name for alias in node.names}
    assert set(taken_from_dagster()) - used == set(), "drop the names nothing uses from dagster_internals.py"


def test_the_stored_tags_keep_their_values():
    assert {name: getattr(dagster_internals, name) for name in STORED_TAGS} == STORED_TAGS
    assert {name for name in taken_from_dagster() if name.endswith("_TAG")} == set(STORED_TAGS)
