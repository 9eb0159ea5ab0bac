"""Gastric masks: load a reference mask, put it exactly on the CT's grid, measure it, picture it.

Plain Python (no Dagster). A mask that cannot describe the CT it belongs to
(empty, outside the CT in physical space, unreadable, a label map without a chosen
label) raises `MaskInputError` naming the mask file. Also here: what a mask holds
(bone, air outside the body) and how far two masks agree (Dice).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from gcmlm_assets.lazy import lazy
from gcmlm_assets.radiology.ct_io import (
    CANONICAL_ORIENTATION,
    CTInputError,
    read_volume_file,
    visible_files,
    volume_suffix,
)
from gcmlm_assets.radiology.hounsfield import AIR_HU, BONE_HU

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk
else:  # imported on first use: the definitions import this module, not its work (gcmlm_assets/lazy.py)
    np = lazy("numpy")
    sitk = lazy("SimpleITK")

# Grids whose spacing/origin differ by less than this fraction of a voxel (and
# whose direction cosines differ by less than this) are the same grid written
# with float32 rounding: the mask takes the CT's geometry without resampling.
GRID_TOLERANCE = 1e-4

# nnU-Net's dataset description, the sidecar that names the labels of a label map; `<mask>.json`
# beside the mask is read the same way.
DATASET_SIDECAR = "dataset.json"
# At most this many labels are spelled out in a refusal (TotalSegmentator's full map has 117).
LISTED_LABELS = 120



class MaskInputError(ValueError):
    """A mask that cannot be used for this CT; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class LabelChoice:
    """Which voxels of the mask as given are the stomach."""

    value: float | None  # the label value kept; None: every non-zero voxel (a binary mask)
    name: str = ""  # the label's name, when the setting named it
    sidecar: str = ""  # the JSON file the name was looked up in

    def describe(self) -> str:
        if self.value is None:
            return "binary mask (every non-zero voxel)"
        named = f" ({self.name}, from {self.sidecar})" if self.name else ""
        return f"label {self.value:g}{named}"

    def as_dict(self) -> dict:
        return {"label_value": self.value, "label_name": self.name, "label_sidecar": self.sidecar,
                "label": self.describe()}


@dataclasses.dataclass(frozen=True)
class ConformedMask:
    """A binary uint8 mask on the CT's grid, and what was done to get it there."""

    image: sitk.Image
    resampled: bool  # nearest-neighbour resampling onto the CT grid was needed
    reoriented_from: str | None  # the mask's own orientation when it was not LPS
    source_voxels: int  # foreground voxels in the mask as given (on its own grid)
    source_grid: dict
    label: LabelChoice = LabelChoice(None)

    def provenance(self) -> dict:
        return {
            **self.label.as_dict(),
            "resampled_to_ct_grid": self.resampled,
            "resampling": "nearest neighbour" if self.resampled else "none (same grid)",
            "reoriented_from": self.reoriented_from or "",
            "source_voxels": self.source_voxels,
            "source_grid": self.source_grid,
        }


