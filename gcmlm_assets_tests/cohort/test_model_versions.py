"""risk_model's files publish as one set: a version folder per model, a pointer replaced atomically,
the last few versions kept; risk_scores reads one consistent version."""

import json
import os
import time
from pathlib import Path

import dagster as dg

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.storage import (
    STALE_TEMPORARY_S, TMP_PREFIX, VERSION_POINTER, ArtifactStore, new_version_folder, publish_version,
    read_version_pointer, version_intact)
from gcmlm_assets_tests.support.cohort.runs import FAST_MODEL, materialize_cohort
from gcmlm_assets_tests.support.cohort.synthetic import write_cohort_files
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results


def publish(root: Path, **files: str) -> dict:
    staging = new_version_folder(root)
    for name, text in files.items():
        (staging / name).write_text(text)
    return publish_version(root, staging, {"note": "test"})


def versions(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def test_a_version_is_published_whole_and_named_by_its_content(tmp_path):
    root = tmp_path / "risk_model"
    staging = new_version_folder(root)
    assert staging.parent == root and staging.name.startswith(TMP_PREFIX)
    staging.rmdir()

    pointer = publish(root, **{"model.skops": "m1", "metrics.json": "{}"})

    assert set(pointer["files"]) == {"model.skops", "metrics.json"} and pointer["note"] == "test"
    assert versions(root) == {pointer["version"]}  # the temporary folder became the version
    assert (root / pointer["version"] / "model.skops").read_text(encoding="utf-8") == "m1"
    assert read_version_pointer(root) == pointer and version_intact(root, pointer)
    assert json.loads((root / VERSION_POINTER).read_text(encoding="utf-8"))["recent_versions"] == [pointer["version"]]
    # the same content again: the installed folder is reused, the staging folder discarded
    assert publish(root, **{"model.skops": "m1", "metrics.json": "{}"})["version"] == pointer["version"]
    assert versions(root) == {pointer["version"]}


def test_the_last_three_versions_are_kept_and_never_the_current_one_removed(tmp_path):
    root = tmp_path / "risk_model"
    published = [publish(root, **{"model.skops": f"m{i}"})["version"] for i in range(5)]
    assert versions(root) == set(published[-3:])
    assert read_version_pointer(root)["recent_versions"] == published[::-1][:3]
    # going back to an older model makes it current again, without a copy
    again = publish(root, **{"model.skops": "m3"})
    assert again["version"] == published[3] and again["recent_versions"] == [published[3], published[4], published[2]]
    assert versions(root) == set(published[2:])


def test_unlisted_versions_wait_a_day_and_damaged_ones_are_replaced(tmp_path):
    root = tmp_path / "risk_model"
    current = publish(root, **{"model.skops": "m0"})
    orphan = root / "0123456789abcdef"  # renamed by a concurrent writer, not yet pointed at
    orphan.mkdir()
    (orphan / "model.skops").write_text("other")
    publish(root, **{"model.skops": "m1"})
    assert orphan.is_dir()  # young: left alone
    old = time.time() - STALE_TEMPORARY_S - 60
    os.utime(orphan / "model.skops", (old, old))
    os.utime(orphan, (old, old))
    publish(root, **{"model.skops": "m2"})
    assert not orphan.exists()

    (root / current["version"] / "model.skops").write_text("damaged")
    assert not version_intact(root, current)
    assert publish(root, **{"model.skops": "m0"})["version"] == current["version"]
    assert version_intact(root, read_version_pointer(root))


def test_a_killed_writers_version_folder_is_cleaned_as_a_stale_temporary(tmp_path):
    store = ArtifactStore(tmp_path)
    staging = new_version_folder(store.asset_dir("risk_model"))
    (staging / "model.skops").write_text("half")
    old = time.time() - STALE_TEMPORARY_S - 60
    for path in (staging / "model.skops", staging):
        os.utime(path, (old, old))
    store.asset_dir("risk_model")
    assert not staging.exists()


def metadata(result, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_retraining_publishes_a_new_version_that_risk_scores_uses_as_published(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 16, seed=8)
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)
    root = data_root / "artifacts" / "risk_model"
    # files of the layout before versions: removed when a version is published
    root.mkdir(parents=True)
    (root / "metrics.json").write_text("{}")
    (root / "_manifest.json").write_text("{}")

    first = materialize_cohort(instance, base_resources)
    second = materialize_cohort(instance, base_resources,
                                settings=RiskModelSettings(**{**FAST_MODEL.model_dump(), "seed": 1}))

    assert first.success and second.success
    old, new = metadata(first, "risk_model"), metadata(second, "risk_model")
    assert old["version"] != new["version"] and new["status"] == "trained"
    pointer = read_version_pointer(root)
    assert pointer["version"] == new["version"] and pointer["recent_versions"] == [new["version"], old["version"]]
    assert versions(root) == {old["version"], new["version"]}
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == [VERSION_POINTER]
    for name, path in new["files"].items():
        assert Path(path) == root / new["version"] / name and Path(path).is_file()
    # readers that look beside the model file (the demo's summary reads metrics.json there) see this version
    assert Path(new["path"]).parent / "metrics.json" == root / new["version"] / "metrics.json"
    scores = metadata(second, "risk_scores")
    assert scores["risk_model_version"] == new["version"]
    assert scores["risk_model_path"] == str(root / new["version"] / "model.skops")

    # A model file that is not the one current.json lists is refused, never scored with.
    model = root / new["version"] / "model.skops"
    model.write_bytes(model.read_bytes() + b"\0")
    (data_root / "artifacts" / "risk_scores" / "_manifest.json").unlink()  # no stored scores to reuse
    tampered = dg.materialize([*cohort_assets.ASSETS], instance=instance, selection=["risk_scores"],
                              resources={**base_resources, "risk_model": FAST_MODEL}, raise_on_error=False)
    assert not tampered.success
    failure = next(e for e in tampered.all_events if e.is_step_failure)
    assert f"{model}: SHA-256" in str(failure.event_specific_data.error)
    assert "current.json" in str(failure.event_specific_data.error)
