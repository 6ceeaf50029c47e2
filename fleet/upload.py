"""Pushing an artifact's bytes to the manager through the operator RPC, with a progress bar."""

from __future__ import annotations

import base64
import hashlib
import sys
from pathlib import Path
from typing import Any

from .client import FleetClient
from .rpc import UPLOAD_CHUNK_BYTES

BAR = 24


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """A progress bar on stderr, drawn only for a terminal."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        filled = int(BAR * done / max(1, self.total))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (BAR - filled)}] {100 * done // max(1, self.total):3d}%"
                         f" {_mb(done)}/{_mb(self.total)}")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def push_file(client: FleetClient, path: Path, *, kind: str, name: str, version: str,
              manifest: dict[str, Any] | None, progress: bool = False, timeout: float = 60.0) -> dict[str, Any]:
    """Upload ``path`` unless the manager has its bytes, then register it (validated, signed there)."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if not client.call("artifacts.has", {"sha256": sha})["stored"]:
        bar = Progress(len(data), f"upload {path.name}", progress)
        for offset in range(0, len(data), UPLOAD_CHUNK_BYTES):
            piece = data[offset:offset + UPLOAD_CHUNK_BYTES]
            client.call("artifacts.upload", {"sha256": sha, "size": len(data), "offset": offset,
                                             "data": base64.b64encode(piece).decode()})
            bar.update(offset + len(piece))
    return client.call("artifacts.push", {"kind": kind, "name": name, "version": version, "sha256": sha,
                                          "manifest": manifest}, timeout=timeout)
