"""No identifying value of the clinical file reaches the cohort outputs, the explanations, the model
card, their metadata or the event log.

clinical.csv carries identifying values where a hospital export puts them by mistake: in the label
and covariate columns of unknown patients and of a known one, and a name in the id column (every
such row is refused, its problem recorded by line and column, never with the value).
clinical_table -> fused_table -> risk_model (with its model card) -> risk_scores ->
risk_explanations run on a real instance; every file under the artifacts root, every
materialization's and check's metadata, the runs' event logs and the instance's home are searched.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from gcmlm_assets.catalogue import RISK_EXPLANATIONS
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import explanation_assets
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.cohort.explained_cohort import QUICK, write_patient_files
from gcmlm_assets_tests.support.cohort.synthetic import make_cohort, write_clinical_csv
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results
from gcmlm_assets_tests.support.phi_search import PATIENT_KEYWORDS, found_in, leaks_in_run, leaks_under


def test_no_identifying_value_of_the_clinical_file_reaches_explanations_the_model_card_or_the_log(
        data_root: Path, instance, base_resources):
    ids, labels, radiomics, pathology = make_cohort(24, seed=4)
    store = ArtifactStore(data_root / "artifacts")
    write_patient_files(store, ids, radiomics, pathology)
    values = PATIENT_KEYWORDS
    misplaced = [f"P998,{values['PatientName']},{values['PatientBirthDate']},{values['AccessionNumber']}",
                 f"P999,{values['PatientID']},1,2",
                 f"{values['PatientName']},0,50,20",  # not an id of ours: a name in the id column
                 f"{ids[-1]},1,{values['PatientBirthDate']},{values['InstitutionName']}"]
    clinical = write_clinical_csv(data_root / "landing", ids[:-1], labels[:-1], extra_lines=misplaced)
    assert set(found_in(clinical.read_bytes())) >= {"ZZSECRETNAME", "ZZSECRETID123", "19010203", "ZZACC98765",
                                                   "ZZSECRET HOSPITAL"}
    add_patients(instance, ids)
    report_sound_results(instance, store.root, ids)
    resources = {**base_resources, "risk_model": RiskModelSettings(**QUICK)}

    cohort = dg.materialize(cohort_assets.ASSETS, instance=instance, resources=resources, raise_on_error=False)
    assert cohort.success, [e.step_failure_data.error for e in cohort.get_step_failure_events()]
    explained = dg.materialize([*cohort_assets.ASSETS, *explanation_assets.ASSETS], instance=instance,
                               resources=resources, partition_key=ids[0],
                               selection=[RISK_EXPLANATIONS.key], raise_on_error=False)
    assert explained.success, [e.step_failure_data.error for e in explained.get_step_failure_events()]

    written = {str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file()}
    assert any(name.startswith("risk_model/") and name.endswith("model_card.json") for name in written), written
    assert any(name.startswith(f"risk_explanations/{ids[0]}/") for name in written), written
    assert leaks_under(store.root) == {}
    assert leaks_in_run(instance, cohort) == [] and leaks_in_run(instance, explained) == []
    assert leaks_under(Path(instance.root_directory)) == {}
