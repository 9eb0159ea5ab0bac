"""LoadOnce: a step's model is loaded once per key, and a load that failed is not tried again for
every patient of the run. store_checks_per_patient: a single-patient step's checks are stored under
the patient and still block."""


import dagster as dg
import pytest

from gcmlm_assets.batching import LoadOnce, StepFailure, store_checks_per_patient


class UnusableModel(ValueError):
    pass


def test_a_model_loads_once_per_key_and_a_failed_load_is_not_repeated():
    calls: list[str] = []

    def load(folder: str) -> str:
        calls.append(folder)
        if folder == "tampered":
            raise UnusableModel(f"{folder}: checkpoint digest differs")
        return f"model of {folder}"

    model = LoadOnce(load, errors=(UnusableModel,))
    assert model.get("a") == model.get("a") == "model of a"
    for _ in range(3):  # three patients of one run asking for the same broken model
        with pytest.raises(StepFailure, match="tampered: checkpoint digest differs"):
            model.get("tampered")
    assert model.get("b") == "model of b"
    assert calls == ["a", "tampered", "b"] and model.loads == 2


# A per-patient asset with two blocking checks (a config can make one fail), and one downstream.
PATIENTS = dg.DynamicPartitionsDefinition(name="patients")


class RowConfig(dg.Config):
    finite: bool = True


@dg.asset(partitions_def=PATIENTS, check_specs=[dg.AssetCheckSpec("complete", asset="row", blocking=True),
                                                dg.AssetCheckSpec("finite", asset="row", blocking=True)])
@store_checks_per_patient
def row(context: dg.AssetExecutionContext, config: RowConfig) -> dg.MaterializeResult:
    return dg.MaterializeResult(check_results=[
        dg.AssetCheckResult(check_name="complete", passed=True),
        dg.AssetCheckResult(check_name="finite", passed=config.finite, description="2 NaN")])


@dg.asset(partitions_def=PATIENTS, deps=[row])
def table() -> None:
    pass


def test_a_single_patient_step_stores_its_checks_under_the_patient_and_still_blocks(instance):
    """Each check result is stored with the step's partition and the materialization it checked; a
    failed blocking check still fails the step and stops the downstream step of the same run, as
    an `AssetCheckResult` does."""
    instance.add_dynamic_partitions("patients", ["P1", "P2"])
    good = dg.materialize([row, table], instance=instance, partition_key="P1")
    bad = dg.materialize([row, table], instance=instance, partition_key="P2", raise_on_error=False,
                         run_config={"ops": {"row": {"config": {"finite": False}}}})

    assert good.success and not bad.success and bad.get_failed_step_keys() == {"row"}
    assert "blocking asset check" in str(bad.failure_data_for_node("row").error)
    assert not bad.asset_materializations_for_node("table")
    latest = instance.get_latest_storage_id_by_partition(row.key, dg.DagsterEventType.ASSET_MATERIALIZATION)
    for result, patient in ((good, "P1"), (bad, "P2")):
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert set(evaluations) == {"complete", "finite"}
        assert {(e.partition, e.target_materialization_data.storage_id) for e in evaluations.values()} == {
            (patient, latest[patient])}
    assert evaluations["finite"].description == "2 NaN" and evaluations["finite"].blocking
    logged = " ".join(entry.user_message for entry in instance.all_logs(good.run_id))
    assert "did not yield" not in logged and "emitted no result" not in logged
