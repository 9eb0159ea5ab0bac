"""Dagster assets of the lymph-node analysis: the tumour classifier the platform trains on the
annotated lymph-node slides, and each patient's nodes, tumour regions and T/MLN (thin wiring over
pathology/lymph_nodes/)."""


import json
import time
from pathlib import Path

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.batching import LoadOnce, per_patient_events
from gcmlm_assets.catalogue import (
    CLASSIFIER_FILE, CLASSIFIER_METRICS, LN_FEATURES, LN_SLIDE_LISTING, LYMPH_NODE_REGIONS, LYMPH_NODE_TABLE,
    LYMPH_NODES, TUMOUR_CLASSIFIER)
from gcmlm_assets.inputs import required_file
from gcmlm_assets.landing.scan import LN_ANNOTATIONS_FOLDER
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.pathology import lymph_node_checks as checks
from gcmlm_assets.pathology.lymph_nodes.settings import LymphNodeFields
from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import TumourClassifierFields
from gcmlm_assets.pathology.resources import LymphNodeSettings, TumourClassifierSettings
from gcmlm_assets.pictures import PHOTO, patient_picture_markdown
from gcmlm_assets.policies import TRANSIENT_RETRY, stored_materialization
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.reuse import StoredOutput, VersionedOutput
from gcmlm_assets.setting_fields import values_of
from gcmlm_assets.storage import ArtifactStore, read_version_pointer, sha256_file, sha256_text

CLASSIFIER_FILES = (CLASSIFIER_FILE, CLASSIFIER_METRICS)
SHOWN_SLIDES = 20  # slides listed in a materialization's table (the rest are in regions.json)


# ---------------------------------------------------------------- tumour_classifier


def annotated_slides(store: ArtifactStore, landing: LandingZone) -> tuple[list, list[str]]:
    """(AnnotatedSlide of every lymph-node slide with features and an annotation file, notes on annotation
    files that match no slide with features). Walks ln_features' patient folders once: a training, not a tick."""
    from gcmlm_assets.pathology.lymph_nodes.annotations import annotation_files
    from gcmlm_assets.pathology.lymph_nodes.classifier_training import AnnotatedSlide

    root = store.asset_dir(LN_FEATURES.key, create=False)  # every patient's folder
    slides, notes = [], []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        patient_id = folder.name
        annotations = landing.patient_dir(patient_id) / LN_ANNOTATIONS_FOLDER
        if not folder.is_dir() or not annotations.is_dir():
            continue
        manifest = store.read_manifest(LN_FEATURES.key, patient_id)
        if not manifest:
            notes.append(f"{annotations}: {patient_id}'s ln_features is not materialized")
            continue
        features = {Path(s["h5_file"]).stem: s["h5_file"] for s in manifest.get("slides", [])}
        found = annotation_files(annotations, features)
        notes += [f"{path}: no lymph-node slide of {patient_id} with features is named {path.stem!r}"
                  for path in found.unmatched]
        slides += [AnnotatedSlide(patient_id, name, folder / features[name], manifest["files"][features[name]], path)
                   for name, path in sorted(found.by_slide.items())]
    return slides, notes


