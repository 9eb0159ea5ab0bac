"""Dagster assets of the pathology group (thin wiring over the plain modules beside it).

The tiling and the encoder's assets are built per kind of slide (slide_sets.py): patch_coords and
uni_features here, ln_patch_coords and ln_features in ln_assets.py, by the same two builders.
"""

import json
import time

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.batching import LoadOnce, gpu_backfill_policy, per_patient_events
from gcmlm_assets.catalogue import SLIDE_VECTOR, SLIDE_VECTOR_PICTURE, SLIDE_VECTOR_TABLE, UNI_FEATURES
from gcmlm_assets.columns import column_schema_metadata
from gcmlm_assets.inputs import required_file
from gcmlm_assets.devices import DeviceError, require_gpu_step_device
from gcmlm_assets.lazy import lazy
from gcmlm_assets.landing_input import LandingInputError
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.policies import TRANSIENT_RETRY, stored_materialization
from gcmlm_assets.pathology import checks, encoders
from gcmlm_assets.pathology.patch_coords import (
    inputs_fingerprint,
    output_version,
    read_listing,
    slide_entry,
    tile_patient,
    write_patient_outputs,
)
from gcmlm_assets.pathology.pooling import (
    SLIDE_VECTOR_COLUMNS,
    PoolingError,
    get_pooling,
    patient_slides,
    slide_vector_picture,
    validate_slide_vector,
    write_slide_vector,
)
from gcmlm_assets.pathology.resources import PatchEncoder, TilingSettings
from gcmlm_assets.pathology.slide_sets import PRIMARY_SLIDES, SlideSet
from gcmlm_assets.pathology.slides import SlideError, list_slides
from gcmlm_assets.pathology.tiling_params import TILING_VERSION
from gcmlm_assets.pictures import PHOTO, patient_picture_markdown, save_png
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.reuse import StoredOutput
from gcmlm_assets.storage import sha256_text

# Imported by the step that uses it, not when the definitions load (gcmlm_assets/lazy.py).
pq = lazy("pyarrow.parquet")


def build_patch_coords(slide_set: SlideSet, description: str) -> dg.AssetsDefinition:
    """The tiling's asset (`slide_set.coords`) over the drop's `slide_set.landing_folder`."""
    specs = checks.patch_coords_check_specs(slide_set.coords)

    @dg.multi_asset(
        name=slide_set.coords.key,
        specs=[dg.AssetSpec(
            **slide_set.coords.dagster_attributes(),
            # Not yielded by a range step: each patient's materialization is logged on its own (batching.py).
            skippable=True,
            description=description,
        )],
        partitions_def=patients_partitions,
        check_specs=specs,
        can_subset=True,
        retry_policy=TRANSIENT_RETRY,
        op_tags=step_pods.op_tags(step_pods.CPU),
    )
    def coords_asset(context: dg.AssetExecutionContext, storage: ArtifactStorage, landing: LandingZone,
                     pathology: TilingSettings):
        yield from per_patient_events(
            context, slide_set.coords,
            lambda patient_id: _patch_coords_for(patient_id, storage, landing, pathology, slide_set, specs), specs)

    return coords_asset


