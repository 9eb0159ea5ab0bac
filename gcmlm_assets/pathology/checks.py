"""Asset checks of the pathology group.

`patch_coords` checks are declared as `check_specs` on the asset and evaluated
inside it (per patient partition) from the slide listing it writes; the
functions below turn that listing into check results. The tiling's and the
encoder's checks are built for the asset they are declared on: patch_coords and
uni_features, or ln_patch_coords and ln_features (the lymph-node slides).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from gcmlm_assets.catalogue import PATCH_COORDS, QUPATH_GEOJSON, SLIDE_VECTOR, UNI_FEATURES, Asset


def patch_coords_check_specs(asset: Asset) -> list[dg.AssetCheckSpec]:
    """The tiling's checks, declared on `asset` (patch_coords or ln_patch_coords)."""
    return [
        dg.AssetCheckSpec("slides_open", asset=asset.key, blocking=True,
                          description="Every whole-slide image of the patient opens and can be read at a usable "
                                      "resolution. If one cannot be read, none of the patient's slides are used until "
                                      "it is replaced or removed, so the patient is never analysed on part of the "
                                      "slides."),
        dg.AssetCheckSpec("mpp_known", asset=asset.key,
                          description="Every slide records its scanning resolution (micrometres per pixel). When one "
                                      "does not, a default resolution is assumed and its patches may be cut at the "
                                      "wrong magnification (a warning)."),
        dg.AssetCheckSpec("tissue_found", asset=asset.key,
                          description="Tissue is found on every slide. A slide without tissue (blank glass, or "
                                      "tissue too faint to detect) adds nothing to the patient's features."),
        dg.AssetCheckSpec("patch_count_in_bounds", asset=asset.key,
                          description="Each slide yields a number of tissue patches within the range expected for "
                                      "the project; far fewer or far more usually means a wrong resolution or poor "
                                      "tissue detection (a warning)."),
    ]


PATCH_COORDS_CHECK_SPECS = patch_coords_check_specs(PATCH_COORDS)

LISTED = 10  # slides or files spelled out in a `found` text; the JSON metadata holds them all


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def _patient_of(entries: list[dict]) -> str:
    # The slides lie in <landing>/<patient>/<slide folder>/.
    return next((Path(e["slide_path"]).parent.parent.name for e in entries if e.get("slide_path")), "")


def _of_patient(entries: list[dict]) -> str:
    patient = _patient_of(entries)
    return f" of patient {patient}" if patient else ""


def slides_open_result(entries: list[dict], failures: list[str], *, asset: Asset) -> dg.AssetCheckResult:
    total = len(entries) + len(failures)
    found = (f"{len(failures)} of {total} slide(s) cannot be read: {'; '.join(failures[:LISTED])}" if failures
             else f"all {total} slide(s) open")
    return dg.AssetCheckResult(
        check_name="slides_open", asset_key=asset.key, passed=not failures,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"{len(failures)} of {total} slide(s){_of_patient(entries)} cannot be read, so none of the "
                     f"patient's slides were used: {'; '.join(failures)}" if failures
                     else f"Passed: {len(entries)} slide(s) open and can be read."),
        metadata={"expected": "every slide opens and can be read", "found": found,
                  "n_slides": total, "n_unreadable": len(failures),
                  "problems": dg.MetadataValue.json(failures)},
    )


def mpp_known_result(entries: list[dict], *, asset: Asset) -> dg.AssetCheckResult:
    defaulted = [e for e in entries if e["mpp_source"] == "default"]
    named = [f"{e['file']} ({e['mpp'][0]:g} µm/px assumed)" for e in defaulted]
    return dg.AssetCheckResult(
        check_name="mpp_known", asset_key=asset.key, passed=not defaulted,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"{len(defaulted)} slide(s){_of_patient(entries)} do not record their scanning resolution; "
                     f"a default was assumed, so their patches may be cut at the wrong magnification: "
                     f"{', '.join(named)}" if defaulted
                     else "Passed: every slide records its scanning resolution."),
        metadata={"expected": "every slide records its µm/px",
                  "found": (f"{len(defaulted)} of {len(entries)} slide(s) without a recorded resolution: "
                            f"{_listed(named)}" if defaulted
                            else f"all {len(entries)} slide(s) record their resolution"),
                  "n_defaulted": len(defaulted),
                  "mpp_sources": dg.MetadataValue.json({e["file"]: e["mpp_source"] for e in entries}),
                  "defaulted": dg.MetadataValue.json([e["file"] for e in defaulted])},
    )


