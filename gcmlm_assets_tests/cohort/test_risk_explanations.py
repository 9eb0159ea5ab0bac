"""risk_explanations through a real Dagster instance: the parts add up to the score, per patient.

Each patient's slide vector is pooled by the real MeanPooling from CLAM-layout feature files, as
slide_vector does, so the per-patch contributions can be checked against the model's own logit.
"""

import json
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import explanation_assets
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.cohort.sensors import build_risk_explanations_sensor
from gcmlm_assets.demo.watch import unexplained
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.pathology.checks import UNI_FEATURES
from gcmlm_assets.pathology.pooling import MeanPooling, patient_slides, write_slide_vector
from gcmlm_assets.storage import ArtifactStore, read_version_pointer, sha256_file
from gcmlm_assets_tests.cohort.synthetic import make_cohort, write_clinical_csv, write_radiomics_row
from gcmlm_assets_tests.cohort.upstream import report_sound_results
from gcmlm_assets_tests.core.test_pictures import assert_ui_picture, decode_markdown

DIM = 48
GRID = 6  # patches per side of each synthetic slide
NO_RADIOLOGY = "P003"


def write_patch_features(store: ArtifactStore, patient_id: str, vector: np.ndarray, rng) -> None:
    """One or two slides of patches on a grid whose features scatter around `vector`; the slide
    vector is then pooled from them by the real MeanPooling."""
    folder = store.asset_dir(UNI_FEATURES, patient_id)
    slides = []
    for k in range(1 + int(rng.integers(0, 2))):
        coords = np.array([(x * 256, y * 256) for y in range(GRID) for x in range(GRID)], np.int64)
        features = (vector[None, :] + rng.normal(0, 1.0, size=(len(coords), DIM))).astype(np.float32)
        name = f"{patient_id}_slide{k + 1}.h5"
        with h5py.File(folder / name, "w") as fh:
            fh.create_dataset("features", data=features)
            fh.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 256
            fh.attrs["slide_path"] = str(folder / f"{patient_id}_slide{k + 1}.tiff")  # absent: layout only
        slides.append({"h5_file": name, "n_patches": len(coords)})
    store.write_manifest(UNI_FEATURES, patient_id, {
        "files": {s["h5_file"]: sha256_file(folder / s["h5_file"]) for s in slides}, "slides": slides})
    pooled = MeanPooling().pool(patient_slides(store, UNI_FEATURES, patient_id))
    write_slide_vector(store.path("slide_vector", patient_id, "slide_vector.parquet"), patient_id, pooled)


@pytest.fixture
def cohort(data_root: Path, instance):
    ids, labels, radiomics, pathology = make_cohort(30, seed=4)
    store = ArtifactStore(data_root / "artifacts")
    rng = np.random.default_rng(0)
    for i, patient_id in enumerate(ids):
        if patient_id != NO_RADIOLOGY:
            write_radiomics_row(store.root, patient_id, radiomics[i])
        store.asset_dir("slide_vector", patient_id)
        write_patch_features(store, patient_id, pathology[i, :DIM].astype(np.float64) * 3, rng)
    write_clinical_csv(data_root / "landing", ids, labels)
    instance.add_dynamic_partitions(patients_partitions.name, ids)
    report_sound_results(instance, store.root, ids)
    return ids, store


