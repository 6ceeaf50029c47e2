"""Model and policy files on the device, by content, and the state naming what runs.

Layout under the store's directory::

    objects/<sha256>.tflite   a model, named by the hash of its bytes
    objects/<sha256>.policy   a policy document
    objects/<sha256>.json     the artifact it came as (manifest with labels, signature)
    staging/<sha256>.part     a download in progress; its size is how far it got
    state.json                active and previous artifact per slot, crash-loop record

``state.json`` is the one place that says what runs. It is replaced atomically (write
a temp file, fsync, rename, fsync the directory), so a process killed at any moment
leaves either the old state or the new one. An object file is complete before any
state names it: it is renamed into ``objects/`` only after it is verified.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from edge.core.contract import Artifact, Running
from edge.core.errors import EdgeError
from edge.core.files import fsync_dir, replace_file, sha256_file
from edge.inference.manifest import Manifest

log = logging.getLogger("edge.modelstore")

STATE_NAME = "state.json"
STALE_PART_S = 86400.0
SUFFIX = {"model": ".tflite", "policy": ".policy"}


class StoreError(EdgeError):
    """The store's state file or an object in it is unreadable."""


class Entry(BaseModel):
    """One artifact as a slot holds it."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    kind: Literal["model", "policy"] = "model"
    name: str
    version: str
    job: str | None = None
    desired_version: int | None = None  # the desired state that asked for it
    activated_at: float = 0.0  # time.time(); 0 for a factory default
    committed: bool = True  # passed its health window (a factory default is trusted)
    boots: list[float] = []  # starts of the daemon since the activation, for crash loops

    def running(self) -> Running:
        return Running(name=self.name, version=self.version, sha256=self.sha256)


class SlotState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    active: Entry | None = None
    previous: Entry | None = None


class State(BaseModel):
    """The whole state file."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    desired_version: int | None = None  # the last desired state fully acted on
    slots: dict[str, SlotState] = {}
    policy: SlotState = SlotState()
    last_change: dict | None = None  # a contract Change, as sent in ``reported``


class CrashLoop(BaseModel):
    """A slot sent back to its previous model at boot."""

    slot: str
    failed: Entry
    restored: Entry
    restarts: int


