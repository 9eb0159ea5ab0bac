"""kill -9 in the middle of a materialization leaves no half-written file, and a re-run gives the
same outputs as an uninterrupted run.

For each asset the test removes its outputs from the session's reference cohort, starts the
materialization in a child process (runs.py), stops the child at a chosen point of the real code and
SIGKILLs it. Then:

- no visible file is incomplete (artifacts.visible_damage: every file under the artifacts root whose
  name is not a temporary opens in full, and every manifest and version pointer matches its files);
- a re-run succeeds and its outputs are byte-identical to the uninterrupted run's (radiomics_row's
  manifest: equal but for the extraction's wall-clock seconds, which it records).

The kill points are deterministic: before any file is written, with a temporary fully or partly
written but not renamed (an HDF5 file still open with one batch of features in it), with the data
files in place and the manifest not, and after the manifest but before Dagster recorded anything.
A killed writer's temporaries stay until they are a day old (storage.remove_stale_temporaries); the
table counts them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest

from gcmlm_assets.catalogue import RADIOMICS_ROW, RADIOMICS_TABLE
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.robustness.artifacts import digests, temporaries, visible_damage, without_timing
from gcmlm_assets_tests.support.robustness.runs import Pause

STORAGE = "gcmlm_assets.storage"


@dataclass(frozen=True)
class KillPoint:
    label: str
    pause: Pause


def kill_points(asset: str, patient: str) -> list[KillPoint]:
    manifest = Pause(f"{STORAGE}:ArtifactStore.write_manifest", f"'{asset}'")
    renamed = f"{asset} files in place, manifest not written"
    return {
        "ct_mask": [
            KillPoint("conforming the reference mask (nothing written)",
                      Pause("gcmlm_assets.radiology.masks:conform_mask")),
            KillPoint("mask.nii.gz and picture in their temporaries, none renamed",
                      Pause(f"{STORAGE}:_fsync_file", ".tmp-mask_overlay-")),
            KillPoint("mask.nii.gz renamed, picture in its temporary",
                      Pause(f"{STORAGE}:_rename_into_place", ".tmp-mask_overlay-")),
            KillPoint(renamed, manifest),
            KillPoint("manifest written, nothing recorded in Dagster",
                      Pause("gcmlm_assets.radiology.checks:ct_mask_check_results")),
        ],
        "radiomics_row": [
            KillPoint("PyRadiomics computing features",
                      Pause("radiomics.featureextractor:RadiomicsFeatureExtractor.computeFeatures")),
            KillPoint(f"{RADIOMICS_TABLE.name} in its temporary, not renamed",
                      Pause(f"{STORAGE}:_fsync_file", f".tmp-{RADIOMICS_TABLE.name.split('.')[0]}-")),
            KillPoint(renamed, manifest),
        ],
        "patch_coords": [
            KillPoint("slide 1's coordinates renamed, slide 2's not started",
                      Pause("gcmlm_assets.pathology.patch_coords:write_coords_h5", nth=2)),
            KillPoint("HDF5 files and picture in place, slides.json in its temporary",
                      Pause(f"{STORAGE}:_fsync_file", ".tmp-slides-")),
            KillPoint(renamed, manifest),
        ],
        "uni_features": [
            KillPoint("slide 1's HDF5 temporary open, one batch of features in it",
                      Pause("gcmlm_assets.pathology.extract:HeapTrimmer.after_batch")),
            KillPoint("slide 1 renamed, slide 2's features complete in its temporary",
                      Pause(f"{STORAGE}:_fsync_file", f".tmp-{patient}_slide2-")),
            KillPoint(renamed, manifest),
        ],
        "risk_model": [
            KillPoint("cross-validated, fitting the final model (nothing written)",
                      Pause("gcmlm_assets.cohort.model.training:fit_risk_model")),
            KillPoint("version staged in a temporary folder, not installed",
                      Pause("gcmlm_assets.reuse:publish_version")),
            KillPoint("version folder installed, current.json in its temporary",
                      Pause(f"{STORAGE}:_fsync_file", ".tmp-current-")),
        ],
    }[asset]


def same_outputs(before: dict[str, str], after: dict[str, str], reference, rerun) -> str:
    """'identical', 'equal in content (...)' or what differs."""
    if before == after:
        return "identical"
    differing = sorted(rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel))
    if differing == ["_manifest.json"] and without_timing(reference / "_manifest.json") == \
            without_timing(rerun / "_manifest.json"):
        return "equal in content (manifest's seconds differ)"
    return f"differs: {differing}"


TABLE_HEADER = ("| asset | kill point | killed after (s) | visible partial files | temporaries left | re-run | "
                "outputs vs uninterrupted run |\n|---|---|---|---|---|---|---|")


@pytest.mark.slow
@pytest.mark.parametrize("asset", ["ct_mask", "radiomics_row", "patch_coords", "uni_features", "risk_model"])
def test_kill_mid_step_leaves_no_partial_file_and_a_rerun_gives_the_same_outputs(asset, reference_cohort,
                                                                                   run_server, capsys):
    ref = reference_cohort
    cohort_level = asset == "risk_model"
    patient = None if cohort_level else ref.patient(reference_mask=True, slides=2).patient_id
    relative = asset if cohort_level else f"{asset}/{patient}"
    target, reference = ref.data.artifacts / relative, ref.snapshot / relative
    expected = digests(reference)
    assert expected, f"the reference cohort has no {relative}"

    rows, failures = [], []
    for point in kill_points(asset, patient):
        shutil.rmtree(target, ignore_errors=True)
        killed = run_server.run(ref.data.env, [asset], patient, pause=point.pause)
        assert killed.killed and killed.paused_at.startswith(point.pause.target), killed
        damage = visible_damage(ref.data.artifacts)
        left = temporaries(target)
        rerun = run_server.run(ref.data.env, [asset], patient)
        outputs = same_outputs(expected, digests(target), reference, target)
        rows.append((asset, point.label, f"{killed.seconds:.1f}", len(damage), len(left),
                     "succeeded" if rerun.exit_code == 0 else f"FAILED (exit {rerun.exit_code})", outputs))
        if damage or rerun.exit_code != 0 or not (outputs == "identical" or outputs.startswith("equal in content")):
            failures.append((point.label, damage, rerun, outputs))
    with capsys.disabled():
        print("\n" + TABLE_HEADER)
        for row in rows:
            print("| " + " | ".join(str(cell) for cell in row) + " |")
    assert failures == []


def test_the_damage_check_sees_a_truncated_file_and_a_stale_manifest(reference_cohort, tmp_path):
    """What the kill test relies on: a cut-short file under a final name, or a file that differs from
    its manifest, is reported; the same bytes under a temporary name are not."""
    patient = reference_cohort.patient(reference_mask=True, slides=2).patient_id
    artifacts = tmp_path / "artifacts"
    for asset in ("uni_features", "radiomics_row"):
        shutil.copytree(reference_cohort.snapshot / asset / patient, artifacts / asset / patient)
    assert visible_damage(artifacts) == []
    features = artifacts / "uni_features" / patient / f"{patient}_slide1.h5"
    data = features.read_bytes()
    (features.parent / f".tmp-{patient}_slide1-x.h5").write_bytes(data[: len(data) // 2])
    assert visible_damage(artifacts) == []
    features.write_bytes(data[: len(data) // 2])
    row = RADIOMICS_TABLE.path(ArtifactStore(artifacts), patient)
    row.write_bytes(row.read_bytes() + b"\0")
    damage = visible_damage(artifacts)
    assert any(line.startswith(f"uni_features/{patient}/{patient}_slide1.h5: OSError") for line in damage), damage
    assert f"uni_features/{patient}/{patient}_slide1.h5: not the file its manifest lists" in damage
    assert f"{RADIOMICS_ROW.key}/{patient}/{RADIOMICS_TABLE.name}: not the file its manifest lists" in damage
