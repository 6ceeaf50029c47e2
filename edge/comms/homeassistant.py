"""Home Assistant MQTT discovery: the device and its cameras appear without custom code.

One retained device-based discovery config on ``{prefix}/device/{object_id}/config``
(Home Assistant 2024.11 and later) holds every entity, in the documented abbreviated
form (``dev``, ``o``, ``cmps``, ``p``, ``uniq_id``, ``stat_t``, ...). Per camera:

- a ``binary_sensor`` (device class ``problem``): the camera is blind or tampered;
- an ``event`` entity fed by the camera's alert topic, one event type per alert event;
- per policy rule with ``state: true``, a ``binary_sensor``: its condition holds now;
- per policy rule, a ``sensor`` of its event count (``total_increasing``);
- per policy rule, a ``switch`` wired to the command topic (when ``commands`` is
  configured): off disables the rule, on enables it again.

The sensors and switches read the camera's retained :class:`CameraSummary` on
``{p}/alerts/{site}/{line}/{camera}/summary``, published by the comms thread whenever
it changes; availability is the device's own retained status (offline by its last will).
The config is published again when Home Assistant announces itself on
``{prefix}/status`` (``online``) and when the set of entities changes; an entity no
longer there is removed by sending it once with its platform alone, as Home Assistant
asks.
"""

from __future__ import annotations

import json
from typing import Any

from edge import __version__
from edge.config import DeviceInfo, HomeAssistantConfig
from edge.core.contract import ALERT_EVENTS, CameraSummary, Command, RuleSummary, Topics, encode
from edge.core.contract import ha_object_id as object_id

from .view import CameraView, LineView

ONLINE = b"online"


class Discovery:
    """Builds the discovery config and the camera summaries of one device."""

    def __init__(self, cfg: HomeAssistantConfig, device: DeviceInfo, topics: Topics, *, commands: bool) -> None:
        self.cfg = cfg
        self.device = device
        self.topics = topics
        self.commands = commands
        self._published: dict[str, str] = {}  # component id -> platform, as last announced

    @property
    def config_topic(self) -> str:
        return f"{self.cfg.discovery_prefix}/device/{object_id(self.device.id)}/config"

    @property
    def status_topic(self) -> str:
        """Where Home Assistant says ``online`` when it (re)starts."""
        return f"{self.cfg.discovery_prefix}/status"

    def components(self, view: LineView) -> dict[str, dict[str, Any]]:
        """Every entity of the cameras and rules in ``view``, by component id."""
        out: dict[str, dict[str, Any]] = {}
        for camera, cam in view.cameras.items():
            out.update(self._camera(camera, cam))
        return out

    def config(self, components: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The device discovery payload announcing ``components``; those announced before
        and gone now are listed with their platform alone, which removes them."""
        d = self.device
        removed = {cid: {"p": platform} for cid, platform in self._published.items() if cid not in components}
        self._published = {cid: c["p"] for cid, c in components.items()}
        return {
            "dev": {"ids": [f"edgecam_{object_id(d.id)}"], "name": d.id, "mf": "edgecam", "mdl": "edge run",
                    "sw": __version__},
            "o": {"name": "edgecam", "sw": __version__},
            "avty": [{"t": self.topics.status(d.id), "val_tpl": "{{ value_json.state }}",
                      "pl_avail": "online", "pl_not_avail": "offline"}],
            "qos": 1,
            "cmps": {**removed, **components},
        }

    def _camera(self, camera: str, cam: CameraView) -> dict[str, dict[str, Any]]:
        d = self.device
        summary = self.topics.camera_summary(d.site, d.line, camera)
        base = f"edgecam_{object_id(d.id)}_{object_id(camera)}"
        cid = object_id(camera)
        out: dict[str, dict[str, Any]] = {
            f"{cid}_problem": {
                "p": "binary_sensor", "name": f"{camera} camera", "uniq_id": f"{base}_problem",
                "dev_cla": "problem", "stat_t": summary, "val_tpl": "{{ 'OFF' if value_json.ok else 'ON' }}"},
            f"{cid}_alerts": {
                "p": "event", "name": f"{camera} alerts", "uniq_id": f"{base}_alerts",
                "stat_t": self.topics.alert(d.site, d.line, camera), "evt_typ": list(ALERT_EVENTS),
                "val_tpl": ("{{ {'event_type': value_json.event, 'rule': value_json.rule, "
                            "'class': value_json.label, 'confidence': value_json.confidence, "
                            "'alert': value_json.id} | to_json }}")},
        }
        for status in cam.rules:
            if status.device_rule:
                continue
            rule = status.rule
            rid = f"{cid}_{object_id(rule)}"
            key = json.dumps(rule)
            if status.retained and status.level is not None:
                out[rid] = {"p": "binary_sensor", "name": f"{camera} {rule}", "uniq_id": f"{base}_{object_id(rule)}",
                            "dev_cla": "occupancy", "stat_t": summary,
                            "val_tpl": f"{{{{ 'ON' if value_json.rules[{key}].on else 'OFF' }}}}"}
            out[f"{rid}_count"] = {
                "p": "sensor", "name": f"{camera} {rule} count", "uniq_id": f"{base}_{object_id(rule)}_count",
                "stat_t": summary, "stat_cla": "total_increasing",
                "val_tpl": f"{{{{ value_json.rules[{key}].count }}}}"}
            if self.commands:
                command = self.topics.command(d.site, d.line, d.id)
                on, off = (encode(Command(v=1, device=d.id, camera=camera, rule=rule, op=op)).decode()
                           for op in ("enable", "disable"))
                out[f"{rid}_enabled"] = {
                    "p": "switch", "name": f"{camera} {rule} alerts", "uniq_id": f"{base}_{object_id(rule)}_enabled",
                    "ent_cat": "config", "cmd_t": command, "pl_on": on, "pl_off": off, "stat_t": summary,
                    "stat_on": "ON", "stat_off": "OFF",
                    "val_tpl": f"{{{{ 'ON' if value_json.rules[{key}].enabled else 'OFF' }}}}"}
        return out

    def summary(self, view: LineView, camera: str) -> tuple[str, bytes]:
        """The camera's :class:`CameraSummary` and its topic."""
        cam = view.cameras[camera]
        d = self.device
        body = CameraSummary(
            v=1, device=d.id, camera=camera, at=view.at, state=cam.state, ok=cam.ok,
            policy_version=view.policy_version,
            model_version=next((v for v in cam.models.values() if v is not None), None),
            rules={s.rule: RuleSummary(on=s.level, enabled=s.enabled, muted_until=s.muted_until,
                                       acknowledged=s.acknowledged, count=s.events) for s in cam.rules})
        return self.topics.camera_summary(d.site, d.line, camera), encode(body)
