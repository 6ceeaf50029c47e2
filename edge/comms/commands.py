"""Commands from the line: enable, disable, mute or unmute a camera's rule, or acknowledge
its latest alert.

Two ways in, one way through: a :class:`~edge.core.contract.Command` body on the plain
command topic ``{p}/commands/{site}/{line}/{device}``, or a Sparkplug DCMD writing a
rule's ``Enabled``, ``Mute Minutes`` or ``Acknowledge`` metric. Either way the command
is authorised by its topic (the device subscribes to its own topics only; the broker's
ACL decides who may write them), validated strictly, applied through the decide
engine's controls (so it takes effect between two frames), kept in the state file (a
restart keeps a disabled rule disabled), written to the outbox as a ``command`` audit
event, and answered on ``.../result`` for the plain topic (Sparkplug hosts read the new
values in the next DDATA).

A body that does not decode, names an unknown camera or rule, or asks for what cannot
be done is refused with a reason, counted, logged and answered; a command addressed to
another device is ignored and counted. Refusals are not audited: what a hostile client
sends must not fill the outbox.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from edge.config import DeviceInfo
from edge.core.contract import CommandResult, ContractError, Topics, decode_command
from edge.core.files import replace_file
from edge.core.logs import fields
from edge.decide.engine import ControlError, DecisionEngine, RuleControl
from edge.sync.events import Event, PayloadError, command_audit

from .sparkplug import RuleOp

log = logging.getLogger("edge.commands")


class Commander:
    """Validates and applies the line's commands for one device."""

    def __init__(self, device: DeviceInfo, topics: Topics, engine: DecisionEngine, cameras: Iterable[str],
                 state_file: Path, audit: Callable[[Event], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.device = device
        self.topics = topics
        self.topic = topics.command(device.site, device.line, device.id)
        self.result_topic = topics.command_result(device.site, device.line, device.id)
        self._engine = engine
        self._cameras = set(cameras)
        self._state_file = state_file
        self._audit = audit
        self._clock = clock
        self.counters: dict[str, Any] = {"applied": {}, "rejected": {}, "ignored": {}}

    # --- state across restarts -------------------------------------------------------------

    def restore(self) -> None:
        """Put back the controls kept by an earlier run; a file that does not load is
        logged and left alone (the daemon starts with every rule enabled)."""
        try:
            doc = json.loads(self._state_file.read_text())
            controls = {(c["camera"], c["rule"]): RuleControl(bool(c["enabled"]), c["muted_until"], c["acked"])
                        for c in doc["controls"]}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("command state unreadable: every rule starts enabled",
                      extra=fields(path=str(self._state_file), error=str(exc)))
            return
        dropped = self._engine.restore_controls(
            {k: c for k, c in controls.items() if k[0] in self._cameras})
        if controls:
            log.info("rule controls restored", extra=fields(controls=len(controls) - len(dropped),
                                                            dropped=[f"{c}/{r}" for c, r in dropped]))

    def _save(self) -> None:
        controls = [{"camera": c, "rule": r, **control.to_dict()} for (c, r), control in self._engine.controls().items()]
        try:
            replace_file(self._state_file, json.dumps({"v": 1, "controls": controls}).encode())
        except OSError as exc:  # the command is applied; only its survival of a restart is lost
            log.error("command state not saved", extra=fields(path=str(self._state_file), error=str(exc)))

    # --- the two ways in -------------------------------------------------------------------

    def from_topic(self, topic: str, data: bytes) -> CommandResult | None:
        """A body on the plain command topic; the result to publish (None: ignored)."""
        try:
            command = decode_command(data, device=self.device.id)
        except ContractError as exc:
            if exc.reason == "wrong_device":
                self._ignore("mqtt", topic, exc.reason, exc.detail)
                return None
            return self._refuse("mqtt", topic, exc.reason, exc.detail)
        return self.apply("mqtt", topic, command.camera, command.rule, command.op, minutes=command.minutes,
                          alert=command.alert, id=command.id)

    def from_sparkplug(self, topic: str, ops: list[RuleOp]) -> list[CommandResult]:
        """The writes of one DCMD, already decoded and type-checked."""
        return [self.apply("sparkplug", topic, op.camera, op.rule, op.op, minutes=op.minutes) for op in ops]

    def apply(self, source: str, topic: str, camera: str, rule: str, op: str, *, minutes: float | None = None,
              alert: str | None = None, id: str | None = None) -> CommandResult:
        if camera not in self._cameras:
            return self._refuse(source, topic, "unknown_camera", f"no camera {camera!r} on this device",
                                camera=camera, rule=rule, op=op, id=id)
        try:
            control = self._engine.control(camera, rule, op, minutes=minutes, alert=alert)
        except ControlError as exc:
            return self._refuse(source, topic, exc.reason, exc.detail, camera=camera, rule=rule, op=op, id=id)
        self._save()
        _count(self.counters["applied"], op)
        log.info("command applied", extra=fields(source=source, camera=camera, rule=rule, op=op, minutes=minutes,
                                                 enabled=control.enabled, muted_until=control.muted_until))
        if self._audit is not None:
            try:
                self._audit(command_audit(camera, source, topic, op, True, rule=rule, id=id, minutes=minutes,
                                          alert=control.acked if op == "ack" else None,
                                          enabled=control.enabled, muted_until=control.muted_until))
            except PayloadError as exc:  # cannot happen with validated fields; never lose the command over it
                log.error("command audit refused", extra=fields(error=str(exc)))
        return CommandResult(v=1, device=self.device.id, id=id, source=source, camera=camera, rule=rule, op=op,
                             ok=True, at=self._clock(), muted_until=control.muted_until)

    # --- refusals ----------------------------------------------------------------------------

    def refuse_sparkplug(self, topic: str, reason: str, detail: str) -> None:
        """A DCMD the edge node could not take (see ``sparkplug.REASONS``)."""
        if reason in ("unknown_camera", "wrong_device"):
            self._ignore("sparkplug", topic, reason, detail)
        else:
            self._refuse("sparkplug", topic, reason, detail)

    def _refuse(self, source: str, topic: str, reason: str, detail: str, **about: Any) -> CommandResult:
        _count(self.counters["rejected"], reason)
        log.warning("command rejected", extra=fields(source=source, topic=topic, reason=reason, error=detail[:300],
                                                     **{k: v for k, v in about.items() if v is not None}))
        return CommandResult(v=1, device=self.device.id, source=source, ok=False, reason=reason,
                             detail=detail[:512], at=self._clock(),
                             **{k: v for k, v in about.items() if k in ("camera", "rule", "op", "id")})

    def _ignore(self, source: str, topic: str, reason: str, detail: str) -> None:
        _count(self.counters["ignored"], reason)
        log.warning("command for another device ignored", extra=fields(source=source, topic=topic, reason=reason,
                                                                       error=detail[:300]))

    def stats(self) -> dict[str, Any]:
        return {k: dict(v) for k, v in self.counters.items()}


def _count(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1
