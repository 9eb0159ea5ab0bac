"""A deterministic synthetic gastric-cancer cohort written into a landing zone (plain Python, no Dagster).

Each patient gets what a real upload would hold (see the README's landing-zone contract):

- `ct/ct.nii.gz`: a small abdominal CT in HU (air, subcutaneous and visceral fat, muscle, liver,
  spine, bowel) with a stomach: a J-shaped tube (union of spheres along a curved centre line)
  made of an enhancing wall around fluid contents. Written with the direction NIfTI files
  usually carry in ITK (x and y flipped), so the pipeline's reorientation is exercised.
- `ct_label/stomach.nii.gz`: the reference stomach mask (uint8, the CT's grid) for half of the
  patients, balanced over the label; the others are segmented by the trained nnU-Net.
- `wsi/<id>_slide<k>.tiff`: one or two pyramidal tiled TIFFs (JPEG tiles, 256 px, levels /1 /2
  /4 /8, resolution tags in pixels per centimetre so OpenSlide reports `openslide.mpp-x`) with
  H&E-like tissue: pink stroma, purple nuclei, tumour nests, white background.
- `READY` (written last) and the cohort's `clinical.csv` (patient_id, mlm, age, sex, pt_stage,
  tumour_size_mm).

The planted signal: every patient has two latent severities, one per modality,
`severity = strength * (2 * mlm - 1) / 2 + N(0, 1)` with independent noise. The radiology
severity enlarges the stomach, thickens its wall and makes its texture more heterogeneous; the
pathology severity raises nuclear density and size and the share of tissue in tumour nests
(less stroma). Each modality alone separates the classes imperfectly (AUC about
`Phi(strength / sqrt(2))`); together they separate them better, so fusion has something to
add. Clinical covariates carry at most a weak association (pT stage), never the answer.

Everything is drawn from `numpy.random.default_rng([seed, patient_index, ...])`, so a cohort is
byte-identical for the same settings; files whose bytes would not change are left untouched
(their times too), so the landing sensor sees no change when a cohort is written again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
import tifffile

from gcmlm_assets.landing.scan import CLINICAL_CSV, READY_MARKER
from gcmlm_assets.storage import atomic_write_bytes, sha256_file

# Bump when the bytes the generator writes would change for the same settings.
GENERATOR_VERSION = "1"
CLINICAL_COLUMNS = ("patient_id", "mlm", "age", "sex", "pt_stage", "tumour_size_mm")
# Kept outside every patient folder; the landing scan only looks at folders and clinical.csv.
COHORT_MANIFEST = ".synthetic_cohort.json"
# The real patient blended in from GCMLM_TEST_DATA (label unknown: scored, never trained on).
REAL_PATIENT_ID = "REAL0001"

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

# H&E colours (RGB): background glass, eosin-stained stroma, tumour-cell cytoplasm, haematoxylin nuclei.
RGB_GLASS = np.array([243, 241, 244], np.float32)
RGB_STROMA = np.array([232, 158, 196], np.float32)
RGB_CYTOPLASM = np.array([206, 146, 198], np.float32)
RGB_NUCLEUS = np.array([84, 52, 138], np.float32)


@dataclass(frozen=True)
class CohortSpec:
    """What to generate. The defaults are the demo's cohort; tests use smaller values."""

    n_patients: int = 24
    seed: int = 20240611
    id_prefix: str = "GC"
    ct_size: tuple[int, int, int] = (96, 96, 48)  # x, y, z voxels
    ct_spacing: tuple[float, float, float] = (2.0, 2.0, 2.5)  # mm
    slide_width: tuple[int, int] = (2000, 3000)  # level-0 pixels, drawn per slide
    slide_aspect: float = 0.75
    mpp: float = 0.5  # µm per level-0 pixel (a 20x scan)
    pyramid_levels: int = 4
    max_slides: int = 2
    jpeg_quality: int = 90
    # Class separation of each modality's latent severity, in noise SDs.
    signal_strength: float = 1.8

    def __post_init__(self) -> None:
        if self.n_patients < 2:
            raise ValueError(f"a cohort needs at least 2 patients, got {self.n_patients}")
        if min(self.ct_size) < 16:
            raise ValueError(f"ct_size {self.ct_size} is too small for the phantom (>= 16 voxels per axis)")
        if self.slide_width[0] < 512 or self.slide_width[1] < self.slide_width[0]:
            raise ValueError(f"slide_width {self.slide_width} must be an increasing range from >= 512 px")

    @classmethod
    def small(cls, n_patients: int = 8, **overrides) -> CohortSpec:
        """A cohort for tests: a few seconds per asset."""
        settings = dict(n_patients=n_patients, ct_size=(48, 48, 24), ct_spacing=(4.0, 4.0, 5.0),
                        slide_width=(1200, 1600), pyramid_levels=3)
        settings.update(overrides)
        return cls(**settings)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class PatientPlan:
    """Everything drawn for one patient before any pixel is made."""

    index: int
    patient_id: str
    mlm: int
    has_reference_mask: bool
    n_slides: int
    radiology_severity: float
    pathology_severity: float
    age: int
    sex: int  # 1 = male
    pt_stage: int
    tumour_size_mm: float


