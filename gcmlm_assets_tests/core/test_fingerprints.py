"""The fingerprints that decide reuse (gcmlm_assets/reuse.py), pinned for fixed inputs.

A fingerprint that changes makes every stored output look out of date: at 10,000 patients that is
nnU-Net, tiling and feature extraction run again for everyone. The values below were computed with
the formulas as they stood before the reusable-output path was shared; change one only together
with the asset's code version in catalogue.py, on purpose.
"""

import hashlib
import os

import dagster as dg

from gcmlm_assets.catalogue import CLINICAL_FILE, CLINICAL_TABLE, CT_IMAGE, CT_VOLUME
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.pathology.assets import slide_vector_fingerprint
from gcmlm_assets.pathology.patch_coords import inputs_fingerprint
from gcmlm_assets.pathology.tiling_params import TilingParams
from gcmlm_assets.radiology.assets import ct_image_fingerprint, ct_mask_fingerprint, radiomics_row_fingerprint
from gcmlm_assets.reuse import StoredOutput, combined_digest
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
