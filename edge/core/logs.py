"""Structured logging: JSON lines for machines, one readable line for people.

Modules log with the standard library and pass structured fields as
``extra={"fields": {...}}``; the formatter puts them in the record.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import sys
import time
from typing import Any, TextIO

from pydantic import BaseModel


def fields(**values: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(camera="c0"))``."""
    return {"fields": values}


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: enums by value, paths and unknown objects as text,
    models and dataclasses as dicts, so no log line shows a Python repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, BaseException):
        return str(value) or type(value).__name__
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(plain(getattr(record, "fields", {})))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


class HumanFormatter(logging.Formatter):
    """``HH:MM:SS level message  key=value ...``; fields that are None are left out."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={_short(v)}" for k, v in plain(getattr(record, "fields", {})).items()
                         if v is not None)
        line = f"{stamp} {record.levelname.lower():7} {record.getMessage()}"
        if extra:
            line += f"  {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _short(value: Any) -> str:
    """One field's text: floats to 4 digits, containers and booleans as JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value, separators=(",", ":"))
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