@dataclass
class CohortResult:
    landing: Path
    patients: list[PatientPlan]
    written: list[str] = field(default_factory=list)  # files whose bytes changed
    unchanged: int = 0
    real_patient: str | None = None

    @property
    def patient_ids(self) -> list[str]:
        ids = [p.patient_id for p in self.patients]
        return ids + ([self.real_patient] if self.real_patient else [])


def patient_id(spec: CohortSpec, index: int) -> str:
    return f"{spec.id_prefix}{index + 1:04d}"


def plan_cohort(spec: CohortSpec) -> list[PatientPlan]:
    """Labels (half positive, rounded down), reference masks (half of each class) and latent severities."""
    rng = np.random.default_rng([spec.seed, 0])
    n = spec.n_patients
    labels = np.zeros(n, dtype=int)
    labels[rng.permutation(n)[: n // 2]] = 1
    # Reference masks for every other patient of each class, so that which CTs the network
    # segments is independent of the label.
    has_mask = np.zeros(n, dtype=bool)
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        has_mask[members[::2]] = True
    plans = []
    for i in range(n):
        prng = np.random.default_rng([spec.seed, 1, i])
        shift = spec.signal_strength * (2 * labels[i] - 1) / 2
        rad = float(shift + prng.normal())
        path = float(shift + prng.normal())
        # pT stage is only weakly tied to the label (a realistic, non-decisive covariate).
        stage = int(np.clip(round(2.4 + 0.4 * labels[i] + prng.normal(0, 0.9)), 1, 4))
        plans.append(PatientPlan(
            index=i,
            patient_id=patient_id(spec, i),
            mlm=int(labels[i]),
            has_reference_mask=bool(has_mask[i]),
            n_slides=int(prng.integers(1, spec.max_slides + 1)),
            radiology_severity=round(rad, 6),
            pathology_severity=round(path, 6),
            age=int(np.clip(round(prng.normal(64, 10)), 30, 90)),
            sex=int(prng.random() < 0.65),
            pt_stage=stage,
            tumour_size_mm=round(float(np.clip(prng.normal(35 + 5 * stage, 12), 8, 120)), 1),
        ))
    return plans


# ---------------------------------------------------------------- CT


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


def make_ct(plan: PatientPlan, spec: CohortSpec) -> tuple[sitk.Image, sitk.Image]:
    """The patient's CT (int16 HU) and its stomach mask (uint8 0/1), same grid."""
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
    severity = plan.radiology_severity
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

    hu += rng.normal(0, HU_NOISE_SD, hu.shape).astype(np.float32)
    hu[body > 1.05] = HU_AIR + rng.normal(0, 5, (body > 1.05).sum()).astype(np.float32)
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


def true_stomach_lps(plan: PatientPlan, spec: CohortSpec) -> sitk.Image:
    """The generator's own stomach mask, reoriented to LPS as ct_image stores the CT: the truth
    a predicted ct_mask can be scored against."""
    return sitk.DICOMOrient(make_ct(plan, spec)[1], "LPS")


def nifti_bytes(image: sitk.Image) -> bytes:
    """The bytes SimpleITK writes for `image` as .nii.gz (via a scratch file outside the landing zone)."""
    with tempfile.TemporaryDirectory(prefix="gcmlm-synthetic-") as scratch:
        path = Path(scratch) / "image.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        return path.read_bytes()


# ---------------------------------------------------------------- WSI


def _resized_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Unit-SD smooth noise at full size, drawn on a coarse grid of `cell` pixels and upsampled."""
    coarse = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), 1.0)
    fine = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine -= fine.mean()
    return fine / max(float(fine.std()), 1e-6)


def make_slide(rng: np.random.Generator, width: int, height: int, severity: float, mpp: float) -> np.ndarray:
    """An H&E-like RGB image (uint8, height x width x 3).

    Tissue is a blob of smooth noise inside an elliptical envelope; inside it, tumour nests (a
    share rising with `severity`) hold dense, large nuclei on lilac cytoplasm, and stroma holds
    sparse, small, elongated nuclei on pink. Sizes are set in micrometres and converted with `mpp`.
    """
    um = 1.0 / mpp  # pixels per micrometre
    ys = ((np.arange(height, dtype=np.float32) - height / 2) / (0.44 * height)) ** 2
    xs = ((np.arange(width, dtype=np.float32) - width / 2) / (0.46 * width)) ** 2
    shape_noise = _resized_noise(rng, height, width, cell=int(250 * um))
    tissue = (1.0 - ys[:, None] - xs[None, :] + 0.35 * shape_noise) > 0.25

    nest_share = float(np.clip(0.30 + 0.11 * severity + rng.normal(0, 0.02), 0.05, 0.85))
    nest_field = _resized_noise(rng, height, width, cell=int(60 * um))
    threshold = float(np.quantile(nest_field[tissue], 1.0 - nest_share)) if tissue.any() else 0.0
    nests = tissue & (nest_field > threshold)
    # 0 glass, 1 stroma, 2 tumour nest
    region = tissue.astype(np.uint8) + nests.astype(np.uint8)

    stain = _resized_noise(rng, height, width, cell=int(120 * um))
    palette = np.stack([RGB_GLASS, RGB_STROMA, RGB_CYTOPLASM])
    stain_amplitude = np.array([0.0, 10.0, 8.0], np.float32)
    rgb = palette[region] + (stain_amplitude[region] * stain)[..., None]

    # Nuclei: Poisson counts per area; tumour nuclei denser and larger as severity rises.
    nuclei = np.zeros((height, width), np.uint8)
    stroma = tissue & ~nests
    area_um2 = {"nest": nests.sum() / um**2, "stroma": stroma.sum() / um**2}
    density = {"nest": 5000e-6 * math.exp(0.22 * severity), "stroma": 800e-6}  # per µm²
    radius_um = {"nest": 3.6 * math.exp(0.08 * severity), "stroma": 2.4}
    for name, mask in (("nest", nests), ("stroma", stroma)):
        count = int(rng.poisson(density[name] * area_um2[name]))
        if count == 0:
            continue
        candidates_y = rng.integers(0, height, size=count * 3)
        candidates_x = rng.integers(0, width, size=count * 3)
        inside = mask[candidates_y, candidates_x]
        cy, cx = candidates_y[inside][:count], candidates_x[inside][:count]
        radii = rng.normal(radius_um[name], 0.5, size=len(cy)).clip(1.2) * um
        elongation = rng.uniform(1.0, 1.3 if name == "nest" else 2.2, size=len(cy))
        angles = rng.uniform(0, 180, size=len(cy))
        for y, x, r, e, a in zip(cy.tolist(), cx.tolist(), radii.tolist(), elongation.tolist(), angles.tolist()):
            axes = (max(1, int(round(r * e))), max(1, int(round(r / e))))
            cv2.ellipse(nuclei, (x, y), axes, a, 0, 360, 255, -1)
    weight = cv2.GaussianBlur(nuclei, (0, 0), 0.8).astype(np.float32) / 255.0
    nucleus_colour = RGB_NUCLEUS + 12.0 * stain[..., None]
    rgb += weight[..., None] * (nucleus_colour - rgb)
    rgb += 4.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def pyramid(rgb: np.ndarray, levels: int) -> list[np.ndarray]:
    images = [rgb]
    for _ in range(1, levels):
        previous = images[-1]
        if min(previous.shape[:2]) < 64:
            break
        images.append(cv2.resize(previous, (previous.shape[1] // 2, previous.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    return images


def pyramidal_tiff_bytes(rgb: np.ndarray, mpp: float, levels: int, quality: int = 90) -> bytes:
    """A tiled, JPEG-compressed, pyramidal TIFF: one directory per level, level 0 first.

    OpenSlide reads this as `generic-tiff` and derives `openslide.mpp-x/y` from the resolution
    tags (pixels per centimetre)."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer, bigtiff=False) as tif:
        for level, image in enumerate(pyramid(rgb, levels)):
            pixels_per_cm = 1e4 / (mpp * 2**level)
            tif.write(
                image,
                photometric="rgb",
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                description=f"synthetic H&E, level {level}" if level == 0 else None,
                metadata=None,
                software="gcmlm_assets.demo.synthetic",
            )
    return buffer.getvalue()


# ---------------------------------------------------------------- writing


def _write_if_changed(path: Path, data: bytes, written: list[str]) -> bool:
    """Replace `path` atomically only when its bytes differ, so unchanged files keep their times."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    written.append(str(path))
    return True


def _drop_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _stale_files(folder: Path, keep: set[str]) -> list[Path]:
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and str(p.relative_to(folder)) not in keep]


def write_patient(landing: Path, plan: PatientPlan, spec: CohortSpec, written: list[str]) -> bool:
    """Write one patient's drop; READY last. Returns whether any file changed."""
    folder = landing / plan.patient_id
    files: dict[str, bytes] = {}
    ct, mask = make_ct(plan, spec)
    files["ct/ct.nii.gz"] = nifti_bytes(ct)
    if plan.has_reference_mask:
        files["ct_label/stomach.nii.gz"] = nifti_bytes(mask)
    rng = np.random.default_rng([spec.seed, 3, plan.index])
    for k in range(plan.n_slides):
        width = int(rng.integers(spec.slide_width[0], spec.slide_width[1] + 1))
        height = int(width * spec.slide_aspect)
        rgb = make_slide(rng, width, height, plan.pathology_severity, spec.mpp)
        files[f"wsi/{plan.patient_id}_slide{k + 1}.tiff"] = pyramidal_tiff_bytes(
            rgb, spec.mpp, spec.pyramid_levels, spec.jpeg_quality)
    return _write_drop(folder, files, written)


def _write_drop(folder: Path, files: dict[str, bytes], written: list[str]) -> bool:
    before = len(written)
    stale = _stale_files(folder, set(files) | {READY_MARKER}) if folder.is_dir() else []
    changes = stale or any(not (folder / rel).is_file() or (folder / rel).read_bytes() != data
                           for rel, data in files.items())
    if changes:
        # Like an uploader replacing a drop: withdraw READY, write, then READY again.
        (folder / READY_MARKER).unlink(missing_ok=True)
        for path in stale:
            path.unlink()
            written.append(f"removed {path}")
        for rel, data in files.items():
            _write_if_changed(folder / rel, data, written)
    if not (folder / READY_MARKER).is_file():
        atomic_write_bytes(folder / READY_MARKER, b"complete\n")
        written.append(str(folder / READY_MARKER))
    return len(written) > before


def clinical_csv_text(plans: list[PatientPlan], real_patient: str | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CLINICAL_COLUMNS)
    for p in plans:
        writer.writerow([p.patient_id, p.mlm, p.age, p.sex, p.pt_stage, f"{p.tumour_size_mm:.1f}"])
    if real_patient:
        # Outcome and covariates unknown: scored by the model, never trained on.
        writer.writerow([real_patient, "", "", "", "", ""])
    return buffer.getvalue()


@dataclass(frozen=True)
class RealFiles:
    """Real test files (GCMLM_TEST_DATA) that make up one extra patient."""

    ct: Path
    stomach_mask: Path
    slide: Path

    @classmethod
    def find(cls, test_data: str | os.PathLike | None) -> RealFiles | None:
        if not test_data:
            return None
        root = Path(test_data)
        files = cls(root / "ct/totalsegmentator/example_ct_sm.nii.gz",
                    root / "ct/totalsegmentator/example_ct_sm_stomach.nii.gz",
                    root / "wsi/cmu-1-small-region.svs")
        return files if all(p.is_file() for p in (files.ct, files.stomach_mask, files.slide)) else None


def write_real_patient(landing: Path, real: RealFiles, written: list[str]) -> bool:
    """The real TotalSegmentator CT with its stomach mask and the real CMU-1 H&E region."""
    files = {
        "ct/ct.nii.gz": real.ct.read_bytes(),
        "ct_label/stomach.nii.gz": real.stomach_mask.read_bytes(),
        f"wsi/{real.slide.name}": real.slide.read_bytes(),
    }
    return _write_drop(landing / REAL_PATIENT_ID, files, written)


def _plan_digest(spec: CohortSpec, plan: PatientPlan) -> str:
    text = json.dumps({"version": GENERATOR_VERSION, "spec": spec.as_dict(), "plan": asdict(plan)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_cohort(landing: str | os.PathLike, spec: CohortSpec | None = None, *,
                 real: RealFiles | None = None, progress=None) -> CohortResult:
    """Write (or confirm) the cohort in `landing`.

    A patient whose folder still holds exactly the bytes recorded for the same generator version,
    settings and plan is skipped without regenerating it; otherwise it is regenerated and only
    files whose bytes differ are replaced. Patients of an earlier, larger cohort with the same id
    prefix are removed, so the landing zone holds exactly this cohort.
    """
    spec = spec or CohortSpec()
    landing = Path(landing)
    landing.mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(spec)
    manifest_path = landing / COHORT_MANIFEST
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8")).get("patients", {})
    except (FileNotFoundError, json.JSONDecodeError):
        recorded = {}
    result = CohortResult(landing, plans)
    manifest: dict[str, dict] = {}
    for plan in plans:
        folder = landing / plan.patient_id
        digest = _plan_digest(spec, plan)
        entry = recorded.get(plan.patient_id, {})
        if (entry.get("plan") == digest and folder.is_dir() and (folder / READY_MARKER).is_file()
                and _drop_digest(folder) == entry.get("files")):
            result.unchanged += 1
            changed = False
        else:
            changed = write_patient(landing, plan, spec, result.written)
        manifest[plan.patient_id] = {"plan": digest, "files": _drop_digest(folder)}
        if progress:
            progress(plan, changed)
    ours = {p.patient_id for p in plans}
    for old in sorted(set(recorded) - ours - {REAL_PATIENT_ID}):
        if (landing / old).is_dir():
            shutil.rmtree(landing / old)
            result.written.append(f"removed {landing / old}")
    if real is not None:
        write_real_patient(landing, real, result.written)
        result.real_patient = REAL_PATIENT_ID
    elif REAL_PATIENT_ID in recorded and (landing / REAL_PATIENT_ID).is_dir():
        shutil.rmtree(landing / REAL_PATIENT_ID)
        result.written.append(f"removed {landing / REAL_PATIENT_ID}")
    if result.real_patient:
        manifest[REAL_PATIENT_ID] = {"plan": "real", "files": _drop_digest(landing / REAL_PATIENT_ID)}
    _write_if_changed(landing / CLINICAL_CSV, clinical_csv_text(plans, result.real_patient).encode(),
                      result.written)
    atomic_write_bytes(manifest_path, json.dumps(
        {"generator_version": GENERATOR_VERSION, "spec": spec.as_dict(), "patients": manifest},
        indent=1, sort_keys=True).encode())
    return result


__all__ = [
    "CohortSpec", "PatientPlan", "CohortResult", "RealFiles", "plan_cohort", "make_ct", "make_slide",
    "true_stomach_lps",
    "pyramidal_tiff_bytes", "write_cohort", "clinical_csv_text", "REAL_PATIENT_ID",
]
