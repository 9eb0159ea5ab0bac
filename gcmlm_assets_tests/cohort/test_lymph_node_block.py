"""The lymph-node block (issue 24) on the cohort side: fused_table reads the patients' lymph_nodes rows
(null T/MLN kept null, broken rows named and left out), the risk model gets a block, an ablation row
and exact per-feature contributions, risk_scores a column, and a cohort without lymph-node slides
gets exactly the results it got before the block existed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.cohort.card import card_context
from gcmlm_assets.cohort.card import model_card as MC
from gcmlm_assets.cohort.explain import explanations as E
from gcmlm_assets.cohort.explain import patient_explanation
from gcmlm_assets.cohort.model import crossval, metrics, modelling, training
from gcmlm_assets.cohort.model.model_settings import (
    FUSED, FUSED_COMPLETE, FUSED_WITH_LYMPH_NODE, ModelSettings, model_labels)
from gcmlm_assets.cohort.tables.clinical import parse_clinical_csv
from gcmlm_assets.cohort.tables.cohort_data import LYMPH_NODE_COLUMNS, CohortData
from gcmlm_assets.cohort.tables.fusion import (
    AVAILABILITY, LYMPH_NODE, PATHOLOGY, RADIOLOGY, build_fused_table, fused_stats)
from gcmlm_assets_tests.support.cohort.lymph_nodes import lymph_node_rows, write_lymph_node_row
from gcmlm_assets_tests.support.cohort.synthetic import make_cohort, write_radiomics_row, write_slide_vector

PATHOLOGY_DIMS = 16  # slide vectors cut short: the tests are about the lymph-node block
FAST = ModelSettings(n_splits=3, n_repeats=1, n_bootstrap=50, pca_components=4, abmil_in_ablation=False)
LN_COLUMNS = ["has_lymph_node", "ln_n_slides", *LYMPH_NODE_COLUMNS]


@dataclasses.dataclass(frozen=True)
class SettingsBeforeLymphNodes(ModelSettings):
    """The blocks as they were before issue 24: what the model did without a lymph-node block."""

    def blocks(self):
        return tuple(b for b in super().blocks() if b != LYMPH_NODE)

    def fusion_blocks(self):
        return tuple(b for b in super().fusion_blocks() if b != LYMPH_NODE)


def clinical_table(ids, labels):
    parsed, problems = parse_clinical_csv("patient_id,mlm\n" + "".join(f"{p},{y}\n" for p, y in zip(ids, labels)))
    assert problems == []
    return parsed.table


def write_cohort(artifacts, n, *, seed=3, signal=1.0, lymph_nodes=lambda i: True, ln_signal=1.0):
    ids, labels, radiomics, pathology = make_cohort(n, seed=seed, signal=signal)
    rows = lymph_node_rows(labels, seed=seed, signal=ln_signal)
    for i, patient_id in enumerate(ids):
        write_radiomics_row(artifacts, patient_id, radiomics[i])
        write_slide_vector(artifacts, patient_id, pathology[i, :PATHOLOGY_DIMS])
        if lymph_nodes(i):
            write_lymph_node_row(artifacts, patient_id, **rows[i])
    return ids, labels


def without_lymph_node_columns(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in LN_COLUMNS if c in table.column_names])


# ---------------------------------------------------------------- fused_table


def test_fused_table_reads_the_lymph_node_rows_and_names_the_broken_ones(tmp_path):
    artifacts = tmp_path / "artifacts"
    ids, labels = write_cohort(artifacts, 8, lymph_nodes=lambda i: False)
    plain, plain_report = build_fused_table(artifacts, clinical_table(ids, labels))

    write_lymph_node_row(artifacts, "P000", n_slides=2, n_nodes=6, n_metastatic_nodes=2, tumour_area_mm2=3.0,
                         metastatic_node_area_mm2=12.0, t_mln=0.25)
    write_lymph_node_row(artifacts, "P001", n_nodes=5)  # no metastatic node: T/MLN null, a value
    broken = {
        "P002": (dict(n_metastatic_nodes=2, tumour_area_mm2=1.0, metastatic_node_area_mm2=5.0, t_mln=None),
                 "t_mln is null although n_metastatic_nodes is 2"),
        "P003": (dict(n_metastatic_nodes=1, tumour_area_mm2=6.5, metastatic_node_area_mm2=5.0, t_mln=1.3),
                 "t_mln is 1.3, outside [0, 1]"),
        "P004": (dict(n_metastatic_nodes=0, t_mln=0.2), "T/MLN is undefined (null) without a metastatic node"),
        "P005": (dict(n_nodes=2, n_metastatic_nodes=3, tumour_area_mm2=1.0, metastatic_node_area_mm2=4.0, t_mln=0.25),
                 "n_metastatic_nodes (3) exceeds n_nodes (2)"),
    }
    for patient_id, (values, _) in broken.items():
        write_lymph_node_row(artifacts, patient_id, **values)
    missing = write_lymph_node_row(artifacts, "P006", n_nodes=3)
    pq.write_table(pq.read_table(missing).drop_columns(["tumour_area_mm2"]), missing)
    broken["P006"] = (None, "lacks the lymph-node column(s) tumour_area_mm2")

    table, report = build_fused_table(artifacts, clinical_table(ids, labels))

    # every column from before stays as it was; the block's come after them, the flag first (then
    # the delta block's flag: no patient has two CT scans)
    assert table.column_names[:plain.num_columns - 2] == plain.column_names[:-2] == \
        without_lymph_node_columns(table).column_names[:-1]
    assert table.column_names[plain.num_columns - 2:] == [*LN_COLUMNS, "has_delta"]
    assert without_lymph_node_columns(table).equals(without_lymph_node_columns(plain))
    assert plain.column("has_lymph_node").to_pylist() == [False] * 8 and plain_report.file_problems == []
    rows = {r["patient_id"]: r for r in table.to_pylist()}
    assert {c: rows["P000"][c] for c in LN_COLUMNS} == {
        "has_lymph_node": True, "ln_n_slides": 2, "ln_n_nodes": 6, "ln_n_metastatic_nodes": 2,
        "ln_tumour_area_mm2": 3.0, "ln_metastatic_node_area_mm2": 12.0, "ln_t_mln": 0.25}
    assert rows["P001"]["has_lymph_node"] and rows["P001"]["ln_n_metastatic_nodes"] == 0
    assert rows["P001"]["ln_t_mln"] is None  # null, not 0 and not NaN
    assert table.schema.field("ln_n_nodes").type == pa.int64() and table.schema.field("ln_t_mln").type == pa.float64()
    for patient_id in (*broken, "P007"):  # broken rows (and no row) leave the block out
        assert not rows[patient_id]["has_lymph_node"] and rows[patient_id]["ln_n_nodes"] is None
        assert rows[patient_id]["has_radiology"] and rows[patient_id]["has_pathology"]
    problems = {p["patient_id"]: p for p in report.file_problems}
    assert set(problems) == set(broken)
    for patient_id, (_, reason) in broken.items():
        assert problems[patient_id]["modality"] == LYMPH_NODE and reason in problems[patient_id]["reason"]
        assert problems[patient_id]["file"].endswith(f"lymph_nodes/{patient_id}/lymph_nodes.parquet")
    assert fused_stats(table)["with_lymph_node"] == 2

    # the model's matrix: a null T/MLN is NaN there (the pipeline turns it into 0 plus an indicator)
    data = CohortData.from_table(table, (LYMPH_NODE,))
    assert data.blocks[LYMPH_NODE].columns == list(LYMPH_NODE_COLUMNS)
    assert data.blocks[LYMPH_NODE].available.tolist() == [True, True] + [False] * 6
    assert np.isnan(data.blocks[LYMPH_NODE].X[1, -1]) and data.blocks[LYMPH_NODE].X[1, 0] == 5.0


def test_a_lymph_node_row_without_an_analysed_slide_is_not_a_present_block(tmp_path):
    artifacts = tmp_path / "artifacts"
    ids, labels = write_cohort(artifacts, 4, lymph_nodes=lambda i: False)
    write_lymph_node_row(artifacts, "P000", n_slides=0, n_nodes=0)  # an empty row
    write_lymph_node_row(artifacts, "P001", n_slides=0)  # nodes claimed from no slide
    write_lymph_node_row(artifacts, "P002", n_slides=None)
    write_lymph_node_row(artifacts, "P003", n_slides=1)  # the one present block

    table, report = build_fused_table(artifacts, clinical_table(ids, labels))

    assert table.column("has_lymph_node").to_pylist() == [False, False, False, True]
    assert table.column("ln_n_nodes").to_pylist() == [None, None, None, 4]
    assert fused_stats(table)["with_lymph_node"] == 1
    problems = {p["patient_id"]: p for p in report.file_problems}
    assert set(problems) == {"P000", "P001", "P002"}
    for patient_id, problem in problems.items():
        assert problem["modality"] == LYMPH_NODE and "no lymph-node slide analysed" in problem["reason"]
        assert problem["file"].endswith(f"lymph_nodes/{patient_id}/lymph_nodes.parquet")


# ---------------------------------------------------------------- without lymph-node slides


@pytest.mark.parametrize("fusion", ["mean", "stacked"])
def test_without_lymph_node_slides_the_model_is_the_one_from_before(tmp_path, fusion):
    artifacts = tmp_path / "artifacts"
    ids, labels = write_cohort(artifacts, 24, signal=0.8, lymph_nodes=lambda i: False)
    fused, _ = build_fused_table(artifacts, clinical_table(ids, labels))
    before_table = without_lymph_node_columns(fused)  # the fused table as it was before the block
    settings = dataclasses.replace(FAST, fusion=fusion)
    before = SettingsBeforeLymphNodes(**dataclasses.asdict(settings))

    # the same training rows and hash: risk_model is not refitted for the new column
    now_rows = training.training_table(fused, settings.blocks())
    before_rows = training.training_table(before_table, before.blocks())
    assert now_rows.equals(before_rows)
    assert training.training_data_sha256(now_rows) == training.training_data_sha256(before_rows)

    results = {}
    for name, table, chosen in (("now", fused, settings), ("before", before_table, before)):
        data = CohortData.from_table(training.training_table(table, chosen.blocks()), chosen.blocks())
        cv = crossval.cross_validate(data, chosen)
        found, _ = metrics.evaluate_cross_validation(cv, chosen)
        model, fitted = training.fit_risk_model(data, chosen, 0.5)
        modelling.save_model(model, tmp_path / f"{name}.skops")
        results[name] = (found, model.score_table(table), fitted, crossval.cv_predictions_table(cv))
    now, then = results["now"], results["before"]
    assert now[0] == then[0]  # every row, every metric
    assert (tmp_path / "now.skops").read_bytes() == (tmp_path / "before.skops").read_bytes()
    assert now[1].equals(then[1]) and now[3].equals(then[3])
    assert now[2].pop(LYMPH_NODE) == {"fitted": False, "reason": "no labelled patient has lymph_node inputs"}
    assert now[2] == then[2]


# ---------------------------------------------------------------- with lymph-node slides


@pytest.fixture(scope="module")
def node_cohort(tmp_path_factory):
    """36 patients, 27 with lymph-node slides; the label shows in T/MLN and barely elsewhere."""
    artifacts = tmp_path_factory.mktemp("cohort") / "artifacts"
    ids, labels = write_cohort(artifacts, 36, seed=5, signal=0.2, lymph_nodes=lambda i: i % 4 != 0)
    fused, report = build_fused_table(artifacts, clinical_table(ids, labels))
    assert report.file_problems == []
    data = CohortData.from_table(training.training_table(fused, FAST.blocks()), FAST.blocks())
    cv = crossval.cross_validate(data, FAST)
    found, _ = metrics.evaluate_cross_validation(cv, FAST)
    model, fitted = training.fit_risk_model(data, FAST, 0.5)
    return fused, data, found, model, fitted, cv


def test_the_ablation_has_a_lymph_node_row_and_the_other_blocks_rows_are_unchanged(node_cohort):
    fused, _, found, _, fitted, _ = node_cohort
    with_nodes = int(np.sum(fused.column("has_lymph_node").to_pylist()))
    assert found[LYMPH_NODE]["patients"] == with_nodes == 27
    assert found[LYMPH_NODE]["auc"] > 0.8  # T/MLN carries the label
    assert found[FUSED_WITH_LYMPH_NODE]["patients"] == 27 and found[FUSED]["patients"] == 36
    assert FUSED_COMPLETE not in found  # everyone has radiology and pathology: no row of its own
    assert "calibration_slope" in found[LYMPH_NODE] and "net_benefit" in found[LYMPH_NODE]
    assert fitted[LYMPH_NODE]["train_patients"] == 27
    assert fitted[LYMPH_NODE]["features"] == [*LYMPH_NODE_COLUMNS, "missingindicator_ln_t_mln"]
    table = metrics.ablation_markdown(found, model_labels(FAST))
    assert "| lymph nodes (counts, areas, T/MLN) | 27 (" in table and "patients with lymph-node slides" in table

    # the same cohort without the lymph-node block: its radiology and pathology rows, exactly
    plain = without_lymph_node_columns(fused)
    data = CohortData.from_table(training.training_table(plain, FAST.blocks()), FAST.blocks())
    plain_found, _ = metrics.evaluate_cross_validation(crossval.cross_validate(data, FAST), FAST)
    assert LYMPH_NODE not in plain_found and FUSED_WITH_LYMPH_NODE not in plain_found
    for block in (RADIOLOGY, PATHOLOGY):
        assert found[block] == plain_found[block]


def test_fused_all_modalities_does_not_require_lymph_nodes(node_cohort):
    data = node_cohort[1]
    # two patients lose their pathology: the row is the patients with radiology AND pathology, with
    # lymph-node slides or not
    lacking = np.flatnonzero(data.blocks[PATHOLOGY].available)[:2]
    data.blocks[PATHOLOGY].available[lacking] = False
    try:
        cv = crossval.cross_validate(data, FAST)
    finally:
        data.blocks[PATHOLOGY].available[lacking] = True
    assert FUSED_COMPLETE in cv.models() and FUSED_WITH_LYMPH_NODE in cv.models()
    labels, _ = cv.model_predictions(FUSED_COMPLETE)
    assert len(labels) == len(cv.labels) - 2


def test_lymph_node_contributions_add_up_and_scores_name_the_block(node_cohort, tmp_path):
    fused, model = node_cohort[0], node_cohort[3]
    modelling.save_model(model, tmp_path / "model.skops")
    loaded = modelling.load_model(tmp_path / "model.skops")  # the trusted types cover the block's imputer
    assert loaded.blocks == (RADIOLOGY, PATHOLOGY, LYMPH_NODE)

    scores = loaded.score_table(fused)
    assert scores.column("probability").to_pylist() == model.score_table(fused).column("probability").to_pylist()
    rows = {r["patient_id"]: r for r in scores.to_pylist()}
    flags = dict(zip(fused.column("patient_id").to_pylist(), fused.column(AVAILABILITY[LYMPH_NODE]).to_pylist()))
    for patient_id, row in rows.items():
        if flags[patient_id]:
            assert 0 < row["probability_lymph_node"] < 1 and "lymph_node" in row["modalities_used"]
            assert row["modalities_missing"] == ""
        else:
            assert row["probability_lymph_node"] is None and row["modalities_missing"] == "lymph_node"

    data = loaded.cohort_data(fused)
    block = data.blocks[LYMPH_NODE]
    pipeline = loaded.pipelines[LYMPH_NODE]
    assert not E.exact_contributions_available(pipeline)[0] and E.feature_split_available(pipeline) == (True, "")
    null_t_mln = [i for i in np.flatnonzero(block.available) if np.isnan(block.X[i, -1])]
    with_t_mln = [i for i in np.flatnonzero(block.available) if np.isfinite(block.X[i, -1])]
    assert null_t_mln and with_t_mln
    logits = loaded.block_logits(data)
    k = loaded.blocks.index(LYMPH_NODE)
    for i in (null_t_mln[0], with_t_mln[0]):
        explanation = patient_explanation.explain_patient(loaded, data, i, [])
        parts = explanation.feature_contributions[LYMPH_NODE]
        assert parts.names == [*LYMPH_NODE_COLUMNS, "missingindicator_ln_t_mln"]
        assert abs(parts.logit - logits[i, k]) <= patient_explanation.EXACT_TOLERANCE
        assert abs(explanation.residuals[LYMPH_NODE]) <= patient_explanation.EXACT_TOLERANCE
        # relative to the training average: the intercept is the average patient's block logit
        row = next(r for r in explanation.combination if r["term"] == LYMPH_NODE)
        assert row["reference_logit"] == pytest.approx(parts.intercept, abs=1e-12)
        assert explanation.reference_fused_logit is not None
        indicator = parts.values[parts.names.index("missingindicator_ln_t_mln")]
        assert (indicator > 0) == (i == null_t_mln[0])  # 1 standardised above the training share
        noted = any("T/MLN is undefined" in note for note in explanation.notes)
        assert noted == (i == null_t_mln[0])
    without = next(i for i in range(len(data.patient_ids)) if not block.available[i])
    explanation = patient_explanation.explain_patient(loaded, data, without, [])
    assert explanation.modalities_missing == [LYMPH_NODE] and LYMPH_NODE not in explanation.feature_contributions


def test_the_model_card_lists_the_block_and_says_its_figures_are_not_clinical(node_cohort, tmp_path):
    _, data, found, model, fitted, cv = node_cohort
    records = card_context.CohortRecords(clinical_manifest={}, fusion_report={}, fused_path=tmp_path / "fused.parquet",
                                         encoder=None)
    card = MC.model_card(model, FAST, fitted, found, cv, {},
                         **card_context.card_context(records, data, cv, FAST, model, found,
                                                     {"sha256": "x", "patch_features_sha256": None}))
    markdown = MC.model_card_markdown(MC.json_safe(card))
    assert MC.LYMPH_NODE_DATA == ("No public lymph-node slides with annotations are available offline here: the "
                                  "lymph-node block has been exercised on synthetic slides only; its figures are "
                                  "not clinical.")
    assert f"- {MC.LYMPH_NODE_DATA}" in markdown
    assert "- lymph_node: 27 training patients" in markdown
    assert "features: " + ", ".join([*LYMPH_NODE_COLUMNS, "missingindicator_ln_t_mln"]) in markdown
    assert "| lymph_node | 9 | 36 |" in markdown  # missing data: the patients without lymph-node slides
    assert "| lymph nodes (counts, areas, T/MLN) | 27 (" in markdown
    assert "lymph_node (where the patient has lymph-node slides)" in card["strategy"]


def test_risk_scores_and_the_fhir_assessment_carry_the_block(node_cohort, tmp_path):
    from datetime import datetime, timezone

    from gcmlm_assets.cohort.columns import RISK_SCORES_COLUMNS
    from gcmlm_assets.cohort.exchange import fhir_risk
    from gcmlm_assets.columns import problems
    from gcmlm_assets.storage import sha256_file

    fused, model = node_cohort[0], node_cohort[3]
    scores = model.score_table(fused)
    scores = (scores.append_column("model_version", pa.array(["v1"] * scores.num_rows, pa.string()))
              .append_column("explanation_key", pa.array(["k"] * scores.num_rows, pa.string())))
    assert problems(RISK_SCORES_COLUMNS, [(f.name, str(f.type)) for f in scores.schema]) == []
    path = modelling.save_model(model, tmp_path / "model.skops")
    identity = fhir_risk.RiskModel(version="v1", sha256=sha256_file(path), risk_threshold=model.risk_threshold)
    rows = {r["patient_id"]: r for r in scores.to_pylist()}
    with_nodes = next(p for p, r in rows.items() if r["probability_lymph_node"] is not None)
    without = next(p for p, r in rows.items() if r["probability_lymph_node"] is None)
    when = datetime(2026, 12, 7, tzinfo=timezone.utc)
    text, missing = fhir_risk.risk_assessment_bundle(rows[with_nodes], identity, when)
    assert missing == [] and f"lymph_nodes/{with_nodes}" in text and "lymph_node model probability" in text
    text, missing = fhir_risk.risk_assessment_bundle(rows[without], identity, when)
    assert missing == [LYMPH_NODE] and f"lymph_nodes/{without}" not in text and "Scored without lymph_node" in text
