"""Replacing a file so that readers see the old one or the new one, never half of one;
and a file's SHA-256 (here rather than in ``signing``, so hashing needs no cryptography)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO


def replace_file(path: Path, data: bytes, *, durable: bool = True, mode: int | None = None) -> None:
    """Write ``data`` beside ``path`` and rename it over. ``durable``: fsync the file and
    its directory too, so the new content also survives a power cut. ``mode``: the new
    file's permissions from its first byte (0o600 for a secret)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    if mode is not None:
        os.fchmod(fd, mode)  # the file may have been left behind with other permissions
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()
