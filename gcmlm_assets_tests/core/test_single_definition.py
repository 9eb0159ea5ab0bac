"""Each setting is defined once.

A setting's default is written in one class; every other class that has the setting reads it from
there (built from it with setting_fields.settings_resource, derived from it, or `default=` naming
it). The scan below reads every module of gcmlm_assets (ast: nothing imported) and collects, per
settings class (a dataclass, or a pydantic / Dagster config class), the fields whose default is
written as a literal; two classes writing literal defaults for the same names are a setting
defined twice.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path
from typing import get_args

import gcmlm_assets

PACKAGE = Path(gcmlm_assets.__file__).parent
# Two classes may share this many literal-default names by coincidence (e.g. `seed = 0`, `patch_size = 256`).
COINCIDENCE = 2
CONFIG_BASES = ("ConfigurableResource", "ConfigurableIOManager", "Config", "BaseModel")


def _is_literal(node: ast.AST | None) -> bool:
    """A default written as a value: a constant, -constant, or a tuple/list of those."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _is_literal(node.operand)
    if isinstance(node, ast.Tuple | ast.List):
        return all(_is_literal(e) for e in node.elts)
    return False


def _default(value: ast.AST | None) -> ast.AST | None:
    """The default expression of a field: the value itself, or `default=` / the first argument of a
    field-making call (pydantic's Field, dataclasses' field, setting_fields.setting)."""
    if isinstance(value, ast.Call):
        for keyword in value.keywords:
            if keyword.arg == "default":
                return keyword.value
        name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", "")
        return value.args[0] if name in ("Field", "setting") and value.args else None
    return value


def _is_settings_class(node: ast.ClassDef) -> bool:
    decorators = {ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list}
    bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
    return any(d.endswith("dataclass") for d in decorators) or bool(bases & set(CONFIG_BASES))


def literal_defaults(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{"module.Class": names of its fields whose default is a literal} of every settings class."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ClassDef) and _is_settings_class(node):
                names = {item.target.id for item in node.body
                         if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                         and _is_literal(_default(item.value))}
                if names:
                    found[f"{module}.{node.name}"] = names
    return found


def defined_twice(found: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """The pairs of classes that write literal defaults for more than COINCIDENCE of the same names."""
    return {(a, b): sorted(found[a] & found[b]) for a, b in itertools.combinations(sorted(found), 2)
            if len(found[a] & found[b]) > COINCIDENCE}


def test_no_setting_has_its_default_written_in_two_classes():
    found = literal_defaults()
    assert defined_twice(found) == {}
    assert "gcmlm_assets.cohort.model.risk_model_fields.ModelSettingFields" in found  # the scan reads the settings


def test_the_scan_finds_a_setting_written_twice(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "plain.py").write_text("from dataclasses import dataclass, field\n\n@dataclass\nclass Plain:\n"
                                      "    a: int = 1\n    b: str = field(default='x')\n    c: float = -0.5\n")
    (package / "wired.py").write_text("import dagster as dg\nfrom pydantic import Field\n\n"
                                      "class Wired(dg.ConfigurableResource):\n    a: int = Field(default=1)\n"
                                      "    b: str = 'y'\n    c: float = Field(-0.5, description='c')\n")
    assert defined_twice(literal_defaults(package)) == {("pkg.plain.Plain", "pkg.wired.Wired"): ["a", "b", "c"]}


def test_risk_model_settings_are_built_from_their_one_declaration():
    from gcmlm_assets.cohort.model.combiners import FUSIONS
    from gcmlm_assets.cohort.model.risk_model_fields import Fusion, ModelSettingFields
    from gcmlm_assets.cohort.model.model_settings import ModelSettings
    from gcmlm_assets.cohort.resources import RiskModelSettings

    declared = {f.name: (f.default, f.metadata["description"]) for f in dataclasses.fields(ModelSettingFields)}
    assert {name: (f.default, f.description) for name, f in RiskModelSettings.model_fields.items()} == declared
    assert issubclass(ModelSettings, ModelSettingFields) and ModelSettings.__dataclass_fields__.keys() == declared.keys()
    assert get_args(Fusion) == FUSIONS


def test_nnunet_training_settings_are_the_resources_and_the_demo_is_the_profile():
    from gcmlm_assets.profiles import DEMO
    from gcmlm_assets.radiology.nnunet_settings import NnunetTrainingFields
    from gcmlm_assets.radiology.nnunet_training import TrainingSettings
    from gcmlm_assets.radiology.resources import SegmentationModelResource

    fields = SegmentationModelResource.model_fields
    for declared in dataclasses.fields(NnunetTrainingFields):
        assert (fields[declared.name].default, fields[declared.name].description) == \
            (declared.default, declared.metadata["description"]), declared.name
    assert issubclass(TrainingSettings, NnunetTrainingFields)
    assert SegmentationModelResource.cpu_demo() == SegmentationModelResource(**DEMO.resource_settings("segmentation"))
