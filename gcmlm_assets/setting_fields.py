"""Settings declared once: a plain dataclass field carries the default, the description and the
bounds, and the Dagster resource a user configures is built from those fields.

Plain Python (no Dagster; pydantic only when a resource class is built). A plain module declares

    @dataclass(frozen=True)
    class ModelSettings:
        n_splits: int = setting(5, "Folds of the stratified CV.", ge=2)

and the resource module builds its resource from it with `settings_resource` (pydantic's
`create_model` over a `dg.ConfigurableResource` subclass that holds the resource's methods), so
the Launchpad shows the same names, defaults, descriptions, `Literal` choices and bounds, and a
new setting is one new field.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

DESCRIPTION = "description"
BOUNDS = ("ge", "gt", "le", "lt")  # pydantic's numeric bounds; checked when the resource is built


def setting(default: Any, description: str, **bounds: float) -> Any:
    """A dataclass field that is also a resource setting: `default`, its `description` for the UI,
    and pydantic `bounds` (ge, gt, le, lt) that the resource enforces."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"setting(): unknown bound(s) {sorted(unknown)}; one of {BOUNDS}")
    return dataclasses.field(default=default, metadata={DESCRIPTION: description, **bounds})


def settings_of(settings_class: type) -> list[dataclasses.Field]:
    """The fields of `settings_class` declared with `setting()`, in declaration order."""
    return [f for f in dataclasses.fields(settings_class) if DESCRIPTION in f.metadata]


def values_of(settings: Any, settings_class: type) -> dict[str, Any]:
    """{name: value} of the `setting()` fields of `settings_class` read from `settings` (a resource)."""
    return {f.name: getattr(settings, f.name) for f in settings_of(settings_class)}


def settings_resource(name: str, base: type, settings_class: type, module: str) -> type:
    """The class `name` derived from `base` (a `dg.ConfigurableResource` with the resource's methods)
    whose fields are the `setting()` fields of `settings_class`: same type, default, description and
    bounds, and `base`'s docstring (the Launchpad's description). `module` is the resource module's
    `__name__` (Dagster and pickling name the class by it)."""
    import pydantic

    hints = typing.get_type_hints(settings_class)
    fields = {f.name: (hints[f.name], pydantic.Field(default=f.default, description=f.metadata[DESCRIPTION],
                                                     **{k: f.metadata[k] for k in BOUNDS if k in f.metadata}))
              for f in settings_of(settings_class)}
    return pydantic.create_model(name, __base__=base, __module__=module, __doc__=base.__doc__, **fields)
