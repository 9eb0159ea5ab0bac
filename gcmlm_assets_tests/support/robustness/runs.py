"""Materializations in child processes that a test can SIGKILL at a chosen point.

A run server (`python -m gcmlm_assets_tests.support.robustness.runs`) imports Dagster, the definitions'
modules and the heavy libraries once, then forks one child per run request read from its stdin:
the child builds the definitions for the request's data root, opens the Dagster instance of its
DAGSTER_HOME and materializes the assets (one patient's partition, or the cohort assets). Forking
saves each killed run the ~5 s of imports a fresh interpreter would spend.

A request may name a pause point, `module:attribute` (a function, or a method as `Class.method`)
with a substring its arguments' repr must contain and which matching call to stop at. The child
replaces that attribute with a wrapper that, at that call, writes a marker file and sleeps; the
real function is never replaced otherwise. The test then sends SIGKILL to the child: the process
dies between two real instructions of the real code, as a node loss or the OOM killer would do it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]
PROFILE = "demo"
# What the server imports before forking (the steps would import them anyway).
WARM_IMPORTS = ("SimpleITK", "radiomics.featureextractor", "torch", "timm", "h5py", "openslide", "pyarrow.parquet",
                "sklearn.linear_model", "skops.io", "matplotlib.pyplot", "gcmlm_assets.radiology.features",
                "gcmlm_assets.radiology.masks", "gcmlm_assets.pathology.extract", "gcmlm_assets.pathology.encoders",
                "gcmlm_assets.cohort.model.modelling", "gcmlm_assets.cohort.model.crossval", "gcmlm_assets.cohort.model.metrics",
                "gcmlm_assets.cohort.card.plots", "gcmlm_assets.cohort.card.model_card", "gcmlm_assets.definitions")


@dataclass(frozen=True)
class Pause:
    """Stop at the `nth` call of `target` whose arguments' repr contains `match`."""

    target: str
    match: str = ""
    nth: int = 1


@dataclass(frozen=True)
class RunOutcome:
    pid: int
    exit_code: int | None  # None when killed
    killed: bool
    paused_at: str  # the marker's text: the call that was stopped
    seconds: float


# ---------------------------------------------------------------- inside the server


def _install_pause(pause: dict, marker: Path) -> None:
    import functools
    import importlib

    module_name, _, attribute_path = pause["target"].partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def paused(*args, **kwargs):
        nonlocal calls
        described = repr((args, kwargs))
        if pause["match"] in described:
            calls += 1
            if calls == pause["nth"]:
                staged = marker.with_name(marker.name + ".part")
                staged.write_text(f"{pause['target']}{described[:300]}")
                os.replace(staged, marker)
                while True:  # until the test's SIGKILL
                    time.sleep(60)
        return original(*args, **kwargs)

    setattr(owner, name, paused)


def _override_profile(settings: dict) -> None:
    """The profile's resource settings with `settings` (resource key -> fields) laid over them, for
    this run only: e.g. a shorter nnU-Net training than the demo's."""
    import dataclasses

    from gcmlm_assets import profiles

    base = profiles.PROFILES[PROFILE]
    merged = {key: {**base.resource_settings(key), **settings.get(key, {})} for key in {*base.resources, *settings}}
    profiles.PROFILES[PROFILE] = dataclasses.replace(base, resources=profiles._frozen(merged))


def _child(request: dict) -> int:
    import dagster as dg

    from gcmlm_assets.definitions import build_definitions

    os.environ.update(request["env"])
    if request.get("settings"):
        _override_profile(request["settings"])
    if request.get("pause"):
        _install_pause(request["pause"], Path(request["marker"]))
    job = build_definitions("local", PROFILE).resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.from_config(request["env"]["DAGSTER_HOME"]) as instance:
        result = job.execute_in_process(instance=instance, partition_key=request.get("partition"),
                                        asset_selection=[dg.AssetKey(a) for a in request["assets"]],
                                        raise_on_error=False)
    return 0 if result.success else 1


def serve() -> None:
    import importlib

    os.environ["GCMLM_PROFILE"] = PROFILE
    os.environ["GCMLM_ENV"] = "local"
    for name in WARM_IMPORTS:
        importlib.import_module(name)
    reply = sys.stdout
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                # The child's own output goes to its log, never into the reply channel.
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                code = _child(request)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                                "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}) + "\n")
        reply.flush()


# ---------------------------------------------------------------- in the test


class RunServer:
    """The client side: one server process, one run at a time."""

    def __init__(self, work: Path, startup_timeout_s: float = 180):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / "server.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gcmlm_assets_tests.support.robustness.runs"],
                                            cwd=PROJECT_ROOT, env=env, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        self.count = 0
        ready = self._read(startup_timeout_s)
        assert ready.get("ready"), ready

    def _read(self, timeout_s: float) -> dict:
        import select

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if readable:
                line = self.process.stdout.readline()
                if not line:
                    break
                return json.loads(line)
            if self.process.poll() is not None:
                break
        raise RuntimeError(f"run server gave no answer in {timeout_s:.0f} s; its log {self.log}:\n"
                           + self.log.read_text(encoding="utf-8", errors="replace")[-3000:])

    def run(self, env: dict[str, str], assets: list[str], partition: str | None = None,
            pause: Pause | None = None, timeout_s: float = 240, settings: dict | None = None) -> RunOutcome:
        """Materialize `assets`; with `pause`, SIGKILL the child once it stops there. `settings`:
        resource settings laid over the profile's for this run (resource key -> fields)."""
        self.count += 1
        marker = self.work / f"paused-{self.count}"
        log = self.work / f"run-{self.count}.log"
        request = {"env": env, "assets": assets, "partition": partition, "marker": str(marker), "log": str(log),
                   "pause": pause.__dict__ if pause else None, "settings": settings}
        started = time.monotonic()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self._read(60)["pid"]
        if pause is not None:
            deadline = started + timeout_s
            while not marker.exists():
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    self._read(60)
                    raise AssertionError(f"run {self.count} never reached {pause}; its log {log}")
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)  # the pid of our own forked child, never a name
        done = self._read(timeout_s)
        if pause is not None and done["signal"] != signal.SIGKILL:
            raise AssertionError(f"run {self.count} ended ({done}) before {pause} could kill it; its log {log}:\n"
                                 + log.read_text(encoding="utf-8", errors="replace")[-3000:])
        return RunOutcome(pid=pid, exit_code=done["exit_code"], killed=done["signal"] == signal.SIGKILL,
                          paused_at=marker.read_text(encoding="utf-8") if marker.exists() else "",
                          seconds=time.monotonic() - started)

    def materialize(self, env: dict[str, str], assets: list[str], partition: str | None = None,
                    settings: dict | None = None, timeout_s: float = 240) -> RunOutcome:
        """An uninterrupted run that must succeed."""
        outcome = self.run(env, assets, partition, timeout_s=timeout_s, settings=settings)
        if outcome.exit_code != 0:
            log = self.work / f"run-{self.count}.log"
            raise AssertionError(f"{assets} for {partition or 'the cohort'} failed (exit {outcome.exit_code}); "
                                 f"log {log}:\n" + "\n".join(_failures(log)))
        return outcome

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _failures(log: Path) -> list[str]:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    picked = [line for line in lines if "STEP_FAILURE" in line or "Error" in line]
    return (picked or lines)[-20:]


if __name__ == "__main__":
    serve()
