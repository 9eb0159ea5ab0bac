"""The real CT's file names, landing drops, and DICOM series written from a volume."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import SimpleITK as sitk

CT_NAME = "example_ct_sm.nii.gz"
STOMACH_NAME = "example_ct_sm_stomach.nii.gz"


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
