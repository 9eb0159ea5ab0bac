"""When segmentation_model retrains and whether its new model is installed, with real nnU-Net trainings.

One history, three trainings on tiny plans (support/radiology/nnunet_cohort.py's crops of the real CT):

1. a weak first model (1 iteration, one augmentation worker) on GC001-GC004: installed, nothing to
   compare with;
2. two new reference masks (GC005, GC006), below the retraining policy: the sensor does not train;
3. a user's run with the tests' 240 iterations (nnunet_cohort.TEST_TRAINING): both new cases are held
   out, the new model's mean Dice on them is compared with the weak model's, and it is installed;
4. a user's run with the weak settings again: the same 4 cases and settings as model 1, so the
   seeded training gives model 1 again, byte for byte; worse than the installed model, it is rejected
   and deleted, the sensor does not ask for that set, and the same run again trains nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import SimpleITK as sitk

from gcmlm_assets.radiology.assets import ct_image
from gcmlm_assets.radiology.resources import RadiomicsSettings, SegmentationModelResource
from gcmlm_assets.radiology.segmentation_model import segmentation_model
from gcmlm_assets.radiology.sensors import build_segmentation_training_sensor, training_status
from gcmlm_assets.resources import ArtifactStorage, AutomationSettings, LandingZone
from gcmlm_assets_tests.support.radiology.ct import make_drop
from gcmlm_assets_tests.support.radiology.nnunet_cohort import (
    TRAIN_SPACING_MM, TRAINING_CROPS, Cohort, demo_segmentation, model_table, resampled,
)
from gcmlm_assets_tests.support.run_results import metadata_of

NEW_CROPS = {"GC005": (3, 3, 0, 56, 46, 15), "GC006": (6, 1, 1, 52, 47, 14)}
# The 2 new cases are below the sensor's threshold (3) and both held out for the comparison.
POLICY = dict(retrain_min_new_cases=3, retrain_min_growth_fraction=1.0, holdout_fraction=0.2, holdout_min_cases=2)
WEAK = dict(epochs=1, iterations_per_epoch=1, val_iterations=1, augmentation_workers=1)


def write_drops(root: Path, real_ct: Path, real_stomach: Path, crops: dict) -> None:
    sources = root / "sources"
    ct = resampled(sitk.ReadImage(str(real_ct)), TRAIN_SPACING_MM, sitk.sitkLinear)
    stomach = resampled(sitk.ReadImage(str(real_stomach)), TRAIN_SPACING_MM, sitk.sitkNearestNeighbor)
    for patient_id, (x, y, z, nx, ny, nz) in crops.items():
        folder = sources / patient_id
        folder.mkdir(parents=True)
        sitk.WriteImage(sitk.RegionOfInterest(ct, [nx, ny, nz], [x, y, z]), str(folder / "ct.nii.gz"), True)
        sitk.WriteImage(sitk.RegionOfInterest(stomach, [nx, ny, nz], [x, y, z]), str(folder / "stomach.nii.gz"), True)
        make_drop(root / "landing", patient_id, [folder / "ct.nii.gz"], folder / "stomach.nii.gz")


def sensor_tick(cohort: Cohort, segmentation: SegmentationModelResource):
    """One evaluation of the real segmentation_training_sensor on the cohort's instance."""
    sensor = build_segmentation_training_sensor(30)
    resources = {"landing": cohort.resources["landing"], "storage": cohort.resources["storage"],
                 "segmentation": segmentation, "automation": AutomationSettings()}
    with dg.build_sensor_context(instance=cohort.instance, resources=resources) as context:
        return sensor(context)


@pytest.fixture(scope="module")
def history(tmp_path_factory, real_ct, real_stomach):
    root = tmp_path_factory.mktemp("segmentation_policy")
    (root / "artifacts").mkdir()
    (root / "dagster_home").mkdir()
    write_drops(root, real_ct, real_stomach, TRAINING_CROPS)
    weak = demo_segmentation(**POLICY, **WEAK)
    demo = demo_segmentation(**POLICY)
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        cohort = Cohort(root, instance, {
            "storage": ArtifactStorage(root=str(root / "artifacts")),
            "landing": LandingZone(root=str(root / "landing")),
            "radiomics": RadiomicsSettings(),
            "segmentation": weak,
        })
        models_root = root / "artifacts" / "segmentation_model"

        def add_patients(patients):
            instance.add_dynamic_partitions("ct_scans", list(patients))
            for patient_id in patients:
                assert cohort.materialize([ct_image], partition=patient_id).success, patient_id

        def train(segmentation) -> dict:
            result = cohort.train(segmentation=segmentation)
            assert result.success, [e.step_failure_data.error for e in result.get_step_failure_events()]
            return {"meta": metadata_of(result, "segmentation_model"),
                    "pointer": json.loads((models_root / "current.json").read_text(encoding="utf-8")),
                    "folders": sorted(p.name for p in models_root.iterdir())}

        add_patients(TRAINING_CROPS)
        steps = {"first": train(weak)}
        write_drops(root, real_ct, real_stomach, NEW_CROPS)
        add_patients(NEW_CROPS)
        steps["below_policy"] = sensor_tick(cohort, weak)
        steps["below_policy_pending"] = training_status(instance, cohort.resources["landing"],
                                                        cohort.resources["storage"], weak, AutomationSettings(),
                                                        {}).pending
        steps["better"] = train(demo)
        steps["worse"] = train(weak)
        steps["after_rejection"] = sensor_tick(cohort, weak)
        steps["again"] = train(weak)
        yield steps