def tissue_found_result(entries: list[dict], *, asset: Asset) -> dg.AssetCheckResult:
    empty = {e["file"]: e["reason"] for e in entries if e["n_patches"] == 0}
    named = [f"{name} ({reason})" for name, reason in empty.items()]
    total_patches = sum(e["n_patches"] for e in entries)
    return dg.AssetCheckResult(
        check_name="tissue_found", asset_key=asset.key, passed=not empty,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"No tissue patch on {len(empty)} slide(s){_of_patient(entries)}, which add nothing to the "
                     f"patient's features: {'; '.join(named)}" if empty
                     else "Passed: tissue found on every slide."),
        metadata={"expected": "at least 1 tissue patch on every slide",
                  "found": (f"{len(empty)} of {len(entries)} slide(s) without tissue patches: {_listed(named)}"
                            if empty else f"{total_patches} patches on {len(entries)} slide(s), none without"),
                  "n_slides_without_patches": len(empty), "n_patches_total": total_patches,
                  "slides_without_patches": dg.MetadataValue.json(empty),
                  "n_patches": dg.MetadataValue.json({e["file"]: e["n_patches"] for e in entries})},
    )


def patch_count_result(entries: list[dict], low: int, high: int, *, asset: Asset) -> dg.AssetCheckResult:
    outside = {e["file"]: e["n_patches"] for e in entries if not low <= e["n_patches"] <= high}
    counts = [e["n_patches"] for e in entries]
    named = [f"{name} ({n} patches)" for name, n in outside.items()]
    return dg.AssetCheckResult(
        check_name="patch_count_in_bounds", asset_key=asset.key, passed=not outside,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"{len(outside)} slide(s){_of_patient(entries)} have a patch count outside the expected "
                     f"{low}-{high}, which often means a wrong resolution or poor tissue detection: "
                     f"{', '.join(named)}" if outside
                     else f"Passed: every slide has between {low} and {high} patches."),
        metadata={"expected": f"{low}-{high} patches per slide",
                  "found": (f"{len(outside)} of {len(entries)} slide(s) outside: {_listed(named)}" if outside
                            else f"{min(counts)}-{max(counts)} patches per slide" if counts else "no slide"),
                  "min_patches_per_slide": low, "max_patches_per_slide": high, "n_outside": len(outside),
                  "outside": dg.MetadataValue.json(outside)},
    )


# ---------------------------------------------------------------- uni_features, slide_vector
# Evaluated inside the assets (check_specs) from the files they just wrote or
# reused: a reused file is re-validated on every materialization.

def features_check_specs(asset: Asset) -> list[dg.AssetCheckSpec]:
    """The encoder's checks, declared on `asset` (uni_features or ln_features)."""
    return [
        dg.AssetCheckSpec("feature_shape", asset=asset.key, blocking=True,
                          description="Every slide's feature file holds one feature vector per tissue patch, each of "
                                      "the length the image encoder produces; otherwise patches and features no "
                                      "longer correspond."),
        dg.AssetCheckSpec("features_finite", asset=asset.key, blocking=True,
                          description="Every feature value computed from the slides is a real number (none missing "
                                      "or infinite); one bad value would spoil the patient's slide summary."),
        dg.AssetCheckSpec("features_nonzero_rows", asset=asset.key, blocking=True,
                          description="No tissue patch has a feature vector of all zeros, which happens when a patch "
                                      "was read as blank or failed to be encoded."),
        dg.AssetCheckSpec("encoder_recorded", asset=asset.key, blocking=True,
                          description="Every feature file records which image encoder and which exact model weights "
                                      "produced it ('untrained' for a random test encoder), so that results can be "
                                      "traced and compared."),
    ]


