"""A QC verdict (tables/qc.py) as a Dagster check result: shared by the stand-alone checks (checks.py) and
the checks that risk_model and risk_scores evaluate in their own step before publishing."""

import dagster as dg

from gcmlm_assets.cohort.tables import qc

SEVERITY = {qc.WARN: dg.AssetCheckSeverity.WARN, qc.ERROR: dg.AssetCheckSeverity.ERROR,
            qc.PASS: dg.AssetCheckSeverity.ERROR}


def check_result(verdict: qc.Verdict, check_name: str | None = None, extra: dict | None = None) -> dg.AssetCheckResult:
    metadata = {k: (dg.MetadataValue.md(v) if isinstance(v, str) and v.startswith("|") else v)
                for k, v in verdict.metadata.items()}
    return dg.AssetCheckResult(check_name=check_name, passed=verdict.passed, severity=SEVERITY[verdict.outcome],
                               description=verdict.description,
                               metadata={"expected": verdict.expected, "found": verdict.found, **metadata,
                                         **(extra or {})})
