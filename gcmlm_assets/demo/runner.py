"""`make demo`: a synthetic cohort dropped into the landing zone, taken to risk scores by the
Dagster daemon alone.

1. The synthetic cohort is written into the landing zone (`synthetic.write_cohort`; files whose
   bytes would not change are left alone, so a second demo sees no change).
2. `dagster-daemon run` starts over the project's workspace and the local SQLite instance in
   DAGSTER_HOME, with `GCMLM_PROFILE=demo` (see `gcmlm_assets.profiles`). Its sensors do the rest:
   `landing_sensor` turns the drops into partitions and batched runs, the two steps sensors carry
   the batches on through their chains, `segmentation_training_sensor`
   trains the tiny nnU-Net once enough reference masks are in, `predicted_mask_sensor` predicts
   the masks that waited for it, `cohort_refresh_sensor` refreshes the cohort assets once the
   per-patient work has settled. The demo launches no run and orders nothing.
3. While it waits it prints per-asset progress (patients done, failed, running).
4. When the cohort has settled, it prints a summary read back from the instance, stops the
   daemon and everything it started by process id, and exits. The daemon's own output (and the
   runs', nnU-Net's console included) is in `<DAGSTER_HOME>/daemon.log`.
"""

from __future__ import annotations

import sys
import time

from gcmlm_assets import settings
from gcmlm_assets.catalogue import RISK_MODEL
from gcmlm_assets.demo import synthetic
from gcmlm_assets.demo.synthetic_plan import CohortSpec
from gcmlm_assets.demo.daemon import prepare_dagster_home, start_daemon
from gcmlm_assets.demo.summary import DELTA_BLOCK, ablation_rows, format_summary, fused_auc, summarise
from gcmlm_assets.demo.watch import ScoresUnreadable, failed_runs, wait_until_settled
from gcmlm_assets.profiles import PROFILE_ENV, chosen_profile_name, get_profile

DEMO_PROFILE = "demo"
# The planted signal is strong enough that a pipeline keeping its information reaches this.
DEMO_AUC_TARGET = 0.8
# The delta block alone, on the patients with a second CT (about ten in the default cohort): the
# planted change must be recovered clearly above chance.
DEMO_DELTA_AUC_TARGET = 0.65
DEMO_TIMEOUT_S = 40 * 60
# Long enough for every sensor's first tick after the daemon has loaded the definitions.
MIN_WAIT_S = 45.0


def _say(message: str) -> None:
    print(message, flush=True)


