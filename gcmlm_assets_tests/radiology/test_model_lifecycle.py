"""When segmentation_model trains and which masks a model predicts: the rules, without a daemon."""

from __future__ import annotations

import math
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


POLICY = lifecycle.RetrainPolicy(min_new_cases=3, min_growth_fraction=0.5)


def decide(cases, **overrides):
    arguments = dict(cases=cases, trained=None, trained_fingerprint=None, policy=POLICY, min_cases=2, busy_runs=0,
                     cursor={}, now=NOW, debounce_s=60.0, requested_before=False)
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
    assert not decide(two, cursor=settled, trained_fingerprint=fingerprint).request
    again = decide(two, cursor=settled, requested_before=True)
    assert not again.request and "already requested" in again.reason


def cohort(n: int, first: int = 0) -> dict[str, list]:
    return {f"P{i:02d}": [i, [["stomach.nii.gz", 100 + i, i]]] for i in range(first, first + n)}


def test_the_first_model_trains_once_enough_reference_masks_exist():
    three = cohort(3)
    settled = {"fp": lifecycle.reference_set_fingerprint(three), "since": NOW - 600}
    first = decide(three, cursor=settled, trained=None)
    assert first.request and first.due and "the first model" in first.reason
    assert not decide(cohort(1), trained=None).due


def test_retraining_waits_until_the_policy_threshold():
    trained_set = cohort(10)
    trained = lifecycle.case_stamps(trained_set)

    def settled(cases, **overrides):
        cursor = {"fp": lifecycle.reference_set_fingerprint(cases), "since": NOW - 600}
        return decide(cases, cursor=cursor, trained=trained,
                      trained_fingerprint=lifecycle.reference_set_fingerprint(trained_set), **overrides)

    # 3 new cases, or half of the 10 trained on, whichever comes first: 3.
    below = settled({**trained_set, **cohort(2, first=10)})
    assert not below.request and not below.due and below.cursor == {}
    assert "2 reference case(s) changed since the last training (2 added)" in below.reason
    assert "retrains from 3" in below.reason and "Materialize segmentation_model" in below.reason
    at = settled({**trained_set, **cohort(3, first=10)})
    assert at.request and at.due and "3 added since the last training" in at.reason
    # A replaced mask of a case the model saw, and a removed one, are changes of the set too.
    changed = {**cohort(9), "P00": [0, [["stomach.nii.gz", 999, 5]]], **cohort(1, first=10)}
    mixed = settled(changed)
    assert mixed.request and "1 added, 1 changed, 1 removed" in mixed.reason
    # The fraction counts when it is the smaller threshold: a fifth of 10 is 2.
    by_fraction = settled({**trained_set, **cohort(2, first=10)},
                          policy=lifecycle.RetrainPolicy(min_new_cases=100, min_growth_fraction=0.2))
    assert by_fraction.request
    # Due but busy or already requested: not requested, still due (the cohort refresh waits for it).
    assert settled({**trained_set, **cohort(3, first=10)}, busy_runs=1).due
    assert lifecycle.RetrainPolicy(3, 0.5).needed(0) == 1  # an empty last set: any change


def test_the_stamps_of_an_older_pointer_are_its_training_cases():
    assert lifecycle.trained_case_stamps(None) is None
    assert lifecycle.trained_case_stamps({"folder": "m", "training": {"cases": ["A", "B"]}}) == {"A": None, "B": None}
    stamps = lifecycle.case_stamps(cohort(2))
    assert lifecycle.trained_case_stamps({"folder": "m", "reference_cases": stamps}) == stamps
    # With no stamp a case the model trained on counts as unchanged; a new one as added.
    changes = lifecycle.set_changes(cohort(3), {"P00": None, "P01": None})
    assert (changes.added, changes.changed, changes.removed) == (["P02"], [], [])


