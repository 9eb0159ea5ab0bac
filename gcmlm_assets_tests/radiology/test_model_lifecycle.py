"""When segmentation_model trains and which masks a model predicts: the rules, without a daemon."""

from __future__ import annotations

import os
from pathlib import Path

from gcmlm_assets.radiology import model_lifecycle as lifecycle

NOW = 1_000_000.0


def drop(landing: Path, artifacts: Path, patient_id: str, *, reference: bool, ct: bool = True) -> Path:
    (landing / patient_id / "ct").mkdir(parents=True)
    if reference:
        (landing / patient_id / "ct_label").mkdir()
        (landing / patient_id / "ct_label" / "stomach.nii.gz").write_bytes(b"mask")
        (landing / patient_id / "ct_label" / ".partial").write_bytes(b"upload in progress")
    ct_path = artifacts / "ct_image" / patient_id / "ct.nii.gz"
    if ct:
        ct_path.parent.mkdir(parents=True)
        ct_path.write_bytes(b"ct")
    return ct_path


def test_reference_set_needs_a_reference_mask_and_a_materialized_ct(tmp_path):
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    paths = {"A": drop(landing, artifacts, "A", reference=True),
             "B": drop(landing, artifacts, "B", reference=False),
             "C": drop(landing, artifacts, "C", reference=True, ct=False)}
    cases = lifecycle.reference_set(landing, paths)
    assert list(cases) == ["A"]
    assert [name for name, _, _ in cases["A"][1]] == ["stomach.nii.gz"]  # hidden files are not masks
    first = lifecycle.reference_set_fingerprint(cases)
    # A replaced mask (new size or time) changes the fingerprint; nothing else does.
    assert lifecycle.reference_set_fingerprint(lifecycle.reference_set(landing, paths)) == first
    mask = landing / "A" / "ct_label" / "stomach.nii.gz"
    mask.write_bytes(b"a corrected mask")
    assert lifecycle.reference_set_fingerprint(lifecycle.reference_set(landing, paths)) != first
    assert lifecycle.has_reference_mask(landing, "A") and not lifecycle.has_reference_mask(landing, "B")


def decide(cases, **overrides):
    arguments = dict(cases=cases, installed_fingerprint=None, min_cases=2, busy_runs=0, cursor={}, now=NOW,
                     debounce_s=60.0, requested_before=False)
    arguments.update(overrides)
    return lifecycle.decide_training(**arguments)


def test_training_waits_for_enough_cases_then_for_the_set_to_settle():
    one = {"A": [1, []]}
    two = {"A": [1, []], "B": [2, []]}
    assert not decide(one).request and "1 of 2" in decide(one).reason
    first = decide(two)
    assert not first.request and "waiting until the set is unchanged" in first.reason
    assert first.cursor == {"fp": first.fingerprint, "since": NOW}
    # Still settling 30 s later; trains once 60 s have passed without a change.
    assert not decide(two, cursor=first.cursor, now=NOW + 30).request
    due = decide(two, cursor=first.cursor, now=NOW + 61)
    assert due.request and due.fingerprint == first.fingerprint
    # A new reference mask restarts the wait.
    three = {**two, "C": [3, []]}
    restarted = decide(three, cursor=first.cursor, now=NOW + 61)
    assert not restarted.request and restarted.cursor["since"] == NOW + 61


def test_training_never_starts_while_radiology_or_training_runs_are_in_flight():
    two = {"A": [1, []], "B": [2, []]}
    settled = {"fp": lifecycle.reference_set_fingerprint(two), "since": NOW - 600}
    busy = decide(two, cursor=settled, busy_runs=3)
    assert not busy.request and "3 radiology or training run(s)" in busy.reason
    assert busy.cursor["since"] == NOW  # the settle time counts from when they are done


def test_training_is_not_requested_again_for_the_installed_or_an_already_requested_set():
    two = {"A": [1, []], "B": [2, []]}
    fingerprint = lifecycle.reference_set_fingerprint(two)
    settled = {"fp": fingerprint, "since": NOW - 600}
    assert not decide(two, cursor=settled, installed_fingerprint=fingerprint).request
    again = decide(two, cursor=settled, requested_before=True)
    assert not again.request and "already requested" in again.reason


def test_a_new_model_re_predicts_every_mask_without_reference_in_slices():
    references = {"P1", "P4"}
    ct_done = [f"P{i}" for i in range(1, 8)]

    def predict(cursor, **overrides):
        arguments = dict(model_key="m1", cursor=cursor, ct_done=ct_done, mask_done=ct_done, in_flight=[],
                         has_reference=lambda pid: pid in references, limit=2)
        arguments.update(overrides)
        return lifecycle.masks_to_predict(**arguments)

    chosen, cursor = predict({})
    assert chosen == ["P2", "P3"]
    chosen, cursor = predict(cursor)
    assert chosen == ["P5", "P6"]
    chosen, cursor = predict(cursor)
    assert chosen == ["P7"]
    # The sweep is done: masks all made, nothing more for this model.
    chosen, cursor = predict(cursor)
    assert chosen == [] and cursor == {"model": "m1", "offset": 7}
    # Patients whose mask waited for a model (CT done, no mask) are predicted unless in flight.
    chosen, _ = predict(cursor, mask_done=["P1", "P2", "P3", "P4"], in_flight=["P6"])
    assert chosen == ["P5", "P7"]
    # Another model starts a new sweep.
    chosen, cursor = predict(cursor, model_key="m2", limit=10)
    assert chosen == ["P2", "P3", "P5", "P6", "P7"] and cursor["model"] == "m2"
    assert lifecycle.mask_run_key("P2", "m2") != lifecycle.mask_run_key("P2", "m1")


def test_model_identity_follows_the_checkpoints(tmp_path):
    folder = tmp_path / "model"
    (folder / "fold_all").mkdir(parents=True)
    checkpoint = folder / "fold_all" / "checkpoint_final.pth"
    checkpoint.write_bytes(b"weights")
    first = lifecycle.model_identity(folder)
    assert lifecycle.model_identity(folder) == first
    os.utime(checkpoint, ns=(1, 1))
    assert lifecycle.model_identity(folder) != first
