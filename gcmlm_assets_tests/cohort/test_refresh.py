"""When the cohort assets refresh: only once per-patient work settled, and only after a change."""

from __future__ import annotations

from gcmlm_assets.cohort.refresh import decide_refresh

NOW = 5_000.0


def decide(**overrides):
    arguments = dict(features_exist=True, busy_runs=0, training_pending=False, last_activity=NOW - 100,
                     now=NOW, quiet_s=60.0, inputs_fingerprint="b", refreshed_fingerprint="a")
    arguments.update(overrides)
    return decide_refresh(**arguments)


def test_refreshes_once_settled_and_changed():
    assert decide().request


def test_waits_while_patients_are_queued_or_running_or_a_training_is_due():
    assert "2 queued or running" in decide(busy_runs=2).reason and not decide(busy_runs=2).request
    assert not decide(training_pending=True).request


def test_waits_for_the_quiet_period_after_the_last_run():
    early = decide(last_activity=NOW - 10)
    assert not early.request and "10 s so far" in early.reason


def test_never_refreshes_without_a_change_or_without_features():
    assert not decide(refreshed_fingerprint="b").request
    assert not decide(features_exist=False).request