def _patch_coords_for(patient_id: str, storage: ArtifactStorage, landing: LandingZone, pathology: TilingSettings,
                      slide_set: SlideSet, specs: list[dg.AssetCheckSpec]):
    store = storage.store()
    params = pathology.tiling_params()
    asset = slide_set.coords
    wsi_dir = landing.patient_dir(patient_id) / slide_set.landing_folder
    try:
        landing.refuse_links_leaving(patient_id, slide_set.landing_folder)
        slides = list_slides(wsi_dir)
    except (FileNotFoundError, SlideError, LandingInputError) as error:
        raise dg.Failure(description=f"patient {patient_id}: {error}", allow_retries=False) from error

    started = time.perf_counter()
    output = StoredOutput(store, asset, patient_id, inputs_fingerprint(slides, params))
    out_dir = output.folder
    if output.reused:
        listing = read_listing(out_dir, slide_set.listing)
        seconds: dict[str, float] = {}
    else:
        outcomes = tile_patient(slides, params)
        seconds = {o.path.name: round(o.seconds, 3) for o in outcomes}
        failures = [o.error for o in outcomes if o.error]
        readable = [slide_entry(o, None, None) for o in outcomes if not o.error]
        if failures:
            # Nothing has been written: the bad slide is reported, the folder stays as it was.
            yield checks.slides_open_result(readable, failures, asset=asset)
            raise dg.Failure(description=f"patient {patient_id}: {len(failures)} unusable slide(s): "
                                         + "; ".join(failures),
                             metadata={"problems": dg.MetadataValue.json(failures)}, allow_retries=False)
        if sum(entry["n_patches"] for entry in readable) == 0:
            yield checks.slides_open_result(readable, [], asset=asset)
            yield checks.tissue_found_result(readable, asset=asset)
            reasons = "; ".join(f"{e['file']}: {e['reason']}" for e in readable)
            raise dg.Failure(description=f"patient {patient_id}: no tissue patch on any slide in {wsi_dir}: "
                                         f"{reasons}",
                             allow_retries=False)
        listing = write_patient_outputs(out_dir, patient_id, outcomes, params,
                                        listing=slide_set.listing, picture=slide_set.picture)
        output.record_digests(listing.pop("files"), tiling_version=TILING_VERSION)

    entries = listing["slides"]
    version = output_version(listing)
    results = [checks.slides_open_result(entries, [], asset=asset), checks.mpp_known_result(entries, asset=asset),
               checks.tissue_found_result(entries, asset=asset),
               checks.patch_count_result(entries, pathology.min_patches_per_slide, pathology.max_patches_per_slide,
                                         asset=asset)]
    yield stored_materialization(
        output,
        metadata={
            "n_slides": len(entries),
            "n_patches": listing["n_patches"],
            "mode": params.mode,
            "slides": dg.MetadataValue.md(_slides_table(entries, seconds)),
            "picture": dg.MetadataValue.md(patient_picture_markdown(slide_set.picture.in_folder(out_dir), PHOTO,
                                                                    f"tiling of {patient_id}")),
            "picture_path": dg.MetadataValue.path(str(slide_set.picture.in_folder(out_dir))),
            "folder": dg.MetadataValue.path(str(out_dir)),
            "listing": dg.MetadataValue.path(str(slide_set.listing.in_folder(out_dir))),
            "h5_files": dg.MetadataValue.json([e["h5"] for e in entries if e["h5"]]),
            "input_fingerprints": dg.MetadataValue.json({
                e["file"]: {"size_bytes": e["size_bytes"], "mtime_ns": e["mtime_ns"], "quickhash1": e["quickhash1"],
                            **({"files": e["source_files"]} if e.get("dicom") else {})} for e in entries}),
            # Per DICOM-WSI series: the file opened, the VOLUME instances tiled, the others ignored and why.
            "dicom_series": dg.MetadataValue.json({e["file"]: e["dicom"] for e in entries if e.get("dicom")}),
            "params": dg.MetadataValue.json(listing["params"]),
            "tiling_version": TILING_VERSION,
            "inputs_fingerprint": output.fingerprint,
            "reused": output.reused,
            "seconds": round(time.perf_counter() - started, 3),
        },
        data_version=version,
        specs=specs, separate_results=results)
    yield from results


