"""Fixtures and helpers of the radiology tests: landing drops of the real CT, generated DICOM series."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import SimpleITK as sitk

from gcmlm_assets.radiology import resources as radiology_resource_defs

CT_NAME = "example_ct_sm.nii.gz"
STOMACH_NAME = "example_ct_sm_stomach.nii.gz"


@pytest.fixture(scope="session")
def real_ct(test_data: Path) -> Path:
    return test_data / "ct" / "totalsegmentator" / CT_NAME


@pytest.fixture(scope="session")
def real_stomach(test_data: Path) -> Path:
    return test_data / "ct" / "totalsegmentator" / STOMACH_NAME


@pytest.fixture
def radiology_resources(base_resources: dict) -> dict:
    """The project's own radiology resources, storage and landing pointed at the test's data root."""
    return {**radiology_resource_defs.resources("local"), **base_resources}


def make_drop(landing: Path, patient_id: str, ct_files: list[Path] | None = None,
              mask_file: Path | None = None) -> Path:
    """A landing-zone drop: `ct/` with copies of `ct_files`, optional `ct_label/`, `READY`."""
    folder = landing / patient_id
    (folder / "ct").mkdir(parents=True)
    for path in ct_files or []:
        shutil.copy(path, folder / "ct" / path.name)
    if mask_file is not None:
        (folder / "ct_label").mkdir()
        shutil.copy(mask_file, folder / "ct_label" / mask_file.name)
    (folder / "READY").write_text("")
    return folder


def write_dicom_series(volume: sitk.Image, folder: Path, *, z_offsets: dict[int, float] | None = None,
                       tags: dict[str, str] | None = None) -> list[Path]:
    """Write an int16 volume as a CT DICOM series, one file per slice, with the tags a scanner sets.

    `z_offsets` moves the stored position of chosen slices (to fake uneven spacing); `tags`
    ("gggg|eeee" -> value) adds or overrides tags of every slice (patient tags, say).
    """
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.Cast(volume, sitk.sitkInt16)
    direction = volume.GetDirection()
    stamp_date, stamp_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    series_tags = {
        "0008|0060": "CT",
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0021": stamp_date,
        "0008|0031": stamp_time,
        "0008|103e": "gcmlm test series",
        "0010|0020": "TEST",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1." + stamp_date + stamp_time,
        "0020|000e": "1.2.826.0.1.3680043.2.1125.2." + stamp_date + stamp_time,
        "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
        "0018|0050": f"{volume.GetSpacing()[2]:.4f}",
        **(tags or {}),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our series UID so all slices form one series
    paths = []
    for k in range(volume.GetDepth()):
        plane = volume[:, :, k]
        for tag, value in series_tags.items():
            plane.SetMetaData(tag, value)
        position = list(volume.TransformIndexToPhysicalPoint((0, 0, k)))
        position[2] += (z_offsets or {}).get(k, 0.0)
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in position))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{stamp_date}{stamp_time}.{k + 1}")
        path = folder / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        paths.append(path)
    return paths


def ct_crop(real_ct: Path) -> sitk.Image:
    """A 64 x 64 x 12 piece of the real CT in LPS orientation (small enough for fast DICOM tests)."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(real_ct)), "LPS")
    return image[30:94, 20:84, 9:21]


class _TouchOnUnpickle:
    """Unpickling this creates `marker`: the stand-in for code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_trapped_checkpoint(path: Path, marker: Path, beside: dict | None = None) -> Path:
    """A torch checkpoint whose loading with weights_only=False creates `marker`: a bare header, or the
    entries of a real checkpoint `beside` plus the trap."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = ({**beside, "trap": _TouchOnUnpickle(marker)} if beside is not None
             else {"trainer_name": _TouchOnUnpickle(marker), "init_args": {"configuration": "3d_fullres"}})
    torch.save(state, path)
    return path


def step_failure_text(result: dg.ExecuteInProcessResult, asset_name: str) -> str:
    """The error text of the failed step of `asset_name` (description and error message)."""
    for event in result.get_step_failure_events():
        if event.step_key == asset_name:
            data = event.step_failure_data
            parts = [data.error.message if data.error else ""]
            if data.user_failure_data and data.user_failure_data.description:
                parts.append(data.user_failure_data.description)
            return "\n".join(parts)
    raise AssertionError(f"no step failure for {asset_name}; failed steps: {result.get_failed_step_keys()}")


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}


def mask_voxels(path: Path) -> int:
    return int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