def tumour_classifier_fingerprint(training_set: str, threshold: float) -> str:
    """The training set's fingerprint (slides, their features and annotations, the training settings,
    the classifier's version) and the tumour threshold its out-of-fold figures are reported at."""
    return sha256_text(TUMOUR_CLASSIFIER.key, training_set, f"threshold={threshold!r}")


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **TUMOUR_CLASSIFIER.dagster_attributes(),
        deps=[dg.AssetKey(LN_FEATURES.key)],
        # Skipped, not failed, while too few lymph-node slides are annotated to train.
        skippable=True,
        description="Patch-level tumour classifier for the lymph-node slides: standardised logistic regression on "
                    "the encoder's patch embeddings (ln_features), trained on the slides with a QuPath annotation "
                    f"file (`<landing>/<patient>/{LN_ANNOTATIONS_FOLDER}/<slide>.geojson`: tumour vs. the rest of "
                    "the node), cross-validated at slide level. A new version when the annotated slides, their "
                    "features or the settings change; lymph_nodes is then made again for every patient.",
    )],
    check_specs=checks.CLASSIFIER_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def tumour_classifier(context: dg.AssetExecutionContext, storage: ArtifactStorage, landing: LandingZone,
                      ln_classifier: TumourClassifierSettings, lymph_node: LymphNodeSettings):
    from gcmlm_assets.pathology.lymph_nodes.classifier_training import (
        fit_tumour_classifier, training_set_fingerprint, write_trained)
    from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import TumourClassifierError

    store = storage.store()
    slides, notes = annotated_slides(store, landing)
    for note in notes:
        context.log.warning(note)
    settings = TumourClassifierFields(**values_of(ln_classifier, TumourClassifierFields))
    if len(slides) < settings.min_annotated_slides:
        context.log.info(f"tumour_classifier: {len(slides)} annotated lymph-node slide(s) with features, "
                         f"{settings.min_annotated_slides} needed: waiting for more annotations")
        return
    threshold = lymph_node.tumour_threshold
    output = VersionedOutput(store, TUMOUR_CLASSIFIER,
                             tumour_classifier_fingerprint(training_set_fingerprint(slides, settings), threshold))
    rejected: dict | None = None
    if output.reused:
        context.log.info(f"tumour_classifier: annotated slides and settings unchanged, version "
                         f"{output.pointer['version']} kept")
        pointer = output.pointer
    else:
        for slide in slides:  # the features trained on are the ones their manifest records
            _verify_digests(slide.patient_id, {slide.features_path.name: slide.features_path},
                            {slide.features_path.name: slide.features_sha256})
        started = time.perf_counter()
        try:
            trained = fit_tumour_classifier(slides, settings, threshold=threshold)
        except TumourClassifierError as error:
            raise dg.Failure(description=f"tumour_classifier: {error}", allow_retries=False) from error
        installed = read_version_pointer(output.root)
        if installed is not None and not checks.classifier_adequate(trained.metrics):
            # Like a segmentation model that predicts worse: the installed classifier stays, and with it
            # every patient's lymph_nodes (a new version would make them all again).
            rejected = trained.metrics
            pointer = installed
            context.log.warning(f"tumour_classifier: the new training's cross-validated AUC "
                                f"{rejected['cv_auc']:.3f} is below {checks.MIN_CLASSIFIER_CV_AUC}: not installed; "
                                f"version {installed['version']} stays")
        else:
            staging = output.staging()
            write_trained(trained, staging)
            pointer = output.publish(staging, patients=sorted({s.patient_id for s in slides}),
                                     cv_auc=trained.metrics["cv_auc"], n_slides=trained.metrics["n_slides"],
                                     seconds=round(time.perf_counter() - started, 3))
    folder = output.root / pointer["version"]
    metrics = json.loads(CLASSIFIER_METRICS.in_folder(folder).read_text(encoding="utf-8"))
    yield dg.MaterializeResult(
        asset_key=TUMOUR_CLASSIFIER.key,
        metadata={
            "version": pointer["version"],
            "reused": output.reused,
            **({"rejected_training": dg.MetadataValue.json(
                {key: rejected[key] for key in ("cv_auc", "fold_aucs", "n_slides", "training_fingerprint")})}
               if rejected else {}),
            "cv_auc": metrics["cv_auc"],
            "fold_aucs": dg.MetadataValue.json(metrics["fold_aucs"]),
            "cv_sensitivity": metrics["cv_sensitivity"],
            "cv_specificity": metrics["cv_specificity"],
            "threshold": metrics["threshold"],
            "n_slides": metrics["n_slides"],
            "n_patients": metrics["n_patients"],
            "n_patches": dg.MetadataValue.json(metrics["n_patches"]),
            "encoder": dg.MetadataValue.json(metrics["encoder"]),
            "model": metrics["model"],
            "slides": dg.MetadataValue.md(_training_slides_table(metrics["slides"])),
            "annotation_notes": dg.MetadataValue.json(notes[:SHOWN_SLIDES]),
            "path": dg.MetadataValue.path(str(CLASSIFIER_FILE.in_folder(folder))),
            "metrics_path": dg.MetadataValue.path(str(CLASSIFIER_METRICS.in_folder(folder))),
            "training_fingerprint": metrics["training_fingerprint"],
            "data": "synthetic slides only so far: no public annotated lymph-node slides are available offline here",
        },
        data_version=dg.DataVersion(pointer["files"][CLASSIFIER_FILE.name]),
        # the new training's figures when it was not installed: the check says why
        check_results=[checks.classifier_result(rejected or metrics, rejected=rejected is not None)])


