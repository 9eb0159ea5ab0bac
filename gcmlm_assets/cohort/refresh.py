"""When the cohort assets refresh (no Dagster): once per-patient work has settled and changed.

Refreshing while patients are still being processed would train the risk model on half a
cohort (and fail "too few labelled patients" on a young one), so the refresh waits until no run
is queued or running, no segmentation training is due, and nothing has finished for a quiet
period. It refreshes only when something it reads changed since the last refresh.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RefreshDecision:
    request: bool
    reason: str


def decide_refresh(*, features_exist: bool, busy_runs: int, training_pending: bool,
                   last_activity: float | None, now: float, quiet_s: float,
                   inputs_fingerprint: str, refreshed_fingerprint: str | None,
                   patients_between_steps: int = 0) -> RefreshDecision:
    if not features_exist:
        return RefreshDecision(False, "no patient has radiomics or slide features yet")
    if inputs_fingerprint == refreshed_fingerprint:
        return RefreshDecision(False, "nothing changed since the last refresh")
    if busy_runs:
        return RefreshDecision(False, f"waiting for {busy_runs} queued or running run(s) to finish")
    if patients_between_steps:
        return RefreshDecision(False, f"waiting for {patients_between_steps} patient(s) between two batched "
                                      "runs of their chain (the steps sensors request the next)")
    if training_pending:
        return RefreshDecision(False, "waiting for the segmentation model's training (due or running)")
    quiet_for = now - last_activity if last_activity is not None else quiet_s
    if quiet_for < quiet_s:
        return RefreshDecision(False, f"waiting for {quiet_s:.0f} s without finished runs "
                                      f"({quiet_for:.0f} s so far)")
    return RefreshDecision(True, "per-patient work settled and changed since the last refresh")
