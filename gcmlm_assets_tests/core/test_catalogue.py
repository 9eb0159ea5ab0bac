"""The catalogue is the one declaration of each asset: the definitions agree with it, and no asset
key or output file name is written as a literal anywhere else in the package."""

import ast
import re
from pathlib import Path

import dagster as dg

import gcmlm_assets
from gcmlm_assets import catalogue
from gcmlm_assets.definitions import build_definitions

PACKAGE = Path(gcmlm_assets.__file__).parent
# The risk model's and the fused table's settings resources are keyed by the asset each configures
# (a resource key, not an asset key: renaming the asset leaves it as it is).
RESOURCE_KEYS = {("risk_model", "profiles.py"), ("risk_model", "cohort/resources.py"),
                 ("fused_table", "cohort/resources.py")}
# Strings that contain a catalogued file name without meaning the asset's file.
NOT_THE_ASSETS_FILE = {"ct/ct.nii.gz": "a landing drop's CT (demo/), whose name the landing zone accepts, not ct_image's"}


def _literals(path: Path):
    """(string, line) of every string constant in the module that is not a docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value, node.lineno


def _declared_files() -> set[str]:
    return {value.name for value in vars(catalogue).values() if isinstance(value, catalogue.AssetFile)} | {
        file.name for file in catalogue.PLOTS.values()}


def test_every_defined_asset_is_the_catalogue_entry_of_its_key():
    graph = build_definitions(env="local", profile="demo").resolve_asset_graph()
    defined = {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}
    assert set(defined) == set(catalogue.ASSETS)
    for name, node in defined.items():
        entry = catalogue.ASSETS[name]
        assert node.group_name == entry.group, name
        assert node.code_version == entry.code_version, name
        assert (node.partitions_def is not None) == entry.per_patient, name
        assert set(node.kinds) == set(entry.kinds), name
        assert list(node.owners) == entry.owners, name


def test_no_asset_key_or_output_file_name_is_written_outside_the_catalogue():
    names = set(catalogue.ASSETS) | _declared_files()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "catalogue.py":
            continue
        for value, line in _literals(path):
            if value in names and (value, relative) not in RESOURCE_KEYS:
                found.append(f"{relative}:{line}: {value!r}")
    assert not found, "take these from gcmlm_assets/catalogue.py:\n" + "\n".join(found)


def _file_name_pattern() -> re.Pattern:
    """A catalogued file name as a path component inside a longer string."""
    names = sorted(_declared_files(), key=len, reverse=True)
    return re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, names)) + r")(?![\w.-])")


def test_no_output_file_name_is_written_inside_a_longer_string():
    # Paths and messages ("fused_table/fused.parquet", f"... {name}/mask.nii.gz") are where a
    # renamed file would be missed. Asset keys inside prose (descriptions, log lines) are words
    # for the reader, like docstrings, and are not scanned.
    pattern = _file_name_pattern()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "catalogue.py":
            continue
        for value, line in _literals(path):
            if value not in _declared_files() and value not in NOT_THE_ASSETS_FILE and pattern.search(value):
                found.append(f"{relative}:{line}: {value!r}")
    assert not found, "take the file names from gcmlm_assets/catalogue.py:\n" + "\n".join(found)


def test_the_longer_string_scan_finds_a_file_name_in_a_path():
    pattern = _file_name_pattern()
    name = catalogue.FUSED_FILE.name
    assert pattern.search(f"{catalogue.FUSED_TABLE.key}/{name}") and pattern.search(f"read {name}: missing")
    assert not pattern.search(f"{name}.tmp-x") and not pattern.search(f"old_{name}")


def test_the_scan_finds_a_restated_name(tmp_path):
    # The scan above must be able to fail: a module that types a catalogued file name is caught,
    # its docstring is not.
    module = tmp_path / "restates.py"
    name = catalogue.RADIOMICS_TABLE.name
    module.write_text(f'"""Reads {name}."""\nROW = "{name}"\n', encoding="utf-8")
    assert [value for value, _ in _literals(module)] == [catalogue.RADIOMICS_TABLE.name]


def test_a_file_path_names_the_patient_of_a_per_patient_asset_and_only_then(tmp_path):
    from gcmlm_assets.storage import ArtifactStore

    store = ArtifactStore(tmp_path)
    row, scores = catalogue.RADIOMICS_TABLE, catalogue.SCORES_FILE
    assert row.path(store, "P001") == tmp_path / row.asset.key / "P001" / row.name
    assert scores.path(store) == tmp_path / scores.asset.key / scores.name
    for file, patient in ((catalogue.RADIOMICS_TABLE, None), (catalogue.SCORES_FILE, "P001")):
        try:
            file.path(store, patient)
        except ValueError as error:
            assert file.asset.key in str(error)
        else:
            raise AssertionError(f"{file} accepted patient {patient!r}")


def test_a_missing_input_file_names_the_file_and_what_to_materialize(tmp_path):
    from gcmlm_assets.inputs import required_file
    from gcmlm_assets.storage import ArtifactStore

    store = ArtifactStore(tmp_path)
    try:
        required_file(catalogue.MASK_VOLUME, store, "P007")
    except dg.Failure as failure:
        assert str(catalogue.MASK_VOLUME.path(store, "P007")) in failure.description
        assert "materialize ct_mask for patient P007" in failure.description
    else:
        raise AssertionError("a missing mask was not refused")
