"""Risk model: no leakage in the CV, the planted signal is found, missing modalities, skops round trip."""

import io
import zipfile

import numpy as np
import pyarrow as pa
import pytest
import skops.io as sio
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gcmlm_assets.cohort.tables import cohort_data
from gcmlm_assets.cohort.model import crossval
from gcmlm_assets.cohort.card import plots
from gcmlm_assets.cohort.model import metrics as model_metrics
from gcmlm_assets.cohort.model import modelling as M
from gcmlm_assets.cohort.model import model_settings
from gcmlm_assets.cohort.model import training
from gcmlm_assets.cohort.tables import qc
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.cohort.synthetic import cohort_table, make_cohort

FAST = M.ModelSettings(n_splits=5, n_repeats=3, n_bootstrap=300)


def fused_cv_auc(table: pa.Table, settings: M.ModelSettings) -> dict:
    data = cohort_data.CohortData.from_table(table, settings.blocks())
    metrics, _ = model_metrics.evaluate_cross_validation(crossval.cross_validate(data, settings), settings)
    return metrics


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(60, seed=11)


def test_planted_signal_is_found(cohort):
    metrics = fused_cv_auc(cohort_table(*cohort), FAST)
    assert metrics["fused"]["auc"] > 0.8, model_metrics.ablation_markdown(metrics)
    assert metrics["fused"]["auc_ci_low"] > 0.5
    for model in ("radiology", "pathology", "fused"):
        m = metrics[model]
        assert m["patients"] == 60 and m["auc_ci_low"] < m["auc"] < m["auc_ci_high"]
        assert 0 <= m["sensitivity"] <= 1 and 0 <= m["specificity"] <= 1 and 0 <= m["brier"] <= 1
    assert qc.cv_auc_reported(metrics).passed


def leaky_cv_auc(features: np.ndarray, labels: np.ndarray) -> float:
    """A deliberately wrong procedure: features chosen on ALL patients, then cross-validated."""
    chosen = SelectKBest(f_classif, k=10).fit(features, labels).transform(features)
    predictions = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression()), chosen, labels,
                                    cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    return float(model_metrics._rank_auc(predictions[labels == 1, 1], predictions[labels == 0, 1]))


def test_permuted_labels_give_chance_auc_and_leakage_would_show(cohort):
    """With every fitted step inside the folds, shuffled labels cannot be predicted: the fused CV
    AUC stays within 0.5 +/- 0.15 for each of three permutations. The single-block AUCs get a
    wider band (0.2) because CV AUC of a strongly shrunk model is known to fall BELOW 0.5 under
    the null (each test fold's class balance mirrors its training fold's); above-chance values
    are what leakage would produce. The control, feature selection outside the folds on the same
    shuffled labels, lands well above the band, so the test can tell the difference."""
    ids, labels, radiomics, pathology = cohort
    honest, leaky = [], []
    for permutation_seed in (1, 2, 3):
        permuted = np.random.default_rng(permutation_seed).permutation(labels)
        metrics = fused_cv_auc(cohort_table(ids, permuted, radiomics, pathology), FAST)
        table = model_metrics.ablation_markdown(metrics)
        assert abs(metrics["fused"]["auc"] - 0.5) <= 0.15, table
        assert metrics["fused"]["auc_ci_low"] < 0.5 < metrics["fused"]["auc_ci_high"], table
        assert qc.cv_auc_reported(metrics).outcome == qc.WARN
        for block in ("radiology", "pathology"):
            assert abs(metrics[block]["auc"] - 0.5) <= 0.2, table
        honest.append(metrics["fused"]["auc"])
        leaky.append(leaky_cv_auc(np.hstack([radiomics, pathology]), permuted))
    assert abs(np.mean(honest) - 0.5) <= 0.1, honest
    assert np.mean(leaky) > 0.65 and all(bad > good for bad, good in zip(leaky, honest)), (leaky, honest)


