"""qupath_geojson: each slide of a patient as QuPath GeoJSON (thin wiring over slide_geojson.py).

Made from patch_coords' grid and, once the patient is explained, the per-patch values of
risk_explanations' current version (`current.json` under the patient's explanation folder names
it; read through the catalogue and storage.py, no cohort module). Written to
`<artifacts>/qupath_geojson/<patient>/<slide>.geojson`, reused while the grid, the values and
this code are unchanged.

When it runs (definitions.py): a one-patient risk_explanations run requested by its sensor
carries it on in the same run; after a range run of explanations, and after patch_coords, the
steps sensors request it for the patients those runs materialized, many per run.
"""

import json
import time
from pathlib import Path

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.batching import gpu_backfill_policy, per_patient_events
from gcmlm_assets.catalogue import PATCH_COORDS, PATCHES_FILE, QUPATH_GEOJSON, RISK_EXPLANATIONS, SLIDE_LISTING
from gcmlm_assets.pathology import checks
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.policies import TRANSIENT_RETRY, stored_materialization
from gcmlm_assets.resources import ArtifactStorage
from gcmlm_assets.reuse import StoredOutput
from gcmlm_assets.storage import VERSION_POINTER, read_version_pointer, sha256_file, sha256_text

HOW_TO_OPEN = ("Open the slide in QuPath (0.4 or later) and drag its .geojson onto the viewer (or File > Import "
               "objects): tissue is drawn as locked annotations, patches as tiles; Measure > Show measurement "
               "maps colours the tiles by a value.")


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **QUPATH_GEOJSON.dagster_attributes(),
        deps=[dg.AssetDep(PATCH_COORDS.key), dg.AssetDep(RISK_EXPLANATIONS.key)],
        # Nothing is yielded for a patient without slides, nor by a range step (batching.py).
        skippable=True,
        description="Every slide of the patient as a QuPath GeoJSON file (`<slide>.geojson`, level-0 pixels): the "
                    "tissue outlines and the patch grid of patch_coords, and, once the patient is explained, each "
                    "patch's contributions and ABMIL attention from risk_explanations as tile measurements. "
                    "Before an explanation (or after a new tiling, until the patient is explained again) the grid "
                    "and tissue alone.",
    )],
    partitions_def=patients_partitions,
    check_specs=checks.QUPATH_GEOJSON_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    # A backfill from the UI writes up to GCMLM_GPU_BATCH_PATIENTS patients per run, as the sensors do.
    backfill_policy=gpu_backfill_policy(),
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def qupath_geojson(context: dg.AssetExecutionContext, storage: ArtifactStorage):
    store = storage.store()
    yield from per_patient_events(context, QUPATH_GEOJSON,
                                  lambda patient_id: _geojson_for(patient_id, store, context.log),
                                  checks.QUPATH_GEOJSON_CHECK_SPECS)


def current_patch_values(store, patient_id: str) -> tuple[Path | None, str | None, str | None]:
    """(patch file, its sha256, the explanation version) of the patient's published explanation;
    (None, None, None) when the patient has not been explained. A listed file that is missing or
    does not hash as `current.json` recorded fails the patient, naming it."""
    root = RISK_EXPLANATIONS.folder(store, patient_id, create=False)
    pointer = read_version_pointer(root)
    if pointer is None:
        return None, None, None
    path = PATCHES_FILE.in_folder(root / pointer["version"])
    recorded = pointer.get("files", {}).get(PATCHES_FILE.name)
    found = sha256_file(path) if path.is_file() else None
    if recorded is None or found != recorded:
        raise dg.Failure(description=f"patient {patient_id}: {path} is missing or not the file "
                                     f"{root / VERSION_POINTER} recorded; materialize {RISK_EXPLANATIONS.key} "
                                     "for the patient again", allow_retries=False)
    return path, found, pointer["version"]


