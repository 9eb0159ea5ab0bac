"""What the UI shows for a per-patient check, asked through Dagster's own GraphQL on a real
instance: the check's latest execution names its patient, also when the patient's step failed
(Dagster's own plan for the run names no partition: "Partition —"); a skipped patient is not failed."""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster_graphql.test.utils import execute_dagster_graphql

from gcmlm_assets_tests.support import checked_patients as C

# The fields of the UI's asset check page (its AssetCheckTableFragment and AssetCheckDetailsQuery).
QUERY = """query($assetKey: AssetKeyInput!, $checkName: String!) {
  assetCheckExecutions(assetKey: $assetKey, checkName: $checkName, limit: 20) {
    status evaluation { partition description } }
  assetNodeOrError(assetKey: $assetKey) { ... on AssetNode { assetCheckOrError(checkName: $checkName) {
    ... on AssetCheck { executionForLatestMaterialization { status evaluation { partition description } } } } } }
}"""


def latest_shown(instance: dg.DagsterInstance) -> tuple[dict, list[dict]]:
    origin = LoadableTargetOrigin(module_name=C.__name__, attribute="defs")
    with in_process_test_workspace(instance, origin) as context:
        result = execute_dagster_graphql(context, QUERY, {"assetKey": {"path": [C.SCAN.key]},
                                                          "checkName": "scan_plausible"})
    assert not result.errors, result.errors
    check = result.data["assetNodeOrError"]["assetCheckOrError"]
    return check["executionForLatestMaterialization"], result.data["assetCheckExecutions"]


def run(instance, config: dict, **kwargs):
    return dg.materialize([C.scan], instance=instance, raise_on_error=False,
                          run_config={"ops": {"scan": {"config": config}}}, **kwargs)


def test_a_checks_latest_execution_names_its_patient_also_when_the_patient_failed(instance):
    instance.add_dynamic_partitions("patients", ["P1", "P2", "P3", "P4"])
    assert run(instance, {}, partition_key="P1").success
    latest, _ = latest_shown(instance)
    assert latest["status"] == "SUCCEEDED" and latest["evaluation"]["partition"] == "P1"

    assert not run(instance, {"failing": ["P2"]}, partition_key="P2").success  # one patient's run fails
    latest, _ = latest_shown(instance)
    assert latest["evaluation"]["partition"] == "P2"
    assert latest["evaluation"]["description"] == ("patient P2: not evaluated: scan failed for this patient: "
                                                   "the scan is unreadable")

    # a range of patients, one failing: each has its own row; the run's plan is the only one without
    ranged = run(instance, {"failing": ["P2"]}, tags={ASSET_PARTITION_RANGE_START_TAG: "P1",
                                                       ASSET_PARTITION_RANGE_END_TAG: "P4"})
    assert not ranged.success
    _, executions = latest_shown(instance)
    newest = {}
    for execution in executions:  # newest first
        partition = (execution["evaluation"] or {}).get("partition")
        newest.setdefault(partition, execution)
    assert {p: e["status"] for p, e in newest.items() if p} == {"P1": "SUCCEEDED", "P2": "FAILED",
                                                                "P3": "SUCCEEDED", "P4": "SUCCEEDED"}
    assert "not evaluated" in newest["P2"]["evaluation"]["description"]

    # a skipped patient is not failed: nothing is recorded for it but Dagster's plan
    before = len(executions)
    assert run(instance, {"skipped": ["P4"]}, partition_key="P4").success
    _, executions = latest_shown(instance)
    assert len(executions) == before + 1 and executions[0]["evaluation"] is None
