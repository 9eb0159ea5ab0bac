"""Fixtures of the radiology tests: the real CT and its stomach mask, the radiology resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from gcmlm_assets.radiology import resources as radiology_resource_defs
from gcmlm_assets_tests.support.radiology.ct import CT_NAME, STOMACH_NAME


@pytest.fixture(scope="session")
def real_ct(test_data: Path) -> Path:
    return test_data / "ct" / "totalsegmentator" / CT_NAME


@pytest.fixture(scope="session")
def real_stomach(test_data: Path) -> Path:
    return test_data / "ct" / "totalsegmentator" / STOMACH_NAME


@pytest.fixture
def radiology_resources(base_resources: dict) -> dict:
    """The project's own radiology resources, storage and landing pointed at the test's data root."""
    return {**radiology_resource_defs.resources("local"), **base_resources}
