"""SQLite files the way edgecam uses them: WAL, explicit transactions, numbered migrations.

The schema is built and migrated with sqlite-utils, one transaction per step, the
step number kept in ``PRAGMA user_version``. The hot paths use the raw connection
with ``isolation_level=None``, so every transaction is an explicit ``BEGIN``/``COMMIT``
and nothing is committed behind the caller's back.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Callable, Sequence

import sqlite_utils

from .logs import fields

log = logging.getLogger("edge.db")

BUSY_TIMEOUT_S = 5.0
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # truncate the WAL back to this after a checkpoint

Migration = Callable[[sqlite_utils.Database], None]


class SchemaTooNew(Exception):
    """The file was written by a newer version that knows more migrations."""


def connect(path: Path, synchronous: str = "normal", *, readonly: bool = False,
            wal_bytes: int | None = None) -> sqlite3.Connection:
    """A connection in WAL mode with explicit transactions, usable from one thread at a time.

    ``wal_bytes`` bounds the WAL this connection's commits leave: it checkpoints once a
    quarter of that is in the WAL, and cuts the file back to half of it when the WAL
    starts over (one transaction may add the other half)."""
    if readonly:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_S)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode is {mode})")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    if wal_bytes is None:
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    else:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={max(1, wal_bytes // 4 // page)}")
        conn.execute(f"PRAGMA journal_size_limit={wal_bytes // 2}")
    return conn


def is_disk_full(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed for want of space ("database or disk is full")."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)


def migrate(conn: sqlite3.Connection, steps: Sequence[Migration], *, name: str) -> int:
    """Run the steps after the file's ``user_version``; returns the new version."""
    db = sqlite_utils.Database(conn, execute_plugins=False)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(steps):
        raise SchemaTooNew(f"schema version {version} is newer than this edgecam understands ({len(steps)})")
    for number, step in enumerate(steps[version:], start=version + 1):
        with db.atomic():
            step(db)
            conn.execute(f"PRAGMA user_version = {number}")
        log.info("schema migrated", extra=fields(db=name, version=number))
    return max(version, len(steps))


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back an open transaction, if any, after a failed statement."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")
