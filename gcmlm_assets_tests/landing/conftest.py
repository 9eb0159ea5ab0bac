"""Landing-zone fixtures."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gcmlm_assets.landing import scan as scan_module


@pytest.fixture
def landing_root(tmp_path: Path) -> Path:
    root = tmp_path / "landing"
    root.mkdir()
    return root


@pytest.fixture
def settle(monkeypatch) -> Callable[[], None]:
    """A 0.2 s settle window, and a call that waits it out, so drops fall below the next watermark."""
    monkeypatch.setattr(scan_module, "SETTLE_NS", 200_000_000)
    return lambda: time.sleep(0.25)


@pytest.fixture(autouse=True)
def one_patient_per_run(monkeypatch):
    """These tests follow each patient's own runs; batches of several (GCMLM_GPU_BATCH_PATIENTS) are
    tested in test_batched_runs.py."""
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", "1")