class ModelStore:
    """Files and state under ``root``; one writer process at a time per state change."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep
        self.objects = root / "objects"
        self.staging = root / "staging"
        self.state_path = root / STATE_NAME
        for d in (self.objects, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    # --- state ---------------------------------------------------------------------------

    def load(self) -> State:
        """The state on disk; an absent file is the empty state (factory defaults)."""
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StoreError(f"cannot read {self.state_path}: {exc.strerror or exc}") from None
        try:
            return State.model_validate_json(text)
        except ValidationError as exc:
            # an atomic rename never leaves half a file: this is damage from outside
            raise StoreError(f"{self.state_path} is not a valid state file: {exc.errors()[0]['msg']}") from None

    def save(self, state: State) -> None:
        """Replace the state file atomically and durably."""
        replace_file(self.state_path, state.model_dump_json(indent=1).encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        """Read-modify-write of the state under an exclusive lock (the daemon and the CLI)."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.load()
            yield state
            self.save(state)

    # --- objects -------------------------------------------------------------------------

    def path(self, sha256: str, kind: str = "model") -> Path:
        return self.objects / f"{sha256}{SUFFIX[kind]}"

    def has(self, artifact: Artifact) -> bool:
        path = self.path(artifact.sha256, artifact.kind)
        return path.is_file() and path.stat().st_size == artifact.size and (self.objects / f"{artifact.sha256}.json").is_file()

    def part(self, sha256: str) -> Path:
        return self.staging / f"{sha256}.part"

    def admit(self, artifact: Artifact, part: Path) -> Path:
        """Move a verified staging file into the store, with its artifact document."""
        replace_file(self.objects / f"{artifact.sha256}.json", artifact.model_dump_json().encode())
        dest = self.path(artifact.sha256, artifact.kind)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        fsync_dir(self.objects)
        return dest

    def import_file(self, path: Path, manifest: Manifest) -> Entry:
        """A factory model (from the config) copied in, so a rollback to it needs nothing else."""
        sha = sha256_file(path)
        dest = self.path(sha)
        if not dest.is_file():
            tmp = self.staging / f"{sha}.import"
            shutil.copyfile(path, tmp)
            artifact = Artifact(kind="model", name=manifest.name, version=manifest.version, sha256=sha,
                                size=tmp.stat().st_size, manifest=manifest.model_dump())
            self.admit(artifact, tmp)
        return Entry(sha256=sha, name=manifest.name, version=manifest.version)

    def artifact(self, sha256: str) -> Artifact:
        try:
            return Artifact.model_validate_json((self.objects / f"{sha256}.json").read_text())
        except (OSError, ValidationError) as exc:
            raise StoreError(f"artifact {sha256[:12]} in {self.objects} is unreadable: {exc}") from None

    def manifest(self, sha256: str) -> Manifest:
        try:
            return Manifest.model_validate(self.artifact(sha256).manifest)
        except ValidationError as exc:
            raise StoreError(f"artifact {sha256[:12]} has an invalid manifest: {exc.errors()[0]['msg']}") from None

    def gc(self, state: State) -> list[str]:
        """Delete objects no slot names, keeping the ``keep`` newest of them; returns the deleted."""
        named = {e.sha256 for s in [*state.slots.values(), state.policy] for e in (s.active, s.previous) if e}
        spare = sorted(
            (p for p in self.objects.glob("*.json") if p.stem not in named),
            key=lambda p: p.stat().st_mtime, reverse=True)
        deleted = []
        for doc in spare[self.keep:]:
            for path in self.objects.glob(f"{doc.stem}.*"):
                path.unlink(missing_ok=True)
            deleted.append(doc.stem)
        # a download nobody resumed for a day is not coming back
        for part in self.staging.glob("*"):
            if time.time() - part.stat().st_mtime > STALE_PART_S:
                part.unlink(missing_ok=True)
        return deleted

    # --- boot ----------------------------------------------------------------------------

    def boot(self, now: float, restarts: int, minutes: float) -> list[CrashLoop]:
        """Record this start against recent activations; a slot whose activation has seen
        ``restarts`` starts within ``minutes`` goes back to its previous model."""
        loops: list[CrashLoop] = []
        with self.locked() as state:
            for slot, s in state.slots.items():
                entry = s.active
                if entry is None or not entry.activated_at or now - entry.activated_at > minutes * 60:
                    continue
                entry.boots = [t for t in entry.boots if now - t <= minutes * 60] + [now]
                if len(entry.boots) < restarts or s.previous is None:
                    continue
                failed, restored = entry, s.previous
                loops.append(CrashLoop(slot=slot, failed=failed, restored=restored, restarts=len(entry.boots)))
                s.active, s.previous = restored, failed.model_copy(update={"boots": []})
                state.last_change = {"slot": slot, "at": now, "job": failed.job,
                                     "reason": f"crash_loop: {len(failed.boots)} starts after activating "
                                               f"{failed.name} {failed.version}"}
                # the desired state that asked for the failed model is answered: do not retry it
                if failed.desired_version is not None:
                    state.desired_version = max(state.desired_version or 0, failed.desired_version)
        return loops


def describe(state: State) -> list[dict]:
    """Rows for ``edge models list``."""
    rows = []
    for slot, s in sorted(state.slots.items()) + [("policy", state.policy)]:
        for role, e in (("active", s.active), ("previous", s.previous)):
            if e is None:
                continue
            rows.append({"slot": slot, "role": role, "name": e.name, "version": e.version, "sha256": e.sha256,
                         "committed": e.committed, "job": e.job, "activated_at": e.activated_at or None})
    return rows


def rollback_slot(store: ModelStore, slot: str) -> Entry:
    """A technician's rollback: the slot's previous model becomes active (a running agent follows)."""
    with store.locked() as state:
        s = state.slots.get(slot)
        if s is None or s.previous is None:
            known = ", ".join(sorted(k for k, v in state.slots.items() if v.previous)) or "none"
            raise StoreError(f"slot {slot!r} has no previous model to go back to (slots with one: {known})")
        if not store.path(s.previous.sha256).is_file():
            raise StoreError(f"the previous model of {slot} ({s.previous.sha256[:12]}) is no longer on disk")
        # the restored model proved itself before: no health window, no crash-loop count
        restored = s.previous.model_copy(update={"committed": True, "boots": [], "activated_at": 0.0})
        s.active, s.previous = restored, s.active
        state.last_change = {"slot": slot, "at": time.time(), "reason": "local rollback on the device",
                             "job": None}
    return restored
