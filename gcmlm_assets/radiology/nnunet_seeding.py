"""Seeded nnU-Net 2.x training: the same cases and settings give the same checkpoint bytes (no Dagster).

nnU-Net seeds nothing itself. nnunet_training.train_model applies these to its trainer object:
`seeded` seeds Python's, NumPy's and torch's generators for the training only (restored after)
and asks for cuDNN's and torch's deterministic kernels; `seed_dataloaders` replaces nnU-Net's
augmentation workers (`NonDetMultiThreadedAugmenter`, whose batch order depends on which worker
is ready first) by batchgenerators' `MultiThreadedAugmenter`, which takes the workers in turn and
seeds each one; `clockless_checkpoints` zeroes the epoch timestamps nnU-Net keeps in its
checkpoint, so the bytes (and the model id, which hashes them) do not depend on the clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from gcmlm_assets import settings
from gcmlm_assets.settings import scoped_environment

_EPOCH_TIMES = ("epoch_start_timestamps", "epoch_end_timestamps")
# cuBLAS picks deterministic reductions only with a fixed workspace (CUDA's documented setting).
_CUBLAS_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (every device) and ask torch for deterministic kernels, for the
    block only: the generators' states and the flags are restored after it."""
    import random

    import torch

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    environment = {} if settings.cublas_workspace_config() else _CUBLAS_DETERMINISTIC
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too
    # nnU-Net's predictor turns cuDNN's benchmark on for the whole process: off while training.
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    # warn_only: an operation without a deterministic kernel warns instead of stopping a training.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with scoped_environment(environment):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[0], flags[1]
        torch.use_deterministic_algorithms(flags[2], warn_only=flags[3])


class _WorkerSeededLoader:
    """An nnU-Net data loader for batchgenerators' `MultiThreadedAugmenter`: its worker processes seed
    only NumPy, and nnU-Net's augmentations also draw from torch and `random`, so `set_thread_id` (which
    each worker calls once, first) seeds those too. A module-level class, so it pickles under spawn."""

    def __init__(self, loader, seed: int):
        self.loader, self.seed = loader, seed

    def set_thread_id(self, thread_id: int) -> None:
        import random

        import torch

        random.seed(self.seed + thread_id)
        torch.manual_seed(self.seed + thread_id)
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)


def seed_dataloaders(trainer, seed: int) -> None:
    """Make this trainer's `get_dataloaders` deterministic (module docstring); nothing global changes."""
    build = trainer.get_dataloaders

    def get_dataloaders():
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        workers = get_allowed_n_proc_DA()
        with scoped_environment({"nnUNet_n_proc_DA": "0"}):
            train, val = build()  # in-process augmenters over nnU-Net's own data loaders and transforms
        if workers == 0:
            return train, val

        def in_workers(augmenter, n: int, first_seed: int):
            # Seeded and taken in turn: the same batches in the same order on every run.
            parallel = MultiThreadedAugmenter(_WorkerSeededLoader(augmenter.data_loader, first_seed), None, n,
                                              num_cached_per_queue=2, seeds=[first_seed + i for i in range(n)],
                                              pin_memory=trainer.device.type == "cuda", wait_time=0.002)
            next(parallel)  # starts the workers now, as nnU-Net does
            return parallel

        # Training and validation workers draw from different seeds.
        return (in_workers(train, workers, seed * 1000 + 1),
                in_workers(val, max(1, workers // 2), seed * 1000 + 501))

    trainer.get_dataloaders = get_dataloaders


def clockless_checkpoints(trainer) -> None:
    """Save this trainer's checkpoints with zeroed epoch timestamps (the rest is what nnU-Net saves)."""
    save = trainer.save_checkpoint

    def save_checkpoint(filename: str) -> None:
        logged = trainer.logger.get_checkpoint()  # nnU-Net's own logging dict, saved in the checkpoint
        times = {key: logged[key] for key in _EPOCH_TIMES}
        logged.update({key: [0.0] * len(values) for key, values in times.items()})
        try:
            save(filename)
        finally:
            logged.update(times)  # its progress plot and epoch lines still use the real times

    trainer.save_checkpoint = save_checkpoint
