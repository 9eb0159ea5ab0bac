"""Which patients a newly installed model runs again (no Dagster).

A per-patient asset made with a model the platform trains (ct_mask with segmentation_model,
lymph_nodes with tumour_classifier) is skipped while no model is installed, and made again for
everyone when a new one is. The sensors that request those runs (radiology/sensors.py,
pathology/ln_sensors.py) decide with `patients_to_rerun` from what the instance says; the cursor
is theirs to keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# Slices of waiting patients whose runs in flight one tick looks up (the rest wait for a later tick).
IN_FLIGHT_LOOKUPS = 2


def patients_to_rerun(*, model_key: str, cursor: dict, upstream_done: Iterable[str], downstream_done: Iterable[str],
                      in_flight: Callable[[list[str]], Iterable[str]], excluded: Callable[[str], bool],
                      limit: int) -> tuple[list[str], dict]:
    """Patients whose downstream asset the installed model (`model_key`) should make, and the next cursor.

    A new model re-makes it for every patient whose upstream asset is materialized, once, in slices of
    `limit` per tick in patient-id order (the cursor's `after`: the last patient the sweep looked at;
    `swept` once it is done, so patients who arrive later, whose landing run uses the installed model,
    are not swept again). Besides, patients whose downstream asset waited for a model (upstream
    materialized, downstream not) are chosen unless `in_flight(patients)` names them: a run of theirs
    is in flight (or, as the sensors ask it, their step was never planned: a batch's next run that a
    steps sensor has yet to request), asked for at most `IN_FLIGHT_LOOKUPS` slices of `limit`
    candidates per tick. `excluded(patient)` (made without the model, e.g. from a reference mask) is
    asked only for candidates.
    """
    upstream_done = sorted(set(upstream_done))
    if cursor.get("model") == model_key and "offset" in cursor:  # the cursor's form before `after`
        offset = int(cursor["offset"])
        cursor = {"model": model_key,
                  "after": upstream_done[min(offset, len(upstream_done)) - 1] if offset and upstream_done else "",
                  "swept": offset >= len(upstream_done)}
    if cursor.get("model") != model_key or "after" not in cursor:
        cursor = {"model": model_key, "after": "", "swept": False}
    chosen: list[str] = []
    if not cursor["swept"]:  # the sweep after a model change is not finished
        after = cursor["after"]
        remaining = [patient_id for patient_id in upstream_done if patient_id > after]
        for patient_id in remaining:
            after = patient_id
            if not excluded(patient_id):
                chosen.append(patient_id)
            if len(chosen) >= limit:
                break
        swept = not remaining or after == remaining[-1]
        return chosen, {"model": model_key, "after": after, "swept": swept}
    waiting = [pid for pid in sorted(set(upstream_done) - set(downstream_done)) if not excluded(pid)]
    for start in range(0, min(len(waiting), IN_FLIGHT_LOOKUPS * limit), limit):
        candidates = waiting[start:start + limit]
        busy = set(in_flight(candidates))
        chosen += [pid for pid in candidates if pid not in busy][:limit - len(chosen)]
        if len(chosen) >= limit:
            break
    return chosen, cursor
