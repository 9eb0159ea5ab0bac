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
    "radiology": {"ct_image", "ct_mask", "radiomics_row", "ct_mask_seg", "radiomics_sr", "segmentation_model"},
    "pathology": {"patch_coords", "uni_features", "slide_vector", "qupath_geojson", "ln_patch_coords", "ln_features",
                  "tumour_classifier", "lymph_nodes"},
    "cohort": {"clinical_table", "fused_table", "risk_model", "risk_scores", "risk_assessments", "risk_explanations"},
}
PER_SCAN = {"ct_image", "ct_mask", "radiomics_row", "ct_mask_seg", "radiomics_sr"}
PER_PATIENT = {"patch_coords", "uni_features", "slide_vector", "qupath_geojson", "ln_patch_coords", "ln_features",
               "lymph_nodes", "risk_explanations"}
AUTOMATION_SENSORS = ("landing_sensor", "radiology_steps_sensor", "pathology_steps_sensor", "lymph_node_steps_sensor",
                      "segmentation_training_sensor", "predicted_mask_sensor", "cohort_refresh_sensor",
                      "risk_explanations_sensor", "qupath_geojson_after_patch_coords_sensor",
                      "qupath_geojson_after_risk_explanations_sensor", "tumour_classifier_sensor",
                      "lymph_nodes_after_classifier_sensor")


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
    for names, partition_set in ((PER_PATIENT, "patients"), (PER_SCAN, "ct_scans")):
        for name in names:
            partitions = graph.get(dg.AssetKey(name)).partitions_def
            assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == partition_set
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