def materialize(instance, resources, settings: RiskModelSettings, patients: list[str]):
    cohort = dg.materialize(cohort_assets.ASSETS, instance=instance, resources={**resources, "risk_model": settings})
    assert cohort.success
    results = [dg.materialize([*cohort_assets.ASSETS, *explanation_assets.ASSETS], instance=instance,
                              resources={**resources, "risk_model": settings}, partition_key=patient_id,
                              selection=[explanation_assets.RISK_EXPLANATIONS])
               for patient_id in patients]
    return [r.asset_materializations_for_node(explanation_assets.RISK_EXPLANATIONS)[0].metadata for r in results]


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
        root = store.asset_dir(explanation_assets.RISK_EXPLANATIONS, patient_id, create=False)
        folder = root / read_version_pointer(root)["version"]
        explanation = json.loads((folder / "explanation.json").read_text())
        # how the blocks combine: the terms sum to the fused logit, which is the scored probability's
        terms = sum(row["contribution"] for row in explanation["combination"])
        assert terms == pytest.approx(explanation["fused_logit"], abs=1e-9)
        assert explanation["fused_logit"] == pytest.approx(logit(scores[patient_id]["probability"]), abs=1e-6)
        assert meta["probability"].value == pytest.approx(scores[patient_id]["probability"], abs=1e-12)
        blocks = {row["term"]: row for row in explanation["combination"] if row["block_logit"] is not None}

        # pathology: one exact part per patch, beside its coordinates
        patches = pq.read_table(folder / "patch_contributions.parquet").to_pylist()
        assert len(patches) == sum(s["n_patches"] for s in store.read_manifest(UNI_FEATURES, patient_id)["slides"])
        parts = np.array([p["contribution_pathology_logit"] for p in patches])
        pathology = blocks["pathology"]
        assert parts.sum() + explanation["pathology_constant"] == pytest.approx(pathology["block_logit"], abs=1e-6)
        fused_parts = np.array([p["contribution_fused_logit"] for p in patches])
        assert fused_parts == pytest.approx(parts * pathology["weight"], abs=1e-12)
        assert all(p["attention"] is not None for p in patches)  # ABMIL fitted for its attention maps
        assert sum(p["attention"] for p in patches) == pytest.approx(1.0, abs=1e-6)
        assert abs(explanation["residuals"]["pathology"]) <= 1e-6

        # heatmaps: contribution and attention per slide, in the UI and at full resolution
        slides = {p["slide"] for p in patches}
        for slide in slides:
            for kind in ("contribution", "attention"):
                full = Path(meta[f"{kind}_{slide}_full_path"].value)
                assert_ui_picture(meta[f"{kind}_{slide}"].value, folder / f"{kind}_{slide}.png")
                alt, _, _ = decode_markdown(meta[f"{kind}_{slide}"].value)
                assert kind in alt.lower() and full.is_file()
        assert "| **fused logit** |" in meta["how_the_blocks_combine"].value

        if patient_id == NO_RADIOLOGY:
            assert "radiology_top_features" not in meta
            assert "radiology" not in blocks
        else:
            radiology = explanation["features"]["radiology"]
            total = sum(f["contribution"] for f in radiology)
            intercept = blocks["radiology"]["block_logit"] - total
            assert abs(explanation["residuals"]["radiology"]) <= 1e-6
            assert "| intercept |" in meta["radiology_top_features"].value
            assert np.isfinite(intercept)


def test_a_non_linear_classifier_gets_no_contributions_and_says_why(cohort, instance, base_resources):
    ids, store = cohort
    settings = RiskModelSettings(classifier="random_forest", n_splits=3, n_repeats=1, n_bootstrap=100,
                                 min_labelled_per_class=3, inner_splits=3, abmil_in_ablation=False)
    (meta,) = materialize(instance, base_resources, settings, ["P001"])
    root = store.asset_dir(explanation_assets.RISK_EXPLANATIONS, "P001", create=False)
    folder = root / read_version_pointer(root)["version"]
    explanation = json.loads((folder / "explanation.json").read_text())
    assert explanation["features"] == {} and explanation["pathology_constant"] is None
    assert not any(key.startswith(("contribution_", "attention_")) for key in meta)  # never a fake heatmap
    assert "random_forest is not linear" in meta["notes"].value
    card = json.loads((store.root / "risk_model" / json.loads(
        (store.root / "risk_model/current.json").read_text())["version"] / "model_card.json").read_text())
    assert {row["block"] for row in card["permutation_importance"] if row["feature"] is None} == {
        "radiology", "pathology"}


def test_the_sensor_asks_once_per_new_scores_for_every_scored_patient(cohort, instance, base_resources):
    ids, store = cohort
    defs_sensor = build_risk_explanations_sensor(30, explanation_assets.RISK_EXPLANATIONS, "risk_scores",
                                                 cohort_assets.SCORES_FILE)
    resources = {"storage": base_resources["storage"]}
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        assert isinstance(defs_sensor(context), dg.SkipReason)  # no scores yet
    settings = RiskModelSettings(n_splits=3, n_repeats=1, n_bootstrap=100, min_labelled_per_class=3,
                                 inner_splits=3, abmil_in_ablation=False)
    assert dg.materialize(cohort_assets.ASSETS, instance=instance,
                          resources={**base_resources, "risk_model": settings}).success
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = defs_sensor(context)
    assert sorted(r.partition_key for r in result.run_requests) == sorted(ids)
    assert all(r.asset_selection == [dg.AssetKey(explanation_assets.RISK_EXPLANATIONS)] for r in result.run_requests)
    assert len({r.run_key for r in result.run_requests}) == len(ids)
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=result.cursor) as context:
        assert isinstance(defs_sensor(context), dg.SkipReason)  # the same scores: nothing new
