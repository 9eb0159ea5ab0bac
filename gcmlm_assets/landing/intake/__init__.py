"""DICOM intake from a PACS: a C-STORE receiver that fills the landing zone (no Dagster).

`deidentify` (the confidentiality profile), `pseudonyms` (the table of real id -> pseudonym, kept
outside the landing zone and artifacts), `staging` (instances per association, moved into a drop and
committed with `READY` after a quiet time), `receiver` (the pynetdicom service) and `__main__`
(`python -m gcmlm_assets.landing.intake`, `make receive`). Nothing here is imported by the definitions.
"""
