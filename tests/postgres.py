"""The tests' private PostgreSQL cluster (``fleet.local_postgres``), skipping with a clear
message where the server's binaries or an account to run them are missing."""

from __future__ import annotations

import pytest

from fleet.local_postgres import LocalPostgres, PostgresUnavailable


class Postgres(LocalPostgres):
    """One cluster for the session; each test gets a database of its own in it."""

    def __init__(self) -> None:
        try:
            super().__init__()
        except PostgresUnavailable as exc:
            pytest.skip(str(exc))
