"""The generator's lymph-node slides: deterministic bytes, a truth that the written pixels bear out,
QuPath annotations of the planted shapes, the label carried by T/MLN, and the demo's comparison."""

from __future__ import annotations

import dataclasses
import json
import math

import cv2
import numpy as np
import pytest
import tifffile

from gcmlm_assets.demo import synthetic
from gcmlm_assets.demo import synthetic_lymph_nodes as ln
from gcmlm_assets.demo.lymph_node_truth import compare_lymph_nodes, split_by_training, table_lines
from gcmlm_assets.demo.synthetic_plan import CohortSpec, plan_cohort
from gcmlm_assets.demo.synthetic_slides import pyramidal_tiff_bytes

SPEC = CohortSpec.small(8, slide_width=(600, 700), ln_annotated=2, ln_fraction=0.5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> synthetic.CohortResult:
    return synthetic.write_cohort(tmp_path_factory.mktemp("ln") / "landing", SPEC)


def ln_plans(plans):
    return [p for p in plans if p.ln_slides]


def test_slides_annotations_and_truth_are_written_and_stable(cohort):
    plans = ln_plans(cohort.patients)
    truth = synthetic.read_lymph_node_truth(cohort.landing)
    assert sorted(truth) == sorted(p.patient_id for p in plans)
    for plan in plans:
        names = [f"{plan.patient_id}_ln{k + 1}" for k in range(len(plan.ln_slides))]
        folder = cohort.landing / plan.patient_id
        assert sorted(p.stem for p in (folder / "ln_wsi").glob("*.tiff")) == names
        annotations = sorted(p.stem for p in (folder / "ln_annotations").glob("*.geojson"))
        assert annotations == (names if plan.ln_annotated else [])
        assert [s["name"] for s in truth[plan.patient_id]["slides"]] == names
    assert sum(p.ln_annotated for p in plans) == SPEC.ln_annotated
    # Patients without lymph-node slides have no ln_ folders.
    assert all(not (cohort.landing / p.patient_id / "ln_wsi").exists()
               for p in cohort.patients if not p.ln_slides)

    # The same plan gives the same bytes; a rewrite changes nothing, the truth included.
    plan = plans[0]
    layout = ln.slide_layout(plan, 0, SPEC)
    again = pyramidal_tiff_bytes(ln.render_slide(layout, plan, 0, SPEC), SPEC.mpp, SPEC.pyramid_levels,
                                 SPEC.jpeg_quality)
    assert again == (cohort.landing / plan.patient_id / "ln_wsi" / f"{layout.name}.tiff").read_bytes()
    truth_bytes = (cohort.landing / synthetic.LYMPH_NODE_TRUTH).read_bytes()
    rewrite = synthetic.write_cohort(cohort.landing, SPEC)
    assert rewrite.written == [] and rewrite.unchanged == SPEC.n_patients
    assert (cohort.landing / synthetic.LYMPH_NODE_TRUTH).read_bytes() == truth_bytes


def test_truth_areas_match_the_written_level_0(cohort):
    """Node and tumour areas re-measured on the written slide's level 0 by colour: tissue is
    saturated (glass is grey), tumour is pink (red well above green), lymphoid tissue is blue."""
    truth = synthetic.read_lymph_node_truth(cohort.landing)
    mm2_per_px = (SPEC.mpp / 1000) ** 2
    tumour_slides = 0
    for patient_id, patient in truth.items():
        for slide in patient["slides"]:
            rgb = tifffile.imread(cohort.landing / patient_id / "ln_wsi" / f"{slide['name']}.tiff", level=0)
            assert rgb.shape == (slide["height"], slide["width"], 3)
            saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)
            tissue = cv2.blur(saturation, (9, 9)) > 20
            rgb = rgb.astype(np.float32)
            tumour = tissue & (cv2.blur(rgb[..., 0] - rgb[..., 1], (25, 25)) > 32)
            # One tissue component per planted node: the node count is exact.
            assert cv2.connectedComponents(tissue.astype(np.uint8))[0] - 1 == len(slide["nodes"])
            node_area = sum(n["area_mm2"] for n in slide["nodes"])
            tumour_area = sum(n["tumour_area_mm2"] for n in slide["nodes"])
            assert tissue.sum() * mm2_per_px == pytest.approx(node_area, rel=0.03)
            if tumour_area:
                tumour_slides += 1
                assert tumour.sum() * mm2_per_px == pytest.approx(tumour_area, rel=0.05)
            else:
                assert tumour.sum() * mm2_per_px < 0.01 * node_area
            for node in slide["nodes"]:
                x, y = node["centre_level0"]
                x0, y0, x1, y1 = node["bbox_level0"]
                assert tissue[y, x] and x0 <= x < x1 and y0 <= y < y1
                assert (node["tumour_area_mm2"] > 0) == node["metastatic"] == (node["tumour_regions"] > 0)
        assert patient["totals"] == ln.patient_totals(patient["slides"])
    assert tumour_slides >= 1


