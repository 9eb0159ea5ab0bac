"""The fingerprints that decide reuse (gcmlm_assets/reuse.py), pinned for fixed inputs.

A fingerprint that changes makes every stored output look out of date: at 10,000 patients that is
nnU-Net, tiling and feature extraction run again for everyone. The values below were computed with
the formulas as they stood before the reusable-output path was shared (segmentation_model's,
risk_model's, fused_table's and risk_scores' from the inline formulas before they became functions);
change one only together with the asset's code version in catalogue.py, on purpose.
"""

import dataclasses
import hashlib
import json
import os

import dagster as dg

from gcmlm_assets.catalogue import (
    CLINICAL_FILE, CLINICAL_TABLE, CT_IMAGE, CT_VOLUME, METRICS_FILE, MODEL_FILE, RISK_MODEL)
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort.card.model_card import settings_json
from gcmlm_assets.cohort.explain.explanation_keys import explanation_key
from gcmlm_assets.cohort.model.model_settings import ModelSettings
from gcmlm_assets.cohort.risk_model_asset import risk_model_fingerprint
from gcmlm_assets.cohort.tables.fusion import FusionReport
from gcmlm_assets.pathology.assets import slide_vector_fingerprint
from gcmlm_assets.pathology.lymph_node_assets import lymph_nodes_fingerprint, tumour_classifier_fingerprint
from gcmlm_assets.pathology.lymph_nodes.classifier_training import AnnotatedSlide, training_set_fingerprint
from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import TumourClassifierFields
from gcmlm_assets.pathology.patch_coords import inputs_fingerprint
from gcmlm_assets.pathology.tiling_params import TilingParams
from gcmlm_assets.radiology.assets import ct_image_fingerprint, ct_mask_fingerprint, radiomics_row_fingerprint
from gcmlm_assets.radiology.dicom_assets import ct_mask_seg_fingerprint, radiomics_sr_fingerprint
from gcmlm_assets.radiology.nnunet_training import TinyPlans, TrainingSettings
from gcmlm_assets.radiology.segmentation_model import segmentation_model_fingerprint
from gcmlm_assets.reuse import StoredOutput, VersionedOutput, combined_digest
from gcmlm_assets.storage import ArtifactStore


def digest(byte: str) -> str:
    return byte * 32


def test_radiology_fingerprints_are_pinned():
    assert (ct_image_fingerprint({"b.dcm": digest("22"), "a.dcm": digest("11")})
            == "03aa202ff8796fba8ed3276c4f3581e0eb63309bccd4f3f2b662635b70443f7b")
    assert (ct_mask_fingerprint(digest("33"), "reference", digest("44"), ("binary", "no model"))
            == "94e911f323ce7dddd1310c3717a75b7469d0bc2b4666b732e50a441f2c35c8d9")
    assert (ct_mask_fingerprint(digest("33"), "predicted", "model-abc", ())
            == "6149dff633b7b1ddcf9884e4a568eaae60b98806cde084409f89c8724ee469f3")
    assert (radiomics_row_fingerprint(digest("33"), digest("88"), digest("55"), "3.1.0")
            == "2b567e08983f576cb2b240a30fbda62e95df22191154dc61071887780b4269d0")
    assert (ct_mask_seg_fingerprint(digest("11"), digest("88"), "MaskOrigin(x)")
            == "1783a3832efd52f2ed03762493f16b77e64bb8559caf0606abe06cb550b22878")
    assert (radiomics_sr_fingerprint(digest("77"), digest("99"), digest("55"))
            == "f1d22212b43c13c4b9a2992dd88e2a8ff32d5591c1b24dd71faf5b6fa99fac6c")