@dataclasses.dataclass(frozen=True)
class MaskStats:
    voxels: int
    voxel_volume_ml: float
    volume_ml: float
    components: int
    largest_component_voxels: int
    bbox_index: tuple[int, ...]  # x0, y0, z0, size_x, size_y, size_z

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_reference_mask(label_dir: Path) -> Path | None:
    """The one volume file in `<patient>/ct_label/`, or None when there is no reference mask."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        return None
    files = visible_files(label_dir)
    if not files:
        return None
    volumes = [p for p in files if volume_suffix(p)]
    sidecars = {DATASET_SIDECAR} | {_sidecar_name(p) for p in volumes}
    others = [p for p in files if not volume_suffix(p) and p.name not in sidecars]
    if len(volumes) != 1 or others:
        names = ", ".join(p.name for p in files[:6])
        raise MaskInputError(f"{label_dir}: expected exactly one mask volume file "
                             f"(.nii/.nii.gz/.nrrd/.mha), optionally with a label sidecar ({DATASET_SIDECAR} "
                             f"or <mask>.json), found: {names}")
    return volumes[0]


def _sidecar_name(mask_path: Path) -> str:
    suffix = volume_suffix(mask_path) or mask_path.suffix
    return mask_path.name[: len(mask_path.name) - len(suffix)] + ".json"


# ---------------------------------------------------------------- label maps


def label_counts(mask: sitk.Image) -> dict[float, int]:
    """Voxel count of every non-zero value of the mask, by value."""
    values, counts = np.unique(sitk.GetArrayViewFromImage(mask), return_counts=True)
    return {float(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}


def label_sidecars(mask_path: Path) -> list[Path]:
    """Where the label names of a mask may be, in the order they are looked for."""
    mask_path = Path(mask_path)
    return [mask_path.parent / _sidecar_name(mask_path), mask_path.parent / DATASET_SIDECAR]


def sidecar_labels(mask_path: Path) -> tuple[Path, dict[str, float]] | None:
    """The label names of a mask from `<mask>.json` or `dataset.json` beside it (nnU-Net's
    `labels` {name: value}), or None when there is neither."""
    for candidate in label_sidecars(mask_path):
        if not candidate.is_file():
            continue
        try:
            labels = json.loads(candidate.read_text(encoding="utf-8")).get("labels")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise MaskInputError(f"{candidate}: label sidecar is not a JSON object ({error})") from error
        if not isinstance(labels, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels.values()):
            raise MaskInputError(f"{candidate}: expected \"labels\": {{name: value}} with one number per name "
                                 "(as nnU-Net's dataset.json has them)")
        return candidate, {str(name): float(value) for name, value in labels.items()}
    return None


def _label_listing(counts: dict[float, int], names: dict[float, str]) -> str:
    shown = [f"{value:g}{' ' + names[value] if value in names else ''} ({count} voxels)"
             for value, count in list(counts.items())[:LISTED_LABELS]]
    more = len(counts) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def resolve_label(setting: str | None, mask_path: Path) -> LabelChoice:
    """The label `setting` names: empty (binary masks only), a value (`6`) or a name (`stomach`)
    looked up in the mask's sidecar JSON."""
    setting = (setting or "").strip()
    if not setting:
        return LabelChoice(None)
    try:
        return LabelChoice(float(setting))
    except ValueError:
        pass
    found = sidecar_labels(mask_path)
    if found is None:
        raise MaskInputError(
            f"{mask_path}: the stomach label is set by name ({setting!r}) but there is no label sidecar "
            f"({' or '.join(str(p) for p in label_sidecars(mask_path))}) to look the name up in; set the label's "
            "value instead")
    sidecar, labels = found
    if setting not in labels:
        raise MaskInputError(f"{mask_path}: label {setting!r} is not named in {sidecar} (names: "
                             f"{', '.join(labels) or 'none'})")
    return LabelChoice(labels[setting], setting, str(sidecar))


def select_stomach(mask: sitk.Image, mask_path: Path, label_setting: str | None = None) -> tuple[sitk.Image,
                                                                                                 LabelChoice]:
    """The stomach as a 0/1 uint8 mask on the mask's own grid, and the label it came from.

    Without a label setting only binary masks are accepted (one non-zero value): a label map
    (several organs) is refused, listing its labels, so that it never becomes one large "stomach".
    """
    choice = resolve_label(label_setting, mask_path)
    counts = label_counts(mask)
    if choice.value is None:
        if len(counts) > 1:
            found = sidecar_labels(mask_path)
            names = {value: name for name, value in found[1].items()} if found else {}
            raise MaskInputError(
                f"{mask_path}: mask holds {len(counts)} different labels, not one: "
                f"{_label_listing(counts, names)}. It looks like a multi-organ label map: set "
                "radiomics.reference_mask_label to the stomach's label (its value, or its name in a "
                f"{DATASET_SIDECAR} beside the mask)")
        return binarise(mask), choice
    if choice.value not in counts:
        raise MaskInputError(f"{mask_path}: {choice.describe()} is not in the mask; its labels are "
                             f"{_label_listing(counts, {}) or 'none (the mask is empty)'}")
    return sitk.Cast(sitk.Equal(mask, choice.value), sitk.sitkUInt8), choice