def _ring_area(ring) -> float:
    x, y = np.asarray(ring, float)[:-1].T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def test_annotations_are_qupath_geojson_of_the_planted_shapes(cohort):
    truth = synthetic.read_lymph_node_truth(cohort.landing)
    annotated = [p for p in ln_plans(cohort.patients) if p.ln_annotated]
    assert annotated
    for plan in annotated:
        for slide in truth[plan.patient_id]["slides"]:
            path = cohort.landing / plan.patient_id / "ln_annotations" / f"{slide['name']}.geojson"
            collection = json.loads(path.read_text())
            assert collection["type"] == "FeatureCollection"
            by_class: dict[str, list] = {}
            for feature in collection["features"]:
                assert feature["geometry"]["type"] == "Polygon"
                assert feature["properties"]["objectType"] == "annotation"
                classification = feature["properties"]["classification"]
                assert len(classification["color"]) == 3
                ring = feature["geometry"]["coordinates"][0]
                assert ring[0] == ring[-1]
                xs, ys = np.asarray(ring).T
                assert xs.min() >= 0 and ys.min() >= 0 and xs.max() < slide["width"] and ys.max() < slide["height"]
                by_class.setdefault(classification["name"], []).append(np.asarray(ring, np.float32))
            nodes = slide["nodes"]
            assert len(by_class["Lymph node"]) == len(nodes)
            assert len(by_class.get("Tumor", [])) == sum(n["tumour_regions"] for n in nodes)
            # The polygons are the planted shapes: their areas are the raster's within 1 %.
            mm2_per_px = (SPEC.mpp / 1000) ** 2
            for ring, node in zip(by_class["Lymph node"], nodes):
                assert _ring_area(ring) * mm2_per_px == pytest.approx(node["area_mm2"], rel=0.01)
            # Every tumour polygon lies inside one node polygon.
            for tumour in by_class.get("Tumor", []):
                assert any(all(cv2.pointPolygonTest(node, (float(x), float(y)), False) > 0 for x, y in tumour)
                           for node in by_class["Lymph node"])


# The first fields of four patients of CohortSpec() as main drew them before lymph-node slides existed.
MAIN_PLANS = {
    0: (0, "GC0001", 0, True, 1, -1.162363, -2.192545, 70, 1, 2, 41.4),
    1: (1, "GC0002", 1, True, 1, -0.216734, 0.836328, 74, 1, 4, 47.5),
    7: (7, "GC0008", 1, False, 1, 0.445249, 1.604494, 79, 1, 2, 57.6),
    23: (23, "GC0024", 1, False, 2, -0.328878, 1.561186, 84, 1, 2, 30.7),
}


def test_lymph_nodes_leave_the_other_draws_unchanged():
    plans = plan_cohort(CohortSpec())
    for index, expected in MAIN_PLANS.items():
        assert dataclasses.astuple(plans[index])[: len(expected)] == expected
    no_ln = plan_cohort(CohortSpec(ln_fraction=0.0))
    assert all(not p.ln_slides and not p.ln_annotated for p in no_ln)
    assert [dataclasses.astuple(p)[:11] for p in no_ln] == [dataclasses.astuple(p)[:11] for p in plans]


def test_demo_plan_sizes_and_separation():
    """At the demo's sizes: nodes at least `ln_gap` patches apart (bounding boxes), tumour regions
    at least `ln_min_tumour_radius` patches, and the nodes' area within the patch budget."""
    spec = CohortSpec()
    unit = spec.ln_unit_px
    slides = 0
    for plan in ln_plans(plan_cohort(spec)):
        for k, nodes in enumerate(plan.ln_slides):
            assert spec.ln_nodes[0] <= len(nodes) <= spec.ln_nodes[1]
            assert sum(math.pi * n.radius**2 for n in nodes) <= spec.ln_max_units + 1e-6
            assert all(spec.ln_node_radius[0] <= n.radius <= spec.ln_node_radius[1] for n in nodes)
            layout = ln.slide_layout(plan, k, spec)
            boxes = [node.bbox for node in layout.nodes]
            for i, a in enumerate(boxes):
                assert a[0] >= spec.ln_gap * unit - 1 and a[1] >= spec.ln_gap * unit - 1
                assert a[2] <= layout.width and a[3] <= layout.height
                for b in boxes[i + 1:]:
                    gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                    assert gap >= spec.ln_gap * unit - 2
            for node in layout.nodes:
                for tumour in node.tumours:
                    equivalent_radius = math.sqrt(_ring_area(np.r_[tumour, tumour[:1]]) / math.pi) / unit
                    assert equivalent_radius >= 0.9 * spec.ln_min_tumour_radius
            slides += 1
    assert slides >= spec.n_patients // 2


