"""The patches of one slide read in batches for the encoder (plain Python, no Dagster).

- Patches are visited in block-major order (blocks of `BLOCK_PATCHES`² grid
  cells, row-major inside), so the image tiles a batch touches stay in the
  reader's tile cache while it needs them: each tile is decoded once, even
  when patches and tiles are not aligned.
- One batch is one dataset item (`PatchBatches`): its patches are read into
  one preallocated uint8 array and the whole batch is resized in one call
  (antialiased bilinear on uint8, which agrees with PIL's `Resize` to within
  a grey level or two). Two ways to run it (`stream_batches`):
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

The region readers (direct TIFF tile decoding, scaled decoding, OpenSlide) and
the choice between them are in region_readers.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gcmlm_assets.pathology.patch_grid import ExtractionError
from gcmlm_assets.pathology.region_readers import (
    ReadThreads,
    ReaderChoice,
    RegionReader,
    open_reader,
    resize_patches,
)

BLOCK_PATCHES = 8


def block_major_order(level_xy: np.ndarray, read_size: int, block_patches: int = BLOCK_PATCHES) -> np.ndarray:
    """Indices visiting patches block by block (blocks row-major, patches row-major inside)."""
    if len(level_xy) == 0:
        return np.zeros(0, dtype=np.int64)
    block = level_xy // (read_size * block_patches)
    return np.lexsort((level_xy[:, 0], level_xy[:, 1], block[:, 0], block[:, 1])).astype(np.int64)


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


def _worker_init(_: int) -> None:
    # Each worker opens its own slide handle on first use (PatchBatches.reader);
    # decoding is single-threaded per worker so workers do not oversubscribe cores.
    torch.set_num_threads(1)


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
