"""A torch checkpoint with a trap: loading it with weights_only=False runs code (it creates a file)."""

from __future__ import annotations

from pathlib import Path


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