def _slides_table(entries: list[dict], seconds: dict[str, float]) -> str:
    lines = ["| slide | size (px) | µm/px | source | patches | level | read px | s |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        w, h = e["dimensions"]
        name = e["file"]
        if e.get("dicom"):
            series = e["dicom"]
            name += (f" (DICOM series of {len(e['source_files'])} files: {len(series['volume_instances'])} VOLUME "
                     f"tiled, {len(series['ignored_instances'])} ignored)")
        lines.append(f"| {name} | {w}x{h} | {e['mpp'][0]:.4g} | {e['mpp_source']} | {e['n_patches']} "
                     f"| {e['patch_level']} | {e['read_size']} | {seconds.get(e['file'], '')} |")
    return "\n".join(lines)


patch_coords = build_patch_coords(
    PRIMARY_SLIDES,
    description=f"Tissue patch coordinates of every slide in `<landing>/<patient>/{PRIMARY_SLIDES.landing_folder}/`: "
                f"one CLAM-layout HDF5 per slide plus `{PRIMARY_SLIDES.listing.name}`.")


# ---------------------------------------------------------------- uni_features, slide_vector


def build_patch_features(slide_set: SlideSet, description: str) -> dg.AssetsDefinition:
    """The encoder's asset (`slide_set.features`) over the tiling asset's listing (`slide_set.listing`)."""
    specs = checks.features_check_specs(slide_set.features)

    @dg.multi_asset(
        name=slide_set.features.key,
        specs=[dg.AssetSpec(
            **slide_set.features.dagster_attributes(),
            deps=[slide_set.coords.key],
            # Not yielded by a range step: each patient's materialization is logged on its own.
            skippable=True,
            description=description,
        )],
        partitions_def=patients_partitions,
        check_specs=specs,
        # Subsettable so that a range step may leave its check outputs unyielded (it logs each patient's).
        can_subset=True,
        retry_policy=TRANSIENT_RETRY,
        # A backfill encodes up to GCMLM_GPU_BATCH_PATIENTS patients per run with one loaded encoder;
        # each patient's features, metadata and checks are still recorded as that patient's own.
        backfill_policy=gpu_backfill_policy(),
        pool=step_pods.GPU_POOL,
        op_tags=step_pods.op_tags(step_pods.GPU),
        required_resource_keys={"storage", "encoder"},
    )
    def features_asset(context: dg.AssetExecutionContext):
        store = context.resources.storage.store()
        encoder: PatchEncoder = context.resources.encoder
        # On Kubernetes a GPU pod without a GPU is misplaced: the whole step fails now, naming its settings.
        require_gpu_step_device(encoder.device, "encoder.device")
        model = LoadOnce(encoder.load, errors=(encoders.EncoderError, DeviceError))
        yield from per_patient_events(
            context, slide_set.features,
            lambda patient_id: _features_for(patient_id, store, encoder, model, context.log, slide_set, specs), specs)

    return features_asset


def _features_for(patient_id: str, store, encoder: PatchEncoder, loaded_model: LoadOnce, log, slide_set: SlideSet,
                  specs: list[dg.AssetCheckSpec]):
    # extract.py and patch_batches.py import torch (patch_batches subclasses its Dataset): only in the step
    # that encodes.
    from gcmlm_assets.pathology import extract
    from gcmlm_assets.pathology.feature_files import validate_feature_file
    from gcmlm_assets.pathology.patch_batches import describe_reading
    from gcmlm_assets.pathology.patch_grid import ExtractionError, read_patch_grid
    from gcmlm_assets.step_output import stdout_to_log

    asset = slide_set.features
    coords_dir = required_file(slide_set.listing, store, patient_id).parent
    listing = read_listing(coords_dir, slide_set.listing)
    # What timm, torch or the slide readers print goes to the step's debug log, not raw stdout.
    with stdout_to_log(log.debug):
        model, device = loaded_model.get()
        out_dir = asset.folder(store, patient_id)
        started = time.perf_counter()
        try:
            done = extract.extract_patient(listing, out_dir, model, batch_size=encoder.batch_size,
                                           num_workers=encoder.num_workers, read_threads=encoder.read_threads,
                                           feature_dtype="float16" if encoder.float16_features else "float32",
                                           scaled_decode=encoder.scaled_decode,
                                           progress=lambda line: log.info(f"{patient_id}: {line}"))
        except ExtractionError as error:
            raise dg.Failure(description=f"patient {patient_id}: {error}", allow_retries=False) from error
    seconds = time.perf_counter() - started

    identity = model.identity()
    # Expected rows come from the coordinate files themselves, not from what extraction reported.
    reports = [validate_feature_file(r.output, expected_dim=model.embedding_dim, expected_encoder=identity,
                                     expected_rows=read_patch_grid(r.attrs["coords_path"]).n_patches)
               for r in done.results]
    # Each slide's features were reused or computed by extract.py: the whole output is only recorded.
    output = StoredOutput(store, asset, patient_id, done.fingerprint, look_up=False)
    output.record({r.output.name: r.output for r in done.results}, encoder=identity,
                  slides=[{"h5_file": r.output.name, "slide_file": r.attrs.get("slide_file"),
                           "n_patches": r.n_patches} for r in done.results],
                  slides_without_patches=done.without_patches)
    computed = [r for r in done.results if not r.reused]
    computed_patches = sum(r.n_patches for r in computed)
    results = list(checks.features_results(reports, identity, asset=asset))
    yield stored_materialization(
        output,
        metadata={
            "encoder": model.name,
            "embedding_dim": model.embedding_dim,
            "checkpoint": identity["checkpoint"] or ("random init (test only)" if model.untrained
                                                     else "no checkpoint file (built-in weights)"),
            "checkpoint_sha256": model.checkpoint_sha256,
            "weights_sha256": identity["weights_sha256"],
            "untrained": model.untrained,
            "n_slides": len(done.results),
            "n_patches": done.n_patches,
            "patches_per_slide": dg.MetadataValue.json({r.output.name: r.n_patches for r in done.results}),
            "slides_without_patches": dg.MetadataValue.json(done.without_patches),
            "patches_per_second": round(computed_patches / sum(r.seconds for r in computed), 2) if computed else 0.0,
            "reused_slides": dg.MetadataValue.json([r.output.name for r in done.results if r.reused]),
            "readers": dg.MetadataValue.json({r.output.name: r.reader_label for r in done.results}),
            "scaled_decode": encoder.scaled_decode,
            "reading": describe_reading(encoder.num_workers, encoder.read_threads),
            "feature_dtype": "float16" if encoder.float16_features else "float32",
            "device": str(model.device),
            "device_reason": device.reason,
            "folder": dg.MetadataValue.path(str(out_dir)),
            "h5_files": dg.MetadataValue.json([str(r.output) for r in done.results]),
            "dicom_series": dg.MetadataValue.json(
                {e["h5_file"]: e["dicom"] for e in listing["slides"] if e.get("h5_file") and e.get("dicom")}),
            "input_patch_coords": dg.MetadataValue.json(
                {e["h5_file"]: e["h5_sha256"] for e in listing["slides"] if e.get("h5_file")}),
            "inputs_fingerprint": done.fingerprint,
            "seconds": round(seconds, 3),
        },
        data_version=output.files_digest(),
        specs=specs, separate_results=results)
    yield from results


uni_features = build_patch_features(
    PRIMARY_SLIDES,
    description="Patch features of every slide with tissue: one CLAM-layout HDF5 per slide "
                "(`features` (N, D), `coords` (N, 2)), from the encoder resource (UNI in production).")


def slide_vector_fingerprint(pooling_description: dict, feature_files: dict[str, str]) -> str:
    """What a slide vector is made from: the pooling (its name, version and parameters) and the
    patient's feature files' hashes (pinned by gcmlm_assets_tests/core/test_fingerprints.py)."""
    return sha256_text(SLIDE_VECTOR.key, json.dumps(pooling_description, sort_keys=True),
                       *(f"{name}:{digest}" for name, digest in sorted(feature_files.items())))


class SlideVectorConfig(dg.Config):
    pooling: str = "mean"


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **SLIDE_VECTOR.dagster_attributes(),
        deps=[uni_features],
        skippable=True,
        description="One row per patient: the patch features of all of the patient's slides pooled into one "
                    "vector (mean by default), with `n_patches` and `n_slides`.",
        metadata=column_schema_metadata(SLIDE_VECTOR_COLUMNS),
    )],
    partitions_def=patients_partitions,
    check_specs=checks.SLIDE_VECTOR_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def slide_vector(context: dg.AssetExecutionContext, config: SlideVectorConfig, storage: ArtifactStorage):
    yield from per_patient_events(context, SLIDE_VECTOR,
                                  lambda patient_id: _slide_vector_for(patient_id, config, storage),
                                  checks.SLIDE_VECTOR_CHECK_SPECS)


