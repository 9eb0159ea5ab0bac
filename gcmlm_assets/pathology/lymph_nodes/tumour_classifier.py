"""The patch-level tumour classifier of lymph-node slides: its settings, the fitted model, its file (plain Python,
no Dagster). classifier_training.py trains it; lymph_nodes applies it to every patch of a slide.

The model is StandardScaler -> LogisticRegression (class_weight="balanced") on the encoder's patch embeddings. It
only means something on embeddings of the encoder it was trained on, so it carries that encoder's identity (name,
embedding dimension, checkpoint sha256, as the feature files record them) and refuses features of another.

Its file is skops (never pickle), written with reproducible bytes (gcmlm_assets/skops_bytes.py: the same model,
the same bytes, so an unchanged retraining publishes no new version) and loaded only with the explicit list of
types in TRUSTED_TYPES; with the sha256 its version pointer pinned, a file changed after publishing is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from gcmlm_assets.catalogue import TUMOUR_CLASSIFIER
from gcmlm_assets.lazy import lazy
from gcmlm_assets.setting_fields import setting
from gcmlm_assets.storage import DigestMismatch, atomic_path, read_pinned_bytes

np = lazy("numpy")
h5py = lazy("h5py")

# tumour_classifier's code version (catalogue.py): bump it there when training would give another model for the
# same annotated slides and settings. It is in the training set's fingerprint.
CLASSIFIER_VERSION = TUMOUR_CLASSIFIER.code_version
# With balanced class weights the two classes weigh the same in the fit, so 0.5 is the neutral cut.
DEFAULT_TUMOUR_THRESHOLD = 0.5
# What identifies the embedding space (the feature files' attributes, written by extract.py).
ENCODER_KEYS = ("encoder", "embedding_dim", "checkpoint_sha256")
PREDICTION_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class TumourClassifierFields:
    """The tumour_classifier resource's settings (a resource inherits these fields: see setting_fields.py)."""

    cv_folds: Annotated[int, setting(
        "slide-level cross-validation folds (fewer when there are fewer annotated slides)", ge=2)] = 5
    min_annotated_slides: Annotated[int, setting(
        "refuse to train on fewer annotated slides with labelled patches", ge=2)] = 3
    C: Annotated[float, setting("inverse L2 penalty strength of the logistic regression", gt=0)] = 1.0
    max_patches_per_slide: Annotated[int, setting(
        "labelled patches drawn per slide at most (a seeded sample), which bounds training memory", ge=10)] = 2000
    seed: Annotated[int, setting("seed of the folds and of the per-slide sample")] = 0


class TumourClassifierError(ValueError):
    """The classifier cannot be trained, loaded or applied (the message names the file or the slides)."""


