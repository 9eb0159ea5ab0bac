"""Pooling to one vector per patient, and patch_coords -> uni_features -> slide_vector through Dagster."""

from __future__ import annotations

import io
import logging
import re
import shutil
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gcmlm_assets import columns
from gcmlm_assets.pathology.assets import patch_coords, slide_vector, uni_features
from gcmlm_assets.pathology.encoders import load_encoder
from gcmlm_assets.pathology.pooling import (
    SLIDE_VECTOR_COLUMNS,
    MeanPooling,
    PooledVector,
    PoolingError,
    SlideFeatures,
    feature_columns,
    get_pooling,
    validate_slide_vector,
    write_slide_vector,
)
from gcmlm_assets.pathology.resources import PatchEncoder, TilingSettings
from gcmlm_assets_tests.support.pathology.features import (
    cosine_rows, materialize_patient, metadata_of, reference_features,
)
from gcmlm_assets_tests.support.pathology.slide_fixtures import copy_into, real_slide


def _feature_file(path: Path, features: np.ndarray) -> SlideFeatures:
    with h5py.File(path, "w") as fh:
        fh["features"] = features
        fh["coords"] = np.zeros((len(features), 2), np.int64)
    return SlideFeatures(path, chunk_rows=4)  # small chunks: the sums run over several blocks


def test_mean_pooling_is_the_mean_over_all_patches_of_all_slides(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 8)).astype(np.float32)
    b = rng.normal(loc=3.0, size=(5, 8)).astype(np.float32)
    pooled = get_pooling("mean").pool([_feature_file(tmp_path / "a.h5", a), _feature_file(tmp_path / "b.h5", b)])
    np.testing.assert_allclose(pooled.vector, np.concatenate([a, b]).astype(np.float64).mean(axis=0), rtol=1e-12)
    assert (pooled.n_patches, pooled.n_slides) == (42, 2)
    assert pooled.details["patches_per_slide"] == {"a": 37, "b": 5}


def test_pooling_refuses_what_it_cannot_pool(tmp_path):
    eight = _feature_file(tmp_path / "a.h5", np.ones((3, 8), np.float32))
    nine = _feature_file(tmp_path / "b.h5", np.ones((3, 9), np.float32))
    with pytest.raises(PoolingError, match="b.h5: feature dimension 9 differs from 8"):
        MeanPooling().pool([eight, nine])
    empty = _feature_file(tmp_path / "c.h5", np.zeros((0, 8), np.float32))
    with pytest.raises(PoolingError, match="0 patches"):
        MeanPooling().pool([empty])
    with pytest.raises(PoolingError, match="unknown pooling 'attention'"):
        get_pooling("attention")
    with pytest.raises(PoolingError, match="missing.h5: cannot read"):
        MeanPooling().pool([SlideFeatures(tmp_path / "missing.h5")])


def test_slide_vector_file_layout_and_its_check(tmp_path):
    path = write_slide_vector(tmp_path / "slide_vector.parquet", "P1", PooledVector(np.arange(3.0), 10, 2))
    table = pq.read_table(path)
    assert table.column_names == ["patient_id", "n_patches", "n_slides", *feature_columns(3)]
    assert table.num_rows == 1 and str(table.schema.field("n_patches").type) == "int64"
    assert validate_slide_vector(path, expected_dim=3) == []
    assert "2 feature columns, expected 3" in validate_slide_vector(
        write_slide_vector(tmp_path / "two.parquet", "P1", PooledVector(np.arange(2.0), 1, 1)), expected_dim=3)[0]
    bad = write_slide_vector(tmp_path / "nan.parquet", "P1", PooledVector(np.array([1.0, np.nan, 3.0]), 1, 1))
    assert validate_slide_vector(bad, expected_dim=3) == ["1 non-finite feature values"]


# ---------------------------------------------------------------- through Dagster


def _resources(base_resources: dict, **encoder) -> dict:
    # Reading as configured by default (in-process threads); num_workers=1 runs a DataLoader worker.
    settings = {"name": "vit-tiny-random", "batch_size": 16, **encoder}
    return {**base_resources, "pathology": TilingSettings(), "encoder": PatchEncoder(**settings)}


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _log_lines(instance, result: dg.ExecuteInProcessResult, step: str, level: int = logging.INFO) -> list[str]:
    """The plain log lines (context.log) a step of the run wrote at `level`, in order."""
    return [entry.user_message for entry in instance.all_logs(result.run_id)
            if entry.dagster_event is None and entry.step_key == step and entry.level == level]


def _failure(result: dg.ExecuteInProcessResult) -> str:
    [event] = result.get_step_failure_events()
    error = event.step_failure_data.error
    return error.message + (error.cause.message if error.cause else "")


