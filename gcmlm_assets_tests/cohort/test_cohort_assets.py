"""The cohort assets and checks through a real Dagster instance."""

import pathlib

import dagster as dg
import numpy as np
import pyarrow.parquet as pq

from gcmlm_assets import columns
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort.columns import CLINICAL_TABLE_COLUMNS, FUSED_TABLE_COLUMNS, RISK_SCORES_COLUMNS
from gcmlm_assets.storage import read_version_pointer
from gcmlm_assets_tests.support.cohort.synthetic import write_clinical_csv, write_cohort_files
from gcmlm_assets_tests.support.cohort.runs import FAST_MODEL, check_results, materialize_cohort
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results
from gcmlm_assets_tests.support.pictures import assert_ui_picture, decode_markdown


def data_versions(result) -> dict[str, str]:
    return {e.asset_key.to_user_string(): e.materialization.tags.get("dagster/data_version")
            for e in result.get_asset_materialization_events()}


def test_small_cohort_through_dagster(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 24, seed=21, without_radiology={"P004"},
                                without_pathology={"P009", "P013"}, unknown_labels={"P002"})
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)

    result = materialize_cohort(instance, base_resources)

    assert result.success
    materialized = {e.asset_key.to_user_string(): e.materialization.metadata
                    for e in result.get_asset_materialization_events()}
    assert set(materialized) == {"clinical_table", "fused_table", "risk_model", "risk_scores"}
    checks = check_results(result)
    declared = [*cohort_checks.CHECKS, *cohort_assets.ASSETS]  # stand-alone and in-step (risk_model, risk_scores)
    assert set(checks) == {spec.name for d in declared for spec in d.check_specs}
    failed = {name: e.description for name, e in checks.items() if not e.passed}
    assert failed == {}, failed
    for name, evaluation in checks.items():
        assert evaluation.metadata["expected"].value and evaluation.metadata["found"].value, name
    assert checks["fused_ids_unique"].metadata["found"].value == "24 rows, 24 patients"

    fused = materialized["fused_table"]
    assert fused["patients"].value == 24 and fused["with_both"].value == 21
    assert fused["label_balance"].value["unknown"] == 1
    assert fused["excluded_patients"].value == {} and fused["excluded_results"].value == 0
    assert "| patient_id | has_radiology |" in fused["preview"].value
    model = materialized["risk_model"]
    for row in ("| radiology |", "| pathology mean |", "| fused, mean logit (the model) |", "| fused, stacked |"):
        assert row in model["ablation"].value, row
    assert model["plot_roc"].value.startswith("![roc](data:image/png;base64,")  # few lines: a sharp PNG
    card = model["model_card_json"].value
    assert card["data_versions"]["training_data_sha256"] == model["training_data_sha256"].value
    assert card["data"]["training_data"]["patients"] == model["labelled_patients"].value == 23  # P002: no label
    assert card["settings"]["n_repeats"] == 2 and "mean of the logits" in card["strategy"]
    card_markdown = model["model_card"].value
    assert "Calibration" in card_markdown and "P004" not in card_markdown.split("Participants")[0]
    assert card_markdown == (pathlib.Path(model["path"].value).parent / "model_card.md").read_text(encoding="utf-8")
    assert 0 < model["fused_auc"].value <= 1
    assert model["status"].value == "trained"

    artifacts = data_root / "artifacts"
    pointer = read_version_pointer(artifacts / "risk_model")
    version_dir = artifacts / "risk_model" / pointer["version"]
    assert model["version"].value == pointer["version"]
    assert model["path"].value == str(version_dir / "model.skops")
    assert materialized["risk_scores"]["risk_model_version"].value == pointer["version"]
    scores = {r["patient_id"]: r for r in pq.read_table(artifacts / "risk_scores/scores.parquet").to_pylist()}
    assert sorted(scores) == ids
    assert scores["P004"]["modalities_used"] == "pathology"
    assert scores["P009"]["modalities_used"] == "radiology"
    assert scores["P004"]["modalities_missing"] == "radiology" and scores["P009"]["modalities_missing"] == "pathology"
    assert {r["modalities_missing"] for p, r in scores.items() if p not in ("P004", "P009", "P013")} == {""}
    assert materialized["risk_scores"]["scored_without"].value == {"pathology": 2, "radiology": 1}
    assert scores["P002"]["mlm"] is None and 0 <= scores["P002"]["probability"] <= 1
    assert {r["model_version"] for r in scores.values()} == {pointer["version"]}  # each score names its model
    assert len({r["explanation_key"] for r in scores.values()}) == len(ids)
    names = {"model.skops", "model_card.json", "model_card.md", "metrics.json", "roc.png", "calibration.png",
             "decision_curve.png", "cv_predictions.parquet"}
    assert set(pointer["files"]) == names
    assert {p.name for p in version_dir.iterdir()} == names
    assert {p.name for p in (artifacts / "risk_model").iterdir()} == {"current.json", pointer["version"]}
    for kind in ("roc", "calibration", "decision_curve"):
        assert model[f"plot_{kind}_path"].value == str(version_dir / f"{kind}.png")
        assert_ui_picture(model[f"plot_{kind}"].value, model[f"plot_{kind}_path"].value)
    risk = materialized["risk_scores"]
    assert risk["picture_path"].value == str(artifacts / "risk_scores" / "score_distribution.png")
    shown = assert_ui_picture(risk["picture"].value, risk["picture_path"].value)
    assert decode_markdown(risk["picture"].value)[0] == "risk score distribution"
    # The threshold is the dashed line at its place on the 0-1 axis between the left and right spines.
    dark = np.asarray(shown.convert("L")) < 80
    runs = (np.diff(dark.astype(int), axis=0) == 1).sum(axis=0)
    spines = np.flatnonzero((dark.sum(axis=0) > shown.height * 0.5) & (runs <= 2))
    left, right = spines.min(), spines.max()
    dashed = left + 3 + np.flatnonzero(runs[left + 3:right - 2] >= 15)
    assert dashed.size, "no dashed threshold line"
    assert abs(dashed.mean() - (left + risk["risk_threshold"].value * (right - left))) < 4

    # The column schemas on the asset pages describe the real tables; each run's names what it holds.
    for asset, schema, path in (("clinical_table", CLINICAL_TABLE_COLUMNS, "clinical_table/clinical.parquet"),
                                ("fused_table", FUSED_TABLE_COLUMNS, "fused_table/fused.parquet"),
                                ("risk_scores", RISK_SCORES_COLUMNS, "risk_scores/scores.parquet")):
        table = pq.read_table(artifacts / path)
        assert columns.problems(schema, columns.table_fields(table)) == [], asset
        shown = materialized[asset]["dagster/column_schema"].value.columns
        assert [c.name for c in shown] == [c.name for c in columns.summarise(schema, columns.table_fields(table))]
    [covariates] = [c for c in materialized["clinical_table"]["dagster/column_schema"].value.columns if c.name == "*"]
    assert covariates.description.endswith("(2 columns: age, ca199)")
    fused_schema = {c.name: c for c in materialized["fused_table"]["dagster/column_schema"].value.columns}
    assert {"clin_*", "rad_*", "path_n_patches", "path_feat_*"} <= set(fused_schema)
    assert "columns" in fused_schema["rad_*"].description
    scores_schema = [c.name for c in materialized["risk_scores"]["dagster/column_schema"].value.columns]
    assert scores_schema == ["patient_id", "probability", "risk_group", "modalities_used", "modalities_missing",
                             "probability_radiology",
                             "probability_pathology", "mlm", "model_version", "explanation_key"]

    # Unchanged inputs and settings: the same outputs, byte for byte, without retraining.
    again = materialize_cohort(instance, base_resources)
    assert again.success and data_versions(again) == data_versions(result)
    # the preview: the first scores are all new, said, and a reused materialization shows the same
    assert risk["newly_scored"].value == len(ids) and risk["score_changed"].value == 0
    assert risk["preview"].value.startswith(f"First scores: all {len(ids)} patients are newly scored.")
    reused = again.asset_materializations_for_node("risk_scores")[0].metadata
    assert reused["preview"].value == risk["preview"].value
    assert read_version_pointer(artifacts / "risk_model") == pointer