def describe_profile(name: str) -> list[str]:
    profile = get_profile(name)
    lines = [f"settings profile {profile.name!r} ({PROFILE_ENV}={profile.name}): {profile.description}"]
    for key, values in profile.resources.items():
        lines.append(f"  resource {key!r}: {', '.join(f'{k}={v!r}' for k, v in values.items())}")
        if key in profile.notes:
            lines.append(f"      why: {profile.notes[key]}")
    lines.append(f"  training, mask and cohort sensors tick every {profile.sensor_interval_s} s "
                 "(landing_sensor every 30 s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gcmlm_assets.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=CohortSpec.n_patients)
    parser.add_argument("--seed", type=int, default=CohortSpec.seed)
    parser.add_argument("--small", action="store_true", help="tiny volumes and slides (a test-sized cohort)")
    parser.add_argument("--timeout", type=float, default=DEMO_TIMEOUT_S, help="seconds to wait for the daemon")
    parser.add_argument("--auc-target", type=float, default=DEMO_AUC_TARGET,
                        help="exit with status 2 when the fused CV AUC is not above this (0: no target)")
    parser.add_argument("--delta-auc-target", type=float, default=DEMO_DELTA_AUC_TARGET,
                        help="exit with status 2 when the cohort has patients with two CT scans and the delta "
                             "block's CV AUC is not above this (0: no target)")
    parser.add_argument("--no-real-data", action="store_true",
                        help="do not blend in the real files of GCMLM_TEST_DATA")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    profile = chosen_profile_name() or DEMO_PROFILE
    home = prepare_dagster_home(settings.dagster_home())
    settings.use_dagster_home(home)
    landing, artifacts = settings.landing_root(), settings.artifacts_root()
    spec = (CohortSpec.small(args.patients, seed=args.seed) if args.small
            else CohortSpec(n_patients=args.patients, seed=args.seed))
    real = None if args.no_real_data else synthetic.RealFiles.find(settings.test_data_root())
    for line in describe_profile(profile):
        _say(line)

    _say(f"[1/3] writing the synthetic cohort ({spec.n_patients} patients{' + 1 real' if real else ''}) "
         f"into {landing}")
    cohort = synthetic.write_cohort(
        landing, spec, real=real,
        progress=lambda plan, changed: _say(
            f"      {plan.patient_id} mlm={plan.mlm} reference_mask={'yes' if plan.has_reference_mask else 'no '} "
            f"slides={plan.n_slides} cts={len(plan.scan_dates) or 1} {'written' if changed else 'unchanged'}"))
    if real:
        _say(f"      real patient {synthetic.REAL_PATIENT_ID}: {real.ct.name} + reference stomach mask, "
             f"{real.slide.name}; label unknown (scored, not trained on)")
    _say(f"      {len(cohort.written)} files written, {cohort.unchanged} patients unchanged")

    log_path = home / "daemon.log"
    _say(f"[2/3] starting the Dagster daemon (DAGSTER_HOME={home}; its log: {log_path})")
    daemon_started = time.time()
    daemon = start_daemon(home, log_path, env={PROFILE_ENV: profile})
    _say(f"      dagster-daemon pid {daemon.pid}; waiting until risk_scores covers the cohort")
    import dagster as dg

    try:
        with dg.DagsterInstance.get() as instance:
            try:
                done = wait_until_settled(instance, since=0.0, timeout_s=args.timeout, say=_say,
                                          alive=daemon.alive, min_wait_s=MIN_WAIT_S)
            except ScoresUnreadable as error:
                _say(f"error: {error}")
                return 1
            _say("[3/3] summary")
            from gcmlm_assets.definitions import build_definitions

            summary = summarise(instance, build_definitions(profile=profile), landing, artifacts, home, spec)
            failures = failed_runs(instance, since=daemon_started)
    finally:
        killed = daemon.stop()
        _say(f"      daemon {daemon.pid} stopped" + (f" ({len(killed)} process(es) had to be killed)" if killed else ""))
    _say(format_summary(summary, time.perf_counter() - started))
    for partition, run_id, reasons in failures:
        _say(f"failed run {run_id[:8]} (patient {partition}): " + "; ".join(reasons))
    if not done:
        _say(f"the daemon did not settle within {args.timeout:.0f} s; see {log_path} and `make ui`")
        return 1
    if failures:
        return 1
    auc, _ = fused_auc(summary[RISK_MODEL.key])
    if args.auc_target > 0:
        if not isinstance(auc, (int, float)) or auc <= args.auc_target:
            _say(f"fused CV AUC {auc} is not above {args.auc_target}: the pipeline lost the planted signal")
            return 2
        _say(f"fused CV AUC {auc:.3f} > {args.auc_target}: the planted signal was recovered")
    if args.delta_auc_target > 0 and (summary.get("timepoints") or {}).get("with_two_or_more"):
        delta = next((row[1] for row in ablation_rows(summary[RISK_MODEL.key] or {}) if row[0] == DELTA_BLOCK), None)
        if not isinstance(delta, (int, float)) or delta <= args.delta_auc_target:
            _say(f"delta block CV AUC {delta} is not above {args.delta_auc_target}: the planted change between "
                 "the CT scans was lost")
            return 2
        _say(f"delta block CV AUC {delta:.3f} > {args.delta_auc_target}: the planted change between the CT scans "
             "was recovered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
