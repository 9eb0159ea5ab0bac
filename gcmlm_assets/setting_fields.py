"""Settings declared once: a plain frozen dataclass declares each setting (type, default, and in
its annotation the description and bounds), and the Dagster resource a user configures inherits
that dataclass.

No Dagster here (pydantic only, for the annotation). A plain module declares

    @dataclass(frozen=True)
    class ModelSettingFields:
        n_splits: Annotated[int, setting("Folds of the stratified CV.", ge=2)] = 5

and the resource module inherits it, Dagster's class first (its __init__, equality and
immutability win over the dataclass's):

    class RiskModelSettings(dg.ConfigurableResource, ModelSettingFields):
        ...methods...

pydantic reads the fields of a dataclass base (the default from the class, the description and
bounds from the `Annotated` metadata), so the Launchpad shows the same names, defaults,
descriptions, `Literal` choices and bounds; type checkers and IDEs see an ordinary class, and a
new setting is one new field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field

BOUNDS = ("ge", "gt", "le", "lt")  # pydantic's numeric bounds, which the resource enforces


def setting(description: str, **bounds: float) -> Any:
    """The `Annotated` metadata of a setting: its `description` for the UI and pydantic `bounds`
    (ge, gt, le, lt) that the resource enforces. The default is the field's value."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"setting(): unknown bound(s) {sorted(unknown)}; one of {BOUNDS}")
    return Field(description=description, **bounds)


def values_of(settings: Any, settings_class: type) -> dict[str, Any]:
    """{name: value} of the fields of the dataclass `settings_class` read from `settings` (a resource)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings_class)}
