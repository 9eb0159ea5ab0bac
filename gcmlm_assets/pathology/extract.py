"""Streaming patch-feature extraction: slide + patch coordinates -> CLAM-layout HDF5 (plain Python,
no Dagster).

Pipeline per slide (`extract_slide_features`):
- The patch grid is read and mapped to the patch level (patch_grid.py); its patches are read in
  batches, in block-major order, by DataLoader workers or by this process between forward passes
  (patch_batches.py).
- The main process normalises in batch on the model's device (uint8 -> float;
  NHWC memory is channels-last for free), runs the encoder under
  `torch.inference_mode` (bf16 autocast on CUDA only) and appends the features
  to a resizable HDF5 dataset as they come, so memory does not grow with the
  slide: one batch is in flight (with workers, at most
  `num_workers * prefetch_factor`).
- The file is written under a temporary name and renamed at the end; a
  finished file carries its fingerprint and is not recomputed (feature_files.py: the file's
  format, fingerprint and validation).

`extract_patient` does this for every slide of a patient's `patch_coords` listing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch

from gcmlm_assets.pathology.encoders import LoadedEncoder
from gcmlm_assets.pathology.feature_files import (
    CHUNK_ROWS,
    EXTRACTION_VERSION,
    FEATURE_DTYPES,
    extraction_fingerprint,
    finished_fingerprint,
)
from gcmlm_assets.pathology.patch_batches import (
    BLOCK_PATCHES,
    PatchBatches,
    block_major_order,
    read_thread_count,
    stream_batches,
)
from gcmlm_assets.pathology.patch_grid import ExtractionError, level_coordinates, plain_value, read_patch_grid
from gcmlm_assets.pathology.region_readers import choose_reader, decode_scale
from gcmlm_assets.step_output import ProgressPacer
from gcmlm_assets.storage import atomic_path, sha256_text

HEAP_HEADROOM_BYTES = 128 << 20


class HeapTrimmer:
    """Keeps the main process's heap from growing with the slide (glibc only; a no-op elsewhere).

    With DataLoader workers, the encoder's large temporary activations and the
    small allocations of receiving batches interleave on glibc's heap, which
    then fragments: RSS crept up by 100-500 MB over 1,920 patches in
    `benchmarks.features`. Trimming after every batch would cost ~5 % (the
    freed pages fault in again), so the heap is trimmed only when the
    process's private resident memory has grown `headroom_bytes` past where it
    stood after the first batch (or after the last trim).
    """

    def __init__(self, headroom_bytes: int = HEAP_HEADROOM_BYTES):
        self.headroom = headroom_bytes
        self.baseline: int | None = None
        self.trims = 0
        try:
            import ctypes

            self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._page = os.sysconf("SC_PAGE_SIZE")
            self.private_bytes()
        except (OSError, AttributeError, ValueError):
            self._malloc_trim = None

    def private_bytes(self) -> int:
        with open("/proc/self/statm") as fh:
            fields = fh.read().split()
        return (int(fields[1]) - int(fields[2])) * self._page  # resident - shared

    def after_batch(self) -> None:
        if self._malloc_trim is None:
            return
        current = self.private_bytes()
        if self.baseline is None:
            self.baseline = current
        elif current > self.baseline + self.headroom:
            self._malloc_trim(0)
            self.trims += 1
            self.baseline = max(self.baseline, self.private_bytes())


def normalise_batch(images: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NHWC (0..255) -> float32 NCHW in channels-last memory, (x/255 - mean) / std.

    `out`: a float32 NHWC buffer of at least the batch's size to write into (reused
    between batches on CPU, where a fresh allocation per batch is measurably slower).
    """
    if out is not None and out.shape[0] >= images.shape[0] and out.shape[1:] == images.shape[1:]:
        x = out[: images.shape[0]]
        x.copy_(images)
    else:
        x = images.to(torch.float32)
    # x * (1/std) - mean/std in one pass over memory, in place.
    torch.addcmul(-mean * inv_std, x, inv_std, out=x)
    return x.permute(0, 3, 1, 2)