class TumourClassifier:
    """The fitted pipeline, the identity of the encoder whose embeddings it reads, and the training set it saw."""

    def __init__(self, pipeline: Any, encoder: Mapping[str, Any], training_fingerprint: str):
        self.pipeline = pipeline
        self.encoder = {key: _plain(encoder[key]) for key in ENCODER_KEYS}
        self.encoder["embedding_dim"] = self.embedding_dim = int(self.encoder["embedding_dim"])
        self.training_fingerprint = training_fingerprint
        self.version = CLASSIFIER_VERSION

    def predict_tumour_probability(self, features, encoder: Mapping[str, Any] | None = None, *,
                                   source: str = "features"):
        """(N,) tumour probability of patch embeddings `features` (N, D). `encoder`: the identity recorded with
        them; given, it must be this classifier's. `source` names them in errors."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.embedding_dim:
            raise TumourClassifierError(
                f"{source}: features of shape {features.shape}; this classifier reads (N, {self.embedding_dim}) "
                f"embeddings of encoder {self.encoder['encoder']!r}")
        if encoder is not None:
            self.check_encoder(encoder, source)
        if not len(features):
            return np.zeros(0, dtype=np.float64)
        if not np.isfinite(features).all():
            raise TumourClassifierError(f"{source}: non-finite feature values")
        return self.pipeline.predict_proba(features.astype(np.float64, copy=False))[:, 1]

    def predict_feature_file(self, path: str | os.PathLike):
        """(coords (N, 2) int64 level-0 corners, tumour probability (N,)) of every patch of one slide's feature file,
        after checking that the file's encoder is this classifier's."""
        path = Path(path)
        identity = feature_file_encoder(path)
        self.check_encoder(identity, str(path))
        try:
            with h5py.File(path, "r") as fh:
                dataset = fh["features"]
                coords = np.asarray(fh["coords"][:], dtype=np.int64).reshape(-1, 2)
                parts = [self.predict_tumour_probability(dataset[start : start + PREDICTION_CHUNK_ROWS],
                                                         source=str(path))
                         for start in range(0, dataset.shape[0], PREDICTION_CHUNK_ROWS)]
        except (OSError, KeyError) as exc:
            raise TumourClassifierError(f"{path}: cannot read patch features: {type(exc).__name__}: {exc}") from None
        probability = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
        if len(probability) != len(coords):
            raise TumourClassifierError(f"{path}: {len(probability)} feature rows but {len(coords)} coords")
        return coords, probability

    def check_encoder(self, identity: Mapping[str, Any], source: str) -> None:
        found = {key: _plain(identity.get(key)) for key in ENCODER_KEYS}
        try:
            found["embedding_dim"] = int(found["embedding_dim"])
        except (TypeError, ValueError):
            pass  # unequal to this classifier's int: refused below, the value shown as found
        mine = self.encoder
        if found != mine:
            raise TumourClassifierError(f"{source}: features of encoder {found}, but this classifier was trained on "
                                        f"{mine}; retrain tumour_classifier on these features")


def feature_file_encoder(path: str | os.PathLike) -> dict[str, Any]:
    """The encoder identity a feature file records ({encoder, embedding_dim, checkpoint_sha256})."""
    try:
        with h5py.File(path, "r") as fh:
            attrs = {key: _plain(fh.attrs[key]) for key in ENCODER_KEYS if key in fh.attrs}
            dim = int(fh["features"].shape[1]) if fh["features"].ndim == 2 else None
    except (OSError, KeyError) as exc:
        raise TumourClassifierError(f"{path}: cannot read patch features: {type(exc).__name__}: {exc}") from None
    missing = [key for key in ENCODER_KEYS if attrs.get(key) in (None, "")]
    if missing:
        raise TumourClassifierError(f"{path}: encoder identity not recorded (attributes {missing} missing)")
    attrs["embedding_dim"] = int(attrs["embedding_dim"])
    if dim != attrs["embedding_dim"]:
        raise TumourClassifierError(f"{path}: `features` has {dim} columns but records embedding_dim "
                                    f"{attrs['embedding_dim']}")
    return attrs


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


# ---------------------------------------------------------------- the file

TRUSTED_TYPES = [
    "numpy.dtype",
    f"{__name__}.TumourClassifier",
]


def save_classifier(classifier: TumourClassifier, path: str | os.PathLike) -> Path:
    import skops.io as sio

    from gcmlm_assets.skops_bytes import normalise_skops_file

    with atomic_path(path) as tmp:
        sio.dump(classifier, tmp)
        normalise_skops_file(tmp)
    return Path(path)


def load_classifier(path: str | os.PathLike, sha256: str | None = None,
                    pinned_by: str = "its version pointer") -> TumourClassifier:
    """Load with skops, refusing any type outside TRUSTED_TYPES (skops' own defaults aside). With `sha256` (what the
    pointer `pinned_by` recorded) the bytes are read once, checked and loaded from memory."""
    import skops.io as sio

    path = Path(path)
    try:
        data = read_pinned_bytes(path, sha256) if sha256 is not None else path.read_bytes()
    except DigestMismatch as mismatch:
        raise TumourClassifierError(f"{path}: SHA-256 {mismatch.found} differs from {sha256} recorded by {pinned_by}; "
                                    "the classifier file changed after it was published and is not loaded "
                                    "(re-materialize tumour_classifier)") from None
    except OSError as exc:
        raise TumourClassifierError(f"{path}: cannot read the classifier: {exc}") from None
    try:
        untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)
        if untrusted:
            raise TumourClassifierError(f"{path}: refusing to load types not on the trusted list: {sorted(untrusted)}")
        classifier = sio.loads(data, trusted=TRUSTED_TYPES)
    except TumourClassifierError:
        raise
    except Exception as exc:  # skops raises a variety of errors on a file that is not one of its own
        raise TumourClassifierError(f"{path}: not a readable skops classifier file: {type(exc).__name__}: {exc}") \
            from None
    if not isinstance(classifier, TumourClassifier):
        raise TumourClassifierError(f"{path}: holds a {type(classifier).__name__}, not a TumourClassifier")
    return classifier
