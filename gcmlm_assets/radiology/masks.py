"""Gastric masks: load a reference mask, put it exactly on the CT's grid, measure it, picture it.

Plain Python (no Dagster). A mask that cannot describe the CT it belongs to
(empty, outside the CT in physical space, unreadable) raises `MaskInputError`
naming the mask file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcmlm_assets.radiology.ct_io import (
    CANONICAL_ORIENTATION,
    CTInputError,
    read_volume_file,
    visible_files,
    volume_suffix,
)

# Grids whose spacing/origin differ by less than this fraction of a voxel (and
# whose direction cosines differ by less than this) are the same grid written
# with float32 rounding: the mask takes the CT's geometry without resampling.
GRID_TOLERANCE = 1e-4


class MaskInputError(ValueError):
    """A mask that cannot be used for this CT; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class ConformedMask:
    """A binary uint8 mask on the CT's grid, and what was done to get it there."""

    image: sitk.Image
    resampled: bool  # nearest-neighbour resampling onto the CT grid was needed
    reoriented_from: str | None  # the mask's own orientation when it was not LPS
    source_voxels: int  # foreground voxels in the mask as given (on its own grid)
    source_grid: dict

    def provenance(self) -> dict:
        return {
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
    if len(volumes) != 1 or len(files) != 1:
        names = ", ".join(p.name for p in files[:6])
        raise MaskInputError(f"{label_dir}: expected exactly one mask volume file "
                             f"(.nii/.nii.gz/.nrrd/.mha), found: {names}")
    return volumes[0]


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


def conform_mask(mask: sitk.Image, image: sitk.Image, mask_path: Path) -> ConformedMask:
    """Binarise `mask` and put it exactly on `image`'s grid.

    A mask on the same grid (possibly stored in another axis order) takes the
    CT's geometry unchanged; any other grid is resampled with nearest neighbour,
    which keeps the mask binary. Empty or non-overlapping masks are refused.
    """
    if mask.GetDimension() != 3:
        raise MaskInputError(f"{mask_path}: expected a 3-D mask, found {mask.GetDimension()}-D")
    source_grid = grid_of(mask)
    binary = binarise(mask)
    box = foreground_box(binary)
    if box is None:
        raise MaskInputError(f"{mask_path}: mask is empty (no non-zero voxel)")
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
    return ConformedMask(on_grid, resampled, reoriented_from, source_voxels, source_grid)


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
