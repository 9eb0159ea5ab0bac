"""Reproducible bytes for a skops file (plain Python, no Dagster).

skops names each array member and `__id__` field after the Python object's `id()` (a memory address)
and stamps each zip entry with the time of writing, so saving the same model twice gives different
bytes. risk_model names its published version by its files' hashes, and risk_scores fingerprints
the model's sha256: with such bytes an unchanged retraining (a re-run after a killed one, or the same
cohort from scratch) would publish a new version and re-score. Here the ids are renumbered in order
of first appearance in schema.json and every entry gets one fixed time; skops loads the result the
same way (ids only have to be unique within the file). Shared: the cohort's risk model and pathology's
tumour classifier are both skops files published as versions.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

SCHEMA = "schema.json"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can carry
_OBJECT_ID = re.compile(r'(?<="__id__": )\d+|(?<="file": ")\d+(?=\.npy")')


def normalise_skops_file(path: str | Path) -> None:
    """Rewrite the skops file at `path` in place with renumbered ids and fixed entry times."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    schema = next((data for info, data in entries if info.filename == SCHEMA), None)
    if schema is None:
        raise ValueError(f"{path}: no {SCHEMA}; not a skops file")
    numbers: dict[str, str] = {}
    text = _OBJECT_ID.sub(lambda m: numbers.setdefault(m.group(), str(len(numbers) + 1)), schema.decode())
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            name = info.filename
            if name == SCHEMA:
                data = text.encode()
            elif name.endswith(".npy") and name[:-4] in numbers:
                name = numbers[name[:-4]] + ".npy"
            entry = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            entry.compress_type = info.compress_type
            entry.external_attr = info.external_attr
            archive.writestr(entry, data)