def normalisation_constants(encoder: LoadedEncoder, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(encoder.spec.mean, dtype=torch.float32, device=device) * 255.0
    inv_std = 1.0 / (torch.tensor(encoder.spec.std, dtype=torch.float32, device=device) * 255.0)
    return mean, inv_std


# ---------------------------------------------------------------- extraction


@dataclass
class ExtractionResult:
    output: Path
    n_patches: int
    embedding_dim: int
    reused: bool
    seconds: float = 0.0
    reader: str = ""
    decode_scale: int = 1
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def patches_per_second(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else 0.0

    @property
    def reader_label(self) -> str:
        """The reader and, when tiles were decoded scaled, the scale: "tiff-tiles at 1/2"."""
        return self.reader + (f" at 1/{self.decode_scale}" if self.decode_scale > 1 else "")


def precision_for(device: torch.device) -> str:
    return "bf16-autocast" if device.type == "cuda" else "float32"


def extract_slide_features(
    slide_path: str | os.PathLike,
    coords_path: str | os.PathLike,
    output_path: str | os.PathLike,
    encoder: LoadedEncoder,
    *,
    fingerprint: str,
    batch_size: int = 32,
    num_workers: int = 0,
    read_threads: int = 0,
    feature_dtype: str = "float32",
    prefetch_factor: int = 2,
    scaled_decode: bool = True,
    extra_attrs: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExtractionResult:
    """Write `<output_path>` (CLAM layout) unless it already holds `fingerprint`.

    `num_workers`: DataLoader worker processes that read ahead while the
    encoder computes (a GPU); 0: this process reads each batch between forward
    passes, on `read_threads` threads (0: as many as torch's intra-op threads),
    which is faster when the encoder runs on this machine's CPU cores.
    `scaled_decode`: allow decoding JPEG tiles at 1/2, 1/4 or 1/8 of their size
    when the read size is that many times the encoder's input (module docstring).
    `progress`: receives "slide <file>: <done>/<total> patches, <rate> patches/s" lines, about
    every tenth of the slide or 30 s, and once at its end.
    """
    slide_path, coords_path, output_path = Path(slide_path), Path(coords_path), Path(output_path)
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if finished_fingerprint(output_path) == fingerprint:
        with h5py.File(output_path, "r") as fh:
            n = int(fh["features"].shape[0])
            attrs = {k: plain_value(v) for k, v in fh.attrs.items()}
        if progress is not None:
            progress(f"slide {slide_path.name}: {n:,}/{n:,} patches, reused (same inputs, features already written)")
        return ExtractionResult(output_path, n, encoder.embedding_dim, reused=True,
                                reader=str(attrs.get("reader", "")), decode_scale=int(attrs.get("decode_scale", 1)),
                                attrs=attrs)

    grid = read_patch_grid(coords_path)
    level_xy, downsample = level_coordinates(slide_path, grid)
    order = block_major_order(level_xy, grid.read_size)
    probe = None
    if grid.n_patches:
        px, py = level_xy[order[0]]
        probe = (int(px), int(py), grid.read_size, grid.read_size)
    input_size = encoder.spec.input_size
    choice = choose_reader(slide_path, grid.patch_level, probe, input_size=input_size,
                           scale=decode_scale(grid.read_size, input_size) if scaled_decode else 1)
    threads = read_thread_count(num_workers, read_threads)
    dataset = PatchBatches(slide_path, level_xy, order, grid.read_size, input_size, batch_size, choice,
                           grid.patch_level, read_threads=threads)
    device = encoder.device
    mean, inv_std = normalisation_constants(encoder, device)
    dim = encoder.embedding_dim
    attrs = {
        **{k: v for k, v in (extra_attrs or {}).items() if v is not None},
        **{k: (v if not isinstance(v, bool) else int(v)) for k, v in encoder.identity().items()},
        "feature_dtype": feature_dtype,
        "precision": precision_for(device),
        "reader": choice.kind,
        "decode_scale": choice.scale,
        "slide_path": str(slide_path),
        "coords_path": str(coords_path),
        "patch_order": f"block-major ({BLOCK_PATCHES}x{BLOCK_PATCHES} patches)",
        "level_downsample": downsample,
        "extraction_version": EXTRACTION_VERSION,
    }
    started = time.perf_counter()
    written = 0
    pacer = ProgressPacer(grid.n_patches)
    try:
        with atomic_path(output_path) as tmp, h5py.File(tmp, "w") as out:
            features = out.create_dataset(
                "features", shape=(0, dim), maxshape=(None, dim), dtype=FEATURE_DTYPES[feature_dtype],
                chunks=(CHUNK_ROWS, dim),
            )
            coords = out.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(CHUNK_ROWS, 2))
            # Row i of features/coords is row source_index[i] of the patch_coords file.
            source_index = out.create_dataset("source_index", shape=(0,), maxshape=(None,), dtype=np.int64,
                                              chunks=(CHUNK_ROWS,))
            for key, value in grid.attrs.items():
                coords.attrs[key] = value
            buffer = None
            trimmer = HeapTrimmer()
            for batch in stream_batches(dataset, num_workers, prefetch_factor, pin_memory=device.type == "cuda"):
                if buffer is None and device.type == "cpu":
                    buffer = torch.empty((batch_size, *batch["images"].shape[1:]), dtype=torch.float32)
                vectors = _encode(encoder, batch["images"], mean, inv_std, buffer)
                index = batch["index"].numpy()
                n = len(index)
                for dataset_, values in ((features, vectors), (coords, grid.coords[index]), (source_index, index)):
                    dataset_.resize(written + n, axis=0)
                    dataset_[written : written + n] = values
                written += n
                trimmer.after_batch()
                if progress is not None and pacer.due(written):
                    progress(f"slide {slide_path.name}: {written:,}/{grid.n_patches:,} patches, "
                             f"{written / max(pacer.elapsed(), 1e-9):,.0f} patches/s")
            for key, value in attrs.items():
                out.attrs[key] = value
            out.attrs["n_patches"] = written
            # Written last: only a complete file carries its fingerprint.
            out.attrs["fingerprint"] = fingerprint
    finally:
        dataset.close()
    seconds = time.perf_counter() - started
    return ExtractionResult(output_path, written, dim, reused=False, seconds=seconds, reader=choice.kind,
                            decode_scale=choice.scale,
                            attrs={**attrs, "fingerprint": fingerprint, "n_patches": written})


def _encode(encoder: LoadedEncoder, images: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor,
            buffer: torch.Tensor | None = None) -> np.ndarray:
    device = encoder.device
    with torch.inference_mode():
        x = normalise_batch(images.to(device, non_blocking=True), mean, inv_std, buffer)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = encoder.module(x)
        return out.float().cpu().numpy()


# ---------------------------------------------------------------- one patient


@dataclass
class PatientFeatures:
    """What `extract_patient` did for every slide of a `patch_coords` listing."""

    results: list[ExtractionResult]
    without_patches: list[str]  # slide files `patch_coords` found no tissue patch on
    fingerprint: str  # of all inputs: changes when any slide's features would

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.results)


def slide_fingerprint(entry: dict[str, Any]) -> str:
    """Identity of a slide's content as `patch_coords` listed it (OpenSlide's quickhash and size).

    A DICOM series adds every file's name, size and modification time: OpenSlide's quickhash of a
    series is its Series Instance UID alone, which stays when a file is re-encoded or replaced."""
    content = entry.get("quickhash1") or f"mtime:{entry.get('mtime_ns')}"
    parts = [str(entry.get("file")), str(entry.get("size_bytes")), str(content)]
    if entry.get("dicom"):
        parts += [f"{f['file']}|{f['size_bytes']}|{f['mtime_ns']}" for f in entry.get("source_files", [])]
    return sha256_text(*parts)


def extract_patient(
    listing: dict[str, Any],
    out_dir: str | os.PathLike,
    encoder: LoadedEncoder,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    read_threads: int = 0,
    feature_dtype: str = "float32",
    scaled_decode: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PatientFeatures:
    """Features for every slide in a `patch_coords` listing (`slides.json`) into `out_dir`.

    Slides already done with the same inputs are kept; files of slides no
    longer listed are removed once every listed slide is done. `progress` receives each slide's
    patch counts (see `extract_slide_features`).
    """
    from gcmlm_assets.storage import sha256_file

    out_dir = Path(out_dir)
    precision = precision_for(encoder.device)
    results, without, parts = [], [], []
    for entry in listing.get("slides", []):
        if not entry.get("h5"):
            without.append(str(entry.get("file")))
            continue
        coords_path = Path(entry["h5"])
        if not coords_path.is_file():
            raise ExtractionError(f"{coords_path}: patch coordinates of {entry.get('file')} are missing")
        coords_sha = sha256_file(coords_path)
        if entry.get("h5_sha256") and entry["h5_sha256"] != coords_sha:
            raise ExtractionError(f"{coords_path}: changed since patch_coords listed it (sha256 differs)")
        fingerprint = extraction_fingerprint(coords_sha256=coords_sha, slide_fingerprint=slide_fingerprint(entry),
                                             encoder=encoder, feature_dtype=feature_dtype, precision=precision,
                                             scaled_decode=scaled_decode)
        result = extract_slide_features(
            entry["slide_path"], coords_path, out_dir / coords_path.name, encoder, fingerprint=fingerprint,
            batch_size=batch_size, num_workers=num_workers, read_threads=read_threads, feature_dtype=feature_dtype,
            scaled_decode=scaled_decode, progress=progress,
            extra_attrs={"slide_file": str(entry.get("file")), "coords_sha256": coords_sha,
                         "patient_id": str(listing.get("patient_id", ""))},
        )
        results.append(result)
        parts.append(fingerprint)
    produced = {r.output.name for r in results}
    for stale in out_dir.glob("*.h5"):
        if stale.name not in produced:
            stale.unlink(missing_ok=True)
    return PatientFeatures(results, without, sha256_text("uni_features-patient", *parts))
