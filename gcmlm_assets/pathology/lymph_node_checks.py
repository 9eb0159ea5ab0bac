"""Asset checks of the lymph-node analysis: the tumour classifier's cross-validated AUC, and each
patient's nodes and T/MLN (thin wiring over pathology/lymph_nodes/)."""

from __future__ import annotations

import math

import dagster as dg

from gcmlm_assets.catalogue import LYMPH_NODES, TUMOUR_CLASSIFIER

# Below this cross-validated AUC the classifier's tumour regions are not to be trusted (a warning).
MIN_CLASSIFIER_CV_AUC = 0.8

CLASSIFIER_CHECK_SPECS = [
    dg.AssetCheckSpec("classifier_cv_auc_reported", asset=TUMOUR_CLASSIFIER.key,
                      description="The tumour classifier's accuracy, estimated by cross-validation over slides (no "
                                  "slide in both the training and the test part of a fold), is reported as an AUC; "
                                  f"a warning when it is missing or below {MIN_CLASSIFIER_CV_AUC}. Such a new training "
                                  "does not replace an installed classifier (the first one is installed anyway)."),
]

LYMPH_NODES_CHECK_SPECS = [
    dg.AssetCheckSpec("t_mln_defined", asset=LYMPH_NODES.key, blocking=True,
                      description="The patient's lymph-node row is one row of counts and areas; T/MLN (tumour area / "
                                  "metastatic node area) lies in [0, 1] when there is a metastatic node and is "
                                  "undefined (empty, not 0) when there is none."),
    dg.AssetCheckSpec("nodes_plausible", asset=LYMPH_NODES.key,
                      description="Each lymph-node slide has at least one node and not implausibly many, every node's "
                                  "area is positive and plausible, its tumour lies within it, and the patient's "
                                  "totals are the sums of the slides' (a warning)."),
    dg.AssetCheckSpec("nodes_inside_tissue", asset=LYMPH_NODES.key, blocking=True,
                      description="Every node and tumour region of a slide lies inside the slide and inside the tissue "
                                  "the tiling found on it, as drawn in the slide's QuPath GeoJSON, and every node of "
                                  "more than a few patches' area holds the tiling's tissue patches (their centres) "
                                  "over at least half of it: an outline drawn in the wrong place or scale fails."),
]


def classifier_adequate(metrics: dict) -> bool:
    cv_auc = metrics.get("cv_auc")
    return isinstance(cv_auc, (int, float)) and math.isfinite(cv_auc) and cv_auc >= MIN_CLASSIFIER_CV_AUC


def classifier_result(metrics: dict, *, rejected: bool = False) -> dg.AssetCheckResult:
    """`metrics` of the installed classifier, or of a new training that was not installed (`rejected`)."""
    cv_auc = metrics.get("cv_auc")
    reported = isinstance(cv_auc, (int, float)) and math.isfinite(cv_auc)
    passed = classifier_adequate(metrics)
    if not reported:
        text = "No cross-validated AUC was reported for the tumour classifier."
    elif passed:
        text = (f"Passed: cross-validated AUC {cv_auc:.3f} over {metrics.get('n_slides')} annotated slides "
                f"({metrics.get('n_folds')} slide-grouped folds).")
    elif rejected:
        text = (f"A new training's cross-validated AUC {cv_auc:.3f} is below {MIN_CLASSIFIER_CV_AUC}: it was not "
                "installed and the installed classifier stays; annotate more slides.")
    else:
        text = (f"The cross-validated AUC {cv_auc:.3f} is below {MIN_CLASSIFIER_CV_AUC}: the tumour regions it "
                "finds are unreliable; annotate more slides.")
    return dg.AssetCheckResult(
        check_name="classifier_cv_auc_reported", asset_key=TUMOUR_CLASSIFIER.key, passed=passed,
        severity=dg.AssetCheckSeverity.WARN, description=text,
        metadata={"cv_auc": float(cv_auc) if reported else float("nan"),
                  "fold_aucs": dg.MetadataValue.json(metrics.get("fold_aucs", [])),
                  "n_slides": int(metrics.get("n_slides") or 0)})


# A node of at least this many patch areas must hold a tissue patch's centre, and from this many on
# patches over at least half its area: the lattice of patch centres leaves smaller ones to chance.
NODE_HOLDS_A_PATCH_FROM = 4.0
NODE_PATCH_COVER_FROM, NODE_PATCH_COVER = 16.0, 0.5


def node_patch_problems(regions: dict) -> list[str]:
    """The nodes of regions.json that do not hold the tiling's patches as their area says they should:
    the patches come from the tiling's HDF5 grid, the outlines from the tissue polygons, so a node drawn
    in the wrong place or at the wrong scale holds too few."""
    problems = []
    for slide in regions.get("slides", []):
        mpp_x, mpp_y = slide["mpp"]
        patch_mm2 = slide["patch_size_level0"] ** 2 * mpp_x * mpp_y * 1e-6
        for node in slide["nodes"]:
            patches_in_area = node["area_mm2"] / patch_mm2
            where = f"slide {slide['name']!r} node {node['id']} ({patches_in_area:.1f} patch areas)"
            if patches_in_area >= NODE_HOLDS_A_PATCH_FROM and node["n_patches"] == 0:
                problems.append(f"{where}: holds no tissue patch of the tiling")
            elif (patches_in_area >= NODE_PATCH_COVER_FROM
                  and node["n_patches"] < NODE_PATCH_COVER * patches_in_area):
                problems.append(f"{where}: holds only {node['n_patches']} tissue patches of the tiling")
    return problems


def _result(name: str, problems: list[str], passed_text: str, severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    shown = problems[:20]
    return dg.AssetCheckResult(
        check_name=name, asset_key=LYMPH_NODES.key, passed=not problems, severity=severity,
        description=("; ".join(shown) + (f" (and {len(problems) - len(shown)} more)" if len(problems) > 20 else ""))
        if problems else passed_text,
        metadata={"problems": dg.MetadataValue.json(shown)})


def lymph_node_results(row_problems: list[str], node_problems: list[str], tissue_problems: list[str],
                       totals: dict) -> list[dg.AssetCheckResult]:
    t_mln = totals.get("t_mln")
    described = (f"T/MLN {t_mln:.3f} with {totals['n_metastatic_nodes']} metastatic node(s)" if t_mln is not None
                 else "T/MLN undefined: no metastatic node")
    return [
        _result("t_mln_defined", row_problems, f"Passed: {described}.", dg.AssetCheckSeverity.ERROR),
        _result("nodes_plausible", node_problems,
                f"Passed: {totals['n_nodes']} node(s) on {totals['n_slides']} slide(s), areas plausible.",
                dg.AssetCheckSeverity.WARN),
        _result("nodes_inside_tissue", tissue_problems, "Passed: every node and tumour region lies inside the tissue.",
                dg.AssetCheckSeverity.ERROR),
    ]
