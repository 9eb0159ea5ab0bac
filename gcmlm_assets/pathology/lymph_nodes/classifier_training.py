"""Training the tumour classifier on the annotated lymph-node slides (plain Python, no Dagster).

The training set: on each annotated slide, the patches whose centre lies in a tumour polygon (label 1) or in a node
polygon outside every tumour polygon (label 0) (annotations.py), with their embeddings from the slide's ln_features
file. At most `max_patches_per_slide` of them per slide, a sample seeded by the setting and the slide, so that a
heavily annotated slide neither dominates the fit nor the memory.

The penalty strength C is a setting, not chosen on inner folds: with the few annotated slides a site has, inner
slide-grouped folds would pick C from a handful of slides' noise, and on standardised embeddings with thousands of
patches the fit is not sensitive to C over a wide range.

Cross-validation is grouped by slide (no slide's patches on both sides of a fold: neighbouring patches of one slide
are near duplicates, and a patch-level split would report a flattering AUC). The folds are stratified by class
(StratifiedGroupKFold); there are min(cv_folds, number of slides) of them, fewer when a fold would leave its
training slides without one of the classes. The reported CV AUC pools the out-of-fold probabilities of all
patches; the per-fold AUCs are given too (None for a fold whose test slides hold one class only). The final model is
fitted on every labelled patch.

Retraining is decided by `training_set_fingerprint`: the slides (patient-qualified), their feature files' and
annotation files' sha256, the settings and CLASSIFIER_VERSION; it reads no feature array, so a sensor can compute it
from the digests the ln_features manifests record.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gcmlm_assets.catalogue import CLASSIFIER_FILE, CLASSIFIER_METRICS, TUMOUR_CLASSIFIER
from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.lymph_nodes.annotations import (
    NOT_TUMOUR, TUMOUR, AnnotationError, patch_labels, read_annotations,
)
from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import (
    CLASSIFIER_VERSION, DEFAULT_TUMOUR_THRESHOLD, TumourClassifier, TumourClassifierError, TumourClassifierFields,
    feature_file_encoder, save_classifier,
)
from gcmlm_assets.setting_fields import values_of
from gcmlm_assets.storage import atomic_write_json, sha256_file, sha256_text

np = lazy("numpy")
h5py = lazy("h5py")

READ_CHUNK_ROWS = 8192
MAX_ITER = 2000


@dataclass(frozen=True)
class AnnotatedSlide:
    """One annotated lymph-node slide: its patient, name, ln_features file (with the sha256 its manifest records)
    and its annotation file (`ln_annotations/<slide name>.geojson`)."""

    patient_id: str
    slide_name: str
    features_path: Path
    features_sha256: str
    annotation_path: Path

    @property
    def slide_id(self) -> str:
        return f"{self.patient_id}/{self.slide_name}"


@dataclass(frozen=True)
class SlidePatches:
    slide_id: str
    patient_id: str
    n_patches: int  # in the feature file
    n_tumour: int  # labelled patches, before the per-slide sample
    n_not_tumour: int
    n_used: int  # in the training set
    features_sha256: str
    annotation_sha256: str  # of the annotation bytes read
    ignored_classes: Mapping[str, int] = field(default_factory=dict)


@dataclass
class TrainingSet:
    features: Any  # (n, D) float32
    labels: Any  # (n,) int8, 1 tumour / 0 not tumour
    groups: Any  # (n,) slide ids
    slides: list[SlidePatches]
    encoder: dict[str, Any]


@dataclass
class TrainedClassifier:
    classifier: TumourClassifier
    metrics: dict[str, Any]


def settings_values(settings: Any) -> dict[str, Any]:
    """The training settings as plain values (from TumourClassifierFields or a resource inheriting it)."""
    return values_of(settings, TumourClassifierFields)


def training_set_fingerprint(slides: Sequence[AnnotatedSlide], settings: Any) -> str:
    """What the classifier is a function of: each slide's id, feature file sha256 and annotation file sha256 (the
    annotation files are read to hash them; the feature files are not read), the settings and CLASSIFIER_VERSION.
    Independent of the order of `slides`."""
    return _fingerprint([(s.slide_id, s.features_sha256, _annotation_sha256(s)) for s in _unique(slides)],
                        settings_values(settings))


def _fingerprint(entries: Sequence[tuple[str, str, str]], values: Mapping[str, Any]) -> str:
    return sha256_text(TUMOUR_CLASSIFIER.key, str(CLASSIFIER_VERSION), json.dumps(dict(values), sort_keys=True),
                       *(part for entry in sorted(entries) for part in entry))


def assemble_training_set(slides: Sequence[AnnotatedSlide], settings: Any) -> TrainingSet:
    """The labelled patches of every slide; refuses (TumourClassifierError) mixed encoders, unreadable or
    inconsistent files, too few slides with labelled patches and a class without patches."""
    values = settings_values(settings)
    slides = sorted(_unique(slides), key=lambda s: s.slide_id)
    encoder: dict[str, Any] | None = None
    encoder_source = ""
    blocks, labels, groups, summaries, empty = [], [], [], [], []
    for slide in slides:
        identity = feature_file_encoder(slide.features_path)
        if encoder is None:
            encoder, encoder_source = identity, str(slide.features_path)
        elif identity != encoder:
            raise TumourClassifierError(
                f"{slide.features_path}: features of encoder {identity}, but {encoder_source} has {encoder}; "
                "the training slides must share one encoder (re-extract ln_features)")
        coords, side, dimensions = _grid_of(slide.features_path)
        try:
            annotations = read_annotations(slide.annotation_path, dimensions=dimensions)
        except AnnotationError as error:
            raise TumourClassifierError(str(error)) from None
        slide_labels = patch_labels(coords, side, annotations)
        labelled = np.flatnonzero(slide_labels >= 0)
        chosen = _sample(labelled, values["max_patches_per_slide"], values["seed"], slide.slide_id)
        summary = SlidePatches(slide.slide_id, slide.patient_id, len(coords),
                               int((slide_labels == TUMOUR).sum()), int((slide_labels == NOT_TUMOUR).sum()),
                               len(chosen), slide.features_sha256, annotations.sha256, dict(annotations.ignored))
        summaries.append(summary)
        if not len(chosen):
            empty.append(slide.slide_id)
            continue
        blocks.append(_rows(slide.features_path, chosen))
        labels.append(slide_labels[chosen])
        groups.append(np.full(len(chosen), slide.slide_id, dtype=object))
    used = [s for s in summaries if s.n_used]
    if len(used) < values["min_annotated_slides"]:
        why = f"; no annotated patch on {', '.join(empty)}" if empty else ""
        raise TumourClassifierError(
            f"{len(used)} annotated lymph-node slide(s) with labelled patches, fewer than min_annotated_slides = "
            f"{values['min_annotated_slides']}{why}; annotate more slides (ln_annotations/<slide>.geojson)")
    y = np.concatenate(labels)
    for label, name, polygon in ((TUMOUR, "tumour", "tumour"), (NOT_TUMOUR, "non-tumour", "lymph-node")):
        holding = sum(1 for s in used if (s.n_tumour if label == TUMOUR else s.n_not_tumour))
        if holding < 2:
            raise TumourClassifierError(
                f"{name} patches on {holding} of {len(used)} annotated slide(s); slide-level cross-validation needs "
                f"them on at least 2 slides (annotate {polygon} regions on more slides)")
    return TrainingSet(np.concatenate(blocks), y, np.concatenate(groups), summaries, dict(encoder or {}))


def fit_tumour_classifier(slides: Sequence[AnnotatedSlide], settings: Any, *,
                          threshold: float = DEFAULT_TUMOUR_THRESHOLD) -> TrainedClassifier:
    """Cross-validate at slide level, then fit on every labelled patch. `threshold`: the tumour-patch cut the
    lymph_nodes asset applies, at which the out-of-fold sensitivity and specificity are reported."""
    from sklearn.metrics import roc_auc_score

    values = settings_values(settings)
    data = assemble_training_set(slides, settings)
    # from the annotation bytes the training set was built from (equal to training_set_fingerprint's unless a file
    # changed meanwhile: then the next comparison differs and the classifier is retrained)
    fingerprint = _fingerprint([(s.slide_id, s.features_sha256, s.annotation_sha256) for s in data.slides], values)
    x, y, groups = data.features, data.labels, data.groups
    folds = slide_folds(y, groups, values["cv_folds"], values["seed"])
    out_of_fold = np.full(len(y), np.nan)
    fold_reports = []
    for k, (train, test) in enumerate(folds):
        model = _fit(x[train], y[train], values)
        out_of_fold[test] = model.predict_proba(x[test].astype(np.float64))[:, 1]
        auc = float(roc_auc_score(y[test], out_of_fold[test])) if len(set(y[test].tolist())) == 2 else None
        fold_reports.append({"fold": k, "auc": auc, "test_slides": sorted(set(groups[test].tolist())),
                             "n_test_patches": int(len(test))})
    predicted = out_of_fold >= threshold
    positives, negatives = y == TUMOUR, y == NOT_TUMOUR
    final = _fit(x, y, values)
    classifier = TumourClassifier(final, data.encoder, fingerprint)
    metrics = {
        "classifier_version": CLASSIFIER_VERSION,
        "training_fingerprint": fingerprint,
        "model": "StandardScaler -> LogisticRegression(class_weight='balanced', lbfgs)",
        "settings": values,
        "encoder": data.encoder,
        "cv": "slide-grouped StratifiedGroupKFold",
        "cv_auc": float(roc_auc_score(y, out_of_fold)),
        "fold_aucs": [f["auc"] for f in fold_reports],
        "n_folds": len(folds),
        "folds": fold_reports,
        "threshold": float(threshold),
        "cv_sensitivity": float(predicted[positives].mean()),
        "cv_specificity": float((~predicted[negatives]).mean()),
        "n_slides": sum(1 for s in data.slides if s.n_used),
        "n_patients": len({s.patient_id for s in data.slides if s.n_used}),
        "n_patches": {"tumour": int(positives.sum()), "not_tumour": int(negatives.sum())},
        "slides": [asdict(s) for s in data.slides],
    }
    return TrainedClassifier(classifier, metrics)


def slide_folds(labels, groups, cv_folds: int, seed: int) -> list[tuple[Any, Any]]:
    """(train rows, test rows) of slide-grouped, class-stratified folds: min(cv_folds, slides) of them, fewer when a
    fold's training slides would lack a class. Raises TumourClassifierError when not even 2 folds can."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_slides = len(set(groups.tolist()))
    for n_splits in range(min(cv_folds, n_slides), 1, -1):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": by design
            warnings.simplefilter("ignore", UserWarning)
            folds = list(splitter.split(np.zeros(len(labels)), labels, groups))
        if all(len(set(labels[train].tolist())) == 2 for train, _ in folds):
            return folds
    raise TumourClassifierError(f"no slide-grouped split of {n_slides} slides leaves both classes in every fold's "
                                "training slides; annotate tumour and node regions on more slides")


