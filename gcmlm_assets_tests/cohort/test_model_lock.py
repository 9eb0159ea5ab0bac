"""risk_model is locked between deliberate changes: a new patient without a label is scored by the
installed model, which refits only when a label, a labelled patient's features or a setting changes.
Real cohort assets in a real Dagster instance; the patients' upstream results are recorded as sound
(upstream.report_sound_results), so each refresh is the cohort run alone."""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster._serdes import serialize_value

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import risk_model_asset
from gcmlm_assets.cohort.model import training
from gcmlm_assets.cohort.model.model_settings import ModelSettings
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.storage import read_version_pointer
from gcmlm_assets_tests.support.cohort.synthetic import (
    make_cohort, write_clinical_csv, write_cohort_files, write_radiomics_row, write_slide_vector)
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results

FAST = RiskModelSettings(n_splits=3, n_repeats=1, n_bootstrap=100, min_labelled_per_class=3, inner_splits=3,
                         abmil_in_ablation=False)
TRAINING_LOG = "cross-validated"  # the first line a fit logs


def refresh(instance, resources, settings=FAST) -> tuple[dg.ExecuteInProcessResult, dict]:
    result = dg.materialize(cohort_assets.ASSETS, instance=instance, resources={**resources, "risk_model": settings})
    assert result.success
    metadata = {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}
    return result, metadata


def value(materialization, key: str):
    return materialization.metadata[key].value


def trained(instance, result) -> bool:
    return any(TRAINING_LOG in (entry.user_message or "") for entry in instance.all_logs(result.run_id))


def add_patient(data_root, instance, patient_id: str, seed: int) -> None:
    """A new drop's features (radiology and pathology), recorded as sound results."""
    _, _, radiomics, pathology = make_cohort(1, seed=seed)
    write_radiomics_row(data_root / "artifacts", patient_id, radiomics[0])
    write_slide_vector(data_root / "artifacts", patient_id, pathology[0])
    add_patients(instance, [patient_id])
    report_sound_results(instance, data_root / "artifacts", [patient_id])


def cohort(data_root, instance, unknown: set[str]):
    ids, labels = write_cohort_files(data_root, 14, seed=8, unknown_labels=unknown)
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)
    return ids, labels


def scores(data_root) -> dict[str, float]:
    table = pq.read_table(data_root / "artifacts" / "risk_scores" / "scores.parquet")
    return dict(zip(table.column("patient_id").to_pylist(), table.column("probability").to_pylist()))


def test_a_new_unlabelled_patient_is_scored_by_the_installed_model_without_a_refit(data_root, instance,
                                                                                     base_resources):
    ids, labels = cohort(data_root, instance, unknown={"P013"})
    first, made = refresh(instance, base_resources)
    root = data_root / "artifacts" / "risk_model"
    pointer = read_version_pointer(root)
    model_file = root / pointer["version"] / "model.skops"
    model_bytes, model_written = model_file.read_bytes(), model_file.stat().st_mtime_ns
    assert value(made["risk_model"], "status") == "trained" and trained(instance, first)
    before = scores(data_root)

    # A new patient without a label, and new features for the patient who has none either (P013 with
    # a clinical row, P900 without one yet): the fused table changes, the training data does not.
    add_patient(data_root, instance, "P900", seed=31)
    write_radiomics_row(data_root / "artifacts", "P013", make_cohort(1, seed=32)[2][0])
    report_sound_results(instance, data_root / "artifacts", ["P013"])
    second, kept = refresh(instance, base_resources)

    assert kept["fused_table"].tags["dagster/data_version"] != made["fused_table"].tags["dagster/data_version"]
    model = kept["risk_model"]
    assert not trained(instance, second)
    assert value(model, "status") == risk_model_asset.REUSED and value(model, "version") == pointer["version"]
    assert model.tags["dagster/data_version"] == made["risk_model"].tags["dagster/data_version"]
    assert read_version_pointer(root) == pointer and {p.name for p in root.iterdir()} == {"current.json",
                                                                                         pointer["version"]}
    assert model_file.read_bytes() == model_bytes and model_file.stat().st_mtime_ns == model_written
    assert "P900" not in (model_file.parent / "model_card.md").read_text(encoding="utf-8")
    # The re-statement is small: the card and plots stay on the materialization that trained the model.
    assert value(model, "card_and_plots_in_run") == first.run_id
    assert not {"model_card", "model_card_json", "plot_roc"} & set(model.metadata)
    assert len(serialize_value(model.metadata)) < 4_000 < len(serialize_value(made["risk_model"].metadata))
    # risk_scores scores the new patient with the installed model; the others keep their scores.
    assert value(kept["risk_scores"], "risk_model_version") == pointer["version"]
    after = scores(data_root)
    assert set(after) == set(before) | {"P900"} and 0 <= after["P900"] <= 1
    assert {p: after[p] for p in before if p != "P013"} == {p: before[p] for p in before if p != "P013"}
    assert after["P013"] != before["P013"]

    # Another seed is a deliberate change: a refit. Back to seed 0, the same training data gives the same
    # model files, hence the same version name: the patients added since are not part of it.
    _, reseeded = refresh(instance, base_resources, RiskModelSettings(**{**FAST.model_dump(), "seed": 1}))
    assert value(reseeded["risk_model"], "status") == "trained"
    assert value(reseeded["risk_model"], "version") != pointer["version"]
    third, back = refresh(instance, base_resources)
    assert trained(instance, third) and value(back["risk_model"], "version") == pointer["version"]
    assert model_file.read_bytes() == model_bytes


