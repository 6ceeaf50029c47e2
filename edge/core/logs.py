"""Structured logging: JSON lines for machines, one readable line for people.

Modules log with the standard library and pass structured fields as
``extra={"fields": {...}}``; the formatter puts them in the record.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO


def fields(**values: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(camera="c0"))``."""
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={_short(v)}" for k, v in getattr(record, "fields", {}).items())
        line = f"{stamp} {record.levelname.lower():7} {record.getMessage()}"
        if extra:
            line += f"  {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def setup_logging(fmt: str = "human", level: str = "info", stream: TextIO | None = None,
                  loggers: tuple[str, ...] = ("edge",)) -> None:
    """Route the named logger trees (``edge`` by default) to one handler on stderr with
    the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    for name in loggers:
        root = logging.getLogger(name)
        root.handlers[:] = [handler]
        root.setLevel(level.upper())
        root.propagate = False
