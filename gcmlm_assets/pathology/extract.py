"""Streaming patch-feature extraction: slide + patch coordinates -> CLAM-layout HDF5.

Pipeline per slide:
- Patches are visited in block-major order (blocks of `BLOCK_PATCHES`² grid
  cells, row-major inside), so the image tiles a batch touches stay in the
  reader's tile cache while it needs them: each tile is decoded once, even
  when patches and tiles are not aligned.
- One batch is one dataset item (`PatchBatches`): its patches are read into
  one preallocated uint8 array and the whole batch is resized in one call
  (antialiased bilinear on uint8, which agrees with PIL's `Resize` to within
  a grey level or two). Two ways to run it:
  - `num_workers` > 0 (GPU): a `DataLoader` whose worker processes each open
    their own slide handle (lazily, after the fork) read ahead while the
    device computes; they return uint8 NHWC batches, four times smaller to
    ship than float. The main process reads the first batch itself while the
    workers start up.
  - `num_workers` = 0 (CPU, the default): the encoder's forward pass already
    keeps every core busy, so a reader beside it can only take cores away
    from it, and a worker process also costs a fork and its copy-on-write
    page faults per slide. Instead the main process reads each batch between
    forward passes, decoding its tiles on `read_threads` threads
    (`ReadThreads`), i.e. on all cores at once.
- The main process normalises in batch on the model's device (uint8 -> float;
  NHWC memory is channels-last for free), runs the encoder under
  `torch.inference_mode` (bf16 autocast on CUDA only) and appends the features
  to a resizable HDF5 dataset as they come, so memory does not grow with the
  slide: one batch is in flight (with workers, at most
  `num_workers * prefetch_factor`).
- The file is written under a temporary name and renamed at the end; a
  finished file carries its fingerprint and is not recomputed.

The region readers (direct TIFF tile decoding, scaled decoding, OpenSlide) and
the choice between them are in region_readers.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gcmlm_assets.catalogue import UNI_FEATURES
from gcmlm_assets.pathology.encoders import LoadedEncoder
from gcmlm_assets.pathology.region_readers import (
    ReadThreads,
    ReaderChoice,
    RegionReader,
    choose_reader,
    decode_scale,
    open_reader,
    resize_patches,
)
from gcmlm_assets.step_output import ProgressPacer
from gcmlm_assets.storage import atomic_path, sha256_text

# uni_features' code version (catalogue.py): bump it there when the extraction's output would change
# for the same inputs. It is in each slide's extraction fingerprint.
EXTRACTION_VERSION = UNI_FEATURES.code_version
BLOCK_PATCHES = 8
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
CHUNK_ROWS = 256
HEAP_HEADROOM_BYTES = 128 << 20


class ExtractionError(RuntimeError):
    """A slide or its coordinates cannot be turned into features (names the file)."""


# ---------------------------------------------------------------- coordinates


@dataclass(frozen=True)
class PatchGrid:
    """The patches of one slide as `patch_coords` wrote them (CLAM layout)."""

    coords: np.ndarray  # (N, 2) int64, level-0 top-left x, y
    patch_level: int
    patch_size: int
    read_size: int  # pixels read at patch_level, then resized
    attrs: dict[str, Any]

    @property
    def n_patches(self) -> int:
        return int(self.coords.shape[0])


def read_patch_grid(path: str | os.PathLike) -> PatchGrid:
    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            if "coords" not in fh:
                raise ExtractionError(f"{path}: no `coords` dataset (expected a CLAM patch-coordinate file)")
            dataset = fh["coords"]
            coords = np.asarray(dataset[()], dtype=np.int64).reshape(-1, 2) if dataset.size else np.zeros((0, 2), np.int64)
            if dataset.size and (dataset.ndim != 2 or dataset.shape[1] != 2):
                raise ExtractionError(f"{path}: `coords` has shape {dataset.shape}, expected (N, 2)")
            attrs = {key: _plain(value) for key, value in dataset.attrs.items()}
    except OSError as exc:
        raise ExtractionError(f"{path}: cannot read patch coordinates: {exc}") from exc
    for key in ("patch_level", "patch_size"):
        if key not in attrs:
            raise ExtractionError(f"{path}: `coords` lacks attribute {key!r}")
    patch_size = int(attrs["patch_size"])
    # CLAM's own files have no read_size: it reads patch_size pixels at patch_level.
    read_size = int(attrs.get("read_size", patch_size))
    if patch_size <= 0 or read_size <= 0:
        raise ExtractionError(f"{path}: patch_size {patch_size} / read_size {read_size} must be positive")
    return PatchGrid(coords, int(attrs["patch_level"]), patch_size, read_size, attrs)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def block_major_order(level_xy: np.ndarray, read_size: int, block_patches: int = BLOCK_PATCHES) -> np.ndarray:
    """Indices visiting patches block by block (blocks row-major, patches row-major inside)."""
    if len(level_xy) == 0:
        return np.zeros(0, dtype=np.int64)
    block = level_xy // (read_size * block_patches)
    return np.lexsort((level_xy[:, 0], level_xy[:, 1], block[:, 0], block[:, 1])).astype(np.int64)


# ---------------------------------------------------------------- batches


class PatchBatches(Dataset):
    """Item i = batch i of patches in block-major order, as uint8 NHWC at the encoder's input size.

    `level_xy` and `read_size` are in pixels of `level`; a reader that decodes
    at 1/scale reads the same regions in its reduced grid (corners rounded down).
    """

    def __init__(
        self,
        slide_path: Path,
        level_xy: np.ndarray,
        order: np.ndarray,
        read_size: int,
        input_size: int,
        batch_size: int,
        reader: ReaderChoice,
        level: int,
        read_threads: int = 1,
    ):
        self.slide_path = Path(slide_path)
        self.order = order
        self.choice = reader
        self.level_xy = level_xy // reader.scale
        self.read_size = read_size // reader.scale
        self.input_size = input_size
        self.batch_size = batch_size
        self.level = level
        self._reader: RegionReader | None = None
        self._reader_pid: int | None = None
        self._scratch: np.ndarray | None = None
        self._scratch_pid: int | None = None
        self.read_threads = max(1, int(read_threads))
        self._threads: ReadThreads | None = None
        self._threads_pid: int | None = None

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def reader(self) -> RegionReader:
        # Opened lazily in the process that reads: a handle inherited through
        # fork would share its file offset and caches with the parent.
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = open_reader(self.slide_path, self.level, self.choice)
            self._reader_pid = os.getpid()
        return self._reader

    def threads(self) -> ReadThreads | None:
        if self.read_threads < 2:
            return None
        if self._threads is None or self._threads_pid != os.getpid():  # threads do not survive a fork
            self._threads = ReadThreads(self.read_threads)
            self._threads_pid = os.getpid()
        return self._threads

    def close(self) -> None:
        if self._reader is not None and self._reader_pid == os.getpid():
            self._reader.close()
        self._reader = None
        if self._threads is not None and self._threads_pid == os.getpid():
            self._threads.shutdown()
        self._threads = None

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        indices = self.order[item * self.batch_size : (item + 1) * self.batch_size]
        patches = self._patch_buffer(len(indices))
        try:
            self.reader().read_many(self.level_xy[indices], patches, self.threads())
        except Exception as exc:
            raise ExtractionError(
                f"{self.slide_path}: cannot read patches of batch {item} at level {self.level}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return {"images": resize_patches(patches, self.input_size), "index": torch.from_numpy(indices)}

    def _patch_buffer(self, n: int) -> np.ndarray:
        shape = (n, self.read_size, self.read_size, 3)
        if self.read_size == self.input_size:
            return np.empty(shape, np.uint8)  # returned as is: must not be reused
        # Reused across batches: a fresh 50 MB array per batch costs page faults
        # and zeroing comparable to the resize itself.
        if self._scratch is None or self._scratch.shape[0] < n or self._scratch_pid != os.getpid():
            self._scratch = np.empty((max(n, self.batch_size), *shape[1:]), np.uint8)
            self._scratch_pid = os.getpid()
        return self._scratch[:n]


class _FromBatch(Dataset):
    """The batches of `dataset` from `start` on."""

    def __init__(self, dataset: PatchBatches, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return max(len(self.dataset) - self.start, 0)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.dataset[item + self.start]


def stream_batches(dataset: PatchBatches, num_workers: int, prefetch_factor: int = 2,
                   pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of `dataset` in order, read by `num_workers` DataLoader workers (0: in this process).

    With workers, this process reads the first batch itself while they start
    (a fork, opening the slide) and read ahead: the encoder does not wait for
    the workers' start-up at the beginning of every slide.
    """
    options = dict(batch_size=None, shuffle=False, pin_memory=pin_memory)
    if num_workers == 0 or len(dataset) < 2:
        yield from DataLoader(dataset, num_workers=0, **options)
        return
    loader = DataLoader(_FromBatch(dataset, 1), num_workers=num_workers, worker_init_fn=_worker_init,
                        prefetch_factor=prefetch_factor, **options)
    rest = iter(loader)  # the workers start here, on batches 1, 2, ...
    try:
        yield dataset[0]
        yield from rest
    finally:
        del rest  # stops the workers, also when the consumer stopped early or failed


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


