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
AUTOMATION_SENSORS = ("landing_sensor", "segmentation_training_sensor", "predicted_mask_sensor",
                      "cohort_refresh_sensor")


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
    for name in AUTOMATION_SENSORS:
        sensor = defs.get_sensor_def(name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING, name
    executor = defs.resolve_job_def("__ASSET_JOB").executor_def
    assert executor.name == ("k8s" if env == "k8s" else "in_process")


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


def test_profiles_build_the_resources_the_daemon_uses(monkeypatch):
    production = build_definitions("local", "production").resources
    assert production["encoder"].name == "uni"
    assert production["segmentation"].tiny_plans is False and production["segmentation"].epochs is None
    assert production["segmentation"].min_training_cases == 5
    demo = build_definitions("local", "demo").resources
    assert demo["encoder"].name == "vit-tiny-random"
    assert demo["segmentation"].tiny_plans is True and demo["segmentation"].trainer == "nnUNetTrainerAdam"
    assert demo["risk_model"].min_labelled_per_class == 3
    assert demo["automation"].training_debounce_s < production["automation"].training_debounce_s
    # The environment variable selects the profile; an unknown one is refused, naming the variable.
    monkeypatch.setenv("GCMLM_PROFILE", "demo")
    assert build_definitions("local").resources["encoder"].name == "vit-tiny-random"
    monkeypatch.setenv("GCMLM_PROFILE", "laptop")
    with pytest.raises(ValueError, match="GCMLM_PROFILE"):
        build_definitions("local")


def test_full_nnunet_training_on_a_cpu_is_refused_naming_the_settings():
    production = build_definitions("local", "production").resources["segmentation"]
    refusal = production.training_refusal()
    assert refusal and "segmentation.tiny_plans" in refusal and "GCMLM_PROFILE=demo" in refusal
    assert "trained_model_folder" in refusal and "segmentation.device='auto'" in refusal
    assert build_definitions("local", "demo").resources["segmentation"].training_refusal() is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_cuda_setting_without_a_gpu_is_refused_naming_the_setting():
    cuda = build_definitions("local", "production").resources["segmentation"].model_copy(update={"device": "cuda"})
    refusal = cuda.training_refusal()
    assert refusal and "segmentation.device='cuda' but this process sees no CUDA GPU" in refusal


def test_every_per_patient_asset_retries_transient_failures():
    from gcmlm_assets.policies import TRANSIENT_RETRY

    defs = build_definitions("local", "production")
    for assets_def in defs.assets:
        names = {key.to_user_string() for key in assets_def.keys}
        if names & (PER_PATIENT | {"segmentation_model"}):
            assert assets_def.op.retry_policy == TRANSIENT_RETRY, names


def test_gpu_assets_share_the_gpu_pool_and_batch_their_backfills():
    import os
    import subprocess
    import sys

    from gcmlm_assets.step_pods import GPU_POOL

    defs = build_definitions("local", "production")
    gpu = {"segmentation_model", "ct_mask", "uni_features"}
    for assets_def in defs.assets:
        [name] = {key.to_user_string() for key in assets_def.keys}
        assert (assets_def.op.pool == GPU_POOL) == (name in gpu), name
        batched = assets_def.backfill_policy
        if name in {"ct_mask", "uni_features"}:
            assert batched is not None and batched.max_partitions_per_run == 32, name
        else:
            assert batched is None, name
    # The batch size comes from the code location's environment when the assets are defined.
    probe = ("from gcmlm_assets.definitions import defs; "
             "print(sorted(a.backfill_policy.max_partitions_per_run for a in defs.assets if a.backfill_policy))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "GCMLM_GPU_BATCH_PATIENTS": "8"}).stdout
    assert out.strip().splitlines()[-1] == "[8, 8]"


# Libraries only the steps that compute need; every step process, sensor tick and code server
# loads the definitions, so these must not come with them (benchmarks/definitions_import.py times it).
HEAVY_MODULES = ("torch", "torchvision", "timm", "nnunetv2", "sklearn", "skops", "scipy", "pandas", "SimpleITK",
                 "radiomics", "cv2", "openslide", "h5py", "tifffile", "pyarrow", "matplotlib", "numpy", "pydicom",
                 "dagster_k8s", "kubernetes")


def test_loading_the_definitions_imports_no_heavy_library():
    import os
    import subprocess
    import sys

    probe = ("import sys, gcmlm_assets.definitions as d; d.defs.resolve_asset_graph(); "
             f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    env = {**os.environ, "GCMLM_ENV": "local"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_every_asset_names_its_kind_owner_and_the_settings_profile():
    for profile in ("production", "demo"):
        defs = build_definitions("local", profile)
        graph = defs.resolve_asset_graph()
        for key in graph.get_all_asset_keys():
            node = graph.get(key)
            assert len(node.kinds) == 1 and node.owners and node.owners[0].startswith("team:"), key
            assert node.metadata["settings_profile"].startswith(f"{profile}: "), key
        assert graph.get(dg.AssetKey("radiomics_row")).kinds == {"pyradiomics"}
        assert graph.get(dg.AssetKey("uni_features")).kinds == {"torch"}


def test_every_check_says_in_plain_words_what_it_checks():
    """The Checks tab shows each spec's description as markdown: it must be a sentence or two,
    keep placeholders such as `<patient>` in code spans (bare <...> is dropped as HTML) and leave
    code names (snake_case) out of the prose."""
    import re

    from gcmlm_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = sorted(graph.asset_check_keys, key=str)
    assert len(keys) == 22  # 7 radiology, 9 pathology, 6 cohort
    for key in keys:
        description = graph.get_check_spec(key).description or ""
        prose = re.sub(r"`[^`]*`", "", description)
        assert len(prose.split()) >= 12, (key, description)
        assert not re.search(r"<[^<>\s]+>", prose), (key, description)
        assert not re.search(r"\b[a-z0-9]+_[a-z0-9_]+\b", prose), (key, description)