def load_mask(path: Path) -> sitk.Image:
    try:
        return read_volume_file(path)
    except CTInputError as error:
        raise MaskInputError(f"mask {error}") from error


def binarise(mask: sitk.Image) -> sitk.Image:
    """Every non-zero voxel is foreground (a multi-label file counts as one region)."""
    return sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)


def grid_of(image: sitk.Image) -> dict:
    return {
        "size": list(image.GetSize()),
        "spacing": [round(v, 6) for v in image.GetSpacing()],
        "origin": [round(v, 4) for v in image.GetOrigin()],
        "direction": [round(v, 6) for v in image.GetDirection()],
    }


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    spacing_a, spacing_b = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(spacing_a, spacing_b, rtol=tolerance, atol=0):
        return False
    if np.abs(np.array(a.GetOrigin()) - np.array(b.GetOrigin())).max() > tolerance * spacing_a.min():
        return False
    return np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)


def geometry_identical(a: sitk.Image, b: sitk.Image) -> bool:
    """Exactly the same grid, as stored (what `mask.nii.gz` must share with `ct.nii.gz`)."""
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
            and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection())


def physical_bounds(image: sitk.Image, index_box: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical box (min corner, max corner) covering voxels of `index_box`
    (x0, y0, z0, nx, ny, nz; default the whole image), voxel edges included."""
    if index_box is None:
        index_box = (0, 0, 0, *image.GetSize())
    start = np.array(index_box[:3], dtype=float) - 0.5
    stop = start + np.array(index_box[3:], dtype=float)
    corners = [image.TransformContinuousIndexToPhysicalPoint(
        [float(stop[d] if (k >> d) & 1 else start[d]) for d in range(3)]) for k in range(8)]
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def foreground_box(mask: sitk.Image) -> tuple[int, ...] | None:
    """Index bounding box (x0, y0, z0, nx, ny, nz) of the non-zero voxels, None when empty."""
    values = sitk.GetArrayViewFromImage(mask)
    nonzero = np.nonzero(values)
    if nonzero[0].size == 0:
        return None
    lo = [int(a.min()) for a in nonzero][::-1]  # array axes are z, y, x
    hi = [int(a.max()) for a in nonzero][::-1]
    return (*lo, *(high - low + 1 for low, high in zip(lo, hi, strict=True)))


def conform_mask(mask: sitk.Image, image: sitk.Image, mask_path: Path,
                 label_setting: str | None = None) -> ConformedMask:
    """Take the stomach out of `mask` (`select_stomach`) and put it exactly on `image`'s grid.

    A mask on the same grid (possibly stored in another axis order) takes the
    CT's geometry unchanged; any other grid is resampled with nearest neighbour,
    which keeps the mask binary. Empty or non-overlapping masks are refused.
    """
    if mask.GetDimension() != 3:
        raise MaskInputError(f"{mask_path}: expected a 3-D mask, found {mask.GetDimension()}-D")
    source_grid = grid_of(mask)
    if foreground_box(mask) is None:
        raise MaskInputError(f"{mask_path}: mask is empty (no non-zero voxel)")
    binary, label = select_stomach(mask, mask_path, label_setting)
    box = foreground_box(binary)
    source_voxels = int(sitk.GetArrayViewFromImage(binary).sum())

    mask_low, mask_high = physical_bounds(binary, box)
    image_low, image_high = physical_bounds(image)
    if np.any(mask_high <= image_low) or np.any(mask_low >= image_high):
        raise MaskInputError(
            f"{mask_path}: mask does not overlap the CT in physical space (mask foreground spans "
            f"{_fmt_box(mask_low, mask_high)} mm, CT spans {_fmt_box(image_low, image_high)} mm)")

    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(binary.GetDirection())
    reoriented_from = None
    if orientation != CANONICAL_ORIENTATION:
        binary = sitk.DICOMOrient(binary, CANONICAL_ORIENTATION)
        reoriented_from = orientation

    if same_grid(binary, image):
        on_grid = sitk.Image(binary)
        on_grid.CopyInformation(image)
        resampled = False
    else:
        on_grid = sitk.Resample(binary, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        resampled = True
        if not sitk.GetArrayViewFromImage(on_grid).any():
            raise MaskInputError(
                f"{mask_path}: mask is empty on the CT grid after nearest-neighbour resampling "
                f"(its {source_voxels} voxels fall between CT voxel centres or outside the CT)")
    return ConformedMask(on_grid, resampled, reoriented_from, source_voxels, source_grid, label)


def validate_prediction(mask: sitk.Image, image: sitk.Image, where: str) -> sitk.Image:
    """A model's output as a uint8 0/1 mask on exactly `image`'s grid, or MaskInputError."""
    if mask.GetDimension() != 3 or not same_grid(mask, image):
        raise MaskInputError(f"{where}: predicted mask grid {grid_of(mask)} differs from the CT grid "
                             f"{grid_of(image)}")
    binary = binarise(mask)
    binary.CopyInformation(image)
    if not sitk.GetArrayViewFromImage(binary).any():
        raise MaskInputError(f"{where}: predicted mask is empty (the model found no stomach)")
    return binary


def mask_stats(mask: sitk.Image) -> MaskStats:
    """Voxel count, volume (voxels x voxel volume) and 6-connected components of a 0/1 mask."""
    values = sitk.GetArrayViewFromImage(mask)
    voxels = int(np.count_nonzero(values))
    voxel_volume_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    # Face connectivity: touching only at an edge or corner is not one piece of stomach.
    components = sitk.ConnectedComponent(mask, False)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.Execute(components)
    sizes = relabel.GetSizeOfObjectsInPixels()
    return MaskStats(
        voxels=voxels,
        voxel_volume_ml=voxel_volume_ml,
        volume_ml=voxels * voxel_volume_ml,
        components=int(relabel.GetNumberOfObjects()),
        largest_component_voxels=int(sizes[0]) if sizes else 0,
        bbox_index=foreground_box(mask) or (0, 0, 0, 0, 0, 0),
    )


@dataclasses.dataclass(frozen=True)
class MaskContent:
    """What the CT holds under a mask: a stomach is soft tissue, fluid and its own gas."""

    voxels: int
    bone_voxels: int  # above BONE_HU
    outside_air_voxels: int  # gas connected to the image's edge within its slice: outside the body

    @property
    def bone_fraction(self) -> float:
        return self.bone_voxels / self.voxels if self.voxels else 0.0

    @property
    def outside_air_fraction(self) -> float:
        return self.outside_air_voxels / self.voxels if self.voxels else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bone_fraction": self.bone_fraction,
                "outside_air_fraction": self.outside_air_fraction}


def outside_body_air(ct_values: np.ndarray) -> np.ndarray:
    """Gas voxels (below AIR_HU) of a z, y, x array joined, within their axial slice, to the slice's
    edge: the air around the patient. Per slice rather than in 3-D, so that the gas of a stomach
    cut by the first or last slice of a partial scan still counts as inside."""
    from scipy import ndimage

    air = ct_values < AIR_HU
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = [[False, True, False], [True, True, True], [False, True, False]]
    components, count = ndimage.label(air, structure=in_plane)
    at_edge = np.zeros(count + 1, dtype=bool)
    for edge in (components[:, 0, :], components[:, -1, :], components[:, :, 0], components[:, :, -1]):
        at_edge[edge] = True
    at_edge[0] = False
    return at_edge[components]


def mask_content(image: sitk.Image, mask: sitk.Image) -> MaskContent:
    """Bone and outside-the-body air under a 0/1 mask on `image`'s grid."""
    inside = sitk.GetArrayViewFromImage(mask) != 0
    voxels = int(np.count_nonzero(inside))
    if voxels == 0:
        return MaskContent(0, 0, 0)
    slices = np.flatnonzero(inside.any(axis=(1, 2)))
    low, high = int(slices[0]), int(slices[-1]) + 1  # only the slices the mask reaches
    values = sitk.GetArrayViewFromImage(image)[low:high]
    inside = inside[low:high]
    return MaskContent(voxels=voxels, bone_voxels=int(np.count_nonzero(values[inside] > BONE_HU)),
                       outside_air_voxels=int(np.count_nonzero(outside_body_air(values)[inside])))


def dice(a: sitk.Image | np.ndarray, b: sitk.Image | np.ndarray) -> float:
    """Dice overlap of two masks on the same grid (non-zero is inside); 1.0 when both are empty."""
    # The array views borrow the images' buffers: `image_a`/`image_b` keep an image passed as a
    # temporary alive until the views are done with.
    image_a, image_b = a, b
    a = sitk.GetArrayViewFromImage(image_a) if isinstance(image_a, sitk.Image) else np.asarray(image_a)
    b = sitk.GetArrayViewFromImage(image_b) if isinstance(image_b, sitk.Image) else np.asarray(image_b)
    if a.shape != b.shape:
        raise ValueError(f"Dice of masks of different shapes: {a.shape} and {b.shape}")
    a, b = a != 0, b != 0
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def write_mask(mask: sitk.Image, final: Path) -> Path:
    from gcmlm_assets.radiology.ct_io import write_volume

    return write_volume(sitk.Cast(mask, sitk.sitkUInt8), final)


def mask_overlay_png(image: sitk.Image, mask: sitk.Image) -> bytes:
    """The CT with the mask outlined, in three planes through the mask's centre of mass, as a
    full-size PNG (`pictures.display_version` makes the UI's copy)."""
    from gcmlm_assets.pictures import figure_png, plt
    from gcmlm_assets.radiology.ct_io import ABDOMEN_WINDOW, THREE_PLANES_FIGSIZE, _windowed, orthogonal_slices

    volume = sitk.GetArrayViewFromImage(image)
    labels = sitk.GetArrayViewFromImage(mask)
    nonzero = np.nonzero(labels)
    centre = tuple(int(round(a.mean())) for a in nonzero) if nonzero[0].size else None
    spacing = image.GetSpacing()
    fig, axes = plt.subplots(1, 3, figsize=THREE_PLANES_FIGSIZE, layout="constrained")
    planes = zip(orthogonal_slices(volume, spacing, centre), orthogonal_slices(labels, spacing, centre), strict=True)
    for ax, ((name, plane, aspect), (_, label_plane, _)) in zip(axes, planes, strict=True):
        ax.imshow(_windowed(plane, ABDOMEN_WINDOW), cmap="gray", vmin=0, vmax=1, aspect=aspect,
                  interpolation="nearest")
        overlay = np.ma.masked_where(label_plane == 0, label_plane)
        ax.imshow(overlay, cmap="autumn", alpha=0.45, aspect=aspect, interpolation="nearest")
        if label_plane.any():
            # 1.2 pt: 2.5 px at full size, still over 1.5 px in the 1200 px display copy
            ax.contour(label_plane, levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(name, fontsize=14)
        ax.axis("off")
    fig.suptitle("gastric mask over CT (patient's right on the left)", fontsize=14)
    return figure_png(fig)


def _fmt_box(low: np.ndarray, high: np.ndarray) -> str:
    return " x ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(low, high, strict=True))
