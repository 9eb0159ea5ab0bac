"""Exact explanations: per-feature and per-patch contributions add up to the fitted block's logit,
non-linear models refuse, the planted region is found, and the heatmap's colours mean what they say."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from gcmlm_assets import pictures
from gcmlm_assets.cohort.explain import explanations as E
from gcmlm_assets.cohort.model import modelling as M
from gcmlm_assets.cohort.model import training
from gcmlm_assets.cohort.model.combiners import PROBABILITY_CLIP
from gcmlm_assets.cohort.tables.fusion import CLINICAL, PATHOLOGY, RADIOLOGY
from gcmlm_assets.cohort.explain import heatmaps as H
from gcmlm_assets.pathology.pooling import MeanPooling, SlideFeatures
from gcmlm_assets_tests.support.cohort.synthetic import RADIOMICS_NAMES, make_cohort
from gcmlm_assets_tests.support.pictures import MIN_WIDTH, assert_ui_picture
from gcmlm_assets_tests.support.pathology.slide_fixtures import write_pyramid_tiff

SETTINGS = M.ModelSettings()
RAD_COLUMNS = ["rad_" + name for name in RADIOMICS_NAMES]


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(60, seed=7)


def assert_feature_split_exact(pipeline, columns, X):
    reference = pipeline.decision_function(X)
    for i, row in enumerate(X):
        split = E.feature_contributions(pipeline, columns, row)
        assert split.contributions.sum() + split.intercept == pytest.approx(reference[i], abs=1e-9)
        np.testing.assert_allclose(split.contributions, split.coefficients * split.values, rtol=0, atol=0)
    np.testing.assert_allclose(E.block_logit(pipeline, X), reference, rtol=0, atol=1e-12)
    return split


# ---------------------------------------------------------------- 1. exactness


def test_radiology_contributions_are_exact_and_named(cohort):
    _, labels, radiomics, _ = cohort
    pipeline = M.fit_block(RADIOLOGY, radiomics, labels, SETTINGS)
    assert E.exact_contributions_available(pipeline) == (True, "")
    split = assert_feature_split_exact(pipeline, RAD_COLUMNS, radiomics)
    # the names are the features the L1 step kept, as the model summary reports them
    assert split.names == training.describe_pipeline(RADIOLOGY, pipeline, RAD_COLUMNS)["selected_features"]
    assert "rad_original_shape_MeshVolume" in split.names
    weights, constant = E.affine_map(pipeline, radiomics.shape[1])
    assert weights.shape == (len(RAD_COLUMNS),)
    np.testing.assert_allclose(radiomics @ weights + constant, pipeline.decision_function(radiomics),
                               rtol=0, atol=1e-6)
    # columns the selectors dropped have no weight at all
    dropped = [j for j, name in enumerate(RAD_COLUMNS) if name not in split.names]
    kept = [RAD_COLUMNS.index(name) for name in split.names]
    assert np.all(np.abs(weights[dropped]) < 1e-12) and np.all(weights[kept] != 0)

    top = split.top(3)
    assert [abs(c) for *_, c in top] == sorted((abs(c) for c in split.contributions), reverse=True)[:3]
    table = split.markdown(n=2)
    assert table.splitlines()[0] == "| feature | value | coefficient | contribution |"
    assert top[0][0] in table and f"**{split.logit:+.3f}**" in table
    if len(split.names) > 2:
        assert f"({len(split.names) - 2} other features)" in table


@pytest.mark.filterwarnings("ignore:Skipping features without any observed values")
def test_clinical_contributions_follow_the_imputer_and_stay_exact_with_missing_values():
    rng = np.random.default_rng(4)
    n = 50
    labels = np.zeros(n, int)
    labels[rng.permutation(n)[:20]] = 1
    columns = ["clin_age", "clin_ca199", "clin_never_recorded", "clin_albumin"]
    X = np.column_stack([rng.normal(60, 10, n) + 8 * labels, rng.gamma(2, 20, n), np.full(n, np.nan),
                         rng.normal(40, 5, n)])
    X[rng.random((n, 4)) < 0.1] = np.nan  # gaps the imputer fills
    pipeline = M.fit_block(CLINICAL, X, labels, SETTINGS)
    split = assert_feature_split_exact(pipeline, columns, X)
    assert split.names == ["clin_age", "clin_ca199", "clin_albumin"]  # the empty column was dropped
    weights, constant = E.affine_map(pipeline, len(columns))
    assert weights[2] == 0.0
    finite = np.isfinite(X[:, [0, 1, 3]]).all(axis=1)
    # any finite value in the dropped column gives the same logit
    filled = np.where(np.isnan(X), 123.0, X)[finite]
    np.testing.assert_allclose(filled @ weights + constant, pipeline.decision_function(X[finite]), rtol=0, atol=1e-6)


def pathology_bags(vector, rng, slide_sizes=(37, 5, 101)):
    """Patch features of several slides whose mean over every patch is `vector` (float64)."""
    patches = rng.normal(scale=2.0, size=(sum(slide_sizes), vector.shape[0]))
    patches += vector - patches.mean(axis=0)
    return np.split(patches, np.cumsum(slide_sizes)[:-1])


def test_pathology_patch_contributions_sum_to_the_logit_of_the_mean(cohort, tmp_path):
    _, labels, _, pathology = cohort
    X = pathology.astype(np.float64)
    pipeline = M.fit_block(PATHOLOGY, X, labels, SETTINGS)
    columns = [f"path_feat_{j:04d}" for j in range(X.shape[1])]
    split = assert_feature_split_exact(pipeline, columns, X)
    assert split.names == [f"pca{k}" for k in range(SETTINGS.pca_components)]
    weights, constant = E.affine_map(pipeline, X.shape[1])
    reference = pipeline.decision_function(X)
    np.testing.assert_allclose(X @ weights + constant, reference, rtol=0, atol=1e-6)

    rng = np.random.default_rng(0)
    for i in range(len(X)):
        slides = pathology_bags(X[i], rng)
        total = sum(len(s) for s in slides)
        per_patch = [E.patch_contributions(weights, constant, s, np.full(len(s), 1.0 / total)) for s in slides]
        assert sum(p.sum() for p in per_patch) + constant == pytest.approx(reference[i], abs=1e-6)

    # Stored as float16 / float32 and pooled as the slide_vector asset pools them: still exact,
    # against the logit of the vector the pooling really produced.
    slides = []
    for index, (patches, dtype) in enumerate(zip(pathology_bags(X[0], rng), (np.float16, np.float32, np.float16))):
        path = tmp_path / f"slide{index}.h5"
        with h5py.File(path, "w") as fh:
            fh["features"] = patches.astype(dtype)
            fh["coords"] = np.column_stack([np.arange(len(patches)) * 256, np.full(len(patches), index * 256)])
        slides.append(SlideFeatures(path, chunk_rows=16))
    pooled = MeanPooling().pool(slides)
    per_slide = list(E.mean_pooled_patch_contributions(weights, constant, slides))
    assert [s.name for s in per_slide] == ["slide0", "slide1", "slide2"]
    assert [len(s.contributions) for s in per_slide] == [37, 5, 101]
    assert all(s.contributions.dtype == np.float64 for s in per_slide)
    np.testing.assert_array_equal(per_slide[2].coords[:, 0], np.arange(101) * 256)
    logit = E.block_logit(pipeline, pooled.vector[None, :])[0]
    assert sum(s.contributions.sum() for s in per_slide) + constant == pytest.approx(logit, abs=1e-6)

    # relative to the training cohort's average patient: the parts sum to logit - reference logit
    average = E.training_mean_input(pipeline, X.shape[1])
    reference_logit = E.reference_logit(pipeline, X.shape[1])
    relative = list(E.mean_pooled_patch_contributions(weights, constant, slides, average))
    assert sum(s.contributions.sum() for s in relative) + reference_logit == pytest.approx(logit, abs=1e-6)

    half = pathology_bags(X[0], rng)[0].astype(np.float16)
    exact = E.patch_contributions(weights, constant, half, 0.5)
    assert exact.dtype == np.float64
    np.testing.assert_allclose(exact, 0.5 * (half.astype(np.float64) @ weights), rtol=1e-12, atol=0)


def test_the_reference_is_the_training_cohorts_average_patient(cohort):
    _, labels, radiomics, pathology = cohort
    X = pathology.astype(np.float64)
    pipeline = M.fit_block(PATHOLOGY, X, labels, SETTINGS)
    average = E.training_mean_input(pipeline, X.shape[1])
    np.testing.assert_allclose(average, X.mean(axis=0), rtol=0, atol=1e-9)  # read from the model, no refit
    assert E.reference_logit(pipeline, X.shape[1]) == pytest.approx(pipeline.decision_function(average[None])[0],
                                                                     abs=1e-9)
    # a standardised block's intercept is the average patient's logit: its features are already relative
    rad = M.fit_block(RADIOLOGY, radiomics, labels, SETTINGS)
    split = E.feature_contributions(rad, RAD_COLUMNS, radiomics[0])
    assert E.reference_logit(rad, len(RAD_COLUMNS)) == pytest.approx(split.intercept, abs=1e-9)
    assert "| intercept (the average training patient's logit) |" in split.markdown()

    # a patient below the average patient gets parts that sum below zero (blue overall), however
    # far below zero the block's constant lies
    weights, constant = E.affine_map(pipeline, X.shape[1])
    logits = pipeline.decision_function(X)
    reference_logit = E.reference_logit(pipeline, X.shape[1])
    low = int(np.argmin(logits))
    parts = E.patch_contributions(weights, constant, X[low:low + 1], 1.0, average)
    assert parts.sum() == pytest.approx(logits[low] - reference_logit, abs=1e-9) and parts.sum() < 0
    shifted = E.patch_contributions(weights, constant - 100.0, X[low:low + 1], 1.0, average)
    np.testing.assert_allclose(shifted, parts, rtol=0, atol=0)  # the constant does not colour the patches


# ---------------------------------------------------------------- 2. non-linear models


@pytest.mark.parametrize("classifier", ["svm", "random_forest"])
def test_non_linear_blocks_report_no_exact_contributions(cohort, classifier):
    _, labels, radiomics, _ = cohort
    pipeline = M.fit_block(RADIOLOGY, radiomics, labels, M.ModelSettings(classifier=classifier))
    available, reason = E.exact_contributions_available(pipeline)
    assert not available
    assert reason.startswith(f"{classifier} is not linear") and "permutation importance" in reason
    with pytest.raises(E.NotExactlyExplainable, match="not linear"):
        E.affine_map(pipeline, radiomics.shape[1])
    with pytest.raises(E.NotExactlyExplainable):
        E.feature_contributions(pipeline, RAD_COLUMNS, radiomics[0])
    # the block logit is still defined: the log-odds of the clipped probability the fusion uses
    p = np.clip(pipeline.predict_proba(radiomics)[:, 1], PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    np.testing.assert_allclose(E.block_logit(pipeline, radiomics), np.log(p / (1 - p)), rtol=1e-12)


def test_a_non_affine_step_before_a_logistic_regression_is_refused(cohort):
    _, labels, radiomics, _ = cohort
    for step, words in ((SimpleImputer(add_indicator=True), "missingness indicators"),
                        (PolynomialFeatures(2), "not one of the affine steps")):
        pipeline = Pipeline([("first", step), ("scale", StandardScaler()),
                             ("classify", LogisticRegression(max_iter=2000))]).fit(radiomics[:, :4], labels)
        available, reason = E.exact_contributions_available(pipeline)
        assert not available and words in reason and "'first'" in reason


# ---------------------------------------------------------------- 3. localisation

GRID = 12
PATCH = 256


def grid_cohort(n=60, dim=128, shift=3.0, seed=0):
    """Patients with one 12x12-patch slide; positives carry a shift along one direction in the
    patches of the left third only."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    loadings = rng.normal(size=(4, dim)) / 2
    coords = np.array([(col * PATCH, row * PATCH) for row in range(GRID) for col in range(GRID)])
    region = coords[:, 0] < (GRID // 3) * PATCH
    labels = np.zeros(n, int)
    labels[rng.permutation(n)[: n // 2]] = 1
    bags = []
    for label in labels:
        patches = rng.normal(size=(GRID * GRID, dim)) + 0.5 * rng.normal(size=4) @ loadings
        if label:
            patches[region] += shift * direction
        bags.append(patches.astype(np.float32))
    return coords, region, labels, bags


def tissue_slide(path):
    rng = np.random.default_rng(2)
    side = GRID * PATCH
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[..., 0] = rng.integers(215, 235, (side, side))
    rgb[..., 1] = rng.integers(160, 190, (side, side))
    rgb[..., 2] = rng.integers(200, 225, (side, side))
    return write_pyramid_tiff(path, rgb, mpp=0.5)


def redness(rgb):
    return rgb[..., 0].astype(float) - rgb[..., 2].astype(float)


def test_top_patches_lie_in_the_planted_region_and_are_drawn_red(tmp_path):
    coords, region, labels, bags = grid_cohort()
    means = np.array([bag.astype(np.float64).mean(axis=0) for bag in bags])
    train = np.arange(40)
    pipeline = M.fit_block(PATHOLOGY, means[train], labels[train], SETTINGS)
    weights, constant = E.affine_map(pipeline, means.shape[1])
    held_out_positive = [i for i in range(40, len(bags)) if labels[i] == 1]
    assert len(held_out_positive) >= 5
    for i in held_out_positive:
        contributions = E.patch_contributions(weights, constant, bags[i], 1.0 / len(bags[i]))
        assert contributions.sum() + constant == pytest.approx(E.block_logit(pipeline, means[i:i + 1])[0], abs=1e-6)
        top = np.argsort(-contributions)[:10]
        assert region[top].mean() >= 0.8, (i, region[top])

    patient = held_out_positive[0]
    contributions = E.patch_contributions(weights, constant, bags[patient], 1.0 / GRID**2)
    slide = tissue_slide(tmp_path / "slide.tiff")
    title = f"patient {patient}: patch contributions"
    png = H.patch_value_heatmap(slide, coords, PATCH, contributions, "contribution", title)
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.format == "PNG"
        shown = np.asarray(opened.convert("RGB"))
    assert shown.shape[1] >= MIN_WIDTH
    full = pictures.save_png(png, tmp_path / "heatmap.png")
    assert_ui_picture(pictures.display_version(png, pictures.PHOTO, "heatmap").markdown("heatmap"), full)

    drawing = H.patch_value_drawing(slide, coords, PATCH, contributions, "contribution")
    assert drawing.note == "" and drawing.label == H.LABELS[H.CONTRIBUTION]
    assert "average training patient" in drawing.label and "red raises" in drawing.label
    height, width = drawing.rgb.shape[:2]
    assert max(height, width) == H.UI_SIDE_PX
    layout = H.figure_layout(width, height, title)
    crop = shown[layout.image_top:layout.image_top + height, layout.image_left:layout.image_left + width]
    assert np.abs(crop.astype(int) - drawing.rgb.astype(int)).mean() < 2  # drawn 1:1 where the layout says
    left = round(width * (GRID // 3) / GRID)
    assert redness(crop[:, :left]).mean() > redness(crop[:, left:]).mean() + 25


def test_full_resolution_is_the_slides_own_size_with_at_least_16_px_a_patch_up_to_the_cap(tmp_path):
    wide = np.array([(col * PATCH, row * PATCH) for row in range(20) for col in range(25)])
    drawing = H.patch_value_drawing(tmp_path / "gone.svs", wide, PATCH, np.ones(len(wide)), "attention",
                                    full_resolution=True)
    assert drawing.rgb.shape[1] == 25 * PATCH and drawing.scale == pytest.approx(1.0)  # level-0 size
    tiny = np.array([(col * 4, row * 4) for row in range(80) for col in range(400)])  # 4 px patches
    small = H.patch_value_drawing(tmp_path / "gone.svs", tiny, 4, np.ones(len(tiny)), "attention",
                                  full_resolution=True)
    assert small.scale * 4 >= 16 and small.rgb.shape[1] == 400 * 16
    strip = np.array([(col * PATCH, 0) for col in range(1000)])
    capped = H.patch_value_drawing(tmp_path / "gone.svs", strip, PATCH, np.ones(len(strip)), "attention",
                                   full_resolution=True)
    assert capped.rgb.shape[1] == H.FULL_MAX_SIDE_PX
    ui = H.patch_value_drawing(tmp_path / "gone.svs", wide, PATCH, np.ones(len(wide)), "attention")
    assert ui.rgb.shape[1] == H.UI_SIDE_PX


# ---------------------------------------------------------------- 4. legend and centring


def test_contribution_colours_are_centred_on_zero_even_when_all_values_are_positive(tmp_path):
    coords = np.array([(col * PATCH, row * PATCH) for row in range(4) for col in range(4)])
    values = np.concatenate([np.zeros(4), np.linspace(0.5, 3.0, 12)])  # nothing negative
    title = "all positive"
    png = H.patch_value_heatmap(tmp_path / "missing.svs", coords, PATCH, values, "contribution", title)
    drawing = H.patch_value_drawing(tmp_path / "missing.svs", coords, PATCH, values, "contribution")
    assert (drawing.vmin, drawing.vmax) == (-3.0, 3.0)
    assert drawing.note == "slide file not readable: patch layout only"
    with Image.open(io.BytesIO(png)) as opened:
        shown = np.asarray(opened.convert("RGB")).astype(int)
    layout = H.figure_layout(*drawing.rgb.shape[1::-1], f"{title}\n({drawing.note})")

    def patch_colour(k):
        left, top, right, bottom = drawing.patch_box(*coords[k], PATCH)
        return shown[layout.image_top + (top + bottom) // 2, layout.image_left + (left + right) // 2]

    for k in range(4):  # value 0: neutral (near white on the white canvas), not the scale's blue end
        colour = patch_colour(k)
        assert colour.min() > 225 and abs(colour[0] - colour[2]) < 10, colour
    hottest = patch_colour(15)  # the scale's dark red end, seen through the square's transparency
    assert hottest[0] - hottest[1] > 50 and hottest[0] - hottest[2] > 35, hottest

    # the colour bar: red at the top, blue at the bottom, neutral in the middle (zero)
    bar_x = layout.bar_left + layout.bar_width // 2
    height = drawing.rgb.shape[0]
    top, middle, bottom = (shown[layout.image_top + 3 + f * (height - 7) // 2, bar_x] for f in (0, 1, 2))
    assert top[0] - top[1] > 60 and top[0] - top[2] > 40 and bottom[2] - bottom[0] > 60, (top, bottom)
    assert middle.min() > 225, middle


def test_attention_uses_a_sequential_scale_from_zero(tmp_path):
    coords = np.array([(col * PATCH, 0) for col in range(4)])
    values = np.array([0.0, 0.1, 0.2, 0.7])
    drawing = H.patch_value_drawing(tmp_path / "missing.svs", coords, PATCH, values, "attention")
    assert (drawing.vmin, drawing.vmax) == (0.0, 0.7)
    assert drawing.label == "ABMIL attention (not a contribution)"
    low = drawing.rgb[drawing.rgb.shape[0] // 2, drawing.patch_box(*coords[0], PATCH)[0] + 5].astype(int)
    high = drawing.rgb[drawing.rgb.shape[0] // 2, drawing.patch_box(*coords[3], PATCH)[0] + 5].astype(int)
    assert low.sum() < high.sum() and low[2] > low[1]  # viridis: dark purple at 0, yellow at the top
    with pytest.raises(ValueError, match="kind must be one of"):
        H.patch_value_drawing(tmp_path / "missing.svs", coords, PATCH, values, "saliency")