def test_a_run_started_by_hand_trains_below_the_policy_threshold():
    """What a user's run of segmentation_model does: the policy does not apply to it."""
    trained_set = cohort(10)
    grown = {**trained_set, **cohort(1, first=10)}
    cursor = {"fp": lifecycle.reference_set_fingerprint(grown), "since": NOW - 600}
    assert not decide(grown, cursor=cursor, trained=lifecycle.case_stamps(trained_set)).due  # the sensor waits
    pointer = {"folder": "m1", "fingerprint": "inputs-1", "checkpoint_sha256": "c1"}
    assert lifecycle.training_action(fingerprint="inputs-2", pointer=pointer) == lifecycle.TRAIN
    assert lifecycle.training_action(fingerprint="inputs-1", pointer=pointer) == lifecycle.REUSE
    assert lifecycle.training_action(fingerprint="inputs-1", pointer=None) == lifecycle.TRAIN
    # A model trained on these inputs was rejected against this installed model: not trained again ...
    rejected = {**pointer, "rejected": {"fingerprint": "inputs-2", "against": "c1"}}
    assert lifecycle.training_action(fingerprint="inputs-2", pointer=rejected) == lifecycle.REJECTED_BEFORE
    # ... unless the installed model is another one now.
    assert lifecycle.training_action(fingerprint="inputs-2",
                                     pointer={**rejected, "checkpoint_sha256": "c2"}) == lifecycle.TRAIN


def digests(patients, version: str = "1") -> dict[str, dict]:
    return {pid: {"ct_image": f"ct-{pid}", "reference_mask": f"mask-{pid}-{version}"} for pid in patients}


def test_held_out_cases_are_ones_the_installed_model_did_not_train_on():
    seen = [f"P{i:02d}" for i in range(20)]
    new = [f"N{i:02d}" for i in range(10)]
    inputs = digests(seen + new)
    installed = digests(seen)
    held = lifecycle.choose_held_out(inputs, installed, fraction=0.2, min_cases=3)
    # max(3, ceil(0.2 x 10)) of the 10 new ones, chosen by the hash of the id: the same every time.
    assert len(held.cases) == 3 and set(held.cases) <= set(new) and held.seen_by_installed == []
    assert lifecycle.choose_held_out(inputs, installed, fraction=0.2, min_cases=3) == held
    more = lifecycle.choose_held_out(digests(seen + new + [f"M{i:02d}" for i in range(20)]), installed,
                                     fraction=0.2, min_cases=3)
    assert len(more.cases) == 6  # a fifth of 30
    # A changed reference mask: the installed model did not train on that mask.
    changed = lifecycle.choose_held_out({**inputs, **digests(["P05"], version="2")}, digests(seen + new),
                                        fraction=0.2, min_cases=3)
    assert changed.cases == ["P05"]
    # Fewer new cases than the minimum: all of them, always leaving nnU-Net 2 training cases.
    assert lifecycle.choose_held_out(digests(["A", "B", "N1"]), digests(["A", "B"]), fraction=0.2,
                                     min_cases=5).cases == ["N1"]
    assert lifecycle.choose_held_out(digests(["A", "N1"]), digests(["A"]), fraction=0.2, min_cases=5).cases == []
    # Nothing new to the installed model (settings changed): held out among the cases it saw, and said so.
    only_seen = lifecycle.choose_held_out(installed, installed, fraction=0.2, min_cases=3)
    assert len(only_seen.cases) == 3 and only_seen.seen_by_installed == only_seen.cases


def test_a_patients_timepoints_are_held_out_together():
    single = [f"P{i:02d}" for i in range(10)]
    timepoints = [f"T{i:02d}@{tp}" for i in range(10) for tp in ("2024-01-10", "2024-06-02")]
    inputs = digests(single + timepoints)
    held = lifecycle.choose_held_out(inputs, {}, fraction=0.2, min_cases=3)
    patients = {key.partition("@")[0] for key in held.cases}
    # whole patients until ceil(0.2 x 30) = 6 cases: no held-out patient has a scan left to train on
    assert len(held.cases) >= 6 and held.seen_by_installed == []
    assert [key for key in inputs if key.partition("@")[0] in patients] == sorted(held.cases)
    assert lifecycle.choose_held_out(inputs, {}, fraction=0.2, min_cases=3) == held
    # A new timepoint of a patient the installed model trained on: the patient's known scan is held out
    # with it (and said to be seen), not left in the new model's training set.
    known = ["A", "B", "C@2024-01-10"]
    grown = lifecycle.choose_held_out(digests(known + ["C@2024-06-02"]), digests(known), fraction=0.2,
                                      min_cases=1)
    assert grown.cases == ["C@2024-01-10", "C@2024-06-02"] and grown.seen_by_installed == ["C@2024-01-10"]
    # A patient whose scans would leave nnU-Net fewer than 2 training cases is not held out in part.
    assert lifecycle.choose_held_out(digests(["A", "C@2024-01-10", "C@2024-06-02"]), digests(["A"]),
                                     fraction=0.2, min_cases=1).cases == []


