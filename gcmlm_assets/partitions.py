"""The partition sets: one partition per patient, and one per CT scan (a patient's timepoints)."""

from collections.abc import Iterable

import dagster as dg

from gcmlm_assets.catalogue import CT_IMAGE, Asset
from gcmlm_assets.scans import SEPARATOR

patients_partitions = dg.DynamicPartitionsDefinition(name="patients")
# The radiology assets' partitions: one per scan, keyed as gcmlm_assets/scans.py says (the patient id
# for a drop's only scan, `<patient>@<timepoint>` for a timepoint folder of ct/).
ct_scans_partitions = dg.DynamicPartitionsDefinition(name="ct_scans")


def partitions_of(asset: Asset) -> dg.DynamicPartitionsDefinition | None:
    """The partition set the catalogue entry's asset uses (None: not partitioned)."""
    if asset.per_scan:
        return ct_scans_partitions
    return patients_partitions if asset.per_patient else None


# Set in Dagster's key-value store once the radiology partitions of an instance from before
# `ct_scans` were carried over (or there were none): `ensure_ct_scans` never does it again.
CT_SCANS_MIGRATED = "gcmlm/ct_scans/migrated"


def ensure_ct_scans(instance: dg.DagsterInstance) -> list[str]:
    """The `ct_scans` partition keys, in their order (the one query a caller makes anyway).

    On an instance from before `ct_scans` (the radiology assets were partitioned by patient) the set
    is empty while ct_image has materialized partitions: those become the scans (a patient id is its
    only scan's key), once, so a reader of the list does not see an empty cohort. Only an empty set
    costs more (a key-value read, and once the migration's queries)."""
    scans = list(instance.get_dynamic_partitions(ct_scans_partitions.name))
    return scans or migrate_ct_scans(instance)


def migrate_ct_scans(instance: dg.DagsterInstance) -> list[str]:
    """The one-off migration of `ensure_ct_scans`: adds what ct_image has materialized to an empty
    `ct_scans` and returns the keys added ([] when the set is not empty or it was done before)."""
    if instance.run_storage.get_cursor_values({CT_SCANS_MIGRATED}):
        return []
    if instance.get_dynamic_partitions(ct_scans_partitions.name):
        keys = []
    else:
        keys = scans_of_materialized(instance.get_materialized_partitions(dg.AssetKey(CT_IMAGE.key)))
        if keys:
            instance.add_dynamic_partitions(ct_scans_partitions.name, keys)
    instance.run_storage.set_cursor_values({CT_SCANS_MIGRATED: "1"})
    return keys


def scans_of_materialized(keys: Iterable[str]) -> list[str]:
    """The scan keys among ct_image's materialized partitions, sorted: a bare patient id is left out
    when the patient also has timepoint keys (its single scan moved into a timepoint folder since)."""
    keys = set(keys)
    with_timepoints = {key.partition(SEPARATOR)[0] for key in keys if SEPARATOR in key}
    return sorted(key for key in keys if SEPARATOR in key or key not in with_timepoints)
