"""The real Definitions load in both environments and validate with Dagster's own CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from gcmlm_assets.definitions import build_definitions

EXPECTED_GROUPS = {
    "radiology": {"ct_image", "ct_mask", "radiomics_row", "segmentation_model"},
    "pathology": {"patch_coords", "uni_features", "slide_vector"},
    "cohort": {"clinical_table", "fused_table", "risk_model", "risk_scores"},
}
PER_PATIENT = {"ct_image", "ct_mask", "radiomics_row", "patch_coords", "uni_features", "slide_vector"}


def asset_groups(defs: dg.Definitions) -> dict[str, set[str]]:
    graph = defs.resolve_asset_graph()
    groups: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        groups.setdefault(node.group_name, set()).add(key.to_user_string())
    return groups


@pytest.mark.parametrize("env", ["local", "k8s"])
def test_definitions_load(env: str):
    defs = build_definitions(env)
    assert asset_groups(defs) == EXPECTED_GROUPS
    graph = defs.resolve_asset_graph()
    for name in PER_PATIENT:
        partitions = graph.get(dg.AssetKey(name)).partitions_def
        assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == "patients"
    assert defs.get_sensor_def("landing_sensor") is not None
    executor = defs.resolve_job_def("__ASSET_JOB").executor_def
    assert executor.name == ("k8s" if env == "k8s" else "multiprocess")


def test_unknown_environment_is_refused(monkeypatch):
    from gcmlm_assets import settings

    monkeypatch.setenv("GCMLM_ENV", "cloud9")
    with pytest.raises(ValueError, match="GCMLM_ENV"):
        settings.environment()


@pytest.mark.parametrize("env", ["local", "k8s"])
def test_dagster_cli_validates(env: str, tmp_path: Path):
    cli = Path(sys.executable).parent / "dagster"
    result = subprocess.run(
        [str(cli), "definitions", "validate", "-m", "gcmlm_assets.definitions"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "GCMLM_ENV": env, "DAGSTER_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