@pytest.mark.parametrize("fusion", ["mean", "stacked"])
def test_missing_modality_patients_are_scored_and_evaluated(fusion):
    ids, labels, radiomics, pathology = make_cohort(40, seed=5)
    no_rad, no_path = {"P001", "P007", "P012"}, {"P002", "P015"}
    table = cohort_table(ids, labels, radiomics, pathology, without_radiology=no_rad, without_pathology=no_path,
                         unknown={"P003", "P007"})
    settings = M.ModelSettings(n_repeats=2, n_bootstrap=200, fusion=fusion)
    data = cohort_data.CohortData.from_table(table, settings.blocks())
    cv = crossval.cross_validate(data, settings)
    metrics, curves = model_metrics.evaluate_cross_validation(cv, settings)
    assert metrics["fused"]["patients"] == 38  # every labelled patient, whatever modality they lack
    assert metrics["radiology"]["patients"] == 38 - 2 and metrics["pathology"]["patients"] == 38 - 2
    assert metrics["fused_all_modalities"]["patients"] == 38 - 4
    assert set(curves["fused"]) == {"roc", "calibration", "decision_curve"}

    model, fitted = training.fit_risk_model(data, settings, metrics["fused"]["youden_threshold"])
    scores = {r["patient_id"]: r for r in model.score_table(table).to_pylist()}
    assert sorted(scores) == ids  # unlabelled and single-modality patients included
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    if fusion == "mean":  # one block: exactly its probability; both: the mean of the two logits
        expected = lambda rad, path: np.mean([v for v in (rad, path) if v is not None])  # noqa: E731
    else:  # intercept + non-negative weights x logits + the availability indicators of the blocks present
        c = model.combiner
        assert (c.weights_ >= 0).all() and c.indicator_blocks_.all()  # both blocks are missing for someone
        expected = lambda rad, path: c.intercept_ + sum(  # noqa: E731
            w * v + i for w, v, i in zip(c.weights_, (rad, path), c.indicator_weights_) if v is not None)
    for patient_id in no_rad:
        row = scores[patient_id]
        assert row["modalities_used"] == "pathology" and row["probability_radiology"] is None
    for patient_id in no_path:
        assert scores[patient_id]["modalities_used"] == "radiology"
    for row in scores.values():
        rad, path = (None if row[f"probability_{b}"] is None else logit(row[f"probability_{b}"])
                     for b in ("radiology", "pathology"))
        assert logit(row["probability"]) == pytest.approx(expected(rad, path), abs=1e-6)
    assert scores["P007"]["mlm"] is None
    assert all(r["risk_group"] == ("high" if r["probability"] >= model.risk_threshold else "low")
               for r in scores.values())
    assert qc.scores_valid(model.score_table(table), ids).passed
    assert fitted["radiology"]["selected_features"] and fitted["pathology"]["pca_components"] == 8


@pytest.mark.parametrize("classifier", ["logistic", "svm", "random_forest"])
def test_skops_round_trip_gives_identical_predictions(tmp_path, classifier):
    ids, labels, radiomics, pathology = make_cohort(30, seed=8)
    table = cohort_table(ids, labels, radiomics, pathology, without_radiology={"P004"})
    settings = M.ModelSettings(classifier=classifier, n_repeats=1, n_bootstrap=50)
    data = cohort_data.CohortData.from_table(table, settings.blocks())
    model, _ = training.fit_risk_model(data, settings, 0.5)
    path = M.save_model(model, tmp_path / "model.skops")
    loaded = M.load_model(path)
    before, after = model.predict_proba(table), loaded.predict_proba(table)
    assert np.all(np.isfinite(before)) and np.all((before >= 0) & (before <= 1))
    np.testing.assert_array_equal(before, after)
    assert loaded.score_table(table).equals(model.score_table(table))
    assert not path.read_bytes().startswith(b"\x80")  # a zip archive, not a pickle stream


class Unlisted:
    """A type no model file should contain."""


def test_loading_refuses_types_off_the_trusted_list(tmp_path):
    ids, labels, radiomics, pathology = make_cohort(24, seed=9)
    table = cohort_table(ids, labels, radiomics, pathology)
    model, _ = training.fit_risk_model(cohort_data.CohortData.from_table(table, FAST.blocks()), FAST, 0.5)
    model.settings = {**model.settings, "smuggled": Unlisted()}
    path = tmp_path / "model.skops"
    sio.dump(model, path)
    with pytest.raises(M.UntrustedModelFile, match="test_modelling.Unlisted"):
        M.load_model(path)


