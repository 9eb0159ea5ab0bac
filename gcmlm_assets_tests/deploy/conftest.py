"""Fixtures of the deploy tests: a real PostgreSQL, and every step's Job as dagster-k8s builds it.

The server is CI's when the DAGSTER_PG_* variables are set (.ci/run exports them; they are the
ones deploy/k8s/dagster.yaml reads), else a throwaway one started here when PostgreSQL's server
binaries are installed. Without either the tests skip, or fail under GCMLM_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from gcmlm_assets_tests.support.deploy.postgres import PostgresServer
from gcmlm_assets_tests.support.deploy.step_jobs import (
    GPU_NODE_SELECTOR, GPU_TOLERATIONS, TEST_NAMESPACE, run_builder,
)

PG_USER = "gcmlm"
START_TIMEOUT_S = 60.0


def _unavailable(reason: str):
    if os.environ.get("GCMLM_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (GCMLM_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(reason)


def _server_from_environment() -> PostgresServer | None:
    if not os.environ.get("DAGSTER_PG_HOST"):
        return None
    missing = [name for name in ("DAGSTER_PG_USER", "DAGSTER_PG_DB") if not os.environ.get(name)]
    if missing:
        _unavailable(f"DAGSTER_PG_HOST is set but {', '.join(missing)} is not")
    return PostgresServer(host=os.environ["DAGSTER_PG_HOST"], port=int(os.environ.get("DAGSTER_PG_PORT", "5432")),
                          user=os.environ["DAGSTER_PG_USER"], password=os.environ.get("DAGSTER_PG_PASSWORD", ""),
                          db=os.environ["DAGSTER_PG_DB"])


def _server_bindir() -> Path | None:
    """Where initdb and postgres are: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    found = [shutil.which(name) for name in ("initdb", "postgres")]
    if all(found):
        return Path(found[0]).resolve().parent
    candidates = [d for d in Path("/usr/lib/postgresql").glob("*/bin")
                  if (d / "initdb").is_file() and (d / "postgres").is_file()]
    candidates.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1, reverse=True)
    return candidates[0] if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ThrowawayServer:
    """initdb + postgres in a temporary directory, stopped by the postmaster's PID.

    initdb and postgres refuse to run as root: as root the server runs as the `postgres` user
    when there is one (Debian's package makes it), else as `nobody`.
    """

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="gcmlm-pg-"))
        self.process: subprocess.Popen | None = None
        self.password = secrets.token_hex(16)
        self._as_user: dict = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                account = pwd.getpwnam("nobody")
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            self._as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            os.chown(pwfile, self._as_user["user"], self._as_user["group"])
        initdb = subprocess.run(
            [str(self.bindir / "initdb"), "--pgdata", str(self.dir / "data"), "--username", PG_USER,
             "--pwfile", str(pwfile), "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8",
             "--no-locale"],
            cwd=self.dir, capture_output=True, text=True, timeout=120, **self._as_user)
        pwfile.unlink()
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stdout}{initdb.stderr}")
        log = self.dir / "server.log"
        for _ in range(3):  # another process may take the free port before the server binds it
            server = PostgresServer("127.0.0.1", _free_port(), PG_USER, self.password, "postgres")
            with log.open("ab") as out:
                self.process = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.dir / "data"), "-p", str(server.port),
                     "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                     "-c", "fsync=off"],  # the data are thrown away
                    cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **self._as_user)
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    server.connect().close()
                    return server
                except psycopg2.OperationalError:
                    time.sleep(0.2)
            self.stop_server()
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"postgres did not start; {log}:\n{tail}")

    def stop_server(self) -> None:
        """Fast shutdown (SIGINT ends the sessions), SIGKILL if the postmaster is still there after 30 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL: CI's (DAGSTER_PG_*), else a throwaway one for this session."""
    server = _server_from_environment()
    if server is not None:
        try:
            server.connect().close()
        except psycopg2.Error as error:
            _unavailable(f"cannot connect to the PostgreSQL in DAGSTER_PG_* "
                         f"({server.user}@{server.host}:{server.port}/{server.db}): {error}".strip())
        yield server
        return
    bindir = _server_bindir()
    if bindir is None:
        _unavailable("no PostgreSQL: DAGSTER_PG_HOST is not set and initdb/postgres are not installed "
                     "(on PATH or in /usr/lib/postgresql/*/bin)")
    throwaway = None
    try:
        try:
            throwaway = ThrowawayServer(bindir)
            server = throwaway.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            _unavailable(f"could not start a throwaway PostgreSQL from {bindir}: {error}")
        yield server
    finally:
        if throwaway is not None:
            throwaway.close()


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A new, empty database on the server for one test, dropped afterwards."""
    name = f"gcmlm_test_{secrets.token_hex(6)}"
    admin = postgres_server.connect()
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield dataclasses.replace(postgres_server, db=name)
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Every step's Job of a plain and a run-tagged run (test_step_jobs.py, test_chart_jobs.py)."""
    return run_builder(tmp_path_factory.mktemp("step_jobs") / "jobs.json", "plain", {
        "GCMLM_ENV": "k8s",
        "GCMLM_GPU_NODE_SELECTOR": json.dumps(GPU_NODE_SELECTOR),
        "GCMLM_GPU_TOLERATIONS": json.dumps(GPU_TOLERATIONS),
        "DAGSTER_K8S_NAMESPACE": TEST_NAMESPACE,  # the run launcher's job_namespace
    })
