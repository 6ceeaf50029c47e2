"""``fleet db copy``: a store moved from one database to another, every row of it.

Tables are read in key order in chunks and inserted with ``ON CONFLICT DO NOTHING``, so
a copy run again (after it was interrupted, or after more events arrived) adds what is
missing and changes nothing else; events are copied in the order they arrived. A row
the target's types refuse (SQLite keeps whatever it is given) is left out and named,
never silently. The lease is not copied: the target's managers choose their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from . import schema as S
from .store import DatabaseError, Store

log = logging.getLogger("fleet.store")

CHUNK_ROWS = 2000
ORDER = ("devices", "events", "artifacts", "blobs", "desired", "reported", "rollouts", "executions", "jobs", "answers",
         "identities")


@dataclass
class Copied:
    rows: dict[str, int] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)  # table -> the refused rows' keys


def copy_store(source: Store, target: Store, *, artifacts: Path | None = None,
               progress: Callable[[str, int], None] = lambda table, rows: None) -> Copied:
    """Copy every table of ``source`` into ``target`` (both at the current schema);
    ``artifacts``: a directory of artifact bytes (``<sha256>`` files) to keep in the target too."""
    done = Copied()
    for name in ORDER:
        table = S.metadata.tables[name]
        done.rows[name] = _copy_table(source, target, table, done, progress)
    if artifacts is not None and artifacts.is_dir():
        have = target.blob_shas()
        for path in sorted(artifacts.iterdir()):
            if path.is_file() and len(path.name) == 64 and path.name not in have:
                target.put_blob(path.name, path.read_bytes())
                done.rows["blobs"] = done.rows.get("blobs", 0) + 1
    return done


def _copy_table(source: Store, target: Store, table: sa.Table, done: Copied,
                progress: Callable[[str, int], None]) -> int:
    keys = list(table.primary_key.columns)
    columns = [c for c in table.columns if c.name != "rowid"]  # the target numbers arrivals anew, in order
    insert = target._insert(table).on_conflict_do_nothing()
    copied, after = 0, None
    while True:
        q = sa.select(*columns, *[k for k in keys if k not in columns]).order_by(*keys).limit(CHUNK_ROWS)
        if after is not None:
            q = q.where(sa.tuple_(*keys) > sa.tuple_(*[sa.literal(v) for v in after]))
        with source.engine.connect() as c:
            rows = [dict(r) for r in c.execute(q).mappings()]
        if not rows:
            return copied
        after = tuple(rows[-1][k.name] for k in keys)
        values = [{c.name: r[c.name] for c in columns} for r in rows]
        try:
            with target.engine.begin() as c:
                c.execute(insert, values)
        except DatabaseError:  # one at a time, to name the rows the target refuses
            for row, value in zip(rows, values):
                try:
                    with target.engine.begin() as c:
                        c.execute(insert, value)
                except DatabaseError as exc:
                    key = " ".join(f"{k.name}={row[k.name]!r}" for k in keys)
                    done.refused.setdefault(table.name, []).append(key)
                    log.warning("row not copied", extra={"fields": {"table": table.name, "row": key,
                                                                    "error": str(getattr(exc, "orig", exc))[:200]}})
        copied += len(rows)
        progress(table.name, copied)
