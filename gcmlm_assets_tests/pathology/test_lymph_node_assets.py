"""`tumour_classifier` and `lymph_nodes` through a real Dagster instance: a classifier trained on the
annotated patients' feature files, each patient's nodes and T/MLN against the planted truth, the
checks, reuse, waiting without a classifier, and too few annotations.

The cohort (support/pathology/ln_cohort.py): real lymph-node TIFFs tiled by the real tiling
(ln_patch_coords' files), feature files whose embeddings say how much tumour a patch shows, plus
noise, so that what is tested is the wiring and the analysis, not an encoder (test_ln_assets.py runs
the encoder)."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.catalogue import (
    CLASSIFIER_METRICS, LN_FEATURES, LYMPH_NODE_REGIONS, LYMPH_NODE_TABLE, LYMPH_NODES, TUMOUR_CLASSIFIER)
from gcmlm_assets.pathology.lymph_node_assets import lymph_nodes, tumour_classifier
from gcmlm_assets.landing.scan import LN_ANNOTATIONS_FOLDER
from gcmlm_assets.storage import read_version_pointer
from gcmlm_assets_tests.support.pathology import lymph_node_slides as planted
from gcmlm_assets_tests.support.pathology.ln_cohort import ANNOTATED, build_cohort, ln_resources


@pytest.fixture
def cohort(instance, data_root):
    return build_cohort(instance, data_root)


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_the_classifier_trains_and_lymph_nodes_finds_the_planted_nodes_and_t_mln(instance, base_resources, cohort):
    resources = ln_resources(base_resources)
    # No classifier yet: lymph_nodes waits (skipped, not failed).
    waiting = dg.materialize([lymph_nodes], partition_key="P4", instance=instance, resources=resources)
    assert waiting.success and not waiting.get_asset_materialization_events()

    trained = dg.materialize([tumour_classifier], instance=instance, resources=resources)
    assert trained.success
    meta = _metadata(trained)
    assert meta["n_slides"] == 3 and meta["n_patients"] == 3 and meta["reused"] is False
    assert meta["cv_auc"] > 0.95
    [check] = trained.get_asset_check_evaluations()
    assert check.check_name == "classifier_cv_auc_reported" and check.passed
    pointer = read_version_pointer(TUMOUR_CLASSIFIER.folder(cohort))
    assert pointer["patients"] == list(ANNOTATED)
    metrics = json.loads(CLASSIFIER_METRICS.in_folder(TUMOUR_CLASSIFIER.folder(cohort) / pointer["version"]).read_text())
    # no slide on both sides of a fold
    assert all(len(set(f["test_slides"])) >= 1 for f in metrics["folds"])

    # The unannotated patient, scored by the classifier.
    result = dg.materialize([lymph_nodes], partition_key="P4", instance=instance, resources=resources)
    assert result.success
    meta = _metadata(result)
    assert meta["n_nodes"] == 3 and meta["n_metastatic_nodes"] == 2
    truth_tumour = sum(n.tumour.area_mm2() for n in planted.NODES if n.tumour)
    truth_metastatic = sum(n.disc.area_mm2() for n in planted.NODES if n.tumour)
    assert meta["t_mln"] == pytest.approx(truth_tumour / truth_metastatic, rel=0.10)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {"t_mln_defined", "nodes_plausible", "nodes_inside_tissue"}
    assert all(e.passed for e in checks.values()), {k: e.description for k, e in checks.items()}
    row = pq.read_table(LYMPH_NODE_TABLE.path(cohort, "P4")).to_pylist()[0]
    assert row["patient_id"] == "P4" and row["t_mln"] == pytest.approx(meta["t_mln"])
    regions = json.loads(LYMPH_NODE_REGIONS.path(cohort, "P4").read_text())
    assert regions["classifier"]["version"] == pointer["version"]
    assert (LYMPH_NODES.folder(cohort, "P4") / regions["slides"][0]["geojson"]).is_file()

    # Again with nothing changed: the classifier and the patient's output are reused.
    assert _metadata(dg.materialize([tumour_classifier], instance=instance, resources=resources))["reused"] is True
    again = dg.materialize([lymph_nodes], partition_key="P4", instance=instance, resources=resources)
    assert _metadata(again)["reused"] is True


def test_too_few_annotated_slides_wait_without_failing(instance, base_resources, cohort):
    result = dg.materialize([tumour_classifier], instance=instance,
                            resources=ln_resources(base_resources, min_annotated_slides=4))
    assert result.success and not result.get_asset_materialization_events()
    assert read_version_pointer(TUMOUR_CLASSIFIER.folder(cohort, create=False)) is None


def test_a_broken_feature_file_fails_its_patient_naming_the_file(instance, base_resources, cohort):
    resources = ln_resources(base_resources)
    assert dg.materialize([tumour_classifier], instance=instance, resources=resources).success
    manifest = cohort.read_manifest(LN_FEATURES.key, "P4")
    broken = LN_FEATURES.folder(cohort, "P4") / manifest["slides"][0]["h5_file"]
    broken.write_bytes(b"not an HDF5 file")
    result = dg.materialize([lymph_nodes], partition_key="P4", instance=instance, resources=resources,
                            raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert str(broken) in failure.event_specific_data.user_failure_data.description


def test_annotations_in_regions_out_in_the_same_coordinates(instance, base_resources, cohort, data_root):
    """An annotated slide's QuPath export goes in (the classifier's training labels); the regions lymph_nodes
    writes for it come out as QuPath GeoJSON that the same reader reads back onto the same places."""
    from gcmlm_assets.pathology.lymph_nodes.annotations import read_annotations, region_area

    resources = ln_resources(base_resources)
    assert dg.materialize([tumour_classifier], instance=instance, resources=resources).success
    assert dg.materialize([lymph_nodes], partition_key="P1", instance=instance, resources=resources).success
    [given] = (data_root / "landing" / "P1" / LN_ANNOTATIONS_FOLDER).glob("*.geojson")
    regions = json.loads(LYMPH_NODE_REGIONS.path(cohort, "P1").read_text())
    [slide] = regions["slides"]
    found = read_annotations(LYMPH_NODES.folder(cohort, "P1") / slide["geojson"], dimensions=tuple(slide["dimensions"]))
    expected = read_annotations(given, dimensions=tuple(slide["dimensions"]))
    side = slide["patch_size_level0"]

    def centre(region):  # the outer ring's area centroid (its vertices are spaced unevenly)
        x, y = np.asarray(region.outer, np.float64).T
        cross = x[:-1] * y[1:] - x[1:] * y[:-1]
        return np.array([((x[:-1] + x[1:]) * cross).sum(), ((y[:-1] + y[1:]) * cross).sum()]) / (3 * cross.sum())

    for kind in ("nodes", "tumours"):
        ins, outs = getattr(expected, kind), getattr(found, kind)
        assert len(outs) == len(ins), kind
        for region in ins:  # each given region has a found one on the same place, of about its area
            match = min(outs, key=lambda out: np.linalg.norm(centre(out) - centre(region)))
            assert np.linalg.norm(centre(match) - centre(region)) < side
            assert region_area(match) == pytest.approx(region_area(region), rel=0.15)


def test_a_worse_training_does_not_replace_the_installed_classifier(instance, base_resources, cohort, data_root):
    from gcmlm_assets_tests.support.pathology.ln_cohort import annotation_file, disc_ring
    from gcmlm_assets_tests.support.pathology.ln_fixtures import annotation, polygon, write_annotations

    resources = ln_resources(base_resources)
    assert dg.materialize([tumour_classifier], instance=instance, resources=resources).success
    installed = read_version_pointer(TUMOUR_CLASSIFIER.folder(cohort))
    # Two annotators call the clean node tumour and the tumours node: labels the features contradict.
    for patient_id in ("P2", "P3"):
        clean = planted.NODES[0]
        features = [annotation(polygon(disc_ring(node.disc)), "Lymph node") for node in planted.NODES]
        features.append(annotation(polygon(disc_ring(clean.disc)), "Tumor"))
        write_annotations(annotation_file(data_root / "landing", patient_id), features)
    result = dg.materialize([tumour_classifier], instance=instance, resources=resources)
    assert result.success
    meta = _metadata(result)
    assert meta["rejected_training"]["cv_auc"] < 0.8 and meta["version"] == installed["version"]
    assert read_version_pointer(TUMOUR_CLASSIFIER.folder(cohort))["version"] == installed["version"]
    [check] = result.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "not installed" in check.description


def test_a_node_outline_in_the_wrong_place_fails_the_tissue_check():
    from gcmlm_assets.pathology.lymph_node_checks import node_patch_problems

    def regions(n_patches: int) -> dict:  # one node of 20 patch areas (32 px patches at 0.5 µm/px)
        area = 20 * (32 * 0.5) ** 2 * 1e-6
        return {"slides": [{"name": "s", "mpp": [0.5, 0.5], "patch_size_level0": 32,
                            "nodes": [{"id": 1, "area_mm2": area, "n_patches": n_patches}]}]}

    assert node_patch_problems(regions(18)) == []
    assert node_patch_problems(regions(4)) == ["slide 's' node 1 (20.0 patch areas): holds only 4 tissue patches "
                                               "of the tiling"]
    assert "holds no tissue patch" in node_patch_problems(regions(0))[0]
