"""Which patients share a run: one run per bucket of consecutive partitions, never across a bucket."""

from __future__ import annotations

import math

import pytest

from gcmlm_assets.patient_batches import BUCKET_TAG, parse_patients_tag, plan_batches

ORDER = [f"P{i:03d}" for i in range(100)]


def test_new_patients_at_the_end_make_ceil_k_over_b_batches_plus_at_most_one():
    for first_new, k, size in ((90, 10, 4), (96, 4, 32), (64, 32, 32), (70, 30, 8), (0, 100, 7)):
        batches = plan_batches(ORDER, ORDER[first_new:first_new + k], size)
        assert [p for b in batches for p in b.patients] == ORDER[first_new:first_new + k]
        assert len(batches) <= math.ceil(k / size) + 1
        assert all(len(b.patients) <= size and b.whole_range for b in batches)


def test_a_batch_never_crosses_a_bucket_or_skips_a_patient_of_its_range():
    batches = plan_batches(ORDER, ["P003", "P004", "P005", "P009", "P002", "P007"], 4)
    assert [b.patients for b in batches] == [("P002", "P003"), ("P004", "P005"), ("P007",), ("P009",)]
    assert [b.bucket for b in batches] == [0, 1, 1, 2]
    assert all(b.whole_range for b in batches)
    assert batches[2].single and not batches[0].single
    assert batches[1].bucket_tag(4) == {BUCKET_TAG: "4:1"}
    # the same patient always lands in the same bucket, whatever else is wanted with it
    assert {b.bucket for b in plan_batches(ORDER, ["P005"], 4)} == {1}


def test_with_gaps_a_bucket_is_one_batch_that_says_it_skips_patients_of_its_range():
    batches = plan_batches(ORDER, ["P003", "P004", "P005", "P009", "P002", "P007"], 4, allow_gaps=True)
    assert [b.patients for b in batches] == [("P002", "P003"), ("P004", "P005", "P007"), ("P009",)]
    assert [b.bucket for b in batches] == [0, 1, 2]
    assert [b.whole_range for b in batches] == [True, False, True]
    assert (batches[1].first, batches[1].last) == ("P004", "P007")


def test_unknown_patients_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="P999"):
        plan_batches(ORDER, ["P999"], 4)
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(ORDER, ["P001"], 0)
    assert plan_batches(ORDER, [], 4) == []


def test_the_patients_tag_round_trips():
    assert parse_patients_tag(None) is None
    assert parse_patients_tag("P004,P005,P007") == {"P004", "P005", "P007"}
