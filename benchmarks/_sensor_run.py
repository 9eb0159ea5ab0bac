"""One run of a sensor's RunRequest in this fresh process, as the daemon's run worker would make it:
import the definitions, execute the run against the instance in DAGSTER_HOME (in-process
executor, like `GCMLM_ENV=local`), print one JSON line with what it did. Used by
benchmarks.batched_sensors.

    python -m benchmarks._sensor_run '{"assets": [...], "partition": null, "tags": {...}}'

Model loads are counted where every GPU step makes them (`batching.LoadOnce`), without importing
torch up front: a run that loads no model pays no more than the daemon's would.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    request = json.loads(sys.argv[1])
    import dagster as dg

    from gcmlm_assets import batching
    from gcmlm_assets.definitions import defs

    loads = {"count": 0, "seconds": 0.0}
    real_get = batching.LoadOnce.get

    def counted_get(self, *key):
        before, start = self.loads, time.perf_counter()
        try:
            return real_get(self, *key)
        finally:
            if self.loads != before:
                loads["count"] += self.loads - before
                loads["seconds"] += time.perf_counter() - start

    batching.LoadOnce.get = counted_get
    imported = time.perf_counter()
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(name) for name in request["assets"]],
            partition_key=request["partition"], tags=request["tags"], raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": request.get("log_level", "WARNING")}}}})
    finished = time.perf_counter()
    print(json.dumps({"run_id": result.run_id, "success": result.success, "model_loads": loads["count"],
                      "load_s": loads["seconds"], "import_s": imported - STARTED, "execute_s": finished - imported}))


if __name__ == "__main__":
    main()
