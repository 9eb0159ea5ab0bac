"""A per-patient asset with a blocking check, as the project's per-patient assets are built
(`per_patient_events`): its config makes named patients fail or be skipped. Loaded as a code
location by tests that ask Dagster's GraphQL what the UI shows for a check."""

import dagster as dg

from gcmlm_assets.batching import per_patient_events
from gcmlm_assets.catalogue import RADIOLOGY, Asset

PATIENTS = dg.DynamicPartitionsDefinition(name="patients")
SCAN = Asset("scan", RADIOLOGY, per_patient=True, code_version="1")
SCAN_CHECKS = [dg.AssetCheckSpec("scan_plausible", asset=SCAN.key, blocking=True)]


class ScanConfig(dg.Config):
    failing: list[str] = []
    skipped: list[str] = []


@dg.multi_asset(specs=[dg.AssetSpec(SCAN.key, skippable=True)], partitions_def=PATIENTS, check_specs=SCAN_CHECKS,
                can_subset=True, backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=10))
def scan(context: dg.AssetExecutionContext, config: ScanConfig):
    def one(patient_id: str):
        if patient_id in config.failing:
            raise dg.Failure(description=f"patient {patient_id}: the scan is unreadable", allow_retries=False)
        if patient_id in config.skipped:
            return []
        return [dg.MaterializeResult(check_results=[
            dg.AssetCheckResult(check_name="scan_plausible", passed=True, description="plausible")])]

    yield from per_patient_events(context, SCAN, one, SCAN_CHECKS)


defs = dg.Definitions(assets=[scan])