def _geojson_for(patient_id: str, store, log):
    # slide_geojson reads slides (openslide) and arrays: imported by the step, not with the definitions
    from gcmlm_assets.pathology.qupath_geojson import GeoJsonInputError, StaleValuesError
    from gcmlm_assets.pathology.slide_geojson import grid_mismatches, inputs_fingerprint, write_patient_geojson

    listing_path = SLIDE_LISTING.path(store, patient_id)
    if not listing_path.is_file():
        log.info(f"patient {patient_id}: no slide grid ({listing_path} missing: the patient has no slides, or "
                 f"{PATCH_COORDS.key} has not been materialized for it); no GeoJSON")
        return
    started = time.perf_counter()
    listing = json.loads(listing_path.read_text(encoding="utf-8"))
    values, values_sha, explanation_version = current_patch_values(store, patient_id)
    output = StoredOutput(store, QUPATH_GEOJSON, patient_id,
                          sha256_text(QUPATH_GEOJSON.key, str(QUPATH_GEOJSON.code_version),
                                      inputs_fingerprint(listing, values_sha)))
    if output.reused:
        summary, note = output.manifest["summary"], output.manifest["values_note"]
    else:
        note = (f"values of explanation version {explanation_version}" if values else
                f"grid and tissue only: the patient has not been explained yet ({RISK_EXPLANATIONS.key})")
        try:
            try:
                summary = write_patient_geojson(listing_path.parent, output.folder, values)
            except StaleValuesError as stale:
                # explained before its slides were tiled again: those values belong to another grid
                note = (f"grid and tissue only: the current explanation (version {explanation_version}) was made "
                        f"from another tiling ({stale}); values return when {RISK_EXPLANATIONS.key} runs again")
                summary = write_patient_geojson(listing_path.parent, output.folder, None)
                values = None
        except GeoJsonInputError as error:
            raise dg.Failure(description=f"patient {patient_id}: {error}", allow_retries=False) from error
        if values and not any(s["tiles_with_values"] for s in summary["slides"]):
            note = (f"grid and tissue only: the current explanation (version {explanation_version}) has no patch "
                    "values (the score used no slide features)")
        output.record_digests(summary.pop("files"), summary=summary, values_note=note)
    log.info(f"patient {patient_id}: {note}")
    result = checks.geojson_matches_grid_result(grid_mismatches(listing, output.folder), summary["n_slides"],
                                                summary["n_tiles"])
    slides = summary["slides"]
    yield stored_materialization(
        output,
        metadata={
            "n_slides": summary["n_slides"],
            "n_tiles": summary["n_tiles"],
            "tiles_with_values": sum(s["tiles_with_values"] for s in slides),
            "measurements": ", ".join(sorted({name for s in slides for name in s["measurements"]})) or "none",
            "values": note,
            "slides": dg.MetadataValue.md(_slides_table(slides)),
            "how_to_open": HOW_TO_OPEN,
            "folder": dg.MetadataValue.path(str(output.folder)),
            "geojson_files": dg.MetadataValue.json([s["path"] for s in slides]),
            "patch_values_path": dg.MetadataValue.path(str(values)) if values else "none",
            "inputs_fingerprint": output.fingerprint,
            "reused": output.reused,
            "seconds": round(time.perf_counter() - started, 3),
        },
        data_version=output.files_digest(),
        specs=checks.QUPATH_GEOJSON_CHECK_SPECS, separate_results=[result])
    yield result


def _slides_table(slides: list[dict]) -> str:
    lines = ["| slide | file | tissue regions | tiles | tiles with values | measurements |",
             "|---|---|---|---|---|---|"]
    for s in slides:
        lines.append(f"| {s['slide']} | {s['file']} | {s['tissue_regions']} | {s['tiles']} | {s['tiles_with_values']} "
                     f"| {', '.join(s['measurements']) or '—'} |")
    return "\n".join(lines)


ASSETS: list[dg.AssetsDefinition] = [qupath_geojson]