def test_label_is_carried_by_the_lymph_nodes():
    spec = CohortSpec.small(24, ln_fraction=0.5, ln_second_slide=0.2)
    plans = plan_cohort(spec)
    with_ln = ln_plans(plans)
    # Half of each class, a few with two slides (when asked for); both classes in the annotated subset,
    # with tumour-bearing and clean nodes.
    assert sum(p.mlm for p in with_ln) == len(with_ln) - sum(p.mlm for p in with_ln) == 6
    assert any(len(p.ln_slides) == 2 for p in with_ln)
    assert all(len(p.ln_slides) == 1 for p in ln_plans(plan_cohort(CohortSpec())))  # the demo's: one each
    annotated = [p for p in with_ln if p.ln_annotated]
    assert len(annotated) == spec.ln_annotated and {p.mlm for p in annotated} == {0, 1}
    assert {n.metastatic for p in annotated for s in p.ln_slides for n in s} == {True, False}
    totals = {p.patient_id: ln.patient_truth(p, spec)["totals"] for p in with_ln}
    mean = {}
    for label in (0, 1):
        members = [totals[p.patient_id] for p in with_ln if p.mlm == label]
        mean[label] = (np.mean([t["t_mln"] or 0.0 for t in members]),
                       np.mean([t["n_metastatic_nodes"] / t["n_nodes"] for t in members]))
    assert mean[1][0] > mean[0][0] + 0.1 and mean[1][1] > mean[0][1]
    for t in totals.values():
        assert (t["t_mln"] is None) == (t["n_metastatic_nodes"] == 0)
        assert t["t_mln"] is None or 0 < t["t_mln"] < 1


# ---------------------------------------------------------------- the demo's comparison


def _node(centre, metastatic, area=1.0, tumour=0.0):
    return {"centre_level0": centre, "metastatic": metastatic, "area_mm2": area, "tumour_area_mm2": tumour}


def _found(bbox, metastatic):
    return {"bbox_level0": bbox, "metastatic": metastatic, "area_mm2": 1.0, "tumour_area_mm2": 0.5 * metastatic}


TRUTH = {
    "P1": {"annotated": True, "slides": [{"name": "P1_ln1", "nodes": [
        _node([100, 100], True, 2.0, 1.0), _node([400, 100], False), _node([700, 100], True, 2.0, 0.5)]}],
        "totals": {"n_nodes": 3, "n_metastatic_nodes": 2, "t_mln": 0.375}},
    "P2": {"annotated": False, "slides": [
        {"name": "P2_ln1", "nodes": [_node([100, 100], False), _node([400, 100], False)]},
        {"name": "P2_ln2", "nodes": [_node([100, 100], True, 1.0, 0.4), _node([400, 100], False)]}],
        "totals": {"n_nodes": 4, "n_metastatic_nodes": 1, "t_mln": 0.4}},
    "P3": {"annotated": False, "slides": [{"name": "P3_ln1", "nodes": [_node([100, 100], False)]}],
           "totals": {"n_nodes": 1, "n_metastatic_nodes": 0, "t_mln": None}},
    "P4": {"annotated": False, "slides": [{"name": "P4_ln1", "nodes": [_node([100, 100], True, 1.0, 0.5)]}],
           "totals": {"n_nodes": 1, "n_metastatic_nodes": 1, "t_mln": 0.5}},
}
REGIONS = {
    # Exact: three nodes, both metastases found; T/MLN 10 % high.
    "P1": {"slides": [{"name": "P1_ln1", "nodes": [
        _found([50, 50, 150, 150], True), _found([350, 50, 450, 150], False), _found([650, 50, 750, 150], True)]}],
        "totals": {"n_nodes": 3, "n_metastatic_nodes": 2, "t_mln": 0.4125}},
    # Slide 1: the two clean nodes merged into one box, called metastatic (two false positives);
    # slide 2: exact, the metastasis missed (a false negative) plus a spurious metastatic node.
    "P2": {"slides": [
        {"name": "P2_ln1", "nodes": [_found([0, 0, 500, 200], True)]},
        {"name": "P2_ln2", "nodes": [_found([50, 50, 150, 150], False), _found([350, 50, 450, 150], False),
                                     _found([900, 900, 950, 950], True)]}],
        "totals": {"n_nodes": 4, "n_metastatic_nodes": 2, "t_mln": 0.3}},
    "P3": {"slides": [{"name": "P3_ln1", "nodes": [_found([50, 50, 150, 150], False)]}],
           "totals": {"n_nodes": 1, "n_metastatic_nodes": 0, "t_mln": None}},
    # P4: no regions.json.
}


