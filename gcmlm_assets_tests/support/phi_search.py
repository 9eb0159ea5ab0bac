"""Distinctive identifying values to put into test inputs, and the search for them in what the
platform writes: artifact files (raw bytes, gzip-decompressed, parquet contents and schema metadata;
a PNG's text chunks are plain bytes, its pixels hold no searchable text), metadata and the event log."""

from __future__ import annotations

import gzip
from pathlib import Path

# DICOM keyword -> value, each one distinctive (no real patient carries them).
PATIENT_KEYWORDS = {
    "PatientName": "ZZSECRETNAME^ZZGIVEN",
    "PatientID": "ZZSECRETID123",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ZZACC98765",
    "InstitutionName": "ZZSECRET HOSPITAL",
}
# What is searched for: each value, and the forms a reader might render it in.
NEEDLES = [b"ZZSECRETNAME", b"ZZGIVEN", b"ZZSECRETID123", b"19010203", b"1901-02-03", b"ZZACC98765",
           b"ZZSECRET HOSPITAL", b"ZZSECRET^HOSPITAL"]


def found_in(data: bytes) -> list[str]:
    upper = data.upper()
    return [needle.decode() for needle in NEEDLES if needle in upper]


def readable_forms(path: Path) -> list[bytes]:
    data = path.read_bytes()
    forms = [data]
    if path.name.endswith(".gz"):
        forms.append(gzip.decompress(data))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        forms.append(repr(table.to_pylist()).encode())
        forms.append(repr(table.schema.metadata).encode())
    return forms


def leaks_under(root: Path) -> dict[str, list[str]]:
    """Relative path -> the needles found in that file (also in its name), for every file under `root`."""
    leaks = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        hits = {hit for form in readable_forms(path) for hit in found_in(form)}
        hits |= set(found_in(str(path.relative_to(root)).encode()))
        if hits:
            leaks[str(path.relative_to(root))] = sorted(hits)
    return leaks


def leaks_in_run(instance, result) -> list[str]:
    """Needles in the run's materialization and check metadata, its event log and the run record."""
    from dagster._serdes import serialize_value

    texts = [serialize_value(e.step_materialization_data.materialization.metadata)
             for e in result.get_asset_materialization_events()]
    texts += [serialize_value(e.metadata) for e in result.get_asset_check_evaluations()]
    texts += [serialize_value(entry) for entry in instance.all_logs(result.run_id)]
    texts.append(serialize_value(instance.get_run_by_id(result.run_id)))
    return sorted({hit for text in texts for hit in found_in(text.encode())})