def test_bad_clinical_rows_fail_the_check_and_are_named(data_root, instance, base_resources):
    ids, labels = write_cohort_files(data_root, 12, seed=3)
    csv = data_root / "landing" / "clinical.csv"
    csv.write_text(csv.read_text(encoding="utf-8") + "P 99,1,50,3\nP100,maybe,60,2\nP101,0,sixty,1\n")

    result = materialize_cohort(instance, base_resources, selection=["clinical_table"])

    assert result.success  # the good rows still make a table
    check = check_results(result)["clinical_rows_valid"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    for line, reason in ((14, "whitespace"), (15, "mlm must be 0, 1 or empty"), (16, "not a number")):
        assert f"line {line}" in check.description and reason in check.description
    assert check.metadata["bad_lines"].value == [14, 15, 16]
    assert check.metadata["expected"].value == "every row of clinical.csv valid"
    found = check.metadata["found"].value
    assert found.startswith("3 bad row(s): line 14: invalid patient id ") and "line 16 (patient 'P101'): " in found
    assert check.metadata["bad_rows"].value == 3
    table = pq.read_table(data_root / "artifacts/clinical_table/clinical.parquet")
    assert table.num_rows == 12


def observations(result, asset: str) -> list[dict]:
    return [{k: getattr(v, "value", v) for k, v in e.event_specific_data.asset_observation.metadata.items()}
            for e in result.all_events if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
            and e.asset_key.to_user_string() == asset]


def test_too_few_labels_and_no_model_yet_waits_without_failing(data_root, instance, base_resources):
    ids, labels = write_cohort_files(data_root, 12, seed=4, unknown_labels={f"P{i:03d}" for i in range(8)})
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)

    result = materialize_cohort(instance, base_resources)

    assert result.success  # waiting is not a failure
    assert not [e for e in result.all_events if e.is_step_failure]
    check = check_results(result)["enough_labelled_patients"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "too few labelled patients" in check.description
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"clinical_table", "fused_table"}
    skipped = {e.step_key for e in result.all_events if e.is_step_skipped}
    assert "risk_scores" in skipped
    no_model = check_results(result)["cv_auc_reported"]  # nothing to report yet: a warning, not blocking
    assert not no_model.passed and no_model.severity == dg.AssetCheckSeverity.WARN
    assert "No model in use" in no_model.description
    (waiting,) = observations(result, "risk_model")
    labelled = [int(v) for p, v in zip(ids, labels) if p >= "P008"]
    assert waiting["status"] == "waiting for labelled patients"
    assert waiting["present_per_class"] == {"positive": sum(labelled), "negative": len(labelled) - sum(labelled)}
    assert waiting["needed_per_class"] == FAST_MODEL.min_labelled_per_class
    assert waiting["model_in_use"] == "none"
    fused = next(e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "fused_table")
    assert waiting["fused_table_sha256"] == fused.materialization.tags["dagster/data_version"]
    assert not (data_root / "artifacts" / "risk_model" / "current.json").exists()


