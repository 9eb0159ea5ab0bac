"""Which patients share a run (no Dagster): one run per bucket of consecutive `patients` partitions.

A run of several patients is a range of the dynamic partitions `patients`, which Dagster orders
by when each patient was added. The partition order is cut into buckets of `batch_size`
consecutive patients (positions 0..B-1, B..2B-1, ...). Every run a sensor requests for patients
stays inside one bucket and carries that bucket's tag; the instance runs one run per bucket value
at a time (a tag concurrency limit in deploy/*), so two such runs that touch one patient never
overlap, whether either is a range or not.

A bucket's wanted patients make one run per stretch of consecutive positions, so a run works on
every patient of its range. New patients arrive together at the end of the order, so K new drops
make at most ceil(K / B) + 1 runs; scattered patients make more, smaller runs. With `allow_gaps`
a bucket's wanted patients make one run over the range from the first to the last of them, which
names its patients (`PATIENTS_TAG`) when others lie between, and its steps leave those alone: the
fewest runs, for work whose runs must stay few whatever the scatter (the explanations). Dagster
shows the patients left alone as failed too when such a run fails, until a later run covers them.

The radiology assets are partitioned by CT scan (`ct_scans`), another order: the same batching
applies to it, and its buckets' names carry the partition set's name (`ct_scans:8:0`), so that a
bucket of scans never shares its tag value, its concurrency slot nor its range runs with a bucket
of patients. "Patients" below stands for the partitions of either set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BUCKET_TAG = "gcmlm/bucket"
# The patients of a range run that its steps work on, comma-separated, when not every patient of
# the range (absent: all of them).
PATIENTS_TAG = "gcmlm/patients"
# The partition set whose buckets keep the names they always had (no prefix).
PATIENTS = "patients"


@dataclass(frozen=True)
class PatientBatch:
    patients: tuple[str, ...]  # the wanted patients, in partition order, all of one bucket
    bucket: int
    whole_range: bool  # no unwanted patient lies between the first and the last
    partition_set: str = PATIENTS  # the name of the dynamic partition set `patients` are partitions of

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
        return {BUCKET_TAG: bucket_name(self.bucket, batch_size, self.partition_set)}


def bucket_name(bucket: int, batch_size: int, partition_set: str = PATIENTS) -> str:
    # the size is part of the name: a changed GCMLM_GPU_BATCH_PATIENTS never merges two old buckets' runs;
    # another partition set's name too (its order is another), while `patients` keeps its names
    name = f"{batch_size}:{bucket}"
    return name if partition_set == PATIENTS else f"{partition_set}:{name}"


def plan_batches(order: Sequence[str], wanted: Iterable[str], batch_size: int, *,
                 allow_gaps: bool = False, partition_set: str = PATIENTS) -> list[PatientBatch]:
    """The batches for `wanted` in the partitions' `order` (the partition set `partition_set`'s),
    never across a bucket of `batch_size` positions, in order: a batch per stretch of consecutive
    positions, or with `allow_gaps` one per bucket (see the module's docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    position = {patient: i for i, patient in enumerate(order)}
    wanted = set(wanted)
    missing = sorted(wanted - set(position))
    if missing:
        raise ValueError(f"not among the partitions: {', '.join(missing[:5])}")
    groups: list[list[int]] = []
    for i in sorted(position[p] for p in wanted):
        current = groups[-1] if groups else None
        same_bucket = current is not None and i // batch_size == current[0] // batch_size
        if same_bucket and (allow_gaps or i == current[-1] + 1):
            current.append(i)
        else:
            groups.append([i])
    return [PatientBatch(tuple(order[i] for i in positions), positions[0] // batch_size,
                         positions[-1] - positions[0] + 1 == len(positions), partition_set)
            for positions in groups]


def parse_patients_tag(value: str | None) -> set[str] | None:
    """The patients a run's `PATIENTS_TAG` names, or None (every patient of its range)."""
    if value is None:
        return None
    return {patient for patient in value.split(",") if patient}
