"""Start and stop the Dagster daemon for `make demo` and the end-to-end tests.

The daemon runs in a session of its own, its output (and that of every run it launches: nnU-Net's
console output among them) in a log file, never on the caller's terminal. It is stopped by
process id: SIGTERM to its process group, then SIGKILL to whatever of it and its descendants is
still alive. A non-interactive shell ignores SIGINT in background jobs, so SIGINT is never relied on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets import settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE = PROJECT_ROOT / "workspace.yaml"
LOCAL_INSTANCE_CONFIG = PROJECT_ROOT / "deploy" / "local" / "dagster.yaml"


def prepare_dagster_home(home: Path) -> Path:
    """Create DAGSTER_HOME with the local instance config (as `make ui` does) if it has none, and
    its SQLite databases.

    The databases are created here, in one process, before the daemon starts: the daemon, its code
    server and a caller opening the instance at the same moment would each create and stamp a
    fresh database, and a schema stamped twice ("more than one head") stops every later process.
    """
    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(LOCAL_INSTANCE_CONFIG.read_text(encoding="utf-8"))
    with dg.DagsterInstance.from_config(str(home)):
        pass
    return home


@dataclass
class Daemon:
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def family(self) -> list:
        """The daemon's process and all its descendants (code server, run workers, step processes)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace_s: float = 30.0) -> list[int]:
        """Stop the daemon and everything it started; return the pids that had to be killed."""
        import psutil

        family = self.family()
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        # Anything still alive (a run worker in its own group, a stuck thread) is killed.
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.process.wait(timeout=10)
        return [proc.pid for proc in alive]


def start_daemon(home: Path, log_path: Path, env: dict[str, str] | None = None) -> Daemon:
    """`dagster-daemon run` over the project's workspace and the instance in `home`."""
    environment = {**settings.process_environment(), **(env or {}), "DAGSTER_HOME": str(home)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    executable = Path(sys.executable).parent / "dagster-daemon"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(executable), "run", "-w", str(WORKSPACE)], cwd=PROJECT_ROOT, env=environment,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(process, log_path)
    time.sleep(1.0)
    if not daemon.alive():
        raise RuntimeError(f"dagster-daemon exited at once ({process.returncode}); its log {log_path}:\n"
                           + daemon.log_tail())
    return daemon