def test_single_scan_hold_out_is_the_per_case_choice():
    """Patients with one scan each: the cases held out are those a choice per case makes."""
    def per_case(inputs, installed, fraction, min_cases):
        room = max(0, len(inputs) - lifecycle.MIN_TRAINING_CASES)
        unseen = sorted((k for k in inputs if installed.get(k) != inputs[k]), key=lifecycle._hash_order)
        if unseen:
            return sorted(unseen[:min(len(unseen), max(min_cases, math.ceil(fraction * len(unseen))), room)])
        return sorted(sorted(inputs, key=lifecycle._hash_order)[:min(min_cases, room)])

    for total, trained, fraction, min_cases in [(30, 20, 0.2, 3), (5, 0, 0.5, 1), (4, 4, 0.2, 3), (3, 2, 0.2, 5),
                                                (50, 10, 0.1, 2), (12, 12, 0.3, 0)]:
        ids = [f"GC{i:04d}" for i in range(total)]
        inputs, installed = digests(ids), digests(ids[:trained])
        assert lifecycle.choose_held_out(inputs, installed, fraction=fraction, min_cases=min_cases).cases == \
            per_case(inputs, installed, fraction, min_cases)


def test_a_new_model_is_installed_only_if_at_least_as_good_on_the_held_out_cases():
    installed = {"A": 0.80, "B": 0.70}
    assert lifecycle.install_decision({"A": 0.80, "B": 0.70}, installed)[0]  # equal: installed
    ok, text = lifecycle.install_decision({"A": 0.90, "B": 0.65}, installed)
    assert ok and "mean Dice 0.775 on 2 held-out case(s), at least the installed model's 0.750" in text
    ok, text = lifecycle.install_decision({"A": 0.80, "B": 0.69}, installed)
    assert not ok and text.startswith("rejected: mean Dice 0.745") and "the installed model stays" in text


def test_a_new_model_re_predicts_every_mask_without_reference_in_slices():
    references = {"P1", "P4"}
    ct_done = [f"P{i}" for i in range(1, 8)]

    def predict(cursor, **overrides):
        arguments = dict(model_key="m1", cursor=cursor, ct_done=ct_done, mask_done=ct_done, in_flight=lambda _: set(),
                         has_reference=lambda pid: pid in references, limit=2)
        arguments.update(overrides)
        return lifecycle.masks_to_predict(**arguments)

    chosen, cursor = predict({})
    assert chosen == ["P2", "P3"]
    chosen, cursor = predict(cursor)
    assert chosen == ["P5", "P6"]
    chosen, cursor = predict(cursor)
    assert chosen == ["P7"] and cursor == {"model": "m1", "after": "P7", "swept": True}
    # The sweep is done: masks all made, nothing more for this model, not even for patients who
    # arrive later (their landing run predicts with the installed model).
    chosen, cursor = predict(cursor)
    assert chosen == [] and cursor == {"model": "m1", "after": "P7", "swept": True}
    chosen, _ = predict(cursor, ct_done=["P0", *ct_done, "P8"], mask_done=["P0", *ct_done, "P8"])
    assert chosen == []
    # Patients whose mask waited for a model (CT done, no mask) are predicted unless in flight.
    asked = []

    def in_flight(patients):
        asked.append(list(patients))
        return {"P6"} & set(patients)

    chosen, _ = predict(cursor, mask_done=["P1", "P2", "P3", "P4"], in_flight=in_flight)
    assert chosen == ["P5", "P7"]
    assert asked == [["P5", "P6"], ["P7"]]  # only the candidates of this tick, a slice at a time
    # Another model starts a new sweep.
    chosen, cursor = predict(cursor, model_key="m2", limit=10)
    assert chosen == ["P2", "P3", "P5", "P6", "P7"] and cursor == {"model": "m2", "after": "P7", "swept": True}
    # a cursor from before (an offset into the sorted patients) carries on where it stood
    chosen, cursor = predict({"model": "m2", "offset": 7}, model_key="m2", limit=10)
    assert chosen == [] and cursor == {"model": "m2", "after": "P7", "swept": True}
    chosen, cursor = predict({"model": "m2", "offset": 3}, model_key="m2", limit=10)
    assert chosen == ["P5", "P6", "P7"] and cursor["swept"]
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