def test_pathology_branch_end_to_end(instance, base_resources, data_root: Path, test_data: Path, monkeypatch,
                                     capfd):
    slide = copy_into(real_slide(test_data), data_root / "landing" / "P001" / "wsi")
    resources = _resources(base_resources)
    capfd.readouterr()
    result = materialize_patient(instance, [patch_coords, uni_features, slide_vector], resources, "P001")
    assert result.success
    # Nothing reaches the run's raw stdout (descriptor level: torch, timm, the readers included).
    assert capfd.readouterr().out == ""
    assert all(_checks(result).values()) and len(_checks(result)) == 9, _checks(result)

    artifacts = data_root / "artifacts"
    with h5py.File(artifacts / "patch_coords" / "P001" / f"{slide.stem}.h5", "r") as fh:
        tiled = fh["coords"][()]
    features_file = artifacts / "uni_features" / "P001" / f"{slide.stem}.h5"
    with h5py.File(features_file, "r") as fh:
        features, coords = fh["features"][()], fh["coords"][()]
        assert fh.attrs["encoder"] == "vit-tiny-random" and fh.attrs["checkpoint_sha256"] == "untrained"
    assert len(tiled) > 20 and features.shape == (len(tiled), 192)
    assert sorted(map(tuple, coords)) == sorted(map(tuple, tiled))
    # The asset's features are the encoder applied to the patches patch_coords chose.
    expected = reference_features(load_encoder("vit-tiny-random"), slide, coords[:6], read_size=256)
    assert cosine_rows(features[:6], expected).min() > 0.9999

    table = pq.read_table(artifacts / "slide_vector" / "P001" / "slide_vector.parquet")
    assert table.num_rows == 1 and table.column_names[:3] == ["patient_id", "n_patches", "n_slides"]
    assert table.column("patient_id")[0].as_py() == "P001"
    assert (table.column("n_patches")[0].as_py(), table.column("n_slides")[0].as_py()) == (len(tiled), 1)
    vector = np.array([table.column(c)[0].as_py() for c in feature_columns(192)])
    np.testing.assert_allclose(vector, features.astype(np.float64).mean(axis=0), rtol=1e-9)
    assert columns.problems(SLIDE_VECTOR_COLUMNS, columns.table_fields(table)) == []
    schema = metadata_of(result, "slide_vector")["dagster/column_schema"].columns
    assert [c.name for c in schema] == ["patient_id", "n_patches", "n_slides", "feat_*"]
    assert "(192 columns: feat_0000 .. feat_0191)" in schema[3].description

    meta = metadata_of(result, "uni_features")
    assert meta["encoder"] == "vit-tiny-random" and meta["checkpoint_sha256"] == "untrained"
    assert meta["untrained"] is True and meta["embedding_dim"] == 192 and meta["patches_per_second"] > 0
    # Random weights are identified by the digest of the parameters themselves.
    assert meta["checkpoint"] == "random init (test only)"
    assert meta["weights_sha256"] == load_encoder("vit-tiny-random").weights_sha256
    assert meta["reading"].startswith("in-process between forward passes")
    vector_meta = metadata_of(result, "slide_vector")
    assert vector_meta["pooling"] == "mean"
    assert vector_meta["picture_path"] == str(artifacts / "slide_vector" / "P001" / "slide_vector.png")
    # Drawn to a file, not embedded (patch_coords' picture shows the slides in the UI).
    assert "picture" not in vector_meta
    shown = Image.open(vector_meta["picture_path"])
    assert shown.format == "PNG" and shown.width >= 600
    # The slide's thumbnail, not a blank canvas: tissue colours and the pooled patches in red.
    rgb = np.asarray(shown.convert("RGB")).astype(int)
    assert ((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum() > 200
    assert ((rgb[..., 0] > 120) & (rgb[..., 2] > 120) & (rgb[..., 1] < rgb[..., 0] - 40)).sum() > 1000  # H&E pink

    # Patches done, as the step's own log lines: paced through the slide, the last one says all are done.
    progress = [line for line in _log_lines(instance, result, "uni_features")
                if line.startswith(f"P001: slide {slide.name}: ")]
    done = [int(re.search(r": ([\d,]+)/", line)[1].replace(",", "")) for line in progress]
    assert 1 <= len(progress) <= 11 and done == sorted(set(done)) and done[-1] == len(tiled)
    assert re.fullmatch(rf"P001: slide {re.escape(slide.name)}: {len(tiled):,}/{len(tiled):,} patches, "
                        r"[\d,]+ patches/s", progress[-1]), progress[-1]

    # Unchanged inputs: nothing is recomputed and the data versions stay.
    again = materialize_patient(instance, [uni_features, slide_vector], resources, "P001")
    assert again.success
    assert f"P001: slide {slide.name}: {len(tiled):,}/{len(tiled):,} patches, reused" in " | ".join(
        _log_lines(instance, again, "uni_features"))
    assert capfd.readouterr().out == ""
    assert metadata_of(again, "uni_features")["reused_slides"] == [features_file.name]
    assert metadata_of(again, "slide_vector")["reused"] is True
    versions = [
        {e.asset_key.to_user_string(): e.materialization.tags.get("dagster/data_version")
         for e in r.get_asset_materialization_events()} for r in (result, again)
    ]
    assert versions[1]["uni_features"] == versions[0]["uni_features"]
    assert versions[1]["slide_vector"] == versions[0]["slide_vector"]

    # UNI without its weights: the step fails and says which setting to fill in.
    monkeypatch.delenv("GCMLM_UNI_CHECKPOINT", raising=False)
    no_weights = materialize_patient(instance, [uni_features], _resources(base_resources, name="uni"), "P001")
    assert not no_weights.success and "GCMLM_UNI_CHECKPOINT" in _failure(no_weights)


def test_tampered_features_fail_the_checks(instance, base_resources, data_root: Path, test_data: Path, capfd):
    copy_into(real_slide(test_data), data_root / "landing" / "P002" / "wsi")
    resources = _resources(base_resources, num_workers=1)  # a DataLoader worker inside a Dagster run
    capfd.readouterr()
    assert materialize_patient(instance, [patch_coords, uni_features, slide_vector], resources, "P002").success
    assert capfd.readouterr().out == ""  # the worker process writes nothing to raw stdout either
    features_dir = data_root / "artifacts" / "uni_features" / "P002"

    def tamper() -> None:
        with h5py.File(next(features_dir.glob("*.h5")), "r+") as fh:
            fh["features"][0] = np.nan  # keeps its fingerprint: the file is reused, then re-validated

    tamper()
    rerun = materialize_patient(instance, [uni_features, slide_vector], resources, "P002")
    assert not rerun.success
    checks = _checks(rerun)
    assert checks["features_finite"] is False and checks["feature_shape"] is True
    finite = {e.check_name: e for e in rerun.get_asset_check_evaluations()}["features_finite"]
    n_values = finite.metadata["n_non_finite_values"].value
    assert n_values > 0 and finite.metadata["expected"].value == "0 missing or infinite values"
    assert finite.metadata["found"].value.startswith(f"{n_values} non-finite value(s) in ")
    assert "patient P002" in finite.description and ".h5" in finite.description
    assert "blocking asset check" in _failure(rerun)
    assert not [m for m in rerun.get_asset_materialization_events() if m.asset_key.to_user_string() == "slide_vector"]
    # The failed features went to quarantine: a later slide_vector run cannot pool them.
    assert not features_dir.exists()
    [moved] = (data_root / "artifacts" / "_quarantine" / "uni_features" / "P002").iterdir()
    assert list(moved.glob("*.h5"))
    alone = materialize_patient(instance, [slide_vector], resources, "P002")
    assert not alone.success and "uni_features has not been materialized" in _failure(alone)

    # slide_vector's own check catches what it pools (features damaged after they passed theirs;
    # its stored vector is removed so that it pools them again rather than reusing it).
    assert materialize_patient(instance, [uni_features], resources, "P002").success
    tamper()
    shutil.rmtree(data_root / "artifacts" / "slide_vector" / "P002")
    alone = materialize_patient(instance, [slide_vector], resources, "P002")
    assert not alone.success and _checks(alone) == {"slide_vector_valid": False}
    [valid] = alone.get_asset_check_evaluations()
    assert valid.metadata["found"].value.endswith("non-finite feature values")
    assert valid.metadata["expected"].value.startswith("1 row with n_patches, n_slides and ")
    assert "patient P002" in valid.description and "slide_vector.parquet" in valid.description


def test_features_need_patch_coords_first(instance, base_resources):
    result = materialize_patient(instance, [uni_features], _resources(base_resources), "P404")
    assert not result.success and "materialize patch_coords for patient" in _failure(result)


def test_a_backfill_range_encodes_many_patients_with_one_encoder(instance, base_resources, data_root: Path,
                                                                 test_data: Path, monkeypatch):
    """uni_features over a range of patients, as a batched backfill run does it: the encoder is
    loaded once, each patient's features and checks are recorded as that patient's own, and a
    patient without patch_coords fails alone, named in the run's failure."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from gcmlm_assets.pathology import encoders

    resources = _resources(base_resources)
    batch = ["B001", "B002", "B003"]
    instance.add_dynamic_partitions("patients", batch)
    for patient_id in ("B001", "B003"):
        copy_into(real_slide(test_data), data_root / "landing" / patient_id / "wsi")
        assert materialize_patient(instance, [patch_coords], resources, patient_id).success
    loads = []
    real_load = encoders.load_encoder
    monkeypatch.setattr(encoders, "load_encoder", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))

    result = dg.materialize([uni_features], instance=instance, resources=resources, raise_on_error=False,
                            tags={ASSET_PARTITION_RANGE_START_TAG: "B001", ASSET_PARTITION_RANGE_END_TAG: "B003"})
    assert not result.success
    failure = _failure(result)
    assert "1 of 3 patients failed: patient B002: " in failure and "materialize patch_coords for patient B002" in failure
    assert "patient B002: patient B002" not in failure
    assert loads == ["vit-tiny-random"]

    key = dg.AssetKey("uni_features")
    logged = [entry.dagster_event for entry in instance.all_logs(result.run_id)
              if entry.dagster_event and entry.dagster_event.step_key == "uni_features"]
    by_patient = {e.partition: e.step_materialization_data.materialization
                  for e in logged if e.is_step_materialization}
    assert set(by_patient) == {"B001", "B003"}
    for patient_id, materialization in by_patient.items():
        meta = {k: v.value for k, v in materialization.metadata.items()}
        assert meta["n_patches"] > 20 and meta["device"] == "cpu" and "encoder.device='auto'" in meta["device_reason"]
        assert meta["h5_files"] == [str(data_root / "artifacts" / "uni_features" / patient_id / f"{real_slide(test_data).stem}.h5")]
    checks = [e.event_specific_data for e in logged if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    names = ("feature_shape", "features_finite", "features_nonzero_rows", "encoder_recorded")
    assert {(c.partition, c.check_name) for c in checks if "evaluated" not in c.metadata} == {
        (p, name) for p in ("B001", "B003") for name in names}
    # the failed patient's checks are recorded under it as not evaluated (batching.py), not as results
    assert {(c.partition, c.check_name) for c in checks if "evaluated" in c.metadata} == {
        ("B002", name) for name in names}
    assert all(c.passed == ("evaluated" not in c.metadata) for c in checks)
    status = instance.get_status_by_partition(key, batch, uni_features.partitions_def)
    assert {p: str(s.value) for p, s in status.items()} == {"B001": "MATERIALIZED", "B002": "FAILED",
                                                            "B003": "MATERIALIZED"}

    # Once the failed patient has its patch_coords, the same range succeeds: it encodes that patient
    # and reuses the others' stored features.
    copy_into(real_slide(test_data), data_root / "landing" / "B002" / "wsi")
    assert materialize_patient(instance, [patch_coords], resources, "B002").success
    again = dg.materialize([uni_features], instance=instance, resources=resources, raise_on_error=False,
                           tags={ASSET_PARTITION_RANGE_START_TAG: "B001", ASSET_PARTITION_RANGE_END_TAG: "B003"})
    assert again.success
    logged = [entry.dagster_event for entry in instance.all_logs(again.run_id)
              if entry.dagster_event and entry.dagster_event.is_step_materialization]
    reused = {e.partition: e.step_materialization_data.materialization.metadata["reused_slides"].value for e in logged}
    assert set(reused) == set(batch) and reused["B002"] == [] and reused["B001"] and reused["B003"]
    status = instance.get_status_by_partition(key, batch, uni_features.partitions_def)
    assert {str(s.value) for s in status.values()} == {"MATERIALIZED"}


def test_slide_vector_picture_without_the_slide_files(tmp_path):
    """Feature files whose slides are gone still give a picture: their patch layouts, counted."""
    from PIL import Image

    from gcmlm_assets.pathology.pooling import slide_vector_picture, slide_vector_title

    rng = np.random.default_rng(3)
    slides = []
    for index, rows in enumerate((30, 12, 5, 7, 9, 11, 2)):
        with h5py.File(tmp_path / f"s{index}.h5", "w") as fh:
            fh["features"] = rng.normal(size=(rows, 4)).astype(np.float32)
            fh["coords"] = rng.integers(0, 20, size=(rows, 2)) * 256
            fh["coords"].attrs["patch_size_level0"] = 256
            fh.attrs["slide_path"] = str(tmp_path / f"gone{index}.svs")
        slides.append(SlideFeatures(tmp_path / f"s{index}.h5"))
    png = slide_vector_picture("P009", slides, "mean")
    with Image.open(io.BytesIO(png)) as full:
        assert full.format == "PNG" and full.width >= 2400  # three slides a row, 900 px each
    assert slide_vector_title("P009", [30, 12, 5, 7, 9, 11, 2], "mean", 6) == \
        "P009: 76 patches from 7 slide(s), mean pooling, first 6 shown"
    assert slide_vector_title("P001", [44], "mean", 1) == "P001: 44 patches from 1 slide(s), mean pooling"
