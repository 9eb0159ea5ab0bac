"""Column schemas of the table outputs, as plain data (no pyarrow; Dagster only inside the two
functions at the end that turn a schema into Dagster metadata).

A schema is a tuple of `Column`s: one column by its exact name, or a family of columns by a name
ending in `*` (`original_*`: every PyRadiomics feature of the unfiltered image). The asset pages
show them as `dagster/column_schema` before any run; at run time `summarise` fills in what the
families actually hold. Types are pyarrow's own names (`string`, `double`, `int8`, ...), so a test can
compare a schema with a real output table column by column (`problems`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

# A family lists its members by name up to this many; beyond it, the first and last only.
LISTED_MEMBERS = 8


@dataclass(frozen=True)
class Column:
    name: str  # an exact column name, or a prefix followed by `*` for a family of columns
    type: str  # pyarrow's name of the column type
    description: str
    # Present only with some settings (a family may then be empty, an exact column absent).
    optional: bool = False

    @property
    def is_family(self) -> bool:
        return self.name.endswith("*")

    def matches(self, column: str) -> bool:
        return column.startswith(self.name[:-1]) if self.is_family else column == self.name


def owner(schema: Sequence[Column], column: str) -> Column | None:
    """The schema entry a column belongs to: its exact entry, else the first family that matches."""
    for entry in schema:
        if not entry.is_family and entry.matches(column):
            return entry
    return next((entry for entry in schema if entry.is_family and entry.matches(column)), None)


def problems(schema: Sequence[Column], fields: Sequence[tuple[str, str]]) -> list[str]:
    """How a table's (name, type) fields differ from the schema: columns it does not describe,
    columns of another type, required entries no column fills. Empty when the schema is right."""
    found: list[str] = []
    filled: set[int] = set()
    for name, kind in fields:
        entry = owner(schema, name)
        if entry is None:
            found.append(f"column {name!r} ({kind}) is not in the schema")
            continue
        filled.add(id(entry))
        if kind != entry.type:
            found.append(f"column {name!r} is {kind}, the schema's {entry.name!r} says {entry.type}")
    found += [f"no column for the schema's {entry.name!r}" for entry in schema
              if not entry.optional and id(entry) not in filled]
    return found


def summarise(schema: Sequence[Column], fields: Sequence[tuple[str, str]]) -> list[Column]:
    """The schema of an actual table, from its (name, type) fields, in the schema's order.

    Families become one entry each with their member count; entries with no column are left out;
    columns the schema does not describe are added as they are, so the page never hides one.
    """
    members: dict[int, list[tuple[str, str]]] = {}
    extra: list[Column] = []
    for name, kind in fields:
        entry = owner(schema, name)
        if entry is None:
            extra.append(Column(name, kind, "not described by the asset's column schema"))
        else:
            members.setdefault(id(entry), []).append((name, kind))
    summary = []
    for entry in schema:
        found = members.get(id(entry))
        if not found:
            continue
        kinds = sorted({kind for _, kind in found})
        kind = kinds[0] if len(kinds) == 1 else " | ".join(kinds)
        if entry.is_family:
            names = [name for name, _ in found]
            shown = ", ".join(names) if len(names) <= LISTED_MEMBERS else f"{names[0]} .. {names[-1]}"
            summary.append(replace(entry, type=kind, description=f"{entry.description} "
                                                                  f"({len(names)} columns: {shown})"))
        else:
            summary.append(replace(entry, type=kind))
    return summary + extra


def dagster_schema(schema: Sequence[Column]):
    """The schema as Dagster's `TableSchema` (for the `dagster/column_schema` metadata key)."""
    import dagster as dg  # only the wiring calls this; the plain modules import the constants alone

    return dg.TableSchema(columns=[dg.TableColumn(name=entry.name, type=entry.type, description=entry.description)
                                   for entry in schema])


def table_fields(table) -> list[tuple[str, str]]:
    """(name, type) of each column of a pyarrow table or schema, for `summarise`."""
    schema = getattr(table, "schema", table)
    return [(field.name, str(field.type)) for field in schema]


def column_schema_metadata(schema: Sequence[Column], table=None) -> dict:
    """`dagster/column_schema` metadata: the declared schema, or with `table` the one that table has."""
    return {"dagster/column_schema": dagster_schema(summarise(schema, table_fields(table)) if table is not None
                                                    else schema)}
