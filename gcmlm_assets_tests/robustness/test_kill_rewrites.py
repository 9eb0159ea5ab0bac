"""kill -9 while a step REPLACES an output that exists leaves the previous output whole and readable,
and a re-run completes the replacement.

test_kill_safety.py kills steps whose output was removed first; here the output is there:

- segmentation_model retrained (other settings) while a model is installed: killed while nnU-Net
  trains, and with the new model trained and compared and `current.json` in its temporary. The
  pointer keeps its bytes, names the installed model, whose files keep their hashes and whose pinned
  checkpoints load;
- ct_mask predicted by a new model over a mask the installed model predicted: killed after the
  prediction, with the new mask and picture in their temporaries, and between the renames. Before the
  renames the previous files keep their hashes; between them nothing visible is damaged and no
  manifest lists other files than those present.

One tiny nnU-Net (the demo profile's, shortened) trains once for the module; the retraining killed
with its model trained gives the second model that ct_mask then predicts with (a configured folder,
pinned by its digests). Kill points are calls the code makes (runs.Pause), never a timer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from gcmlm_assets_tests.support.robustness.artifacts import DataRoot, digests, prepare_root, visible_damage
from gcmlm_assets_tests.support.phi_search import PATIENT_KEYWORDS, leaks_under
from gcmlm_assets_tests.support.robustness.runs import Pause

STORAGE = "gcmlm_assets.storage"
# The demo profile's tiny nnU-Net, trained for a few iterations only: these tests need models that
# install and predict, not good ones (nnU-Net's seed is fixed, so the models are the same each time).
# The retraining differs in its iterations, so its fingerprint differs and it trains; the held-out
# comparison then decides whether it is installed (it was here, 0.019 vs 0.018), and the test
# accepts either outcome: the old model must survive every kill all the same.
FIRST_TRAINING = {"segmentation": {"epochs": 1, "iterations_per_epoch": 3, "val_iterations": 1}}
RETRAINING = {"segmentation": {"epochs": 1, "iterations_per_epoch": 1, "val_iterations": 1}}
# ... so their masks fail ct_mask's plausibility checks (volume, content), which block: opened here.
OPEN_MASK_CHECKS = {"radiomics": {"mask_volume_min_ml": 0.0, "mask_volume_max_ml": 1e9, "mask_bone_fraction_max": 1.0,
                                  "mask_outside_air_fraction_max": 1.0}}
TRAINING_TIMEOUT_S = 1500


@dataclass
class Installed:
    data: DataRoot
    predicted_patient: str  # a patient without a reference mask: its ct_mask is the first model's prediction

    @property
    def models_root(self) -> Path:
        return self.data.artifacts / "segmentation_model"

    def pointer(self) -> dict:
        return json.loads((self.models_root / "current.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def installed_model(tmp_path_factory, run_server) -> Installed:
    from gcmlm_assets.demo.synthetic import write_cohort
    from gcmlm_assets.demo.synthetic_ct import make_ct, nifti_bytes
    from gcmlm_assets.demo.synthetic_plan import CohortSpec

    base = tmp_path_factory.mktemp("rewrites")
    spec = CohortSpec.small(6, slide_width=(800, 1000))
    cohort = write_cohort(base / "landing", spec)
    # The CTs as NIfTI (the demo drops DICOM series): their headers' free text is what is searched.
    for plan in cohort.patients:
        ct_folder = cohort.landing / plan.patient_id / "ct"
        for slice_file in ct_folder.iterdir():
            slice_file.unlink()
        (ct_folder / "ct.nii.gz").write_bytes(nifti_bytes(make_ct(plan, spec)[0]))
    for image in sorted(cohort.landing.glob("*/ct*/*.nii.gz")):
        with_identifying_header(image)
    data = prepare_root(base / "root", cohort.landing, cohort.patient_ids)
    for plan in cohort.patients:
        run_server.materialize(data.env, ["ct_image"], plan.patient_id)
    run_server.materialize(data.env, ["segmentation_model"], settings=FIRST_TRAINING, timeout_s=TRAINING_TIMEOUT_S)
    predicted = next(p.patient_id for p in cohort.patients if not p.has_reference_mask)
    run_server.materialize(data.env, ["ct_mask"], predicted, settings=OPEN_MASK_CHECKS)
    manifest = json.loads((data.artifacts / "ct_mask" / predicted / "_manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == "predicted", manifest
    return Installed(data, predicted)


# NIfTI-1 header fields a scanner export or a hand-made mask may fill with free text.
NIFTI_TEXT_FIELDS = {"descrip": (148, 80), "aux_file": (228, 24)}


def with_identifying_header(path: Path) -> None:
    """Write distinctive patient values into the free-text fields of a .nii.gz's header."""
    import gzip

    data = bytearray(gzip.decompress(path.read_bytes()))
    values = PATIENT_KEYWORDS
    texts = {"descrip": f"{values['PatientName']} {values['PatientBirthDate']} {values['InstitutionName']}",
             "aux_file": values["AccessionNumber"]}
    for field, (offset, size) in NIFTI_TEXT_FIELDS.items():
        data[offset:offset + size] = texts[field].encode().ljust(size, b"\0")[:size]
    path.write_bytes(gzip.compress(bytes(data)))


