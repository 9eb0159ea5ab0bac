"""The lymph-node tumour classifier: trained on annotated slides' feature files (real HDF5 files, real sklearn),
cross-validated by slide, saved and loaded with skops, refusing what it cannot train on or apply, and its
training-set fingerprint (synthetic embeddings: figures here say nothing clinical)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression

from gcmlm_assets.catalogue import CLASSIFIER_FILE, CLASSIFIER_METRICS, TUMOUR_CLASSIFIER
from gcmlm_assets.pathology.lymph_nodes.classifier_training import (
    AnnotatedSlide, assemble_training_set, fit_tumour_classifier, slide_folds, training_set_fingerprint,
    write_trained,
)
from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import (
    CLASSIFIER_VERSION, TumourClassifierError, TumourClassifierFields, load_classifier, save_classifier,
)
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.pathology.ln_fixtures import (
    annotation, grid, polygon, square, write_annotations, write_feature_file,
)

DIM, SIDE, COLS = 16, 256, 10
SETTINGS = TumourClassifierFields()
# (patient, slide, tumour box in patches (col0, row0, col1, row1) or None): 3 patients, 6 slides, one without tumour
SLIDES = [("P1", "LN-1", (1, 1, 5, 5)), ("P1", "LN-2", (3, 2, 7, 6)), ("P2", "LN-1", (0, 4, 4, 8)),
          ("P2", "LN-2", None), ("P3", "LN-1", (4, 4, 8, 8)), ("P3", "LN-2", (2, 0, 6, 4))]
NODE_PATCHES = 8  # the node covers the top-left 8 x 8 patches of the 10 x 10 grid


def write_slides(folder: Path, *, shift: float, seed: int = 0, dim: int = DIM, encoder: dict | None = None,
                 slides=SLIDES) -> list[AnnotatedSlide]:
    """Feature files and annotations of `slides`; tumour patches' embeddings moved by `shift` on 4 dimensions."""
    rng = np.random.default_rng(seed)
    coords = grid(COLS, COLS, SIDE)
    annotated = []
    for patient, name, box in slides:
        features = rng.normal(size=(len(coords), dim)) + rng.normal(scale=0.3, size=dim)  # a per-slide offset
        shapes = [annotation(polygon(square(0, 0, NODE_PATCHES * SIDE, NODE_PATCHES * SIDE)), "Lymph node")]
        if box is not None:
            x0, y0, x1, y1 = (v * SIDE for v in box)
            shapes.append(annotation(polygon(square(x0, y0, x1, y1)), "Tumor"))
            centre = coords + SIDE / 2
            tumour = (centre[:, 0] > x0) & (centre[:, 0] < x1) & (centre[:, 1] > y0) & (centre[:, 1] < y1)
            features[tumour, :4] += shift
        h5 = write_feature_file(folder / patient / f"{name}.h5", features, coords, side=SIDE,
                                dimensions=(COLS * SIDE, COLS * SIDE), encoder=encoder)
        geojson = write_annotations(folder / patient / "ln_annotations" / f"{name}.geojson", shapes)
        annotated.append(AnnotatedSlide(patient, name, h5, sha256_file(h5), geojson))
    return annotated


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    slides = write_slides(tmp_path_factory.mktemp("separable"), shift=2.0)
    return slides, fit_tumour_classifier(slides, SETTINGS)


def test_separable_embeddings_give_a_high_slide_level_cv_auc(separable):
    slides, trained = separable
    metrics = trained.metrics
    assert metrics["cv_auc"] > 0.9
    assert all(auc is None or auc > 0.8 for auc in metrics["fold_aucs"])
    assert (metrics["n_slides"], metrics["n_patients"], metrics["n_folds"]) == (6, 3, 5)
    assert metrics["n_patches"] == {"tumour": 5 * 16, "not_tumour": 6 * NODE_PATCHES**2 - 5 * 16}
    assert metrics["threshold"] == 0.5 and metrics["cv_sensitivity"] > 0.8 and metrics["cv_specificity"] > 0.8
    assert metrics["encoder"] == {"encoder": "test-encoder", "embedding_dim": DIM, "checkpoint_sha256": "c" * 64}
    assert metrics["classifier_version"] == CLASSIFIER_VERSION == TUMOUR_CLASSIFIER.code_version
    # what a sensor computes from the manifests' digests is what the trained classifier records
    assert metrics["training_fingerprint"] == training_set_fingerprint(slides, SETTINGS)
    assert trained.classifier.training_fingerprint == metrics["training_fingerprint"]
    # every slide is tested in exactly one fold
    tested = [slide for fold in metrics["folds"] for slide in fold["test_slides"]]
    assert sorted(tested) == sorted(s.slide_id for s in slides)


def test_the_folds_never_split_a_slide(separable):
    slides, _ = separable
    data = assemble_training_set(slides, SETTINGS)
    folds = slide_folds(data.labels, data.groups, SETTINGS.cv_folds, SETTINGS.seed)
    assert len(folds) == 5
    for train, test in folds:
        assert not set(data.groups[train]) & set(data.groups[test])
        assert set(data.labels[train].tolist()) == {0, 1}
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(len(data.labels)))


def test_random_embeddings_give_an_auc_near_one_half(tmp_path):
    trained = fit_tumour_classifier(write_slides(tmp_path, shift=0.0, seed=1), SETTINGS)
    assert 0.3 < trained.metrics["cv_auc"] < 0.7


