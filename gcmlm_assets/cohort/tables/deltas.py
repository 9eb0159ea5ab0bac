"""Change-over-time (delta) radiomics of a patient scanned more than once (plain Python, no Dagster).

Between the first and the last of ALL the patient's scans (oldest first; scan_choice.py: when either
of those two is unsound or has no usable row, the patient has no delta block: it is never taken
from other scans), for each radiomics feature f:
- `<f>_diff`: last - first;
- `<f>_rel`: (last - first) / |first|, NaN where |first| < REL_EPSILON (no scale to relate to);
and for the pair:
- `days`: days from the first scan to the last when both timepoints are dated (ISO folder names),
  else NaN;
- `similarity`: 1 - the mean over features of |last - first| / (|first| + |last|), a feature
  where both are 0 counting as 0 (no change): 1 = identical scans, 0 = every feature changed
  completely (or changed sign). Features that are NaN in either scan are left out of the mean;
  NaN when no feature is finite in both.
A NaN feature gives NaN for its own diff and rel, never for the others.
fused_table prefixes the names with `delta_` (the block's columns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from gcmlm_assets.scans import timepoint_date

REL_EPSILON = 1e-12
DAYS, SIMILARITY = "days", "similarity"
DIFF_SUFFIX, REL_SUFFIX = "_diff", "_rel"


def delta_names(features: Sequence[str]) -> list[str]:
    """The delta row's names, in order: per feature its diff then its rel, then days and similarity."""
    names = []
    for feature in features:
        names += [feature + DIFF_SUFFIX, feature + REL_SUFFIX]
    return [*names, DAYS, SIMILARITY]


def days_between(first_timepoint: str | None, last_timepoint: str | None) -> float:
    """Days from the first scan to the last, NaN unless both timepoints are dates."""
    first, last = timepoint_date(first_timepoint), timepoint_date(last_timepoint)
    if first is None or last is None:
        return math.nan
    return float((last - first).days)


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def delta_row(features: Sequence[str], first: Mapping[str, float], last: Mapping[str, float],
              first_timepoint: str | None, last_timepoint: str | None) -> dict[str, float]:
    """{name: value} of the delta row (names as `delta_names(features)`) between the first scan's
    feature values and the last's (oldest first, as scans.patient_scans orders them). A feature
    missing from either mapping counts as NaN."""
    row: dict[str, float] = {}
    changes: list[float] = []
    for feature in features:
        a, b = first.get(feature, math.nan), last.get(feature, math.nan)
        a = math.nan if a is None else float(a)
        b = math.nan if b is None else float(b)
        diff = b - a if _finite(a) and _finite(b) else math.nan
        row[feature + DIFF_SUFFIX] = diff
        row[feature + REL_SUFFIX] = diff / abs(a) if _finite(diff) and abs(a) >= REL_EPSILON else math.nan
        if _finite(diff):
            scale = abs(a) + abs(b)
            changes.append(abs(diff) / scale if scale > 0 else 0.0)
    row[DAYS] = days_between(first_timepoint, last_timepoint)
    row[SIMILARITY] = 1.0 - sum(changes) / len(changes) if changes else math.nan
    return row