def _worker_init(_: int) -> None:
    # Each worker opens its own slide handle on first use (PatchBatches.reader);
    # decoding is single-threaded per worker so workers do not oversubscribe cores.
    torch.set_num_threads(1)


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


def extraction_fingerprint(
    *, coords_sha256: str, slide_fingerprint: str, encoder: LoadedEncoder, feature_dtype: str, precision: str,
    scaled_decode: bool = True,
) -> str:
    identity = encoder.identity()
    return sha256_text(
        UNI_FEATURES.key, EXTRACTION_VERSION, coords_sha256, slide_fingerprint, identity["encoder"],
        identity["checkpoint_sha256"], identity["weights_sha256"], str(encoder.spec.input_size),
        repr(encoder.spec.mean), repr(encoder.spec.std), feature_dtype, precision, f"scaled_decode={scaled_decode}",
    )


def precision_for(device: torch.device) -> str:
    return "bf16-autocast" if device.type == "cuda" else "float32"


def finished_fingerprint(path: Path) -> str | None:
    """The fingerprint of a complete feature file, or None (absent, unreadable, incomplete)."""
    try:
        with h5py.File(path, "r") as fh:
            if fh["features"].shape[0] != fh["coords"].shape[0]:
                return None
            value = fh.attrs.get("fingerprint")
    except (OSError, KeyError):
        return None
    return _plain(value) if value is not None else None


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
            attrs = {k: _plain(v) for k, v in fh.attrs.items()}
        if progress is not None:
            progress(f"slide {slide_path.name}: {n:,}/{n:,} patches, reused (same inputs, features already written)")
        return ExtractionResult(output_path, n, encoder.embedding_dim, reused=True,
                                reader=str(attrs.get("reader", "")), decode_scale=int(attrs.get("decode_scale", 1)),
                                attrs=attrs)

    grid = read_patch_grid(coords_path)
    level_xy, downsample = _level_coordinates(slide_path, grid)
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


