"""Shared fixtures: the real test files, a real Dagster instance, per-test storage roots."""

from __future__ import annotations

import locale
import os
from pathlib import Path

import dagster as dg
import pytest

from gcmlm_assets.cohort.resources import FusedTableSettings
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets_tests.support.definitions import patient_result_checks

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SESSION_LOCALE = locale.setlocale(locale.LC_ALL)  # read before any test module is imported


def _test_data_root() -> Path:
    return Path(os.environ.get("GCMLM_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(autouse=True)
def keep_locale():
    """SimpleITK's and GDCM's readers and writers set the process's locale to "C", after which Python
    decodes text (a subprocess's output, a file opened without an encoding) as ASCII in every later
    test of the session: each test starts with the locale the session started with."""
    locale.setlocale(locale.LC_ALL, SESSION_LOCALE)
    yield
    locale.setlocale(locale.LC_ALL, SESSION_LOCALE)


@pytest.fixture(scope="session")
def test_data() -> Path:
    """`GCMLM_TEST_DATA` (default ../shared/data); fails instead of skipping under CI's
    GCMLM_REQUIRE_TEST_DATA=1."""
    root = _test_data_root()
    if not (root / "SOURCES.md").is_file():
        message = f"real test data not found at {root} (set GCMLM_TEST_DATA)"
        if os.environ.get("GCMLM_REQUIRE_TEST_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def clam_reference(test_data: Path) -> Path:
    """`../shared/reference/clam`, beside the data folder."""
    root = test_data.parent / "reference" / "clam"
    if not root.is_dir():
        message = f"CLAM reference not found at {root}"
        if os.environ.get("GCMLM_REQUIRE_TEST_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data root (landing zone, artifacts) for one test."""
    root = tmp_path / "data"
    (root / "landing").mkdir(parents=True)
    (root / "artifacts").mkdir(parents=True)
    monkeypatch.setenv("GCMLM_DATA_ROOT", str(root))
    monkeypatch.delenv("GCMLM_LANDING_ROOT", raising=False)
    monkeypatch.delenv("GCMLM_ARTIFACTS_ROOT", raising=False)
    return root


@pytest.fixture
def instance(tmp_path: Path):
    """A real Dagster instance (SQLite storage in a temporary DAGSTER_HOME)."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture
def base_resources(data_root: Path) -> dict:
    return {
        "storage": ArtifactStorage(root=str(data_root / "artifacts")),
        "landing": LandingZone(root=str(data_root / "landing")),
        "patient_result_checks": patient_result_checks(),
        "fused_table": FusedTableSettings(),
    }