def test_comparison_figures_on_hand_made_regions():
    result = compare_lymph_nodes(TRUTH, REGIONS)
    assert [p.patient_id for p in result.patients] == ["P1", "P2", "P3", "P4"]
    # Exact slides: P1_ln1, P3_ln1 (P2_ln1 merged, P2_ln2 has a spurious node, P4 nothing).
    assert (result.slides_exact, result.slides_total) == (2, 5)
    errors = {p.patient_id: p.t_mln_relative_error for p in result.patients}
    assert errors["P1"] == pytest.approx(0.1) and errors["P2"] == pytest.approx(0.25)
    assert errors["P3"] is None and errors["P4"] == math.inf
    assert result.t_mln_error_median == pytest.approx(0.25) and result.t_mln_error_max == math.inf
    # Metastatic planted: P1 x2 found, P2 missed, P4 unmatched -> 2/4.
    assert (result.true_positive, result.false_negative) == (2, 2)
    # Clean planted: P1 ok, P2_ln1 two merged into a metastatic box (FP x2), P2_ln2 ok, P3 ok;
    # plus the spurious metastatic node -> 3 / 6.
    assert (result.true_negative, result.false_positive) == (3, 3)
    assert result.sensitivity == 0.5 and result.specificity == 0.5
    assert (result.unmatched_planted, result.unmatched_found) == (1, 1)
    assert not any(result.targets_met().values())
    figures = result.figures()
    assert figures["t_mln_relative_error_max"] is None and figures["t_mln_missing"] == 1
    json.dumps(figures, allow_nan=False)
    text = "\n".join(table_lines(result.patients))
    assert f"| P1 | yes | 1 (1) | 3/3 | 2/2 | 0.375 | {0.4125:.3f} | 0.100 |" in text
    assert "| P4 | no | 1 (0) | 1/- | 1/- | 0.500 | - | not found |" in text

    perfect = compare_lymph_nodes({"P1": TRUTH["P1"]}, {"P1": {**REGIONS["P1"], "totals": {
        "n_nodes": 3, "n_metastatic_nodes": 2, "t_mln": 0.38}}})
    assert all(perfect.targets_met().values())
    assert (perfect.sensitivity, perfect.specificity, perfect.slides_exact) == (1.0, 1.0, 1)


def test_the_headline_figures_leave_out_the_classifiers_training_patients():
    """P1 (annotated, the classifier's training set) is found perfectly; the held-out P2-P4 are not.
    The targets are judged on P2-P4 alone, P1's figures stand apart, the table keeps everyone."""
    report = split_by_training(TRUTH, REGIONS)
    assert [p.patient_id for p in report.held_out.patients] == ["P2", "P3", "P4"]
    assert [p.patient_id for p in report.training.patients] == ["P1"]
    held_out = report.held_out
    assert (held_out.slides_exact, held_out.slides_total) == (1, 4)  # P3 only
    assert (held_out.true_positive, held_out.false_negative, held_out.true_negative, held_out.false_positive) == \
        (0, 2, 2, 3)
    assert held_out.t_mln_errors == [pytest.approx(0.25), math.inf]
    assert (report.training.sensitivity, report.training.specificity, report.training.slides_exact) == (1.0, 1.0, 1)
    assert report.targets_met() == held_out.targets_met() and not any(report.targets_met().values())

    figures = report.figures()
    json.dumps(figures, allow_nan=False)
    assert figures["held_out"]["patients"] == 3 and figures["training"]["patients"] == 1
    assert figures["held_out"]["metastatic_sensitivity"] == 0.0 and figures["held_out"]["metastatic_specificity"] == 0.4
    assert figures["training"]["metastatic_sensitivity"] == 1.0 and "targets_met" not in figures["training"]

    text = report.markdown()
    assert "not clinical" in text
    held_out_at, training_at = text.index("Held out (3 patients"), text.index("Training (1 patient with annotations")
    assert held_out_at < text.index("- targets:") < training_at < text.index("| patient | training |")
    assert "sensitivity 0.000 (0/2), specificity 0.400 (2/5)" in text[held_out_at:training_at]
    assert "sensitivity 1.000 (2/2), specificity 1.000 (1/1)" in text[training_at:]
    assert [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| P")] == [
        ["| P1", "yes"], ["| P2", "no"], ["| P3", "no"], ["| P4", "no"]]

    # Without any held-out patient nothing is measured, so no target is met.
    only_training = split_by_training({"P1": TRUTH["P1"]}, REGIONS)
    assert only_training.held_out.patients == [] and not any(only_training.targets_met().values())
