"""Atomic writes, artifact layout and output reuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcmlm_assets.catalogue import RADIOMICS_ROW, RADIOMICS_TABLE
from gcmlm_assets.patients import InvalidPatientId
from gcmlm_assets.storage import (
    STALE_TEMPORARY_S,
    TMP_PREFIX,
    ArtifactStore,
    atomic_path,
    atomic_write_bytes,
    remove_stale_temporaries,
    sha256_file,
)

SLOW_WRITER = """
import sys, time
from gcmlm_assets.storage import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as fh:
        fh.write(b"x" * 1024)
        fh.flush()
        print("writing", flush=True)
        time.sleep(60)
        fh.write(b"never")
"""


def test_killed_writer_leaves_no_final_file(tmp_path: Path):
    final = tmp_path / "out" / "features.h5"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(final)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not final.exists()
    leftovers = list(final.parent.iterdir())
    assert leftovers and all(p.name.startswith(TMP_PREFIX) for p in leftovers)
    # A young temporary may be another run's write in progress: it is left alone.
    store = ArtifactStore(tmp_path)
    store.asset_dir("out")
    assert list(final.parent.iterdir()) == leftovers
    # Once untouched for a day it is a killed writer's, and the next writer of that folder clears it.
    day_ago = time.time() - STALE_TEMPORARY_S - 60
    for path in leftovers:
        os.utime(path, (day_ago, day_ago))
    store.asset_dir("out")
    assert list(final.parent.iterdir()) == []


def test_stale_temporary_folders_are_removed_by_their_newest_file(tmp_path: Path):
    models = tmp_path / "segmentation_model"
    training = models / f"{TMP_PREFIX}train-abc" / "nnunet" / "fold_all"
    training.mkdir(parents=True)
    (training / "training_log.txt").write_text("epoch 1")
    day_ago = time.time() - STALE_TEMPORARY_S - 60
    for path in (models / f"{TMP_PREFIX}train-abc", models / f"{TMP_PREFIX}train-abc" / "nnunet", training):
        os.utime(path, (day_ago, day_ago))
    # A training that still writes its log is alive, however old its folders are.
    assert remove_stale_temporaries(models) == 0 and training.is_dir()
    os.utime(training / "training_log.txt", (day_ago, day_ago))
    assert remove_stale_temporaries(models) == 1
    assert list(models.iterdir()) == []


def test_failed_block_leaves_nothing(tmp_path: Path):
    final = tmp_path / "table.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path: Path):
    final = tmp_path / "ct.nii.gz"
    atomic_write_bytes(final, b"first")
    atomic_write_bytes(final, b"second version")
    assert final.read_bytes() == b"second version"
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]


def test_temporary_keeps_suffix(tmp_path: Path):
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"data")


def test_empty_output_is_refused(tmp_path: Path):
    with pytest.raises(OSError, match="no data"):
        with atomic_path(tmp_path / "ct.nii.gz"):
            pass
    assert not (tmp_path / "ct.nii.gz").exists()


def test_layout_and_patient_id_guard(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    assert store.asset_dir("ct_image", "P001") == tmp_path / "ct_image" / "P001"
    assert store.asset_dir("fused_table") == tmp_path / "fused_table"
    for bad in ("..", "../etc", "a/b", "with space"):
        with pytest.raises(InvalidPatientId, match="invalid patient id"):
            store.asset_dir("ct_image", bad)


def test_manifest_reuse_detects_changes(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    out = RADIOMICS_TABLE.in_folder(RADIOMICS_ROW.folder(store, "P001"))
    atomic_write_bytes(out, b"row")
    store.write_manifest("radiomics_row", "P001",
                         {"fingerprint": "abc", "files": {out.name: sha256_file(out)}})
    assert store.reusable("radiomics_row", "P001", "abc") is not None
    assert store.reusable("radiomics_row", "P001", "other") is None
    time.sleep(0.01)
    out.write_bytes(b"tampered")
    assert store.reusable("radiomics_row", "P001", "abc") is None
