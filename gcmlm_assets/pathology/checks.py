"""Asset checks of the pathology group.

`patch_coords` checks are declared as `check_specs` on the asset and evaluated
inside it (per patient partition) from the slide listing it writes; the
functions below turn that listing into check results.
"""

from __future__ import annotations

import dagster as dg

PATCH_COORDS = "patch_coords"

PATCH_COORDS_CHECK_SPECS = [
    dg.AssetCheckSpec("slides_open", asset=PATCH_COORDS, blocking=True,
                      description="Every slide of the patient opens, decodes and has a plausible resolution."),
    dg.AssetCheckSpec("mpp_known", asset=PATCH_COORDS,
                      description="Every slide states its µm/px (WARN when the configured default was used)."),
    dg.AssetCheckSpec("tissue_found", asset=PATCH_COORDS,
                      description="Every slide yields at least one patch (ERROR for a slide with 0 patches)."),
    dg.AssetCheckSpec("patch_count_in_bounds", asset=PATCH_COORDS,
                      description="Each slide's patch count lies within the configured bounds (WARN)."),
]


def slides_open_result(entries: list[dict], failures: list[str]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="slides_open", asset_key=PATCH_COORDS, passed=not failures,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(failures) if failures else f"{len(entries)} slide(s) open and decode",
        metadata={"n_slides": len(entries) + len(failures), "n_unreadable": len(failures),
                  "problems": dg.MetadataValue.json(failures)},
    )


def mpp_known_result(entries: list[dict]) -> dg.AssetCheckResult:
    defaulted = [e["file"] for e in entries if e["mpp_source"] == "default"]
    return dg.AssetCheckResult(
        check_name="mpp_known", asset_key=PATCH_COORDS, passed=not defaulted,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"resolution unknown, default µm/px assumed for: {', '.join(defaulted)}" if defaulted
                     else "every slide states its resolution"),
        metadata={"mpp_sources": dg.MetadataValue.json({e["file"]: e["mpp_source"] for e in entries}),
                  "defaulted": dg.MetadataValue.json(defaulted)},
    )


def tissue_found_result(entries: list[dict]) -> dg.AssetCheckResult:
    empty = {e["file"]: e["reason"] for e in entries if e["n_patches"] == 0}
    return dg.AssetCheckResult(
        check_name="tissue_found", asset_key=PATCH_COORDS, passed=not empty,
        severity=dg.AssetCheckSeverity.ERROR,
        description=("; ".join(f"{name}: {reason}" for name, reason in empty.items()) if empty
                     else "every slide has tissue patches"),
        metadata={"slides_without_patches": dg.MetadataValue.json(empty),
                  "n_patches": dg.MetadataValue.json({e["file"]: e["n_patches"] for e in entries})},
    )


def patch_count_result(entries: list[dict], low: int, high: int) -> dg.AssetCheckResult:
    outside = {e["file"]: e["n_patches"] for e in entries if not low <= e["n_patches"] <= high}
    return dg.AssetCheckResult(
        check_name="patch_count_in_bounds", asset_key=PATCH_COORDS, passed=not outside,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"patch counts outside [{low}, {high}]: {outside}" if outside
                     else f"every slide has between {low} and {high} patches"),
        metadata={"min_patches_per_slide": low, "max_patches_per_slide": high,
                  "outside": dg.MetadataValue.json(outside)},
    )


# ---------------------------------------------------------------- uni_features, slide_vector
# Evaluated inside the assets (check_specs) from the files they just wrote or
# reused: a reused file is re-validated on every materialization.

UNI_FEATURES = "uni_features"
SLIDE_VECTOR = "slide_vector"

UNI_FEATURES_CHECK_SPECS = [
    dg.AssetCheckSpec("feature_shape", asset=UNI_FEATURES, blocking=True,
                      description="Every slide's features are (n_coords, D), D the encoder's embedding size."),
    dg.AssetCheckSpec("features_finite", asset=UNI_FEATURES, blocking=True,
                      description="No NaN or infinite feature value."),
    dg.AssetCheckSpec("features_nonzero_rows", asset=UNI_FEATURES, blocking=True,
                      description="No all-zero feature row."),
    dg.AssetCheckSpec("encoder_recorded", asset=UNI_FEATURES, blocking=True,
                      description="Every feature file names its encoder and its weights' sha256 ('untrained' "
                                  "for random-init encoders)."),
]

SLIDE_VECTOR_CHECK_SPECS = [
    dg.AssetCheckSpec("slide_vector_valid", asset=SLIDE_VECTOR, blocking=True,
                      description="One row with n_patches, n_slides and D finite features, D the encoder's size."),
]


def uni_features_results(reports: list, identity: dict) -> list[dg.AssetCheckResult]:
    """Check results from `extract.FeatureFileReport`s of one patient's feature files."""
    def failing(predicate) -> dict[str, list[str]]:
        return {r.path.name: [p for p in r.problems if predicate(p)] for r in reports
                if any(predicate(p) for p in r.problems)}

    shape = failing(lambda p: "shape" in p or "unreadable" in p)
    identity_problems = failing(lambda p: "encoder identity" in p)
    non_finite = {r.path.name: r.non_finite_values for r in reports if r.non_finite_values}
    zero_rows = {r.path.name: r.zero_rows for r in reports if r.zero_rows}
    error = dg.AssetCheckSeverity.ERROR
    shapes = dg.MetadataValue.json({r.path.name: [r.n_rows, r.dim] for r in reports})
    return [
        dg.AssetCheckResult(
            check_name="feature_shape", asset_key=UNI_FEATURES, passed=not shape, severity=error,
            description=(f"{shape}" if shape else f"{len(reports)} file(s) of shape (n_coords, "
                                                   f"{identity.get('embedding_dim')})"),
            metadata={"shapes": shapes},
        ),
        dg.AssetCheckResult(
            check_name="features_finite", asset_key=UNI_FEATURES, passed=not non_finite, severity=error,
            description=f"non-finite values: {non_finite}" if non_finite else "all values finite",
            metadata={"non_finite_values": dg.MetadataValue.json(non_finite)},
        ),
        dg.AssetCheckResult(
            check_name="features_nonzero_rows", asset_key=UNI_FEATURES, passed=not zero_rows, severity=error,
            description=f"all-zero rows: {zero_rows}" if zero_rows else "no all-zero row",
            metadata={"zero_rows": dg.MetadataValue.json(zero_rows)},
        ),
        dg.AssetCheckResult(
            check_name="encoder_recorded", asset_key=UNI_FEATURES, passed=not identity_problems, severity=error,
            description=f"{identity_problems}" if identity_problems else _encoder_line(identity),
            metadata={"encoder": str(identity.get("encoder")),
                      "checkpoint_sha256": str(identity.get("checkpoint_sha256")),
                      "untrained": bool(identity.get("untrained"))},
        ),
    ]


def _encoder_line(identity: dict) -> str:
    weights = ("untrained, random init" if identity.get("untrained")
               else f"checkpoint sha256 {str(identity.get('checkpoint_sha256'))[:12]}")
    return f"encoder {identity.get('encoder')} ({weights})"


def slide_vector_result(problems: list[str], expected_dim: int) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="slide_vector_valid", asset_key=SLIDE_VECTOR, passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems) if problems else f"one row of {expected_dim} finite features",
        metadata={"expected_dim": expected_dim, "problems": dg.MetadataValue.json(problems)},
    )


CHECKS: list[dg.AssetChecksDefinition] = []