def test_a_model_file_written_before_cohort_was_split_still_loads(tmp_path):
    ids, labels, radiomics, pathology = make_cohort(24, seed=9)
    table = cohort_table(ids, labels, radiomics, pathology)
    model, _ = training.fit_risk_model(cohort_data.CohortData.from_table(table, FAST.blocks()), FAST, 0.5)
    M.save_model(model, tmp_path / "new.skops")
    # the same file as the flat cohort/ wrote it: its classes named by gcmlm_assets.cohort.<module>
    former = tmp_path / "former.skops"
    with zipfile.ZipFile(tmp_path / "new.skops") as new, zipfile.ZipFile(former, "w") as old:
        for entry in new.infolist():
            content = new.read(entry)
            old.writestr(entry, content.replace(b"gcmlm_assets.cohort.model.", b"gcmlm_assets.cohort.")
                         if entry.filename == "schema.json" else content)
    assert "gcmlm_assets.cohort.modelling.FusedRiskModel" in sio.get_untrusted_types(file=former)
    loaded = M.load_model(former, sha256_file(former))
    assert isinstance(loaded, M.FusedRiskModel)
    assert loaded.score_table(table).equals(model.score_table(table))


def test_too_few_labels_is_a_clear_error():
    ids, labels, radiomics, pathology = make_cohort(20, seed=2, positive_fraction=0.15)
    table = cohort_table(ids, labels, radiomics, pathology)
    with pytest.raises(model_settings.InsufficientLabels, match="min_labelled_per_class"):
        crossval.cross_validate(cohort_data.CohortData.from_table(table, FAST.blocks()), FAST)


def test_auc_check_warns_when_the_ci_includes_chance_and_fails_without_an_auc():
    chance = qc.cv_auc_reported({"fused": {"auc": 0.62, "auc_ci_low": 0.45, "auc_ci_high": 0.78}})
    assert chance.outcome == qc.WARN and chance.found == "AUC 0.620, 95 % CI 0.450-0.780"
    assert chance.expected == "a cross-validated AUC whose 95 % CI lies above 0.5"
    assert qc.cv_auc_reported({"fused": {"auc": 0.9, "auc_ci_low": 0.8, "auc_ci_high": 0.97}}).passed
    assert qc.cv_auc_reported({"fused": {"patients": 3, "note": "too few"}}).outcome == qc.ERROR
    assert qc.cv_auc_reported({}).outcome == qc.ERROR


def test_scores_check_fails_on_bad_probabilities_and_unscored_patients():
    scores = pa.table({"patient_id": ["a", "b", "c"], "probability": [0.2, float("nan"), 1.3],
                       "risk_group": ["low", "high", "high"]})
    verdict = qc.scores_valid(scores, ["a", "b", "c", "d"])
    assert verdict.outcome == qc.ERROR
    assert "b=nan" in verdict.description and "c=1.3" in verdict.description and "d" in verdict.description
    assert verdict.expected == "4 patient(s) scored once each, probabilities finite in [0, 1], risk group high or low"
    assert verdict.found == "2 of 3 scores outside [0, 1]: b (nan); c (1.3); 1 of 4 patient(s) not scored: d"
    assert verdict.metadata["bad_probabilities"] == 2 and verdict.metadata["not_scored"] == 1


def test_rank_auc_and_net_benefit_match_definitions():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50), 1)  # ties count half
    rank_auc = model_metrics._rank_auc(scores[labels == 1], scores[labels == 0])
    assert rank_auc == pytest.approx(roc_auc_score(labels, scores))
    # net benefit of treating everyone equals the treat-all line
    nb = model_metrics.net_benefit(labels, np.ones(50), np.array([0.2]))
    prevalence = labels.mean()
    assert nb[0] == pytest.approx(prevalence - (1 - prevalence) * 0.25)


def test_the_score_distribution_is_drawn_with_no_scores_at_all():
    # A cohort whose patients all lack features scores nobody: the picture says so instead of failing.
    from PIL import Image

    png = plots.plot_score_distribution([], threshold=0.4)
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG" and picture.width >= 800


def test_a_class_of_one_is_refused_as_a_setting():
    """The cross-validation needs two patients of each class: a minimum of 1 would let training
    reach scikit-learn's k-fold with one split and fail there, unexplained."""
    import pydantic

    from gcmlm_assets.cohort.resources import RiskModelSettings

    with pytest.raises(pydantic.ValidationError, match="min_labelled_per_class"):
        RiskModelSettings(min_labelled_per_class=1)
    assert RiskModelSettings(min_labelled_per_class=2).min_labelled_per_class == 2
