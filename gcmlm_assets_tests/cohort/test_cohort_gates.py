"""Cohort QC gates publication: a risk_model or risk_scores that fails its blocking check is
quarantined before it is published, and what readers see stays the previous, passing version."""

import json
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort.model import metrics as cohort_metrics
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.catalogue import UNI_FEATURES
from gcmlm_assets.quarantine import QUARANTINE_FOLDER, REASON_FILE
from gcmlm_assets.storage import read_version_pointer, sha256_file
from gcmlm_assets_tests.support.cohort.explained_cohort import QUICK, sound_cohort
from gcmlm_assets_tests.support.cohort.runs import FAST_MODEL, check_results, materialize_cohort
from gcmlm_assets_tests.support.cohort.synthetic import write_cohort_files
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results


def _first_cohort(data_root: Path, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 20, seed=21)
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)
    first = materialize_cohort(instance, base_resources)
    assert first.success
    return first


def _quarantined(data_root: Path, asset: str) -> list[Path]:
    return sorted((data_root / "artifacts" / QUARANTINE_FOLDER / asset).glob("*/"))


def test_a_model_without_a_cv_auc_never_becomes_current(data_root, instance, base_resources, monkeypatch):
    _first_cohort(data_root, instance, base_resources)
    root = data_root / "artifacts" / "risk_model"
    before = read_version_pointer(root)

    # The fault the check guards against: the cross-validation reports no AUC for the fused model.
    evaluate = cohort_metrics.evaluate_cross_validation

    def without_fused_auc(cv, settings):
        metrics, curves = evaluate(cv, settings)
        metrics["fused"] = {"patients": metrics["fused"]["patients"], "note": "no AUC (injected)"}
        return metrics, curves

    monkeypatch.setattr(cohort_metrics, "evaluate_cross_validation", without_fused_auc)
    reseeded = RiskModelSettings(**{**FAST_MODEL.model_dump(), "seed": 1})
    retrained = dg.materialize([*cohort_assets.ASSETS], instance=instance, raise_on_error=False,
                               resources={**base_resources, "risk_model": reseeded})

    assert not retrained.success
    check = check_results(retrained)["cv_auc_reported"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "no cross-validated AUC (no AUC (injected))" in check.description
    assert check.metadata["model_in_use"].value == before["version"]
    materialized = {e.asset_key.to_user_string() for e in retrained.get_asset_materialization_events()}
    assert "risk_model" not in materialized and "risk_scores" not in materialized
    assert read_version_pointer(root) == before  # the previous model stays current
    (moved,) = _quarantined(data_root, "risk_model")
    assert Path(check.metadata["quarantined_to"].value) == moved and (moved / "model.skops").is_file()
    assert json.loads((moved / REASON_FILE).read_text(encoding="utf-8"))["failed_checks"] == ["cv_auc_reported"]

    # risk_scores, run on its own, scores with the model still current
    monkeypatch.undo()
    rescored = dg.materialize([*cohort_assets.ASSETS], instance=instance, selection=["risk_scores"],
                              resources={**base_resources, "risk_model": FAST_MODEL})
    scores = rescored.asset_materializations_for_node("risk_scores")[0].metadata
    assert scores["risk_model_version"].value == before["version"]


def test_scores_that_fail_scores_valid_are_not_where_the_explanations_read(data_root, instance, base_resources):
    first = _first_cohort(data_root, instance, base_resources)
    scores_path = data_root / "artifacts" / "risk_scores" / "scores.parquet"
    published = sha256_file(scores_path)
    latest = instance.get_latest_materialization_event(dg.AssetKey("risk_scores"))

    # A fused table that lists one patient twice (a fault fused_ids_unique would catch upstream;
    # here risk_scores runs on its own): that patient is scored twice.
    fused_path = data_root / "artifacts" / "fused_table" / "fused.parquet"
    fused = pq.read_table(fused_path)
    pq.write_table(pa.concat_tables([fused, fused.slice(0, 1)]), fused_path)
    rescored = dg.materialize([*cohort_assets.ASSETS], instance=instance, selection=["risk_scores"],
                              resources={**base_resources, "risk_model": FAST_MODEL}, raise_on_error=False)

    assert not rescored.success
    check = check_results(rescored)["scores_valid"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "scored twice" in check.description
    assert not rescored.get_asset_materialization_events()
    # what the explanations' sensor and the demo's watcher read: the latest materialization's
    # scores file, still the previous, valid one
    assert instance.get_latest_materialization_event(dg.AssetKey("risk_scores")).run_id == latest.run_id
    assert first.run_id == latest.run_id and sha256_file(scores_path) == published
    (moved,) = _quarantined(data_root, "risk_scores")
    assert Path(check.metadata["quarantined_to"].value) == moved
    assert pq.read_table(moved / "scores.parquet").num_rows == fused.num_rows + 1
    assert json.loads((moved / REASON_FILE).read_text(encoding="utf-8"))["failed_checks"] == ["scores_valid"]


def test_a_patient_whose_patch_features_cannot_be_read_is_left_out_with_the_reason(data_root, instance,
                                                                                    base_resources):
    # An ABMIL model reads every pathology patient's patch features. One patient's file is damaged:
    # neither trained on nor scored as if it had no slides, but left out, the reason in the metadata.
    ids, store = sound_cohort(data_root, instance, 24, seed=4)
    damaged = store.path(UNI_FEATURES.key, "P005", "P005_slide1.h5")
    damaged.write_bytes(b"not an HDF5 file")
    settings = RiskModelSettings(**QUICK, pathology_pooling="abmil", abmil_max_epochs=4, abmil_in_ablation=False)

    result = dg.materialize(cohort_assets.ASSETS, instance=instance,
                            resources={**base_resources, "risk_model": settings})

    assert result.success
    for asset in ("risk_model", "risk_scores"):
        meta = result.asset_materializations_for_node(asset)[0].metadata
        assert meta["excluded_patients_count"].value == 1, asset
        (reason,) = meta["excluded_patients"].value.values()
        assert list(meta["excluded_patients"].value) == ["P005"]
        assert reason.startswith("uni_features unreadable for the ABMIL block") and str(damaged) in reason
    scores = pq.read_table(store.path("risk_scores", None, "scores.parquet")).column("patient_id").to_pylist()
    assert "P005" not in scores and len(scores) == len(ids) - 1
    assert check_results(result)["scores_valid"].passed  # left out with a reason, not missing
    pointer = read_version_pointer(store.root / "risk_model")
    assert list(pointer["excluded_patients"]) == ["P005"]
