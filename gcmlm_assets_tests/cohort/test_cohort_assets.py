"""The cohort assets and checks through a real Dagster instance, and their hourly automation."""

import datetime
import dagster as dg
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets_tests.cohort.synthetic import write_cohort_files

FAST_MODEL = RiskModelSettings(n_splits=4, n_repeats=2, n_bootstrap=200)


def materialize_cohort(instance, resources, selection=None):
    return dg.materialize([*cohort_assets.ASSETS, *cohort_checks.CHECKS], instance=instance,
                          resources={**resources, "risk_model": FAST_MODEL}, raise_on_error=False,
                          selection=selection)


def check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def data_versions(result) -> dict[str, str]:
    return {e.asset_key.to_user_string(): e.materialization.tags.get("dagster/data_version")
            for e in result.get_asset_materialization_events()}


def test_small_cohort_through_dagster(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 24, seed=21, without_radiology={"P004"},
                                without_pathology={"P009", "P013"}, unknown_labels={"P002"})
    instance.add_dynamic_partitions(patients_partitions.name, ids)

    result = materialize_cohort(instance, base_resources)

    assert result.success
    materialized = {e.asset_key.to_user_string(): e.materialization.metadata
                    for e in result.get_asset_materialization_events()}
    assert set(materialized) == {"clinical_table", "fused_table", "risk_model", "risk_scores"}
    checks = check_results(result)
    assert set(checks) == {spec.name for d in cohort_checks.CHECKS for spec in d.check_specs}
    failed = {name: e.description for name, e in checks.items() if not e.passed}
    assert failed == {}, failed

    fused = materialized["fused_table"]
    assert fused["patients"].value == 24 and fused["with_both"].value == 21
    assert fused["label_balance"].value["unknown"] == 1
    assert "| patient_id | has_radiology |" in fused["preview"].value
    model = materialized["risk_model"]
    assert "fused (all patients)" in model["ablation"].value
    assert model["plot_roc"].value.startswith("![roc](data:image/png;base64,")
    card = model["model_card"].value
    assert card["data_versions"]["fused_table_sha256"] == model["fused_table_sha256"].value
    assert card["settings"]["n_repeats"] == 2 and "mean of the logits" in card["strategy"]
    assert 0 < model["fused_auc"].value <= 1

    artifacts = data_root / "artifacts"
    scores = {r["patient_id"]: r for r in pq.read_table(artifacts / "risk_scores/scores.parquet").to_pylist()}
    assert sorted(scores) == ids
    assert scores["P004"]["modalities_used"] == "pathology"
    assert scores["P009"]["modalities_used"] == "radiology"
    assert scores["P002"]["mlm"] is None and 0 <= scores["P002"]["probability"] <= 1
    for name in ("model.skops", "model_card.json", "metrics.json", "roc.png", "calibration.png",
                 "decision_curve.png", "cv_predictions.parquet"):
        assert (artifacts / "risk_model" / name).is_file(), name

    # Unchanged inputs and settings: the same outputs, byte for byte, without retraining.
    again = materialize_cohort(instance, base_resources)
    assert again.success and data_versions(again) == data_versions(result)


def test_bad_clinical_rows_fail_the_check_and_are_named(data_root, instance, base_resources):
    ids, labels = write_cohort_files(data_root, 12, seed=3)
    csv = data_root / "landing" / "clinical.csv"
    csv.write_text(csv.read_text() + "P 99,1,50,3\nP100,maybe,60,2\nP101,0,sixty,1\n")

    result = materialize_cohort(instance, base_resources, selection=["clinical_table"])

    assert result.success  # the good rows still make a table
    check = check_results(result)["clinical_rows_valid"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    for line, reason in ((14, "whitespace"), (15, "mlm must be 0, 1 or empty"), (16, "not a number")):
        assert f"line {line}" in check.description and reason in check.description
    assert check.metadata["bad_lines"].value == [14, 15, 16]
    table = pq.read_table(data_root / "artifacts/clinical_table/clinical.parquet")
    assert table.num_rows == 12


def test_too_few_labels_block_the_model(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 12, seed=4, unknown_labels={f"P{i:03d}" for i in range(8)})
    instance.add_dynamic_partitions(patients_partitions.name, ids)

    result = materialize_cohort(instance, base_resources)

    check = check_results(result)["enough_labelled_patients"]
    assert not check.passed and "too few labelled patients" in check.description
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"clinical_table", "fused_table"}  # the blocking check stopped risk_model


def test_missing_clinical_csv_names_the_file(data_root, instance, base_resources):
    result = materialize_cohort(instance, base_resources, selection=["clinical_table"])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "clinical.csv: clinical table not found" in str(failure.event_specific_data.error)


def test_cohort_refreshes_once_per_cron_tick(instance, base_resources):
    """Nothing before the first tick, all four assets on the tick, nothing again until the next."""
    upstream = [dg.AssetSpec(name, partitions_def=patients_partitions, group_name="stand_in")
                for name in ("radiomics_row", "slide_vector")]
    defs = dg.Definitions(assets=[*upstream, *cohort_assets.ASSETS], sensors=cohort_assets.SENSORS,
                          resources={**base_resources, "risk_model": FAST_MODEL})
    (sensor,) = cohort_assets.SENSORS
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    cohort = {dg.AssetKey(n) for n in ("clinical_table", "fused_table", "risk_model", "risk_scores")}
    assert sensor.asset_selection.resolve(defs.resolve_asset_graph()) == cohort

    start = datetime.datetime(2026, 1, 5, 10, 20, tzinfo=datetime.timezone.utc)
    cursor = None
    requested = []
    for minutes in (0, 20, 41, 42, 70, 101):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                                   evaluation_time=start + datetime.timedelta(minutes=minutes))
        cursor = result.cursor
        requested.append({key.to_user_string() for key in cohort if result.get_num_requested(key)})
    everything = {key.to_user_string() for key in cohort}
    # 10:20, 10:40: no tick passed; 11:01: the 11:00 tick; 11:02: handled; 11:30: no tick; 12:01: next tick
    assert requested == [set(), set(), everything, set(), set(), everything]


@pytest.mark.parametrize("name", ["clinical_table", "fused_table", "risk_model", "risk_scores"])
def test_every_cohort_asset_has_the_refresh_condition(name):
    spec = next(a for a in cohort_assets.ASSETS if a.key.to_user_string() == name)
    condition = spec.automation_conditions_by_key[spec.key]
    assert condition.get_label().startswith("cohort refresh at each tick of '0 * * * *'")
