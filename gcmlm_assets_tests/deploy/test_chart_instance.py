"""The storage the Helm chart writes from deploy/helm/values.yaml, opened on a real PostgreSQL.

chart_render.py renders the chart's dagster.yaml; its three storage entries are used here as the
chart writes them, with only the server's address, role and database swapped for the test
server's (the values name the production ones) and the password read from DAGSTER_PG_PASSWORD,
as the chart's pods get it from the Secret. A run and its events are written through it and read
back. Without `postgresqlScheme` the same storage fails the way issue 21 found in the image: the
bare postgresql:// URL asks SQLAlchemy 2.1 for psycopg 3, which is not installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import dagster as dg
import pytest
import yaml

from gcmlm_assets_tests.support.deploy import chart_render

VALUES_FILE = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "values.yaml"


def chart_storage_on(server, values: dict) -> dict:
    """The chart's storage entries for these values, pointed at `server`; nothing else changed."""
    values = copy.deepcopy(values)
    pg = values["postgresql"]
    pg["postgresqlHost"], pg["postgresqlUsername"], pg["postgresqlDatabase"] = server.host, server.user, server.db
    pg["service"]["port"] = server.port
    rendered = chart_render.render_instance(values)
    return {key: rendered[key] for key in chart_render.STORAGE_CLASSES}


@pytest.fixture
def values() -> dict:
    return yaml.safe_load(VALUES_FILE.read_text(encoding="utf-8"))


@pytest.fixture
def chart_pod_env(postgres_database, monkeypatch):
    """The one database variable the chart gives its pods: the password, from the Secret."""
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_DB"):
        monkeypatch.delenv(name, raising=False)  # the chart's instance reads none of these
    monkeypatch.setenv(chart_render.PASSWORD_ENV, postgres_database.password)
    return postgres_database


@dg.asset
def chart_storage_probe(context):
    context.log.info("written through the chart's storage")
    return 1


def test_the_chart_storage_opens_postgres_and_keeps_a_run(chart_pod_env, values, tmp_path):
    storage = chart_storage_on(chart_pod_env, values)
    for section in storage.values():
        db = section["config"]["postgres_db"]
        assert db["password"] == {"env": chart_render.PASSWORD_ENV} and db["scheme"] == "postgresql+psycopg2"
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(storage))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert instance.run_storage.postgres_url.startswith("postgresql+psycopg2://")
        run_id = dg.materialize([chart_storage_probe], instance=instance).run_id

    # A second instance from the same file reads what the first wrote.
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        messages = [record.user_message for record in instance.all_logs(run_id)]
        assert "written through the chart's storage" in messages
        event = instance.get_latest_materialization_event(dg.AssetKey("chart_storage_probe"))
        assert event is not None and event.run_id == run_id
        assert instance.all_instigator_state() == []  # the schedule storage answers too


def test_without_the_scheme_the_chart_storage_needs_psycopg_3(chart_pod_env, values, tmp_path):
    """The blocker the test guards against: take postgresqlScheme out and the instance cannot open."""
    del values["postgresql"]["postgresqlScheme"]
    storage = chart_storage_on(chart_pod_env, values)
    assert all("scheme" not in section["config"]["postgres_db"] for section in storage.values())
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(storage))
    with pytest.raises(ModuleNotFoundError, match="No module named 'psycopg'"):
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            instance.get_runs(limit=1)
