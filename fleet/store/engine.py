"""Where the store lives: a path or URL made into a SQLAlchemy engine, and its schema
version brought up to date with Alembic.

``fleet.db``, ``sqlite:///fleet.db``: SQLite, embedded, in WAL mode with
``synchronous=FULL`` (an ack tells the device to delete its rows, so what the fleet
acked must survive a power cut) and ``BEGIN IMMEDIATE`` transactions (a writer waits
for the lock up front instead of failing half-way). ``postgresql://...``: PostgreSQL
through psycopg 3, a pool of connections checked before use (a restarted server costs
the next query nothing but a reconnect) and statements prepared server-side once a
query has run a few times.

A SQLite store written before the migrations were Alembic's keeps its version in
``PRAGMA user_version``; it is stamped with the matching revision and upgraded in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, Engine, make_url

from edge.core.errors import EdgeError
from edge.core.logs import fields

log = logging.getLogger("fleet.store")

BUSY_TIMEOUT_S = 5.0
WAL_SIZE_LIMIT = 64 * 1024 * 1024
PREPARE_THRESHOLD = 2  # psycopg prepares a statement server-side from its second run on
CONNECT_TIMEOUT_S = 5
MIGRATIONS = Path(__file__).with_name("migrations")
LEGACY_REVISIONS = {1: "0001", 2: "0002"}  # PRAGMA user_version of the SQLite-only store
MIGRATION_LOCK = 0x6564676563616D  # "edgecam": one manager migrates, the others wait for it


class StoreError(EdgeError):
    """The fleet store cannot be opened or read."""


class SchemaTooNew(StoreError):
    """The store was written by a newer version that knows more migrations."""


def parse_url(value: str | Path) -> URL:
    """A path (SQLite) or a URL (``sqlite:///...``, ``postgresql://...``); StoreError otherwise."""
    text = str(value)
    if "://" not in text:
        return URL.create("sqlite+pysqlite", database=text)
    try:
        url = make_url(text)
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"not a database URL: {text!r} ({exc})") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        return url.set(drivername="sqlite+pysqlite")
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    raise StoreError(f"{describe(url)}: the fleet store is SQLite (a path or sqlite:///PATH) "
                     f"or PostgreSQL (postgresql://USER@HOST/DB), not {backend}")


def describe(url: URL) -> str:
    """The URL as logs and errors show it: never the password."""
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True).replace("postgresql+psycopg", "postgresql")


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def create(url: URL, *, readonly: bool = False, pool_size: int = 4) -> Engine:
    """An engine for the store at ``url`` (nothing is connected yet)."""
    if is_sqlite(url):
        return _sqlite(url, readonly)
    engine = sa.create_engine(
        url, pool_size=pool_size, max_overflow=4, pool_pre_ping=True, pool_recycle=1800,
        connect_args={"prepare_threshold": PREPARE_THRESHOLD, "connect_timeout": CONNECT_TIMEOUT_S,
                      "application_name": "edgecam-fleet"})
    if readonly:
        engine = engine.execution_options(postgresql_readonly=True)
    return engine


def _sqlite(url: URL, readonly: bool) -> Engine:
    path = Path(url.database or "")
    if readonly:
        url = url.set(database=f"file:{path.resolve()}?mode=ro", query={"uri": "true"})
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi, record) -> None:
        dbapi.isolation_level = None  # transactions are ours, begun below
        if not readonly:
            mode = dbapi.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sa.exc.OperationalError("PRAGMA journal_mode=WAL", (), RuntimeError(
                    f"cannot use WAL mode (journal_mode is {mode})"))
            dbapi.execute("PRAGMA synchronous=FULL")
            dbapi.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


# --- schema versions -----------------------------------------------------------------------


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head() -> str:
    """The newest schema revision this code knows."""
    return ScriptDirectory.from_config(_config()).get_current_head() or ""


def current(conn: Connection) -> str | None:
    """The store's schema revision (None: an empty database)."""
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is None and conn.dialect.name == "sqlite":
        legacy = conn.exec_driver_sql("PRAGMA user_version").scalar() or 0
        if legacy:
            return LEGACY_REVISIONS.get(legacy, f"user_version {legacy}")
    return revision


def check(conn: Connection, name: str) -> str | None:
    """The store's revision if this code can read it; SchemaTooNew naming both otherwise."""
    revision = current(conn)
    known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
    if revision is not None and revision not in known:
        raise SchemaTooNew(f"{name}: the fleet store's schema is version {revision}, newer than this edgecam "
                           f"understands (its newest is {head()}): upgrade edgecam, or use a store it made")
    return revision


def upgrade(engine: Engine, name: str) -> tuple[str | None, str]:
    """Bring the schema to :func:`head` in one transaction; returns (before, after)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        before = check(conn, name)
        if before == head():
            return before, before
        config = _config()
        config.attributes["connection"] = conn
        if conn.dialect.name == "sqlite" and before in LEGACY_REVISIONS.values() \
                and MigrationContext.configure(conn).get_current_revision() is None:
            command.stamp(config, before)  # what user_version said, now said the way Alembic reads it
        command.upgrade(config, "head")
    after = head()
    log.info("schema migrated", extra=fields(db=name, before=before or "empty", after=after))
    return before, after
