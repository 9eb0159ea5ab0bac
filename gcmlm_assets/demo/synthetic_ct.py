"""The synthetic patient's CT and its stomach mask (plain Python, no Dagster).

A small abdominal CT in HU (air, subcutaneous and visceral fat, muscle, liver, spine, bowel) with
a stomach: a J-shaped tube (union of spheres along a curved centre line) made of an enhancing
wall around fluid contents, enlarged, thickened and roughened by the patient's radiology severity
(synthetic_plan.py); a patient's second CT has the same anatomy, the stomach at its changed
severity and its own noise. Written with the direction NIfTI files usually carry in ITK (x and y
flipped), so the pipeline's reorientation is exercised.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcmlm_assets.demo.synthetic_plan import CohortSpec, PatientPlan

# HU of the tissues the phantom is made of (typical portal-venous-phase values).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 50.0
HU_SOFT = 35.0
HU_LIVER = 60.0
HU_BONE_CORTEX = 700.0
HU_BONE_MARROW = 250.0
HU_STOMACH_WALL = 80.0
HU_STOMACH_CONTENT = 15.0
HU_NOISE_SD = 12.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-SD Gaussian-smoothed noise (sigma in voxels)."""
    field_ = rng.standard_normal(shape).astype(np.float32)
    field_ = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(field_), sigma))
    field_ -= field_.mean()
    return field_ / max(float(field_.std()), 1e-6)