def test_the_classifier_round_trips_through_skops_with_reproducible_bytes(separable, tmp_path):
    slides, trained = separable
    written = write_trained(trained, tmp_path / "v1")
    assert set(written) == {CLASSIFIER_FILE.name, CLASSIFIER_METRICS.name}
    path = CLASSIFIER_FILE.in_folder(tmp_path / "v1")
    loaded = load_classifier(path, sha256=sha256_file(path))
    coords, probability = loaded.predict_feature_file(slides[0].features_path)
    _, expected = trained.classifier.predict_feature_file(slides[0].features_path)
    np.testing.assert_array_equal(probability, expected)
    assert coords.shape == (COLS * COLS, 2) and loaded.training_fingerprint == trained.metrics["training_fingerprint"]
    tumour = ((coords // SIDE >= (1, 1)) & (coords // SIDE < (5, 5))).all(axis=1)
    assert probability[tumour].mean() > 0.8 > 0.2 > probability[~tumour].mean()
    # the same model, the same bytes (its published version is named by them)
    assert save_classifier(trained.classifier, tmp_path / "again.skops").read_bytes() == path.read_bytes()
    metrics = json.loads(CLASSIFIER_METRICS.in_folder(tmp_path / "v1").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["cv_auc"] == trained.metrics["cv_auc"]


def test_loading_refuses_a_changed_file_and_another_object(separable, tmp_path):
    _, trained = separable
    path = save_classifier(trained.classifier, tmp_path / CLASSIFIER_FILE.name)
    with pytest.raises(TumourClassifierError, match=f"{path}: SHA-256 .* differs from {'0' * 64}"):
        load_classifier(path, sha256="0" * 64)
    other = tmp_path / "other.skops"
    sio.dump(LogisticRegression(), other)
    with pytest.raises(TumourClassifierError, match=f"{other}: holds a LogisticRegression, not a TumourClassifier"):
        load_classifier(other)
    junk = tmp_path / "junk.skops"
    junk.write_bytes(b"not a zip")
    with pytest.raises(TumourClassifierError, match=f"{junk}: not a readable skops classifier file"):
        load_classifier(junk)


def test_prediction_refuses_features_of_another_dimension_or_encoder(separable, tmp_path):
    _, trained = separable
    classifier = trained.classifier
    with pytest.raises(TumourClassifierError, match=r"features of shape \(3, 17\); this classifier reads \(N, 16\)"):
        classifier.predict_tumour_probability(np.zeros((3, DIM + 1)))
    wider = write_slides(tmp_path / "wider", shift=0.0, dim=DIM + 1, slides=SLIDES[:1])[0]
    with pytest.raises(TumourClassifierError, match=f"{wider.features_path}: features of encoder .*retrain"):
        classifier.predict_feature_file(wider.features_path)
    other = write_slides(tmp_path / "other", shift=0.0, encoder={"checkpoint_sha256": "d" * 64}, slides=SLIDES[:1])[0]
    with pytest.raises(TumourClassifierError, match=f"{other.features_path}: features of encoder .*'d{{64}}'"):
        classifier.predict_feature_file(other.features_path)
    assert classifier.predict_tumour_probability(np.zeros((0, DIM))).shape == (0,)


def test_training_refuses_mixed_encoders_too_few_slides_and_a_missing_class(tmp_path):
    slides = write_slides(tmp_path / "a", shift=2.0, slides=SLIDES[:3])
    mixed = write_slides(tmp_path / "b", shift=2.0, encoder={"encoder": "another"}, slides=SLIDES[3:4])
    with pytest.raises(TumourClassifierError, match=f"{mixed[0].features_path}: features of encoder .*share one"):
        fit_tumour_classifier(slides + mixed, SETTINGS)
    with pytest.raises(TumourClassifierError, match="2 annotated lymph-node slide\\(s\\) .* min_annotated_slides = 3"):
        fit_tumour_classifier(slides[:2], SETTINGS)
    no_tumour = write_slides(tmp_path / "c", shift=2.0, slides=[(p, n, None) for p, n, _ in SLIDES[:3]])
    with pytest.raises(TumourClassifierError, match="tumour patches on 0 of 3 annotated slide"):
        fit_tumour_classifier(no_tumour, SETTINGS)
    one_tumour = write_slides(tmp_path / "d", shift=2.0, slides=SLIDES[1:4][::-1])[:2] + no_tumour[:1]
    with pytest.raises(TumourClassifierError, match="tumour patches on 1 of 3 .* at least 2 slides"):
        fit_tumour_classifier(one_tumour, SETTINGS)
    outside = write_annotations(tmp_path / "e" / "far.geojson",
                                [annotation(polygon(square(0, 0, 99_999, 10)), "Lymph node")])
    with pytest.raises(TumourClassifierError, match=f"{outside}: .*outside the slide's level-0 2560 x 2560 px"):
        fit_tumour_classifier(slides[:2] + [dataclasses.replace(slides[2], annotation_path=outside)], SETTINGS)


def test_the_fingerprint_reads_no_features_and_follows_annotations_features_and_settings(tmp_path):
    slides = write_slides(tmp_path, shift=2.0, slides=SLIDES[:3])
    unread = [dataclasses.replace(s, features_path=tmp_path / "absent.h5") for s in slides]
    first = training_set_fingerprint(unread, SETTINGS)
    assert training_set_fingerprint(unread[::-1], SETTINGS) == first == training_set_fingerprint(slides, SETTINGS)
    assert training_set_fingerprint(unread, dataclasses.replace(SETTINGS, C=0.5)) != first
    assert training_set_fingerprint(unread[:2], SETTINGS) != first
    assert training_set_fingerprint([dataclasses.replace(unread[0], features_sha256="0" * 64), *unread[1:]],
                                    SETTINGS) != first
    path = slides[0].annotation_path
    collection = json.loads(path.read_text())
    collection["features"][1]["geometry"] = polygon(square(0, 0, 512, 512))
    path.write_text(json.dumps(collection))
    assert training_set_fingerprint(unread, SETTINGS) != first