def test_a_label_or_a_labelled_patients_features_refit_the_model(data_root, instance, base_resources):
    ids, labels = cohort(data_root, instance, unknown={"P013"})
    _, made = refresh(instance, base_resources)
    versions = [value(made["risk_model"], "version")]

    def refits() -> None:
        result, metadata = refresh(instance, base_resources)
        model = metadata["risk_model"]
        assert trained(instance, result) and value(model, "status") == "trained"
        assert value(model, "version") not in versions
        assert value(metadata["risk_scores"], "risk_model_version") == value(model, "version")
        versions.append(value(model, "version"))

    flipped = labels.copy()
    flipped[2] = 1 - flipped[2]  # a label corrected
    write_clinical_csv(data_root / "landing", ids, flipped, unknown={"P013"})
    refits()
    write_clinical_csv(data_root / "landing", ids, flipped)  # P013's label arrives
    refits()
    write_radiomics_row(data_root / "artifacts", "P001", make_cohort(1, seed=33)[2][0])  # a labelled patient's CT
    report_sound_results(instance, data_root / "artifacts", ["P001"])
    refits()


def fused_rows(rows: list[dict]) -> pa.Table:
    return pa.table({"patient_id": pa.array([r["id"] for r in rows], pa.string()),
                     "has_radiology": pa.array([r.get("has", r["rad"] is not None) for r in rows]),
                     "has_pathology": pa.array([False] * len(rows)), "has_clinical": pa.array([True] * len(rows)),
                     "mlm": pa.array([r["mlm"] for r in rows], pa.int8()),
                     "clin_age": pa.array([60.0] * len(rows)),
                     "rad_a": pa.array([r["rad"] for r in rows], pa.float64()),
                     "rad_only_unlabelled": pa.array([r.get("extra") for r in rows], pa.float64())})


def test_the_training_data_hash_covers_the_labelled_rows_the_fit_reads_and_nothing_else():
    blocks = ModelSettings().blocks()
    rows = [{"id": "P1", "mlm": 1, "rad": 1.5}, {"id": "P2", "mlm": 0, "rad": None},
            {"id": "P3", "mlm": None, "rad": 2.0, "extra": 7.0}]

    def digest(rows) -> str:
        return training.training_data_sha256(training.training_table(fused_rows(rows), blocks))

    table = training.training_table(fused_rows(rows), blocks)
    assert table.column("patient_id").to_pylist() == ["P1", "P2"]
    # no clinical block by default; a column only an unlabelled patient has values in is not read
    assert table.column_names == ["patient_id", "mlm", "has_radiology", "rad_a", "has_pathology"]
    reference = digest(rows)
    assert digest(rows[::-1]) == reference  # the file's row order
    assert digest(rows + [{"id": "P0", "mlm": None, "rad": 9.0}]) == reference  # a new unlabelled patient
    assert digest([*rows[:2], {**rows[2], "rad": 3.0}]) == reference  # an unlabelled patient's features
    assert digest([{**rows[0], "mlm": 0}, *rows[1:]]) != reference  # a label
    assert digest([rows[0], {**rows[1], "rad": 0.5}, rows[2]]) != reference  # a labelled patient's features
    assert digest([*rows[:2], {**rows[2], "mlm": 1}]) != reference  # a new label
    nan = [rows[0], {**rows[1], "rad": float("nan"), "has": False}, rows[2]]  # a NaN value is not a missing one
    assert digest(nan) != reference and np.isnan(training.training_table(fused_rows(nan), blocks)
                                                 .column("rad_a").to_pylist()[1])