def write_trained(trained: TrainedClassifier, folder: str | os.PathLike) -> dict[str, Path]:
    """The classifier file and its metrics in `folder` (a version folder being staged), each written atomically."""
    folder = Path(folder)
    return {
        CLASSIFIER_FILE.name: save_classifier(trained.classifier, CLASSIFIER_FILE.in_folder(folder)),
        CLASSIFIER_METRICS.name: atomic_write_json(CLASSIFIER_METRICS.in_folder(folder), trained.metrics),
    }


# ---------------------------------------------------------------- helpers


def _unique(slides: Sequence[AnnotatedSlide]) -> list[AnnotatedSlide]:
    seen: dict[str, AnnotatedSlide] = {}
    for slide in slides:
        if slide.slide_id in seen:
            raise TumourClassifierError(f"slide {slide.slide_id} is listed twice in the training set "
                                        f"({seen[slide.slide_id].features_path}, {slide.features_path})")
        seen[slide.slide_id] = slide
    return list(seen.values())


def _annotation_sha256(slide: AnnotatedSlide) -> str:
    try:
        return sha256_file(slide.annotation_path)
    except OSError as exc:
        raise TumourClassifierError(f"{slide.annotation_path}: cannot read the annotation file: {exc}") from None


def _grid_of(path: Path):
    """(coords (N, 2) level-0 corners, patch side in level-0 px, level-0 (width, height) or None) of a feature
    file; the side and dimensions are the tiling's attributes, carried on its `coords` dataset."""
    try:
        with h5py.File(path, "r") as fh:
            dataset = fh["coords"]
            coords = np.asarray(dataset[:], dtype=np.int64).reshape(-1, 2)
            attrs = dict(dataset.attrs)
            n_features = int(fh["features"].shape[0])
    except (OSError, KeyError) as exc:
        raise TumourClassifierError(f"{path}: cannot read patch features: {type(exc).__name__}: {exc}") from None
    if n_features != len(coords):
        raise TumourClassifierError(f"{path}: {n_features} feature rows but {len(coords)} coords (an unfinished file)")
    side = float(attrs.get("patch_size_level0", 0) or 0)
    if side <= 0:
        raise TumourClassifierError(f"{path}: the patch side (coords attribute `patch_size_level0`) is not recorded")
    width, height = attrs.get("level0_width"), attrs.get("level0_height")
    dimensions = (int(width), int(height)) if width is not None and height is not None else None
    return coords, side, dimensions