UNI_FEATURES_CHECK_SPECS = features_check_specs(UNI_FEATURES)

SLIDE_VECTOR_CHECK_SPECS = [
    dg.AssetCheckSpec("slide_vector_valid", asset=SLIDE_VECTOR.key, blocking=True,
                      description="The patient's slide summary is one row with the number of patches and slides "
                                  "and one real number per encoder feature, ready to be combined with the CT and "
                                  "clinical data."),
]


def features_results(reports: list, identity: dict, *, asset: Asset) -> list[dg.AssetCheckResult]:
    """Check results from `feature_files.FeatureFileReport`s of one patient's feature files."""
    def failing(predicate) -> dict[str, list[str]]:
        return {r.path.name: [p for p in r.problems if predicate(p)] for r in reports
                if any(predicate(p) for p in r.problems)}

    def per_file(problems: dict[str, list[str]]) -> list[str]:
        return [f"{name}: {', '.join(found)}" for name, found in problems.items()]

    # The feature files lie in <artifacts>/<features asset>/<patient>/.
    patient = reports[0].path.parent.name if reports else ""
    of_patient = f" of patient {patient}" if patient else ""
    dim = identity.get("embedding_dim")
    shape = failing(lambda p: "shape" in p or "unreadable" in p)
    identity_problems = failing(lambda p: "encoder identity" in p)
    non_finite = {r.path.name: r.non_finite_values for r in reports if r.non_finite_values}
    zero_rows = {r.path.name: r.zero_rows for r in reports if r.zero_rows}
    rows = {r.path.name: r.n_rows for r in reports}
    error = dg.AssetCheckSeverity.ERROR
    shapes = dg.MetadataValue.json({r.path.name: [r.n_rows, r.dim] for r in reports})
    weights = _encoder_line(identity)
    return [
            dg.AssetCheckResult(
                check_name="feature_shape", asset_key=asset.key, passed=not shape, severity=error,
                description=(f"The feature file(s) of {len(shape)} slide(s){of_patient} do not hold one {dim}-long "
                             f"vector per tissue patch: {'; '.join(per_file(shape))}" if shape
                             else f"Passed: {len(reports)} file(s) with one {dim}-long vector per patch."),
                metadata={"expected": f"one row of {dim} values per tissue patch in every file",
                          "found": (f"{len(shape)} of {len(reports)} file(s) wrong: {_listed(per_file(shape))}"
                                    if shape else f"{len(reports)} file(s), {sum(rows.values())} rows of {dim}"),
                          "n_files": len(reports), "n_bad_files": len(shape), "embedding_dim": dim,
                          "shapes": shapes},
            ),
            dg.AssetCheckResult(
                check_name="features_finite", asset_key=asset.key, passed=not non_finite, severity=error,
                description=(f"{sum(non_finite.values())} feature value(s){of_patient} are missing or infinite, in "
                             + _listed([f"{name} ({n})" for name, n in non_finite.items()]) if non_finite
                             else "Passed: every feature value is a finite number."),
                metadata={"expected": "0 missing or infinite values",
                          "found": (f"{sum(non_finite.values())} non-finite value(s) in "
                                    + _listed([f"{name} ({n})" for name, n in non_finite.items()]) if non_finite
                                    else f"all values finite in {len(reports)} file(s)"),
                          "n_non_finite_values": sum(non_finite.values()),
                          "non_finite_values": dg.MetadataValue.json(non_finite)},
            ),
            dg.AssetCheckResult(
                check_name="features_nonzero_rows", asset_key=asset.key, passed=not zero_rows, severity=error,
                description=(f"{sum(zero_rows.values())} tissue patch(es){of_patient} have an all-zero feature vector "
                             "(read as blank or not encoded), in "
                             + _listed([f"{name} ({n} of {rows[name]})" for name, n in zero_rows.items()]) if zero_rows
                             else "Passed: no all-zero feature vector."),
                metadata={"expected": "0 all-zero rows",
                          "found": (f"{sum(zero_rows.values())} all-zero row(s) in "
                                    + _listed([f"{name} ({n} of {rows[name]})" for name, n in zero_rows.items()])
                                    if zero_rows else f"no all-zero row in {sum(rows.values())} row(s)"),
                          "n_zero_rows": sum(zero_rows.values()),
                          "zero_rows": dg.MetadataValue.json(zero_rows)},
            ),
            dg.AssetCheckResult(
                check_name="encoder_recorded", asset_key=asset.key, passed=not identity_problems, severity=error,
                description=(f"The feature file(s) of {len(identity_problems)} slide(s){of_patient} do not record the "
                             f"encoder of this run ({weights}), so they cannot be traced: "
                             f"{'; '.join(per_file(identity_problems))}" if identity_problems
                             else f"Passed: every file records {weights}."),
                metadata={"expected": f"every file names {weights}",
                          "found": (f"{len(identity_problems)} of {len(reports)} file(s) wrong: "
                                    f"{_listed(per_file(identity_problems))}" if identity_problems
                                    else f"all {len(reports)} file(s) name it"),
                          "encoder": str(identity.get("encoder")),
                          "checkpoint_sha256": str(identity.get("checkpoint_sha256")),
                          "untrained": bool(identity.get("untrained"))},
            ),
    ]


