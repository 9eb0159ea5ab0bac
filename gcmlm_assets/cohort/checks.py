"""Asset checks of the cohort group: thin wrappers over the decisions in `tables/qc.py`.

Blocking where a downstream result would be wrong: duplicate fused rows, no CV AUC, invalid
scores. The last two (`cv_auc_reported`, `scores_valid`) run inside the risk_model and
risk_scores steps, before the new output is published: one that fails is moved into quarantine
and the published version stays the one risk_scores and the explanations read (a stand-alone
check would run after the output had become current). Bad clinical rows and misaligned
modalities are reported (ERROR/WARN) without blocking, because the rest of the cohort is still
right and one bad row must not stop it. Too few labelled
patients is a non-blocking WARN: risk_model itself waits for more and keeps its last good model.
"""

import json

import dagster as dg

from gcmlm_assets.catalogue import CLINICAL_PROBLEMS, FUSED_FILE, FUSION_REPORT
from gcmlm_assets.cohort.tables import fusion, qc
from gcmlm_assets.cohort.assets import clinical_table, fused_table
from gcmlm_assets.cohort.check_results import check_result as _result
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.resources import ArtifactStorage
from gcmlm_assets.lazy import lazy

pq = lazy("pyarrow.parquet")


def _missing(path) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR,
                               description=f"The file this check reads, {path}, does not exist; materialize the "
                                           "asset first.",
                               metadata={"expected": f"{path.name} present", "found": "missing",
                                         "missing": str(path)})


@dg.asset_check(asset=clinical_table, blocking=False,
                description="Every row of the clinical spreadsheet (clinical.csv) can be used: a patient id, a "
                "liver metastasis (MLM) status of 0, 1 or empty, and numbers where numbers belong. A bad row is "
                "left out of the analysis and named here with its line number and reason.")
def clinical_rows_valid(storage: ArtifactStorage) -> dg.AssetCheckResult:
    path = CLINICAL_PROBLEMS.path(storage.store())
    if not path.is_file():
        return _missing(path)
    return _result(qc.clinical_rows_valid(json.loads(path.read_text(encoding="utf-8"))))


@dg.asset_check(asset=fused_table, blocking=True,
                description="Each patient appears only once in the combined table of CT, slide and clinical "
                "data; a patient counted twice would weigh double in the model.")
def fused_ids_unique(storage: ArtifactStorage) -> dg.AssetCheckResult:
    path = FUSED_FILE.path(storage.store())
    if not path.is_file():
        return _missing(path)
    return _result(qc.fused_ids_unique(pq.read_table(path, columns=["patient_id"]).column(0).to_pylist()))


@dg.asset_check(asset=fused_table, blocking=False,
                description="Each patient's CT features, slide features and clinical row could all be used "
                "together. A feature file that cannot be used is an error (that part of the patient's data counts "
                "as missing); features without a clinical row, or a clinical row without features, are warnings.")
def modalities_aligned(storage: ArtifactStorage) -> dg.AssetCheckResult:
    path = FUSION_REPORT.path(storage.store())
    if not path.is_file():
        return _missing(path)
    return _result(qc.modalities_aligned(json.loads(path.read_text(encoding="utf-8"))))


@dg.asset_check(asset=fused_table, blocking=False,
                description="Enough patients with a known liver metastasis (MLM) status and CT or slide "
                "features, both with and without MLM, to train the risk model; a warning while the model waits "
                "for more patients.")
def enough_labelled_patients(storage: ArtifactStorage, risk_model: RiskModelSettings) -> dg.AssetCheckResult:
    path = FUSED_FILE.path(storage.store())
    if not path.is_file():
        return _missing(path)
    # a table written before the lymph-node block has no has_lymph_node
    names = set(pq.read_schema(path).names)
    flags = [f for m, f in fusion.AVAILABILITY.items() if m != fusion.CLINICAL and f in names]
    table = pq.read_table(path, columns=["patient_id", "mlm", *flags])
    return _result(qc.enough_labelled(table, risk_model.min_labelled_per_class))


CHECKS: list[dg.AssetChecksDefinition] = [
    clinical_rows_valid, fused_ids_unique, modalities_aligned, enough_labelled_patients,
]
