"""The partition sets: one partition per patient, and one per CT scan (a patient's timepoints)."""

import dagster as dg

from gcmlm_assets.catalogue import Asset

patients_partitions = dg.DynamicPartitionsDefinition(name="patients")
# The radiology assets' partitions: one per scan, keyed as gcmlm_assets/scans.py says (the patient id
# for a drop's only scan, `<patient>@<timepoint>` for a timepoint folder of ct/).
ct_scans_partitions = dg.DynamicPartitionsDefinition(name="ct_scans")


def partitions_of(asset: Asset) -> dg.DynamicPartitionsDefinition | None:
    """The partition set the catalogue entry's asset uses (None: not partitioned)."""
    if asset.per_scan:
        return ct_scans_partitions
    return patients_partitions if asset.per_patient else None