def model_loads(models_root: Path, pointer: dict) -> str:
    """The model id of the model the pointer names, verified against its pins and loaded."""
    from gcmlm_assets.radiology.nnunet import GastricSegmenter, installed_model_pins

    model = GastricSegmenter.load(models_root / pointer["folder"], device="cpu",
                                  pins=installed_model_pins(models_root, pointer))
    return model.model_id


@dataclass(frozen=True)
class KilledRetraining:
    label: str
    killed: bool
    pointer_unchanged: bool
    old_files_unchanged: bool
    old_model_loads: bool
    damage: list


@pytest.fixture(scope="module")
def killed_retrainings(installed_model, run_server, tmp_path_factory) -> tuple[list[KilledRetraining], Path]:
    """The retraining killed at each point, what the installed model looked like after each kill,
    and a copy of the model the second killed retraining had trained."""
    from gcmlm_assets.radiology.nnunet import ModelFolderError, find_trained_model_folder

    setup = installed_model
    pointer_bytes = (setup.models_root / "current.json").read_bytes()
    old = setup.pointer()
    old_files = digests(setup.models_root / old["folder"])
    assert old_files
    kill_points = [
        ("nnU-Net training in its work folder",
         Pause("gcmlm_assets.radiology.nnunet_training:train_segmentation_model")),
        ("new model trained and compared, current.json (installing it or recording its rejection) written "
         "to its temporary",
         Pause(f"{STORAGE}:_fsync_file", ".tmp-current-")),
    ]
    observed = []
    for label, pause in kill_points:
        killed = run_server.run(setup.data.env, ["segmentation_model"], pause=pause, settings=RETRAINING,
                                timeout_s=TRAINING_TIMEOUT_S)
        observed.append(KilledRetraining(
            label, killed.killed, (setup.models_root / "current.json").read_bytes() == pointer_bytes,
            digests(setup.models_root / old["folder"]) == old_files,
            model_loads(setup.models_root, old) == old["model_id"], visible_damage(setup.data.artifacts)))

    # The model the second killed retraining trained: installed beside the current one, or (had the
    # comparison rejected it) still in that step's work folder.
    trained = [p for p in setup.models_root.iterdir() if p.is_dir() and p.name != old["folder"]
               and not p.name.startswith(".tmp-")]
    for work in sorted(setup.models_root.glob(".tmp-train-*")):
        try:
            trained.append(find_trained_model_folder(work / "nnunet" / "nnUNet_results"))
        except ModelFolderError:
            continue  # the first kill's work folder: labels only
    assert trained, sorted(setup.models_root.rglob("*"))
    second = tmp_path_factory.mktemp("second_model") / "model"
    shutil.copytree(trained[0], second)
    return observed, second