def _training_slides_table(slides: list[dict]) -> str:
    lines = ["| slide | patches | tumour | not tumour | used |", "|---|---|---|---|---|"]
    for s in slides[:SHOWN_SLIDES]:
        lines.append(f"| {s['slide_id']} | {s['n_patches']} | {s['n_tumour']} | {s['n_not_tumour']} | {s['n_used']} |")
    if len(slides) > SHOWN_SLIDES:
        lines.append(f"| ... {len(slides) - SHOWN_SLIDES} more (in {CLASSIFIER_METRICS.name}) | | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- lymph_nodes


def installed_classifier(store: ArtifactStore) -> tuple[dict, Path] | None:
    """(pointer, classifier file) of the installed tumour classifier; None when none is installed."""
    root = TUMOUR_CLASSIFIER.folder(store, create=False)
    pointer = read_version_pointer(root)
    if pointer is None:
        return None
    return pointer, CLASSIFIER_FILE.in_folder(root / pointer["version"])


def lymph_nodes_fingerprint(listing_sha256: str, feature_files: dict[str, str], classifier_sha256: str,
                            settings: dict) -> str:
    """What a patient's lymph-node analysis is made from: the slide listing, the patch features, the
    classifier file and the analysis settings (and the asset's code version)."""
    return sha256_text(LYMPH_NODES.key, str(LYMPH_NODES.code_version), listing_sha256, classifier_sha256,
                       json.dumps(settings, sort_keys=True),
                       *(f"{name}:{digest}" for name, digest in sorted(feature_files.items())))


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **LYMPH_NODES.dagster_attributes(),
        deps=[dg.AssetKey(LN_FEATURES.key), dg.AssetKey(TUMOUR_CLASSIFIER.key)],
        # Skipped, not failed, while no tumour classifier is installed; lymph_nodes_after_classifier_sensor
        # runs it once one is.
        skippable=True,
        description="Per lymph-node slide: each node (a tissue component of the tiling), each patch's tumour "
                    "probability (tumour_classifier on ln_features) and the tumour regions (connected tumour "
                    "patches), as a picture, a QuPath GeoJSON and a patch table; per patient one row: nodes, "
                    "metastatic nodes, tumour area, metastatic node area and T/MLN (their ratio; empty without a "
                    "metastatic node). Skipped until a tumour classifier is installed.",
    )],
    partitions_def=patients_partitions,
    check_specs=checks.LYMPH_NODES_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def lymph_nodes(context: dg.AssetExecutionContext, storage: ArtifactStorage, lymph_node: LymphNodeSettings):
    from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import TumourClassifierError, load_classifier

    store = storage.store()
    classifier = LoadOnce(lambda path, sha256: load_classifier(path, sha256), errors=(TumourClassifierError,))
    settings = LymphNodeFields(**values_of(lymph_node, LymphNodeFields))
    yield from per_patient_events(context, LYMPH_NODES,
                                  lambda patient_id: _lymph_nodes_for(context, patient_id, store, settings, classifier),
                                  checks.LYMPH_NODES_CHECK_SPECS)