def test_pathology_fingerprints_are_pinned(tmp_path):
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x" * 1000)
    os.utime(slide, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert inputs_fingerprint([slide], TilingParams()) == (
        "8da45c7535c883830a976082a0aa459f7bf392db0b66fff9feed4b61baf05c5e")
    features = {"s2.h5": digest("99"), "s1.h5": digest("66")}
    assert slide_vector_fingerprint({"name": "mean", "version": "1"}, features) == (
        "9d69cdac7796cbaedf47cb34a5ab0a356ac077885cd98d96c4a856ddf61c86ca")
    # uni_features' data version: all its files' hashes in one
    assert combined_digest(features) == "6ff45fe5d6181e0e98bed1117f7bc028eba3af81523669ba5809d06c53e8ddb9"


def test_lymph_node_fingerprints_are_pinned(tmp_path):
    # A change of the classifier's retrains it and re-makes lymph_nodes for every patient with lymph-node slides.
    annotation = tmp_path / "s.geojson"
    annotation.write_bytes(b'{"type":"FeatureCollection","features":[]}')
    slides = [AnnotatedSlide("P1", "s", tmp_path / "s.h5", digest("55"), annotation)]
    assert training_set_fingerprint(slides, TumourClassifierFields()) == (
        "932aaa53ff8bc42238bb89244441f4808844d67d55f246080d359b96df657ec1")
    assert tumour_classifier_fingerprint(digest("ab"), 0.5) == (
        "7aa5914f9e13ab8d4a3855da286f9986e6bc1e9afe51f2e69c14c8b902a1d99b")
    assert lymph_nodes_fingerprint(digest("11"), {"b.h5": digest("22"), "a.h5": digest("33")}, digest("44"),
                                   {"tumour_threshold": 0.5, "min_tumour_patches": 2}) == (
        "d256c6456622a8e7c35635e005dcc8a99809e34a7277febd8fc46108817d51d8")


def test_segmentation_model_fingerprint_is_pinned():
    # A change retrains nnU-Net (hours on a GPU). The formula is pinned on fixed settings; how the
    # settings are written into it, below (a new setting changes them without touching this pin).
    inputs = {"P001": {"ct_image": digest("11"), "reference_mask": digest("22")},
              "P002": {"ct_image": digest("33"), "reference_mask": digest("44"), "reference_label": "stomach",
                       "mask.json": digest("55")}}
    assert segmentation_model_fingerprint("2.5.1", {"device": "cpu", "epochs": 30}, inputs) == (
        "91d6c164db1766af40d0a8590f5b898ce02b8cdce336a25da1f4f52b7055cf97")
    settings = TrainingSettings(device="cpu", epochs=30, iterations_per_epoch=15, tiny_plans=TinyPlans())
    written = settings.as_dict()
    assert set(written) == {field.name for field in dataclasses.fields(TrainingSettings)}
    assert written["tiny_plans"] == dataclasses.asdict(TinyPlans()) and written["epochs"] == 30


def test_uni_features_extraction_fingerprint_is_pinned():
    import torch

    from gcmlm_assets.pathology.encoders import LoadedEncoder, get_spec
    from gcmlm_assets.pathology.extract import extraction_fingerprint

    encoder = LoadedEncoder(spec=get_spec("uni"), module=torch.nn.Identity(), checkpoint=None,
                            checkpoint_sha256="untrained", weights_sha256=digest("ff"))
    assert extraction_fingerprint(coords_sha256=digest("13"), slide_fingerprint=digest("24"), encoder=encoder,
                                  feature_dtype="float16", precision="float32") == (
        "0f4915e820c05bdc25fd9e77e347204b19cf180b09cbe62b87841d1369fd94c8")
    assert extraction_fingerprint(coords_sha256=digest("13"), slide_fingerprint=digest("24"), encoder=encoder,
                                  feature_dtype="float16", precision="bf16-autocast", scaled_decode=False) == (
        "59d9c620b78ecf4ecd40d68230bb7b38aec83fcf8b259ec36b26128d8dd2d00e")


def test_cohort_model_fingerprints_are_pinned():
    # fused_table 5 and risk_model 6: per-scan radiomics, the radiology_timepoint setting and the
    # delta block (issue 25)
    report = FusionReport(input_files={"slide_vector/P002/slide_vector.parquet": digest("88"),
                                       "radiomics_row/P001/radiomics.parquet": digest("99")},
                          excluded_results=[{"patient_id": "P003", "modality": "radiology", "file": "x",
                                             "reason": "ct_mask failed mask_plausible"}])
    assert cohort_assets.fused_table_fingerprint(report, digest("aa")) == (
        "6b721722bc38c1ce8a913b2794b15cba4e9f610ad3cd68113f48bbf3eeb15f5a")
    assert cohort_assets.fused_table_fingerprint(FusionReport(), None) == (
        "faeda498827826430a11576c1e884c44a3a1baa170768acc6d6d2b0244a127a0")
    # which scans fed a patient, and the setting that picks the radiology block's scan
    report.scans = {"P001": {"scans": ["P001@2024-01-02", "P001@2024-03-01"], "radiology": "P001@2024-01-02",
                             "delta": ["P001@2024-01-02", "P001@2024-03-01"]}}
    assert cohort_assets.fused_table_fingerprint(report, digest("aa"), "last") == (
        "887cbc5b517bd167725dbc7e5aa386f1c9d75aa949a1490eb24d8a7d825fd969")
    # the formula, on the settings as model_card.settings_json writes them (a new setting changes
    # those, and so refits the model, without touching this pin)
    inputs = {"training_data_sha256": digest("66"), "labelled_patients": 40, "patch_features_sha256": None}
    settings = json.dumps({"fusion": "mean", "n_splits": 5}, sort_keys=True)
    assert risk_model_fingerprint("scikit-learn=1.5.0", settings, inputs) == (
        "203479e01aa2fbe774b359775eeda88b1eb44dba98626cf01a35d80735da1bae")
    assert risk_model_fingerprint("scikit-learn=1.5.0", settings, {**inputs, "patch_features_sha256": digest("77")}) == (
        "0a6b9713a16ae7a28c844cd9d6824074ff45ce349531ed961149a14bf9c1ae50")
    assert cohort_assets.risk_scores_fingerprint(digest("bb"), digest("cc"), digest("dd"), "0123456789abcdef") == (
        "1aef393503317e660c8f129ce40da30880890412a0e6f215c67a2432d303ea45")
    # each patient's explanation is made again when its key changes
    assert explanation_key(digest("bb"), digest("ee"), {"s2.h5": digest("12"), "s1.h5": digest("34")}) == (
        "ad63a5b61125c0cf0fa50f1e5d36c1a11778a43a441c4cd11dd620c3b06a0faa")
    assert explanation_key(digest("bb"), digest("ee"), None) == (
        "a81511c9edb870df6f3d214ec5e46325417b9303df63f854b2a2a0824bc76a76")


def test_the_model_settings_are_written_into_the_fingerprint_as_their_fields():
    # every field by name with its value, nothing else: a refactor that wrote them otherwise (nested,
    # renamed, with extra keys) would refit every stored model
    written = json.loads(settings_json(ModelSettings()))
    assert written == {field.name: json.loads(json.dumps(getattr(ModelSettings(), field.name)))
                       for field in dataclasses.fields(ModelSettings)}


def test_cohort_fingerprint_is_pinned(data_root, instance, base_resources):
    (data_root / "landing" / "clinical.csv").write_bytes(b"patient_id,mlm,age\nP001,1,60\nP002,0,55\n")
    result = dg.materialize([cohort_assets.clinical_table], instance=instance, resources=base_resources)
    manifest = ArtifactStore(data_root / "artifacts").read_manifest(CLINICAL_TABLE.key, None)
    assert manifest["fingerprint"] == "fbf85b428845737f643cb249103ed6c0f013d573f170bd2be9825c1d12654fd6"
    assert set(manifest) == {"fingerprint", "files", "source", "summary"}
    [event] = result.get_asset_materialization_events()
    assert event.materialization.tags["dagster/data_version"] == manifest["files"][CLINICAL_FILE.name]


def test_stored_output_is_reused_only_while_its_files_are_intact(tmp_path):
    store = ArtifactStore(tmp_path)
    first = StoredOutput(store, CT_IMAGE, "P001", "fp-1")
    assert not first.reused and first.manifest is None
    first.path(CT_VOLUME).write_bytes(b"volume")
    manifest = first.record([CT_VOLUME], summary={"voxels": 1})
    assert manifest == {"fingerprint": "fp-1", "files": {"ct.nii.gz": hashlib.sha256(b"volume").hexdigest()},
                        "summary": {"voxels": 1}}
    assert store.read_manifest(CT_IMAGE.key, "P001") == manifest
    assert first.sha256(CT_VOLUME) == hashlib.sha256(b"volume").hexdigest()

    again = StoredOutput(store, CT_IMAGE, "P001", "fp-1")
    assert again.reused and again.manifest == manifest
    assert not StoredOutput(store, CT_IMAGE, "P001", "fp-2").reused  # other inputs
    again.path(CT_VOLUME).write_bytes(b"damaged")
    assert not StoredOutput(store, CT_IMAGE, "P001", "fp-1").reused  # the file no longer hashes as recorded


# risk_model's current.json as the code before VersionedOutput wrote it: a model trained then is reused.
PUBLISHED_BEFORE = {
    "excluded_patients": {}, "fingerprint": "fp-1", "inputs": {"labelled_patients": 40},
    "files": {"metrics.json": hashlib.sha256(b"{}").hexdigest(), "model.skops": hashlib.sha256(b"model").hexdigest()},
    "recent_versions": ["3a2deaeecd51e85c"], "version": "3a2deaeecd51e85c"}


def test_versioned_output_reuses_a_version_published_before_it_existed(tmp_path):
    store = ArtifactStore(tmp_path)
    root = RISK_MODEL.folder(store)
    (root / "3a2deaeecd51e85c").mkdir()
    MODEL_FILE.in_folder(root / "3a2deaeecd51e85c").write_bytes(b"model")
    METRICS_FILE.in_folder(root / "3a2deaeecd51e85c").write_bytes(b"{}")
    (root / "current.json").write_text(json.dumps(PUBLISHED_BEFORE, indent=2, sort_keys=True), encoding="utf-8")

    kept = VersionedOutput(store, RISK_MODEL, "fp-1")
    assert kept.reused and kept.pointer == PUBLISHED_BEFORE
    assert kept.folder == root / "3a2deaeecd51e85c" and kept.sha256(MODEL_FILE) == hashlib.sha256(b"model").hexdigest()
    assert not VersionedOutput(store, RISK_MODEL, "fp-2").reused  # other inputs or settings

    # the same files published again: the same version and pointer, byte for byte
    again = VersionedOutput(store, RISK_MODEL, "fp-1")
    staging = again.staging()
    MODEL_FILE.in_folder(staging).write_bytes(b"model")
    METRICS_FILE.in_folder(staging).write_bytes(b"{}")
    assert again.publish(staging, inputs={"labelled_patients": 40}, excluded_patients={}) == PUBLISHED_BEFORE
    assert json.loads((root / "current.json").read_text(encoding="utf-8")) == PUBLISHED_BEFORE

    MODEL_FILE.in_folder(root / "3a2deaeecd51e85c").write_bytes(b"damaged")
    assert not VersionedOutput(store, RISK_MODEL, "fp-1").reused  # a file no longer hashes as recorded