def _sample(rows, limit: int, seed: int, slide_id: str):
    """At most `limit` of `rows`, sorted; the draw depends on the seed and the slide only (not on the other
    slides or their order)."""
    if len(rows) <= limit:
        return rows
    slide_seed = int(hashlib.sha256(slide_id.encode()).hexdigest()[:16], 16)
    rng = np.random.default_rng([seed, slide_seed])
    return np.sort(rng.choice(rows, size=limit, replace=False))


def _rows(path: Path, rows) -> Any:
    """Rows `rows` (sorted) of the file's `features`, as float32, read a chunk at a time (chunks without a chosen
    row are not read)."""
    parts = []
    with h5py.File(path, "r") as fh:
        features = fh["features"]
        for start in range(0, features.shape[0], READ_CHUNK_ROWS):
            stop = start + READ_CHUNK_ROWS
            chosen = rows[(rows >= start) & (rows < stop)]
            if len(chosen):
                parts.append(np.asarray(features[start:stop], dtype=np.float32)[chosen - start])
    block = np.concatenate(parts)
    if not np.isfinite(block).all():
        raise TumourClassifierError(f"{path}: non-finite feature values in annotated patches")
    return block


def _fit(x, y, values: Mapping[str, Any]):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(
        C=values["C"], class_weight="balanced", solver="lbfgs", max_iter=MAX_ITER, random_state=values["seed"]))
    return model.fit(np.asarray(x, dtype=np.float64), y)