@pytest.mark.slow
def test_a_killed_retraining_keeps_the_installed_model_and_a_rerun_replaces_it(installed_model, killed_retrainings,
                                                                                 run_server):
    setup = installed_model
    observed, _ = killed_retrainings
    for kill in observed:
        assert (kill.killed, kill.pointer_unchanged, kill.old_files_unchanged, kill.old_model_loads,
                kill.damage) == (True, True, True, True, []), kill
    old = setup.pointer()
    old_files = digests(setup.models_root / old["folder"])

    rerun = run_server.run(setup.data.env, ["segmentation_model"], settings=RETRAINING, timeout_s=TRAINING_TIMEOUT_S)
    assert rerun.exit_code == 0
    new = setup.pointer()
    assert visible_damage(setup.data.artifacts) == []
    # The retraining completed: the new model installed, or rejected on the held-out Dice (the
    # comparison decides, as it should) with the installed model still complete and current.
    if new["folder"] != old["folder"]:
        assert model_loads(setup.models_root, new) == new["model_id"] != old["model_id"]
        assert new["training"]["settings"]["iterations_per_epoch"] == RETRAINING["segmentation"]["iterations_per_epoch"]
    else:
        assert new["rejected"]["evaluation"]["installed"] is False
        assert model_loads(setup.models_root, new) == old["model_id"]
        assert digests(setup.models_root / old["folder"]) == old_files


@pytest.mark.slow
def test_a_killed_prediction_by_a_new_model_keeps_the_previous_mask(installed_model, killed_retrainings, run_server):
    from gcmlm_assets.radiology.checkpoint_pins import checkpoint_digests, format_pins

    setup = installed_model
    _, second = killed_retrainings
    patient = setup.predicted_patient
    folder = setup.data.artifacts / "ct_mask" / patient
    before = digests(folder)
    old_model = json.loads((folder / "_manifest.json").read_text(encoding="utf-8"))["provenance"]["model_id"]
    env = {**setup.data.env, "GCMLM_NNUNET_MODEL_FOLDER": str(second),
           "GCMLM_NNUNET_MODEL_SHA256": format_pins(checkpoint_digests(second))}

    before_renames = [
        ("new model predicted, nothing written", Pause("gcmlm_assets.radiology.masks:validate_prediction")),
        ("new mask and picture in their temporaries", Pause(f"{STORAGE}:_fsync_file", ".tmp-mask_overlay-")),
    ]
    for label, pause in before_renames:
        killed = run_server.run(env, ["ct_mask"], patient, pause=pause, settings=OPEN_MASK_CHECKS)
        assert killed.killed, (label, killed)
        assert digests(folder) == before, label
        assert visible_damage(setup.data.artifacts) == [], label

    # Between the renames: the previous manifest withdrawn, the new mask in place, the picture not yet.
    killed = run_server.run(env, ["ct_mask"], patient, settings=OPEN_MASK_CHECKS,
                            pause=Pause(f"{STORAGE}:_rename_into_place", ".tmp-mask_overlay-"))
    assert killed.killed
    assert visible_damage(setup.data.artifacts) == []
    assert not (folder / "_manifest.json").exists()

    rerun = run_server.run(env, ["ct_mask"], patient, settings=OPEN_MASK_CHECKS)
    assert rerun.exit_code == 0
    manifest = json.loads((folder / "_manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == "predicted" and manifest["provenance"]["model_id"] != old_model
    assert digests(folder) != before and visible_damage(setup.data.artifacts) == []


@pytest.mark.slow
def test_no_patient_value_of_the_inputs_reaches_the_model_its_training_files_or_the_log(installed_model,
                                                                                        killed_retrainings):
    """The CTs and reference masks carry patient values in their NIfTI headers (descrip, aux_file).
    Searched: every file under the artifacts root (ct_image, the installed model's nnU-Net files and
    current.json, predicted masks, and the work folders killed retrainings left: nnU-Net's raw,
    preprocessed and results folders) and every file of the instance's home (event log)."""
    setup = installed_model
    landing_ct = next(setup.data.landing.glob("*/ct/*.nii.gz"))
    assert leaks_under(landing_ct.parent), "the search must find the values in the inputs"
    work = [p.name for p in setup.models_root.glob(".tmp-train-*/nnunet/*")]
    assert {"nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"} <= set(work), work
    nnunet_files = [p.name for p in setup.data.artifacts.rglob("*.json")]
    assert {"current.json", "plans.json", "dataset.json"} <= set(nnunet_files), sorted(nnunet_files)
    assert leaks_under(setup.data.artifacts) == {}
    assert leaks_under(setup.data.home) == {}