def _encoder_line(identity: dict) -> str:
    weights = ("untrained, random init" if identity.get("untrained")
               else f"checkpoint sha256 {str(identity.get('checkpoint_sha256'))[:12]}")
    return f"encoder {identity.get('encoder')} ({weights})"


def slide_vector_result(problems: list[str], expected_dim: int, path: Path | None = None) -> dg.AssetCheckResult:
    # The file lies in <artifacts>/slide_vector/<patient>/.
    where = f" of patient {path.parent.name} ({path})" if path else ""
    return dg.AssetCheckResult(
        check_name="slide_vector_valid", asset_key=SLIDE_VECTOR.key, passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"The slide summary{where} is not valid: {'; '.join(problems)}" if problems
                     else f"Passed: one row of {expected_dim} finite features."),
        metadata={"expected": f"1 row with n_patches, n_slides and {expected_dim} finite features",
                  "found": "; ".join(problems) if problems else f"1 row of {expected_dim} finite features",
                  "expected_dim": expected_dim, "n_problems": len(problems),
                  "problems": dg.MetadataValue.json(problems)},
    )


QUPATH_GEOJSON_CHECK_SPECS = [
    dg.AssetCheckSpec("geojson_matches_grid", asset=QUPATH_GEOJSON.key, blocking=True,
                      description="Each slide's GeoJSON file, read back from disk, has one tile per tissue patch of "
                                  "the slide's tiling, in order, each at that patch's full-resolution position, so "
                                  "that what QuPath draws is the grid the patient was analysed on."),
]


def geojson_matches_grid_result(problems: list[str], n_slides: int, n_tiles: int) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="geojson_matches_grid", asset_key=QUPATH_GEOJSON.key, passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"The GeoJSON does not match the patch grid: {'; '.join(problems[:LISTED])}" if problems
                     else f"Passed: {n_tiles} tile(s) of {n_slides} slide(s) are the HDF5 patches."),
        metadata={"expected": "one tile per HDF5 patch, in order, at its coordinates",
                  "found": "; ".join(problems[:LISTED]) if problems else f"{n_tiles} tile(s) equal to the HDF5 rows",
                  "n_problems": len(problems)},
    )


CHECKS: list[dg.AssetChecksDefinition] = []
