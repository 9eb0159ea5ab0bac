"""The database privileges deploy/README.md ("The database") tells the operator to grant.

PostgreSQL 15 took CREATE on schema `public` away from every role but the database's owner. The
production instance's storage (deploy/k8s/dagster.yaml) creates its tables on first start, so its
role must own the database or hold CREATE on `public`. Each test makes a login role with only the
privileges it names, on a database the server's superuser owns, and opens the production storage
as that role.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
import yaml

from gcmlm_assets_tests.support.deploy.postgres import PostgresServer

K8S_INSTANCE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "dagster.yaml"
# The first PostgreSQL without CREATE on `public` for every role.
PUBLIC_SCHEMA_LOCKED_FROM = 150000


@pytest.fixture
def role_and_database(postgres_server: PostgresServer) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """(admin on the new database, a new login role on it with CONNECT only); both dropped afterwards."""
    suffix = secrets.token_hex(5)
    role, database, password = f"gcmlm_role_{suffix}", f"gcmlm_priv_{suffix}", secrets.token_hex(12)
    admin = postgres_server.connect()
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
            cursor.execute(f'CREATE DATABASE "{database}"')  # owned by the superuser, not the role
            cursor.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
        yield (PostgresServer(postgres_server.host, postgres_server.port, postgres_server.user,
                              postgres_server.password, database),
               PostgresServer(postgres_server.host, postgres_server.port, role, password, database))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            cursor.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def _admin_sql(admin: PostgresServer, statement: str) -> None:
    connection = admin.connect()
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def _open_production_storage(server: PostgresServer, home: Path, monkeypatch) -> dg.DagsterInstance:
    production = yaml.safe_load(K8S_INSTANCE.read_text(encoding="utf-8"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": production["storage"]}))
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return dg.DagsterInstance.from_config(str(home))


def _server_version(server: PostgresServer) -> int:
    connection = server.connect()
    try:
        return connection.server_version
    finally:
        connection.close()


def _writes_and_reads_a_run(instance: dg.DagsterInstance) -> None:
    run = instance.create_run_for_job(dg.GraphDefinition(name="privileges_probe", node_defs=[]).to_job())
    assert [r.run_id for r in instance.get_runs()] == [run.run_id]


def test_connect_alone_cannot_create_the_tables(role_and_database, tmp_path, monkeypatch):
    admin, role = role_and_database
    if _server_version(admin) < PUBLIC_SCHEMA_LOCKED_FROM:
        pytest.skip("PostgreSQL before 15 grants CREATE on public to every role")
    with pytest.raises(Exception) as failure:
        _open_production_storage(role, tmp_path / "home", monkeypatch)
    chain, error = [], failure.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, psycopg2.errors.InsufficientPrivilege) or "permission denied for schema public" in str(e)
               for e in chain), [repr(e) for e in chain]


def test_create_on_schema_public_is_enough(role_and_database, tmp_path, monkeypatch):
    admin, role = role_and_database
    _admin_sql(admin, f"GRANT CREATE ON SCHEMA public TO {role.user}")
    with _open_production_storage(role, tmp_path / "home", monkeypatch) as instance:
        _writes_and_reads_a_run(instance)


def test_owning_the_database_is_enough(role_and_database, tmp_path, monkeypatch):
    admin, role = role_and_database
    _admin_sql(admin, f'ALTER DATABASE "{admin.db}" OWNER TO {role.user}')
    with _open_production_storage(role, tmp_path / "home", monkeypatch) as instance:
        _writes_and_reads_a_run(instance)
