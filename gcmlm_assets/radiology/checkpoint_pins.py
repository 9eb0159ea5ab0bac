"""Pinned SHA-256 digests of nnU-Net checkpoints, checked before any checkpoint is unpickled.

nnU-Net writes its checkpoints with `torch.save`, as Python pickles, and its own predictor
unpickles them in full, which runs whatever Python a pickle names. We read them with torch's
weights-only unpickler instead (`nnunet.read_checkpoint`), and first, as the outer guard, load a
model folder only when every checkpoint it would load has the digest pinned by someone we trust:
the configuration (`segmentation.trained_model_sha256`) for a folder trained
elsewhere, `current.json` (written at install time) for a model this platform trained.

Plain Python (no Dagster, no torch): the resource parses the setting with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

CHECKPOINT = "checkpoint_final.pth"
SETTING = "segmentation.trained_model_sha256 (GCMLM_NNUNET_MODEL_SHA256)"
# The key of a digest given without a fold: valid when the folder uses exactly one checkpoint.
ONLY_CHECKPOINT = "*"
_HEX = re.compile(r"[0-9a-f]{64}")


class ModelFolderError(ValueError):
    """A folder that is not a usable trained nnU-Net model; the message names the folder and what is wrong."""


class CheckpointHashError(ModelFolderError):
    """A checkpoint without a pinned digest, or with another one; nothing was unpickled."""


def available_folds(folder: Path) -> tuple[str, ...]:
    """`('all',)` when fold_all is trained (it saw every case), else every numbered fold (an ensemble)."""
    if (folder / "fold_all" / CHECKPOINT).is_file():
        return ("all",)
    numbered = sorted(int(p.parent.name[5:]) for p in folder.glob(f"fold_*/{CHECKPOINT}")
                      if p.parent.name[5:].isdigit())
    return tuple(str(f) for f in numbered)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def parse_pins(text: str | None) -> dict[str, str]:
    """Fold -> digest from the setting's text.

    One 64-hex digest (the folder's only checkpoint), or `fold_<f>=<digest>` entries (`all`,
    `0`..`4`; the `fold_` prefix is optional) separated by commas or whitespace. Empty: {}.
    """
    pins: dict[str, str] = {}
    for entry in (text or "").replace(",", " ").split():
        fold, sep, digest = entry.rpartition("=")
        fold = fold.strip().removeprefix("fold_") if sep else ONLY_CHECKPOINT
        digest = digest.strip().lower()
        if not _HEX.fullmatch(digest) or not (fold == ONLY_CHECKPOINT or fold == "all" or fold.isdigit()):
            raise ModelFolderError(
                f"{SETTING}: {entry!r} is not a SHA-256 pin; expected one 64-hex-digit digest, or "
                "fold_<f>=<digest> for each fold (e.g. fold_0=<digest>,fold_1=<digest>)")
        if fold in pins:
            raise ModelFolderError(f"{SETTING}: fold {fold!r} is pinned twice")
        pins[fold] = digest
    if ONLY_CHECKPOINT in pins and len(pins) > 1:
        raise ModelFolderError(f"{SETTING}: give either one digest or fold_<f>=<digest> entries, not both")
    return pins


def format_pins(digests: Mapping[str, str]) -> str:
    """The setting's text for these checkpoints (what a user pastes after checking the files)."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    return ",".join(f"fold_{fold}={digest}" for fold, digest in digests.items())


@dataclasses.dataclass(frozen=True)
class CheckpointPins:
    """The digests a model folder's checkpoints must have before anything loads them.

    `digests`: fold (`all`, `0`..`4`, or `*` for the only checkpoint) -> SHA-256.
    `source` names where they come from and `remedy` says what to do on a refusal; both end up in
    the message.
    """

    digests: Mapping[str, str]
    source: str
    remedy: str

    @classmethod
    def from_setting(cls, text: str | None) -> CheckpointPins:
        return cls(parse_pins(text), SETTING,
                   f"after checking that this folder holds the model you mean, set {SETTING} to")

    @classmethod
    def from_install(cls, pointer_file: Path, digests: Mapping[str, str] | None) -> CheckpointPins:
        return cls(dict(digests or {}), str(pointer_file),
                   "the installed model changed after it was installed (or predates recorded digests): "
                   "materialize segmentation_model to train and install it again, or restore the artifact "
                   "store; its checkpoints now read")

    @classmethod
    def of_fresh_training(cls, folder: Path) -> CheckpointPins:
        """The digests of a folder this step has just trained: written by our own nnU-Net run
        in a private work folder, so its bytes are what we pin when installing it."""
        return cls(checkpoint_digests(folder), f"training output {folder}", "")

    def verify(self, folder: Path) -> dict[str, str]:
        """Fold -> digest of the checkpoints nnU-Net would load from `folder`, all equal to the pins.

        Reads the files as bytes only; raises `CheckpointHashError` (naming the file, the expected
        and the found digest, and how to set them) before anything could unpickle a mismatch.
        """
        found = checkpoint_digests(folder)
        suggestion = format_pins(found)
        if not self.digests:
            raise CheckpointHashError(
                f"{folder}: no SHA-256 is pinned for its checkpoint(s) in {self.source}; nothing was loaded. "
                "nnU-Net checkpoints are Python pickles that run code when loaded, so a model folder is used "
                f"only with its checkpoints' digests pinned. Found: {_listing(folder, found)}. "
                f"{_capital(self.remedy)} `{suggestion}`")
        expected = dict(self.digests)
        if ONLY_CHECKPOINT in expected:
            if len(found) != 1:
                raise CheckpointHashError(
                    f"{folder}: {self.source} pins one digest but the model loads {len(found)} checkpoints "
                    f"({_listing(folder, found)}); nothing was loaded. Pin each: {self.remedy} `{suggestion}`")
            expected = {next(iter(found)): expected[ONLY_CHECKPOINT]}
        problems = []
        for fold in sorted(set(expected) | set(found)):
            file = folder / f"fold_{fold}" / CHECKPOINT
            if fold not in found:
                problems.append(f"{file}: pinned ({expected[fold]}) but missing or not loaded (the model loads "
                                f"{', '.join('fold_' + f for f in found)})")
            elif fold not in expected:
                problems.append(f"{file}: no pinned digest (found {found[fold]})")
            elif expected[fold] != found[fold]:
                problems.append(f"{file}: SHA-256 mismatch: expected {expected[fold]}, found {found[fold]}")
        if problems:
            message = "; ".join(problems) + f" (pins from {self.source}); nothing was loaded."
            if self.remedy:
                message += f" {_capital(self.remedy)} `{suggestion}`"
            raise CheckpointHashError(message)
        return found


def checkpoint_digests(folder: Path) -> dict[str, str]:
    """Fold -> SHA-256 of each checkpoint the model would load (fold order)."""
    return {fold: file_sha256(folder / f"fold_{fold}" / CHECKPOINT) for fold in available_folds(folder)}


def _listing(folder: Path, digests: Mapping[str, str]) -> str:
    return ", ".join(f"{folder / f'fold_{fold}' / CHECKPOINT} sha256 {digest}" for fold, digest in digests.items())


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