def read_thread_count(num_workers: int, read_threads: int) -> int:
    """Threads decoding a batch: 1 in each worker process (several of them share the cores);
    without workers `read_threads`, or torch's intra-op thread count when 0."""
    if num_workers > 0:
        return 1
    return read_threads if read_threads > 0 else torch.get_num_threads()


def describe_reading(num_workers: int, read_threads: int) -> str:
    if num_workers > 0:
        return f"{num_workers} DataLoader worker process(es)"
    return f"in-process between forward passes, {read_thread_count(0, read_threads)} thread(s)"


def _encode(encoder: LoadedEncoder, images: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor,
            buffer: torch.Tensor | None = None) -> np.ndarray:
    device = encoder.device
    with torch.inference_mode():
        x = normalise_batch(images.to(device, non_blocking=True), mean, inv_std, buffer)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = encoder.module(x)
        return out.float().cpu().numpy()


def _level_coordinates(slide_path: Path, grid: PatchGrid) -> tuple[np.ndarray, float]:
    import openslide

    try:
        with openslide.OpenSlide(str(slide_path)) as slide:
            if not 0 <= grid.patch_level < slide.level_count:
                raise ExtractionError(f"{slide_path}: patch_level {grid.patch_level} does not exist "
                                      f"(the slide has {slide.level_count} levels)")
            downsample = float(slide.level_downsamples[grid.patch_level])
    except openslide.OpenSlideError as exc:
        raise ExtractionError(f"{slide_path}: OpenSlide cannot open the slide: {exc}") from exc
    level_xy = np.floor(grid.coords / downsample).astype(np.int64) if grid.n_patches else np.zeros((0, 2), np.int64)
    return level_xy, downsample


# ---------------------------------------------------------------- validation


@dataclass
class FeatureFileReport:
    path: Path
    n_rows: int = 0
    dim: int = 0
    non_finite_values: int = 0
    zero_rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_feature_file(path: str | os.PathLike, *, expected_rows: int, expected_dim: int,
                          expected_encoder: dict[str, Any] | None = None, chunk_rows: int = 4096) -> FeatureFileReport:
    """Shape (expected_rows, expected_dim), finite, no all-zero row, encoder identity recorded
    (and, given `expected_encoder`, equal to its name and checkpoint sha256)."""
    path = Path(path)
    report = FeatureFileReport(path)
    try:
        with h5py.File(path, "r") as fh:
            features, coords = fh["features"], fh["coords"]
            report.n_rows, report.dim = int(features.shape[0]), int(features.shape[1])
            if features.shape != (expected_rows, expected_dim):
                report.problems.append(f"features shape {features.shape}, expected ({expected_rows}, {expected_dim})")
            if coords.shape != (features.shape[0], 2):
                report.problems.append(f"coords shape {coords.shape} does not match features {features.shape}")
            for start in range(0, features.shape[0], chunk_rows):
                block = np.asarray(features[start : start + chunk_rows], dtype=np.float32)
                report.non_finite_values += int((~np.isfinite(block)).sum())
                report.zero_rows += int((~block.any(axis=1)).sum())
            missing = [k for k in ("encoder", "embedding_dim", "checkpoint_sha256") if not fh.attrs.get(k, "")]
            if missing:
                report.problems.append(f"encoder identity not recorded (missing attrs {missing})")
            elif expected_encoder is not None:
                recorded = {k: _plain(fh.attrs[k]) for k in ("encoder", "checkpoint_sha256")}
                wanted = {k: expected_encoder[k] for k in ("encoder", "checkpoint_sha256")}
                if recorded != wanted:
                    report.problems.append(f"encoder identity {recorded} differs from this run's {wanted}")
    except (OSError, KeyError) as exc:
        report.problems.append(f"unreadable feature file: {type(exc).__name__}: {exc}")
        return report
    if report.non_finite_values:
        report.problems.append(f"{report.non_finite_values} non-finite values")
    if report.zero_rows:
        report.problems.append(f"{report.zero_rows} all-zero rows")
    return report


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
