"""Which patients share a run (no Dagster): contiguous ranges of the `patients` partitions, cut at buckets.

A run of several patients is a range of the dynamic partitions `patients`, which Dagster orders
by when each patient was added. The partition order is cut into buckets of `batch_size`
consecutive patients (positions 0..B-1, B..2B-1, ...), and every run a sensor requests for
patients, of one patient or a range, stays inside one bucket and carries that bucket's tag. The
instance runs one run per bucket value at a time (a tag concurrency limit), so two such runs that
touch one patient never overlap, whether either is a range or not.

New patients arrive together at the end of the order, so K new drops make at most
ceil(K / B) + 1 batches; scattered changes make one run per contiguous stretch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BUCKET_TAG = "gcmlm/bucket"


@dataclass(frozen=True)
class PatientBatch:
    patients: tuple[str, ...]  # in partition order, consecutive positions of one bucket
    bucket: int

    @property
    def first(self) -> str:
        return self.patients[0]

    @property
    def last(self) -> str:
        return self.patients[-1]

    @property
    def single(self) -> bool:
        return len(self.patients) == 1

    def bucket_tag(self, batch_size: int) -> dict[str, str]:
        return {BUCKET_TAG: bucket_name(self.bucket, batch_size)}


def bucket_name(bucket: int, batch_size: int) -> str:
    # the size is part of the name: a changed GCMLM_GPU_BATCH_PATIENTS never merges two old buckets' runs
    return f"{batch_size}:{bucket}"


def plan_batches(order: Sequence[str], wanted: Iterable[str], batch_size: int) -> list[PatientBatch]:
    """The fewest runs that cover exactly `wanted`: maximal stretches of consecutive positions in
    `order` (the partitions' order), each inside one bucket of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    position = {patient: i for i, patient in enumerate(order)}
    missing = sorted(set(wanted) - set(position))
    if missing:
        raise ValueError(f"not among the partitions: {', '.join(missing[:5])}")
    batches: list[PatientBatch] = []
    current: list[int] = []
    for i in sorted({position[p] for p in wanted}):
        if current and (i != current[-1] + 1 or i // batch_size != current[0] // batch_size):
            batches.append(_batch(order, current, batch_size))
            current = []
        current.append(i)
    if current:
        batches.append(_batch(order, current, batch_size))
    return batches


def _batch(order: Sequence[str], positions: list[int], batch_size: int) -> PatientBatch:
    return PatientBatch(tuple(order[i] for i in positions), positions[0] // batch_size)

