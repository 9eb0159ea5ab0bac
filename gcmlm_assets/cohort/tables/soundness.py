"""Which per-patient results the cohort may use: plain decisions over facts read from Dagster.

Plain Python (no Dagster): `soundness_facts.py` reads the facts from the instance in bulk and this module
decides. A patient's result of one per-patient asset (its `radiomics_row` or `slide_vector` file)
is sound only when
- the asset has a materialization for the patient,
- no later attempt to materialize it failed or was canceled (the file on disk may then be one that
  no check has seen); a later attempt still running is fine only while the file is still the one
  the latest materialization recorded (its data version), and
- every blocking check of the asset has a result for that latest materialization, and none of
  them failed with ERROR severity (a WARN result does not block, as in Dagster).
Anything else leaves the result out, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ERROR_SEVERITY = "ERROR"
FAILED, CANCELED, IN_PROGRESS = "failed", "was canceled", "is still running"


@dataclass(frozen=True)
class CheckOutcome:
    """A check's newest result on the partition's latest materialization."""

    passed: bool
    severity: str = ERROR_SEVERITY
    description: str = ""


@dataclass(frozen=True)
class PartitionFacts:
    """What the instance knows about one partition of one asset."""

    materialized: bool = False
    # a materialization attempt after the latest materialization that did not produce one:
    # (FAILED / CANCELED / IN_PROGRESS, run id); None when there is none or its run succeeded
    later_attempt: tuple[str, str] | None = None
    # blocking check name -> its outcome on the latest materialization, None: no result for it
    checks: Mapping[str, CheckOutcome | None] = field(default_factory=dict)
    # while an attempt is running: the file is still the one the latest materialization recorded
    file_is_latest: bool = False


def exclusion_reason(asset: str, facts: PartitionFacts) -> str | None:
    """Why this partition's result must not be used, or None when it is sound."""
    if facts.later_attempt is not None:
        state, run_id = facts.later_attempt
        if state != IN_PROGRESS:
            return f"the latest attempt to materialize {asset} {state} (run {run_id[:8]})"
        if not facts.materialized:
            return f"the first materialization of {asset} {state} (run {run_id[:8]})"
        if not facts.file_is_latest:
            return (f"the latest attempt to materialize {asset} {state} (run {run_id[:8]}) and the file "
                    "differs from the one its latest materialization recorded")
    if not facts.materialized:
        return f"{asset} has no recorded materialization"
    for name in sorted(facts.checks):
        outcome = facts.checks[name]
        if outcome is None:
            return f"blocking check {name} has no result for the latest {asset} materialization"
        if not outcome.passed and outcome.severity == ERROR_SEVERITY:
            detail = f": {_shorten(outcome.description)}" if outcome.description else ""
            return f"blocking check {name} failed on the latest {asset} materialization{detail}"
    return None


def unsound_partitions(asset: str, facts: Mapping[str, PartitionFacts],
                       partitions: Iterable[str]) -> dict[str, str]:
    """{partition: reason} for each of `partitions` whose result must be left out
    (a partition without facts has never been materialized)."""
    reasons = {}
    for partition in partitions:
        reason = exclusion_reason(asset, facts.get(partition, PartitionFacts()))
        if reason is not None:
            reasons[partition] = reason
    return reasons


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