def _stomach_centreline(n_points: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A J-shaped centre line (in mm, relative to the volume centre; x left, y posterior, z superior)
    and the relative radius along it: a wide fundus high on the left that narrows into an antrum
    crossing the midline anteriorly."""
    t = np.linspace(0.0, 1.0, n_points)
    x = 44.0 - 58.0 * t**1.6
    y = 5.0 - 30.0 * t
    z = 34.0 - 58.0 * t + 30.0 * np.clip(t - 0.7, 0, None) ** 1.5 * 3
    radius = 1.0 - 0.45 * t
    return np.stack([x, y, z], axis=1), radius


def make_ct(plan: PatientPlan, spec: CohortSpec, followup: bool = False) -> tuple[sitk.Image, sitk.Image]:
    """The patient's CT (int16 HU) and its stomach mask (uint8 0/1), same grid. `followup`: the
    patient's second CT (plan.scan_dates[1]): the same anatomy, the stomach drawn at the changed
    severity (plan.followup_severity), a new draw of the scanner's noise."""
    if followup and len(plan.scan_dates) < 2:
        raise ValueError(f"{plan.patient_id} has no second CT in its plan")
    rng = np.random.default_rng([spec.seed, 2, plan.index])
    nx, ny, nz = spec.ct_size
    sx, sy, sz = spec.ct_spacing
    # Voxel-centre coordinates in mm relative to the volume centre, array order z, y, x.
    zs = (np.arange(nz) - (nz - 1) / 2) * sz
    ys = (np.arange(ny) - (ny - 1) / 2) * sy
    xs = (np.arange(nx) - (nx - 1) / 2) * sx
    Z, Y, X = np.meshgrid(zs, ys, xs, indexing="ij")
    fov_x, fov_y = nx * sx, ny * sy
    scale = min(fov_x / 192.0, fov_y / 192.0)  # anatomy sized for a ~19 cm field, shrunk with it

    hu = np.full((nz, ny, nx), HU_AIR, np.float32)
    body_a = (84 + rng.normal(0, 3)) * scale
    body_b = (66 + rng.normal(0, 3)) * scale
    body = (X / body_a) ** 2 + (Y / body_b) ** 2
    fat_rim = 10 * scale
    muscle_rim = 5 * scale
    hu[body <= 1] = HU_FAT
    inner_muscle = (X / (body_a - fat_rim)) ** 2 + (Y / (body_b - fat_rim)) ** 2
    hu[inner_muscle <= 1] = HU_MUSCLE
    abdomen = (X / (body_a - fat_rim - muscle_rim)) ** 2 + (Y / (body_b - fat_rim - muscle_rim)) ** 2 <= 1
    # Visceral content: bowel soft tissue interleaved with mesenteric fat.
    mesentery = _smooth_noise(rng, hu.shape, sigma=2.0)
    hu[abdomen] = np.where(mesentery[abdomen] > 0.6, HU_FAT, HU_SOFT)

    # Spine: posterior midline, cortical ring around marrow.
    spine_r = (13 + rng.normal(0, 1)) * scale
    spine_y = body_b - fat_rim - muscle_rim - spine_r - 4 * scale
    spine_d = np.hypot(X, Y - spine_y)
    hu[spine_d <= spine_r] = HU_BONE_CORTEX
    hu[spine_d <= spine_r - 3 * scale] = HU_BONE_MARROW

    # Liver on the patient's right (negative x), behind the stomach's antrum.
    liver = (((X + 46 * scale) / (36 * scale)) ** 2 + ((Y - 2 * scale) / (42 * scale)) ** 2
             + ((Z - 15 * scale) / (60 * scale)) ** 2) <= 1
    hu[liver & abdomen] = HU_LIVER + 6 * _smooth_noise(rng, hu.shape, 3.0)[liver & abdomen]

    # Stomach: the radiology severity enlarges it, thickens the wall and roughens its texture.
    severity = plan.followup_severity if followup else plan.radiology_severity
    base_radius = (17.0 + 2.2 * severity + rng.normal(0, 1.0)) * scale
    wall = max(2.5, (4.0 + 0.8 * severity + rng.normal(0, 0.3))) * scale
    heterogeneity = 20.0 * math.exp(0.45 * severity + rng.normal(0, 0.08))
    offset = rng.normal(0, 4.0, size=3) * scale
    centre, relative_radius = _stomach_centreline()
    centre = centre * scale + offset
    outer = np.zeros(hu.shape, bool)
    lumen = np.zeros(hu.shape, bool)
    for (cx, cy, cz), rel in zip(centre, relative_radius):
        r_out = base_radius * rel
        r_in = max(r_out - wall, 0.0)
        d2 = (X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2
        outer |= d2 <= r_out**2
        lumen |= d2 <= r_in**2
    stomach = outer & (body <= 1)
    lumen &= stomach
    texture = _smooth_noise(rng, hu.shape, sigma=1.2)
    hu[stomach] = HU_STOMACH_WALL + 0.6 * heterogeneity * texture[stomach]
    hu[lumen] = HU_STOMACH_CONTENT + heterogeneity * texture[lumen]

    # The anatomy above is drawn alike for both CTs (the same draws in the same order); the noise
    # of the second CT is a draw of its own.
    noise = np.random.default_rng([spec.seed, 5, plan.index]) if followup else rng
    hu += noise.normal(0, HU_NOISE_SD, hu.shape).astype(np.float32)
    hu[body > 1.05] = HU_AIR + noise.normal(0, 5, (body > 1.05).sum()).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    # ITK's view of a typical NIfTI: x and y axes flipped, origin at the first voxel's centre.
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    origin = ((nx - 1) / 2 * sx, (ny - 1) / 2 * sy, -(nz - 1) / 2 * sz)
    # The array was laid out along +x/+y (LPS); flipping x and y puts the same anatomy under the
    # flipped direction, so LPS reorientation reproduces the layout above.
    images = []
    for array in (hu, stomach.astype(np.uint8)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array[:, ::-1, ::-1]))
        image.SetSpacing((float(sx), float(sy), float(sz)))
        image.SetDirection(direction)
        image.SetOrigin(origin)
        images.append(image)
    return images[0], images[1]


def true_stomach_lps(plan: PatientPlan, spec: CohortSpec, followup: bool = False) -> sitk.Image:
    """The generator's own stomach mask, reoriented to LPS as ct_image stores the CT: the truth
    a predicted ct_mask can be scored against."""
    return sitk.DICOMOrient(make_ct(plan, spec, followup)[1], "LPS")


def nifti_bytes(image: sitk.Image) -> bytes:
    """The bytes SimpleITK writes for `image` as .nii.gz (via a scratch file outside the landing zone)."""
    with tempfile.TemporaryDirectory(prefix="gcmlm-synthetic-") as scratch:
        path = Path(scratch) / "image.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        return path.read_bytes()