def _lymph_nodes_for(context, patient_id: str, store: ArtifactStore, settings: LymphNodeFields, classifier: LoadOnce):
    from gcmlm_assets.pathology.lymph_nodes.patient import (
        LymphNodeInputError, analyse_patient, node_problems, read_regions, tissue_problems)
    from gcmlm_assets.pathology.lymph_nodes.patient_row import lymph_node_row_problems
    from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import TumourClassifierError
    listing_path = required_file(LN_SLIDE_LISTING, store, patient_id)
    listing = json.loads(listing_path.read_text(encoding="utf-8"))
    features = store.read_manifest(LN_FEATURES.key, patient_id)
    if not features:
        raise dg.Failure(description=f"patient {patient_id}: {LN_FEATURES.key} has not been materialized "
                                     f"({store.path(LN_FEATURES.key, patient_id, store.MANIFEST)} missing)",
                         allow_retries=False)
    installed = installed_classifier(store)
    if installed is None:
        context.log.info(f"{patient_id}: waiting for a tumour classifier: none is installed yet. tumour_classifier_"
                         "sensor trains one once enough lymph-node slides are annotated "
                         f"(`{LN_ANNOTATIONS_FOLDER}/`); lymph_nodes_after_classifier_sensor then runs this patient.")
        return
    pointer, classifier_path = installed
    classifier_sha256 = pointer["files"][CLASSIFIER_FILE.name]
    setting_values = values_of(settings, LymphNodeFields)
    output = StoredOutput(store, LYMPH_NODES, patient_id,
                          lymph_nodes_fingerprint(sha256_file(listing_path), features["files"], classifier_sha256,
                                                  setting_values))
    out_dir = output.folder
    started = time.perf_counter()
    if output.reused:
        summary = output.manifest["summary"]
    else:
        feature_files = {s["h5_file"]: store.path(LN_FEATURES.key, patient_id, s["h5_file"]) for s in features["slides"]}
        _verify_digests(patient_id, feature_files, features["files"])
        try:
            model = classifier.get(classifier_path, classifier_sha256)
            probabilities = {Path(name).stem: model.predict_feature_file(path) for name, path in feature_files.items()}
            done = analyse_patient(listing, probabilities, out_dir, settings,
                                   classifier={"version": pointer["version"], "sha256": classifier_sha256,
                                               "training_fingerprint": pointer.get("fingerprint")},
                                   withdraw=store.path(LYMPH_NODES.key, patient_id, store.MANIFEST),
                                   listing_path=listing_path,
                                   sources={Path(name).stem: path for name, path in feature_files.items()})
        except (LymphNodeInputError, TumourClassifierError) as error:
            raise dg.Failure(description=f"patient {patient_id}: {error}", allow_retries=False) from error
        summary = {key: value for key, value in done.items() if key != "files"}
        output.record_digests(done["files"], summary=summary, classifier_version=pointer["version"])
    regions = read_regions(out_dir)
    results = checks.lymph_node_results(lymph_node_row_problems(LYMPH_NODE_TABLE.in_folder(out_dir)),
                                        node_problems(regions, settings),
                                        tissue_problems(listing, out_dir) + checks.node_patch_problems(regions),
                                        regions["totals"])
    slides = summary["slides"]
    first_picture = out_dir / regions["slides"][0]["picture"] if regions["slides"] else None
    yield stored_materialization(
        output,
        metadata={
            **{key: summary[key] for key in ("n_slides", "n_nodes", "n_metastatic_nodes")},
            "tumour_area_mm2": round(summary["tumour_area_mm2"], 4),
            "metastatic_node_area_mm2": round(summary["metastatic_node_area_mm2"], 4),
            # undefined without a metastatic node: shown as text, never as 0
            "t_mln": summary["t_mln"] if summary["t_mln"] is not None else "undefined (no metastatic node)",
            "slides": dg.MetadataValue.md(_slides_table(slides)),
            **({"picture": dg.MetadataValue.md(patient_picture_markdown(first_picture, PHOTO,
                                                                        f"lymph nodes of {patient_id}"))}
               if first_picture is not None and first_picture.is_file() else {}),
            "folder": dg.MetadataValue.path(str(out_dir)),
            "regions": dg.MetadataValue.path(str(LYMPH_NODE_REGIONS.in_folder(out_dir))),
            "path": dg.MetadataValue.path(str(LYMPH_NODE_TABLE.in_folder(out_dir))),
            "classifier_version": pointer["version"],
            "inputs_fingerprint": output.fingerprint,
            "reused": output.reused,
            "seconds": round(time.perf_counter() - started, 3),
        },
        data_version=output.sha256(LYMPH_NODE_TABLE),
        specs=checks.LYMPH_NODES_CHECK_SPECS, separate_results=results)
    yield from results


def _verify_digests(patient_id: str, files: dict[str, Path], recorded: dict[str, str]) -> None:
    """The feature files are the ones their manifest records (the fingerprint is made of those hashes)."""
    for name, path in files.items():
        if not path.is_file() or sha256_file(path) != recorded.get(name):
            raise dg.Failure(description=f"patient {patient_id}: {path} is missing or changed since {LN_FEATURES.key} "
                                         f"recorded it; materialize {LN_FEATURES.key} again", allow_retries=False)


def _slides_table(slides: list[dict]) -> str:
    lines = ["| slide | patches | tumour patches | nodes | metastatic | tumour mm² | metastatic node mm² | T/MLN |",
             "|---|---|---|---|---|---|---|---|"]
    for s in slides[:SHOWN_SLIDES]:
        ratio = f"{s['t_mln']:.3f}" if s["t_mln"] is not None else "undefined"
        lines.append(f"| {s['slide']} | {s['n_patches']} | {s['n_tumour_patches']} | {s['n_nodes']} "
                     f"| {s['n_metastatic_nodes']} | {s['tumour_area_mm2']:.3f} | {s['metastatic_node_area_mm2']:.3f} "
                     f"| {ratio} |")
    if len(slides) > SHOWN_SLIDES:
        lines.append(f"| ... {len(slides) - SHOWN_SLIDES} more (in {LYMPH_NODE_REGIONS.name}) | | | | | | | |")
    return "\n".join(lines)


ASSETS: list[dg.AssetsDefinition] = [tumour_classifier, lymph_nodes]
