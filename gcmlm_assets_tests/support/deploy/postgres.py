"""How the deploy tests reach a PostgreSQL server: address, credentials, database."""

from __future__ import annotations

import dataclasses

import psycopg2


@dataclasses.dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    db: str

    def connect(self, db: str | None = None):
        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=db or self.db, connect_timeout=10)

    def env(self) -> dict[str, str]:
        """The variables the production instance's storage section reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db}
