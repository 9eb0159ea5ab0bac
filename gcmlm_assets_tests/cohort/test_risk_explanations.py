"""risk_explanations through a real Dagster instance: the parts add up to the score, per patient.

Each patient's slide vector is pooled by the real MeanPooling from CLAM-layout feature files, as
slide_vector does, so the per-patch contributions can be checked against the model's own logit.
(test_explanation_runs.py: which patients the sensor explains, and runs over ranges of patients.)
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import explanation_assets
from gcmlm_assets.catalogue import RISK_EXPLANATIONS, SCORES_FILE
from gcmlm_assets.cohort.explanation_sensors import build_risk_explanations_sensor
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.demo.watch import unexplained
from gcmlm_assets.catalogue import UNI_FEATURES
from gcmlm_assets.storage import read_version_pointer
from gcmlm_assets_tests.support.cohort.explained_cohort import NO_RADIOLOGY, QUICK, sound_cohort
from gcmlm_assets_tests.support.pictures import PATIENT_LIMIT_BYTES, assert_ui_picture, decode_markdown


@pytest.fixture
def cohort(data_root: Path, instance):
    return sound_cohort(data_root, instance, 30, seed=4)


def materialize(instance, resources, settings: RiskModelSettings, patients: list[str]):
    cohort = dg.materialize(cohort_assets.ASSETS, instance=instance, resources={**resources, "risk_model": settings})
    assert cohort.success
    results = [dg.materialize([*cohort_assets.ASSETS, *explanation_assets.ASSETS], instance=instance,
                              resources={**resources, "risk_model": settings}, partition_key=patient_id,
                              selection=[RISK_EXPLANATIONS.key])
               for patient_id in patients]
    return [r.asset_materializations_for_node(RISK_EXPLANATIONS.key)[0].metadata for r in results]


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_every_part_adds_up_to_the_patients_score(cohort, instance, base_resources, data_root):
    ids, store = cohort
    settings = RiskModelSettings(n_splits=3, n_repeats=1, n_bootstrap=100, min_labelled_per_class=3,
                                 inner_splits=3, abmil_max_epochs=8)
    patients = ["P000", NO_RADIOLOGY]
    metadata = materialize(instance, base_resources, settings, patients)
    assert unexplained(instance) == set(ids) - set(patients)  # what the demo waits for
    scores = {r["patient_id"]: r for r in pq.read_table(store.root / "risk_scores/scores.parquet").to_pylist()}

    for patient_id, meta in zip(patients, metadata):
        root = store.asset_dir(RISK_EXPLANATIONS.key, patient_id, create=False)
        folder = root / read_version_pointer(root)["version"]
        explanation = json.loads((folder / "explanation.json").read_text(encoding="utf-8"))
        # how the blocks combine: the terms sum to the fused logit, which is the scored probability's
        terms = sum(row["contribution"] for row in explanation["combination"])
        assert terms == pytest.approx(explanation["fused_logit"], abs=1e-9)
        assert explanation["fused_logit"] == pytest.approx(logit(scores[patient_id]["probability"]), abs=1e-6)
        assert meta["probability"].value == pytest.approx(scores[patient_id]["probability"], abs=1e-12)
        blocks = {row["term"]: row for row in explanation["combination"] if row["block_logit"] is not None}

        # pathology: one exact part per patch, beside its coordinates
        patches = pq.read_table(folder / "patch_contributions.parquet").to_pylist()
        assert len(patches) == sum(s["n_patches"] for s in store.read_manifest(UNI_FEATURES.key, patient_id)["slides"])
        parts = np.array([p["contribution_pathology_logit"] for p in patches])
        pathology = blocks["pathology"]
        # relative to the training cohort's average patient: the parts plus that patient's logit
        assert parts.sum() + explanation["pathology_reference_logit"] == pytest.approx(pathology["block_logit"],
                                                                                        abs=1e-6)
        assert pathology["reference_logit"] == pytest.approx(explanation["pathology_reference_logit"], abs=1e-9)
        fused_parts = np.array([p["contribution_fused_logit"] for p in patches])
        assert fused_parts == pytest.approx(parts * pathology["weight"], abs=1e-12)
        assert all(p["attention"] is not None for p in patches)  # ABMIL fitted for its attention maps
        assert sum(p["attention"] for p in patches) == pytest.approx(1.0, abs=1e-6)
        assert abs(explanation["residuals"]["pathology"]) <= 1e-6

        # heatmaps: contribution and attention per slide, in the UI and at full resolution; the
        # first slide's contribution map is embedded, the others are named by their paths
        slides = sorted({p["slide"] for p in patches})
        embedded = [key for key in meta if key.startswith(("contribution_", "attention_"))
                    and not key.endswith("_path")]
        assert embedded == [f"contribution_{explanation['pictures'][0]['slide']}"]
        for slide in slides:
            for kind in ("contribution", "attention"):
                full = Path(meta[f"{kind}_{slide}_full_path"].value)
                assert full.is_file() and (folder / f"{kind}_{slide}.png").is_file()
                if f"{kind}_{slide}" in embedded:
                    assert_ui_picture(meta[f"{kind}_{slide}"].value, folder / f"{kind}_{slide}.png",
                                      PATIENT_LIMIT_BYTES)
                    alt, _, _ = decode_markdown(meta[f"{kind}_{slide}"].value)
                    assert kind in alt.lower()
                else:
                    assert Path(meta[f"{kind}_{slide}_path"].value) == folder / f"{kind}_{slide}.png"
        assert "| **fused logit** |" in meta["how_the_blocks_combine"].value
        # the reference, the probability and the threshold, stated on every explanation
        relative = sum(row["relative"] for row in explanation["combination"])
        assert relative + explanation["reference_fused_logit"] == pytest.approx(explanation["fused_logit"], abs=1e-9)
        assert meta["risk_threshold"].value == pytest.approx(explanation["risk_threshold"])
        assert meta["reference_probability"].value == pytest.approx(explanation["reference_probability"])
        assert "average patient" in meta["reference"].value
        reading = meta["reading"].value
        assert f"probability {explanation['probability']:.3f}" in reading
        assert f"decision threshold {explanation['risk_threshold']:.3f}" in reading
        assert f"probability {explanation['reference_probability']:.3f}" in reading
        for picture in explanation["pictures"]:
            assert f"decision threshold {explanation['risk_threshold']:.3f}" in picture["title"]

        if patient_id == NO_RADIOLOGY:
            assert "radiology_top_features" not in meta
            assert "radiology" not in blocks
            # said where one reads: the scores table, the explanation's metadata and its markdown
            assert scores[patient_id]["modalities_missing"] == "radiology"
            assert "**Scored WITHOUT radiology**: no usable radiomics_row" in meta["modalities_missing"].value
            assert reading.startswith("**Scored WITHOUT radiology.**")
            assert meta["how_the_blocks_combine"].value.startswith("**Scored WITHOUT radiology**")
            assert all("scored WITHOUT radiology" in picture["title"] for picture in explanation["pictures"])
            assert explanation["modalities_missing"] == {"radiology": meta["modalities_missing"].value.split(": ", 1)[1]}
        else:
            assert scores[patient_id]["modalities_missing"] == ""
            assert meta["modalities_missing"].value == "none: scored with every modality of the model"
            assert "WITHOUT" not in reading
            radiology = explanation["features"]["radiology"]
            total = sum(f["contribution"] for f in radiology)
            intercept = blocks["radiology"]["block_logit"] - total
            assert abs(explanation["residuals"]["radiology"]) <= 1e-6
            assert "| intercept (the average training patient's logit) |" in meta["radiology_top_features"].value
            assert intercept == pytest.approx(blocks["radiology"]["reference_logit"], abs=1e-9)
            assert np.isfinite(intercept)


def test_a_non_linear_classifier_gets_no_contributions_and_says_why(cohort, instance, base_resources):
    ids, store = cohort
    settings = RiskModelSettings(classifier="random_forest", n_splits=3, n_repeats=1, n_bootstrap=100,
                                 min_labelled_per_class=3, inner_splits=3, abmil_in_ablation=False)
    (meta,) = materialize(instance, base_resources, settings, ["P001"])
    root = store.asset_dir(RISK_EXPLANATIONS.key, "P001", create=False)
    folder = root / read_version_pointer(root)["version"]
    explanation = json.loads((folder / "explanation.json").read_text(encoding="utf-8"))
    assert explanation["features"] == {} and explanation["pathology_constant"] is None
    assert not any(key.startswith(("contribution_", "attention_")) for key in meta)  # never a fake heatmap
    assert "random_forest is not linear" in meta["notes"].value
    card = json.loads((store.root / "risk_model" / json.loads(
        (store.root / "risk_model/current.json").read_text(encoding="utf-8"))["version"] / "model_card.json").read_text(encoding="utf-8"))
    assert {row["block"] for row in card["permutation_importance"] if row["feature"] is None} == {
        "radiology", "pathology"}


def test_a_tampered_model_file_is_refused_before_it_is_loaded(cohort, instance, base_resources):
    # model.skops changed after risk_model published it (its pointer lists another hash): the
    # explanation fails with the file and both digests named; nothing is explained with it.
    ids, store = cohort
    settings = RiskModelSettings(n_splits=3, n_repeats=1, n_bootstrap=100, min_labelled_per_class=3,
                                 inner_splits=3, abmil_in_ablation=False)
    assert dg.materialize(cohort_assets.ASSETS, instance=instance,
                          resources={**base_resources, "risk_model": settings}).success
    root = store.root / "risk_model"
    pointer = read_version_pointer(root)
    model = root / pointer["version"] / "model.skops"
    model.write_bytes(model.read_bytes() + b"\0")
    result = dg.materialize([*cohort_assets.ASSETS, *explanation_assets.ASSETS], instance=instance,
                            resources={**base_resources, "risk_model": settings}, partition_key="P001",
                            selection=[RISK_EXPLANATIONS.key], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.event_specific_data.error or failure.event_specific_data.user_failure_data.description)
    assert f"{model}: SHA-256" in message and pointer["files"]["model.skops"] in message
    assert str(root / "current.json") in message
    assert read_version_pointer(store.asset_dir(RISK_EXPLANATIONS.key, "P001", create=False)) is None


def test_after_the_first_scores_the_sensor_asks_for_everyone_in_ranges_a_few_runs_per_tick(
        cohort, instance, base_resources, monkeypatch):
    ids, store = cohort
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", "4")
    sensor = build_risk_explanations_sensor(30, RISK_EXPLANATIONS.key, "risk_scores",
                                            SCORES_FILE.name, runs_per_tick=3)
    resources = {"storage": base_resources["storage"]}
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        assert isinstance(sensor(context), dg.SkipReason)  # no scores yet
    settings = RiskModelSettings(**QUICK, abmil_in_ablation=False)
    assert dg.materialize(cohort_assets.ASSETS, instance=instance,
                          resources={**base_resources, "risk_model": settings}).success

    # 30 patients, none explained: 8 runs of at most 4 patients, 3 runs a tick, each tick after the last
    cursor, ranges = None, []
    for expected_runs in (3, 3, 2):
        with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
            result = sensor(context)
        assert len(result.run_requests) == expected_runs
        for request in result.run_requests:
            assert request.asset_selection == [dg.AssetKey(RISK_EXPLANATIONS.key)]
            assert request.partition_key is None and request.partition_key_range is not None
            ranges.append((request.partition_key_range.start, request.partition_key_range.end))
        cursor = result.cursor
    assert ranges == [(ids[i], ids[min(i + 3, len(ids) - 1)]) for i in range(0, len(ids), 4)]
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        assert "was requested" in sensor(context).skip_message  # the same scores: nothing new