def test_the_first_model_is_installed_without_comparison(history):
    meta, pointer = history["first"]["meta"], history["first"]["pointer"]
    assert meta["trained"] is True and meta["reused"] is False
    assert meta["decision"] == "installed: the first model (none installed to compare with)"
    assert meta["training_cases"] == ", ".join(TRAINING_CROPS) and "held_out_cases" not in meta
    assert pointer["training"]["held_out"] == [] and pointer["model_id"] == meta["model_id"]
    # The set this training saw, as the sensor measures it: each case's stamp.
    assert sorted(pointer["reference_cases"]) == sorted(TRAINING_CROPS)


def test_new_reference_masks_below_the_policy_do_not_retrain(history):
    skip = history["below_policy"]
    assert isinstance(skip, dg.SkipReason)
    assert "2 reference case(s) changed since the last training (2 added)" in skip.skip_message
    assert "retrains from 3" in skip.skip_message
    assert history["below_policy_pending"] is False  # the cohort refresh does not wait for a training


def test_a_model_at_least_as_good_on_held_out_cases_is_installed(history):
    meta, pointer = history["better"]["meta"], history["better"]["pointer"]
    first = history["first"]["meta"]
    assert meta["trained"] is True and meta["reused"] is False
    # A run started by hand trains below the policy: the new cases are held out, the others trained on.
    assert meta["held_out_cases"] == "GC005, GC006" and meta["training_cases"] == ", ".join(TRAINING_CROPS)
    assert meta["compared_with_model_id"] == first["model_id"]
    dice = meta["held_out_dice"]
    assert set(dice) == set(NEW_CROPS)
    assert meta["new_model_mean_dice"] == pytest.approx(sum(d["new"] for d in dice.values()) / 2, abs=1e-6)
    assert meta["installed_model_mean_dice"] == pytest.approx(sum(d["installed"] for d in dice.values()) / 2,
                                                              abs=1e-6)
    print(f"\n[held-out Dice] 240-iteration model {meta['new_model_mean_dice']:.3f}, "
          f"1-iteration model {meta['installed_model_mean_dice']:.3f}")
    assert meta["new_model_mean_dice"] >= meta["installed_model_mean_dice"]
    assert meta["decision"].startswith("installed: mean Dice")
    assert meta["model_id"] != first["model_id"] and pointer["model_id"] == meta["model_id"]
    assert model_table(meta)["held-out cases"] == "GC005, GC006"
    # current.json keeps the comparison with the model it installed.
    evaluation = pointer["training"]["evaluation"]
    assert evaluation["installed"] is True and evaluation["held_out"] == ["GC005", "GC006"]
    assert evaluation["new_model_mean_dice"] == meta["new_model_mean_dice"]
    assert sorted(pointer["reference_cases"]) == sorted([*TRAINING_CROPS, *NEW_CROPS])


def test_a_worse_model_is_rejected_deleted_and_not_trained_again(history):
    better, worse = history["better"], history["worse"]
    meta, pointer = worse["meta"], worse["pointer"]
    # Green, trained, and the installed model kept: the materialization says why.
    assert meta["trained"] is True and meta["reused"] is True
    assert meta["decision"].startswith("rejected: mean Dice") and "the installed model stays" in meta["decision"]
    assert meta["new_model_mean_dice"] < meta["installed_model_mean_dice"] == better["meta"]["new_model_mean_dice"]
    assert meta["held_out_cases"] == "GC005, GC006"
    assert meta["model_id"] == better["meta"]["model_id"] == pointer["model_id"]
    assert meta["checkpoint_sha256"] == better["meta"]["checkpoint_sha256"]
    # Its files are gone: the model folders are those of the two installed models, nothing half-done.
    assert worse["folders"] == better["folders"]
    assert not [name for name in worse["folders"] if name.startswith(".tmp")]
    rejected = pointer["rejected"]
    assert rejected["evaluation"]["installed"] is False and meta["rejected_model_id"] == rejected["model_id"]
    # The sensor does not ask for that set (the last training saw it) ...
    assert isinstance(history["after_rejection"], dg.SkipReason)
    assert "the last training saw the current 6 reference masks" in history["after_rejection"].skip_message
    # ... and the same run again does not train the same model again.
    again = history["again"]["meta"]
    assert again["trained"] is False and again["reused"] is True
    assert again["decision"].startswith("not retrained: a model trained on these inputs and settings was "
                                        "rejected before (rejected: mean Dice")
    assert history["again"]["folders"] == worse["folders"] and history["again"]["pointer"] == pointer


def test_seeded_training_gives_the_same_model_from_the_same_cases_and_settings(history):
    """The rejected model trained on the first model's 4 cases with its settings (one augmentation
    worker process included): the same checkpoint bytes, hence the same model id."""
    first = history["first"]["meta"]
    rejected = history["worse"]["pointer"]["rejected"]
    assert rejected["cases"] == list(TRAINING_CROPS)
    assert rejected["checkpoint_sha256"] == first["checkpoint_sha256"]
    assert rejected["model_id"] == first["model_id"]