def _slide_vector_for(patient_id: str, config: SlideVectorConfig, storage: ArtifactStorage):
    store = storage.store()
    features = store.read_manifest(UNI_FEATURES.key, patient_id)
    if not features:
        raise dg.Failure(description=f"patient {patient_id}: {UNI_FEATURES.key} has not been materialized "
                                     f"({store.path(UNI_FEATURES.key, patient_id, store.MANIFEST)} missing)",
                         allow_retries=False)
    try:
        pooling = get_pooling(config.pooling)
    except PoolingError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from error
    dim = int(features["encoder"]["embedding_dim"])
    output = StoredOutput(store, SLIDE_VECTOR, patient_id,
                          slide_vector_fingerprint(pooling.describe(), features["files"]))
    out_path, picture_path = output.path(SLIDE_VECTOR_TABLE), output.path(SLIDE_VECTOR_PICTURE)
    slides = patient_slides(store, UNI_FEATURES.key, patient_id)
    if output.reused:
        summary = output.manifest["summary"]
    else:
        try:
            pooled = pooling.pool(slides)
        except PoolingError as error:
            raise dg.Failure(description=f"patient {patient_id}: {error}", allow_retries=False) from error
        write_slide_vector(out_path, patient_id, pooled)
        save_png(slide_vector_picture(patient_id, slides, pooling.name), picture_path)
        summary = {"n_patches": pooled.n_patches, "n_slides": pooled.n_slides, "dim": int(pooled.vector.shape[0]),
                   **pooled.details}
        output.record([SLIDE_VECTOR_TABLE, SLIDE_VECTOR_PICTURE], summary=summary)
    if not picture_path.is_file():  # reused output stored before slide_vector had a picture
        save_png(slide_vector_picture(patient_id, slides, pooling.name), picture_path)
    problems = validate_slide_vector(out_path, expected_dim=dim)
    result = checks.slide_vector_result(problems, dim, out_path)
    yield stored_materialization(
        output,
        metadata={
            "pooling": pooling.name,
            "n_patches": summary["n_patches"],
            "n_slides": summary["n_slides"],
            "dim": summary["dim"],
            "encoder": features["encoder"]["encoder"],
            "checkpoint_sha256": features["encoder"]["checkpoint_sha256"],
            "path": dg.MetadataValue.path(str(out_path)),
            # The slides with the pooled patches, as a file only: patch_coords' embedded picture shows
            # the same slides and grid, and a second one per patient would double the event log's share.
            "picture_path": dg.MetadataValue.path(str(picture_path)),
            "input_uni_features": dg.MetadataValue.json(features["files"]),
            "inputs_fingerprint": output.fingerprint,
            "reused": output.reused,
            **column_schema_metadata(SLIDE_VECTOR_COLUMNS, pq.read_schema(out_path)),
        },
        # The file as recorded (and, when reused, found intact) in the manifest.
        data_version=output.sha256(SLIDE_VECTOR_TABLE),
        specs=checks.SLIDE_VECTOR_CHECK_SPECS, separate_results=[result])
    yield result


ASSETS: list[dg.AssetsDefinition] = [patch_coords, uni_features, slide_vector]