def test_fused_table_is_told_the_blocking_checks_of_every_result_it_reads():
    """The cohort imports no other domain: the definitions hand fused_table the blocking checks of
    radiomics_row and slide_vector (its resource), which must be exactly those assets' own."""
    from gcmlm_assets.catalogue import PATIENT_FEATURES

    defs = build_definitions("local")
    graph = defs.resolve_asset_graph()
    told = defs.resources["patient_result_checks"].blocking
    read = {file.asset.key for file in PATIENT_FEATURES.values()}
    declared = {asset: sorted(key.name for key in graph.get_check_keys_for_assets({dg.AssetKey(asset)})
                              if graph.get_check_spec(key).blocking) for asset in read}
    assert {asset: sorted(names) for asset, names in told.items()} == declared
    assert all(declared.values()), declared  # each result fused_table reads has a blocking check


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
    gpu = {"segmentation_model", "ct_mask", "uni_features", "ln_features"}
    for assets_def in defs.assets:
        [name] = {key.to_user_string() for key in assets_def.keys}
        assert (assets_def.op.pool == GPU_POOL) == (name in gpu), name
        batched = assets_def.backfill_policy
        # risk_explanations, qupath_geojson: CPU work, batched as their sensors batch it
        if name in {"ct_mask", "uni_features", "ln_features", "risk_explanations", "qupath_geojson"}:
            assert batched is not None and batched.max_partitions_per_run == 32, name
        else:
            assert batched is None, name
    # The batch size comes from the code location's environment when the assets are defined.
    probe = ("from gcmlm_assets.definitions import defs; "
             "print(sorted(a.backfill_policy.max_partitions_per_run for a in defs.assets if a.backfill_policy))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "GCMLM_GPU_BATCH_PATIENTS": "8"}).stdout
    assert out.strip().splitlines()[-1] == "[8, 8, 8, 8, 8]"


# Libraries only the steps that compute need; every step process, sensor tick and code server
# loads the definitions, so these must not come with them (benchmarks/definitions_import.py times it).
HEAVY_MODULES = ("torch", "torchvision", "timm", "nnunetv2", "sklearn", "skops", "scipy", "pandas", "SimpleITK",
                 "radiomics", "cv2", "openslide", "h5py", "tifffile", "pyarrow", "matplotlib", "numpy", "pydicom",
                 "highdicom", "skimage", "PIL", "dagster_k8s", "kubernetes")


def test_loading_the_definitions_imports_no_heavy_library():
    import os
    import subprocess
    import sys

    probe = ("import sys, gcmlm_assets.definitions as d; d.defs.resolve_asset_graph(); "
             f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    env = {**os.environ, "GCMLM_ENV": "local"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_lazy_names_only_third_party_libraries():
    """The project's own modules are imported as usual, so that readers, IDEs and type checkers see the
    wiring; lazy() is for heavy third-party libraries only (gcmlm_assets/lazy.py)."""
    import ast

    import gcmlm_assets

    package = Path(gcmlm_assets.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "lazy"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).split(".")[0] == "gcmlm_assets"):
                offenders.append(f"gcmlm_assets/{relative}:{node.lineno} lazy({node.args[0].value!r})")
    assert offenders == [], "import the project's own modules instead:\n" + "\n".join(offenders)


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
    assert len(keys) == 39  # 11 radiology, 22 pathology (12 of them the lymph-node slides'), 6 cohort
    for key in keys:
        description = graph.get_check_spec(key).description or ""
        prose = re.sub(r"`[^`]*`", "", description)
        assert len(prose.split()) >= 12, (key, description)
        assert not re.search(r"<[^<>\s]+>", prose), (key, description)
        assert not re.search(r"\b[a-z0-9]+_[a-z0-9_]+\b", prose), (key, description)


# ---------------------------------------------------------------- what the asset pages say (issue 12)

def prose(text: str) -> str:
    """Markdown text without its code spans: what the UI renders as prose."""
    import re

    return re.sub(r"`[^`]*`", "", text)


def markdown_problems(text: str) -> list[str]:
    """What the UI would not render as written: a bare `<word>` (dropped as HTML), a bare `*` (emphasis)."""
    import re

    outside = prose(text)
    return [*re.findall(r"<[^<>\s][^<>]*>", outside), *(["a bare *"] if "*" in outside else [])]


def sentences(text: str) -> int:
    import re

    return len(re.findall(r"[.!?](?:\s|$)", prose(text).strip()))


def test_markdown_checks_catch_what_the_ui_drops():
    assert markdown_problems("from <landing>/<patient>/ct_label/") == ["<landing>", "<patient>"]
    assert markdown_problems("from `<landing>/<patient>/ct_label/` and `rad_*`") == []
    assert markdown_problems("rad_* and path_*") == ["a bare *"]
    assert sentences("One. Two `a. b.` still two.") == 2


def test_every_asset_describes_itself_in_one_to_three_sentences_that_render_as_written():
    graph = build_definitions("local", "production").resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        description = graph.get(key).description or ""
        assert 1 <= sentences(description) <= 3, (key, description)
        assert markdown_problems(description) == [], (key, description)


def test_resource_and_config_descriptions_render_as_written():
    defs = build_definitions("local", "production")
    for key, resource in defs.resources.items():
        texts = {"docstring": type(resource).__doc__ or ""}
        texts.update({name: field.description or "" for name, field in type(resource).model_fields.items()})
        for name, text in texts.items():
            assert markdown_problems(text) == [], (key, name, text)


def test_table_assets_show_their_column_schema_before_any_run():
    from gcmlm_assets.cohort.columns import CLINICAL_TABLE_COLUMNS, FUSED_TABLE_COLUMNS, RISK_SCORES_COLUMNS
    from gcmlm_assets.columns import dagster_schema
    from gcmlm_assets.pathology.pooling import SLIDE_VECTOR_COLUMNS
    from gcmlm_assets.radiology.columns import RADIOMICS_ROW_COLUMNS

    tables = {"radiomics_row": RADIOMICS_ROW_COLUMNS, "slide_vector": SLIDE_VECTOR_COLUMNS,
              "clinical_table": CLINICAL_TABLE_COLUMNS, "fused_table": FUSED_TABLE_COLUMNS,
              "risk_scores": RISK_SCORES_COLUMNS}
    graph = build_definitions("local", "production").resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        name = key.to_user_string()
        schema = graph.get(key).metadata.get("dagster/column_schema")
        if name not in tables:
            assert schema is None, name
            continue
        assert schema == dagster_schema(tables[name]), name
        assert all(column.type and column.description for column in schema.columns), name
        assert not markdown_problems(" ".join(c.description for c in schema.columns).replace("*", "")), name
    columns = {c.name for c in graph.get(dg.AssetKey("fused_table")).metadata["dagster/column_schema"].columns}
    assert {"patient_id", "mlm", "clin_*", "rad_*", "path_feat_*"} <= columns
    # a summary of the PyRadiomics features, not a thousand names
    radiomics = graph.get(dg.AssetKey("radiomics_row")).metadata["dagster/column_schema"].columns
    assert [c.name for c in radiomics][:2] == ["patient_id", "original_*"] and len(radiomics) < 20


def test_model_assets_name_the_configured_models_without_reading_their_weights(monkeypatch, tmp_path):
    def metadata(profile: str, asset: str) -> dict:
        return dict(build_definitions("local", profile).resolve_asset_graph().get(dg.AssetKey(asset)).metadata)

    monkeypatch.delenv("GCMLM_UNI_CHECKPOINT", raising=False)
    monkeypatch.delenv("GCMLM_NNUNET_MODEL_FOLDER", raising=False)
    uni = metadata("production", "uni_features")
    assert uni["encoder"].startswith("uni: UNI") and uni["encoder_embedding_dim"] == 1024
    assert "GCMLM_UNI_CHECKPOINT" in uni["encoder_checkpoint"]
    tiny = metadata("demo", "uni_features")
    assert tiny["encoder"].startswith("vit-tiny-random") and tiny["encoder_embedding_dim"] == 192
    assert tiny["encoder_checkpoint"] == "random init (test only)"
    # A checkpoint is named as configured, never opened: this one does not even exist.
    checkpoint = tmp_path / "uni" / "pytorch_model.bin"
    monkeypatch.setenv("GCMLM_UNI_CHECKPOINT", str(checkpoint))
    assert metadata("production", "uni_features")["encoder_checkpoint"] == str(checkpoint)

    for asset in ("segmentation_model", "ct_mask"):
        full = metadata("production", asset)
        assert full["nnunet_training"] == "1000 epochs x 250 iterations, fold all", asset
        assert full["nnunet_plans"].startswith("full-size") and full["nnunet_trainer"] == "nnUNetTrainer"
        assert (full["nnunet_configuration"], full["nnunet_device"]) == ("3d_fullres", "auto")
        demo = metadata("demo", asset)
        assert demo["nnunet_training"] == "30 epochs x 15 iterations, fold all" and demo["nnunet_device"] == "cpu"
        assert demo["nnunet_plans"].startswith("tiny") and demo["nnunet_trainer"] == "nnUNetTrainerAdam"
    monkeypatch.setenv("GCMLM_NNUNET_MODEL_FOLDER", str(tmp_path / "trained"))
    assert metadata("production", "segmentation_model")["nnunet_trained_model_folder"] == str(tmp_path / "trained")


def test_the_launchpad_warns_that_production_trains_full_size_nnunet():
    from gcmlm_assets.radiology.resources import SegmentationModelResource

    description = build_definitions("local", "production").resolve_asset_graph().get(
        dg.AssetKey("segmentation_model")).description
    assert "refused on a CPU" in description and "`GCMLM_PROFILE=demo`" in description
    assert "trained_model_folder" in description and "tiny_plans" in description
    fields = SegmentationModelResource.model_fields
    for name in ("epochs", "iterations_per_epoch", "tiny_plans", "device"):
        text = fields[name].description
        assert "CPU" in text and ("demo" in text or "tiny_plans" in text), name
    assert "GCMLM_NNUNET_MODEL_FOLDER" in fields["trained_model_folder"].description


def test_a_schema_that_drifted_from_its_table_is_named():
    from gcmlm_assets.columns import problems, summarise
    from gcmlm_assets.pathology.pooling import SLIDE_VECTOR_COLUMNS

    fields = [("patient_id", "string"), ("n_patches", "int64"), ("n_slides", "int64"),
              *((f"feat_{i:04d}", "double") for i in range(12))]
    assert problems(SLIDE_VECTOR_COLUMNS, fields) == []
    drifted = [("patient_id", "string"), ("n_patches", "double"), ("feat_0000", "double"), ("pooling", "string")]
    assert problems(SLIDE_VECTOR_COLUMNS, drifted) == [
        "column 'n_patches' is double, the schema's 'n_patches' says int64",
        "column 'pooling' (string) is not in the schema",
        "no column for the schema's 'n_slides'"]
    # At run time a family is one entry with its count; an undescribed column is still shown.
    shown = summarise(SLIDE_VECTOR_COLUMNS, [*fields, ("pooling", "string")])
    assert [c.name for c in shown] == ["patient_id", "n_patches", "n_slides", "feat_*", "pooling"]
    assert shown[3].description.endswith("(12 columns: feat_0000 .. feat_0011)")


def test_the_cohort_refresh_waits_on_each_fused_chain_and_only_those():
    """A chain whose modality yields no row the cohort fuses (the lymph-node chain until lymph_nodes
    joins fused_table) is carried by its steps sensor but not waited on by the cohort refresh."""
    from gcmlm_assets import definitions
    from gcmlm_assets.catalogue import LYMPH_NODE, PATIENT_FEATURES

    ends = {chain[-1].to_user_string() for chain in definitions.FEATURE_CHAINS}
    assert ends == {file.asset.key for file in PATIENT_FEATURES.values()}
    assert len(definitions.FEATURE_CHAINS) == len(PATIENT_FEATURES)
    if LYMPH_NODE not in PATIENT_FEATURES:
        assert definitions.MODALITY_ASSETS[LYMPH_NODE][0] not in {key for c in definitions.FEATURE_CHAINS for key in c}
    assert definitions.defs.get_sensor_def(f"{LYMPH_NODE}_steps_sensor") is not None