def test_too_few_labels_keep_the_last_good_model_in_use(data_root, instance, base_resources):
    ids, labels = write_cohort_files(data_root, 20, seed=21)
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)
    first = materialize_cohort(instance, base_resources)
    assert first.success
    root = data_root / "artifacts" / "risk_model"
    pointer = read_version_pointer(root)

    # Most labels are withdrawn (e.g. under review): the fused table changes, training must wait.
    write_clinical_csv(data_root / "landing", ids, labels, unknown=set(ids[:16]))
    second = materialize_cohort(instance, base_resources)

    assert second.success
    before, after = data_versions(first), data_versions(second)
    assert after["fused_table"] != before["fused_table"]
    assert after["risk_model"] == before["risk_model"]  # the same model, stated again
    assert read_version_pointer(root) == pointer
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in second.get_asset_materialization_events()}
    model = meta["risk_model"]
    assert model["status"].value.startswith("kept previous model, waiting for labelled patients")
    assert model["version"].value == pointer["version"] and model["needed_per_class"].value == 5
    assert model["waiting_on_fused_table_sha256"].value == after["fused_table"]
    assert check_results(second)["cv_auc_reported"].passed  # the model in use stays green
    (waiting,) = observations(second, "risk_model")
    assert waiting["model_in_use"] == pointer["version"]
    # risk_scores, in the same run, scores every patient of the new table with the kept model
    scores = meta["risk_scores"]
    assert scores["risk_model_version"].value == pointer["version"]
    assert scores["fused_table_sha256"].value == after["fused_table"] and scores["scored"].value == 20
    table = pq.read_table(data_root / "artifacts" / "risk_scores" / "scores.parquet").to_pylist()
    assert sum(1 for row in table if row["mlm"] is None) == 16
    assert check_results(second)["scores_valid"].passed


def test_missing_clinical_csv_names_the_file(data_root, instance, base_resources):
    result = materialize_cohort(instance, base_resources, selection=["clinical_table"])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "clinical.csv: clinical table not found" in str(failure.event_specific_data.error)
