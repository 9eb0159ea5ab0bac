"""Each setting is defined once.

A setting's default is written in one class; every other class that has the setting reads it from
there (inherits it, as a resource inherits its plain settings dataclass, or `default=` naming it).
The scan below reads every module of gcmlm_assets (ast: nothing imported) and collects, per
settings class (a dataclass, or a pydantic / Dagster config class), the fields whose default is
written as a literal; two classes writing literal defaults for the same names are a setting
defined twice.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import sys
from pathlib import Path
from typing import get_args, get_type_hints

from pydantic.fields import FieldInfo

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
    field-making call (pydantic's Field, dataclasses' field)."""
    if isinstance(value, ast.Call):
        for keyword in value.keywords:
            if keyword.arg == "default":
                return keyword.value
        name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", "")
        return value.args[0] if name == "Field" and value.args else None
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


def _resources_and_their_declarations():
    from gcmlm_assets.cohort.model.risk_model_fields import ModelSettingFields
    from gcmlm_assets.cohort.resources import RiskModelSettings
    from gcmlm_assets.pathology.resources import TilingSettings
    from gcmlm_assets.pathology.tiling_settings import TilingFields
    from gcmlm_assets.radiology.nnunet_settings import NnunetTrainingFields
    from gcmlm_assets.radiology.resources import SegmentationModelResource

    return [(RiskModelSettings, ModelSettingFields), (SegmentationModelResource, NnunetTrainingFields),
            (TilingSettings, TilingFields)]


def _declared(settings_class: type) -> dict[str, tuple]:
    """{name: (default, description, bounds)} as the plain dataclass declares them (the description
    and bounds in its `Annotated` metadata, setting_fields.setting)."""
    hints = get_type_hints(settings_class, include_extras=True)
    declared = {}
    for field in dataclasses.fields(settings_class):
        info = next((m for m in getattr(hints[field.name], "__metadata__", ()) if isinstance(m, FieldInfo)), None)
        declared[field.name] = (field.default, info.description if info else None,
                                [repr(m) for m in info.metadata] if info else [])
    return declared


def test_each_resource_inherits_its_settings_as_declared():
    for resource, settings_class in _resources_and_their_declarations():
        assert issubclass(resource, settings_class), resource
        fields = resource.model_fields
        assert {name: (fields[name].default, fields[name].description, [repr(m) for m in fields[name].metadata])
                for name in _declared(settings_class)} == _declared(settings_class), resource
        # What the Launchpad shows: Dagster's config schema has the same defaults and descriptions.
        schema = resource.to_config_schema().as_field().config_type.fields
        for name, (default, description, _) in _declared(settings_class).items():
            assert (schema[name].default_value, schema[name].description) == (default, description), name


def test_the_resources_are_ordinary_classes_a_type_checker_reads():
    """Every field of a resource is annotated in a `class` statement (the resource's or a base's),
    not added at run time, so IDEs and type checkers see it."""
    for resource, _ in _resources_and_their_declarations():
        assert getattr(sys.modules[resource.__module__], resource.__qualname__) is resource
        assert get_type_hints(resource).keys() >= resource.model_fields.keys(), resource
        written = {}  # class -> the names its class statement annotates
        for owner in resource.__mro__[:-1]:
            try:
                statement = ast.parse(inspect.getsource(owner)).body[0]
            except (OSError, TypeError):  # a class made at run time has no source
                continue
            written[owner] = {item.target.id for item in statement.body
                              if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
        for name in resource.model_fields:
            assert any(name in names for names in written.values()), (resource, name)


def test_risk_model_settings_are_their_one_declaration():
    from gcmlm_assets.cohort.model.combiners import FUSIONS
    from gcmlm_assets.cohort.model.risk_model_fields import Fusion, ModelSettingFields
    from gcmlm_assets.cohort.model.model_settings import ModelSettings
    from gcmlm_assets.cohort.resources import RiskModelSettings

    declared = _declared(ModelSettingFields)
    assert all(description for _, description, _ in declared.values())  # the Launchpad explains each
    assert RiskModelSettings.model_fields.keys() == declared.keys()
    assert issubclass(ModelSettings, ModelSettingFields)
    assert ModelSettings.__dataclass_fields__.keys() == declared.keys()
    assert RiskModelSettings(n_splits=3).model_settings() == ModelSettings(n_splits=3)
    assert get_args(Fusion) == FUSIONS


def test_nnunet_training_settings_are_the_resources_and_the_demo_is_the_profile():
    from gcmlm_assets.profiles import DEMO
    from gcmlm_assets.radiology.nnunet_settings import NnunetTrainingFields
    from gcmlm_assets.radiology.nnunet_training import TrainingSettings
    from gcmlm_assets.radiology.resources import SegmentationModelResource

    assert all(description for _, description, _ in _declared(NnunetTrainingFields).values())
    assert issubclass(TrainingSettings, NnunetTrainingFields)
    assert SegmentationModelResource.cpu_demo() == SegmentationModelResource(**DEMO.resource_settings("segmentation"))


def test_tiling_settings_default_to_the_plain_tiling_classes():
    from gcmlm_assets.pathology.resources import TilingSettings
    from gcmlm_assets.pathology.tiling_params import TilingParams
    from gcmlm_assets.pathology.tiling_settings import TilingFields

    assert TilingSettings().tiling_params() == TilingFields().tiling_params() == TilingParams()
