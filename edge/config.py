"""The device config: YAML validated into typed, immutable models.

Every error names the offending key as a path (``cameras[1].source.fps: must be > 0``)
and raises :class:`ConfigError` (exit code 2). Relative paths in the file are resolved
against the directory of the file itself, so a config works from any working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge.core.contract import (
    BATCH_OVERHEAD,
    DEFAULT_PREFIX,
    HA_DISCOVERY_PREFIX,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
)
from edge.core.errors import ConfigError

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # safe as an MQTT topic level and a file name


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- capture sources ---------------------------------------------------------------


class VideoSource(_Strict):
    """A video file, paced at its native frame rate or read as fast as it is consumed."""

    kind: Literal["video"]
    path: ConfigPath
    pace: Literal["native", "fast"] = "native"
    loop: bool = False
    fps: float | None = Field(default=None, gt=0, description="override the file's frame rate")
    decoder_threads: int = Field(default=1, ge=0, le=16, description=(
        "FFmpeg's decoding threads; 0: one per core. One holds the fewest frames (a 720p H.264 "
        "stream's decoder: 2 MB less per thread) and adds no frame of delay"))


class ImagesSource(_Strict):
    """A directory of still images, in name order."""

    kind: Literal["images"]
    path: ConfigPath
    fps: float | None = Field(default=None, gt=0, description="pace; unset reads as fast as consumed")
    loop: bool = False


class UsbSource(_Strict):
    """A V4L2 / USB camera by index or device path."""

    kind: Literal["usb"]
    device: int | str = 0
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    fps: float | None = Field(default=None, gt=0)
    fourcc: str | None = Field(default=None, pattern=r"^[A-Z0-9]{4}$")


class UrlSource(_Strict):
    """An RTSP or HTTP stream through OpenCV's FFmpeg backend."""

    kind: Literal["url"]
    url: str = Field(pattern=r"^(rtsps?|https?|rtmp|udp|tcp)://")
    open_timeout_s: float = Field(default=10.0, gt=0)
    decoder_threads: int = Field(default=1, ge=0, le=16, description=(
        "FFmpeg's decoding threads; 0: one per core. One holds the fewest frames (a 720p H.264 "
        "stream's decoder: 2 MB less per thread) and adds no frame of delay"))


class GStreamerSource(_Strict):
    """A GStreamer pipeline ending in ``appsink`` (e.g. Jetson's ``nvarguscamerasrc``)."""

    kind: Literal["gstreamer"]
    pipeline: str = Field(min_length=1)

    @model_validator(mode="after")
    def _ends_in_appsink(self) -> "GStreamerSource":
        if "appsink" not in self.pipeline:
            raise ValueError("pipeline must end in an appsink element")
        return self


class Picamera2Source(_Strict):
    """A Raspberry Pi camera through picamera2 (Pi only)."""

    kind: Literal["picamera2"]
    camera: int = Field(default=0, ge=0)
    width: int = Field(default=1280, gt=0)
    height: int = Field(default=720, gt=0)
    fps: float = Field(default=30.0, gt=0)
    lores: bool = Field(default=True, description="feed the model from a second, low-resolution stream the "
                        "ISP scales to the model's input size; the full frame stays for snapshots")


class PatternSource(_Strict):
    """A synthetic moving test pattern; ``still`` repeats one frame (a frozen feed)."""

    kind: Literal["pattern"]
    width: int = Field(default=640, gt=0)
    height: int = Field(default=480, gt=0)
    fps: float = Field(default=30.0, gt=0)
    still: bool = False


SourceConfig = Annotated[
    Union[
        VideoSource,
        ImagesSource,
        UsbSource,
        UrlSource,
        GStreamerSource,
        Picamera2Source,
        PatternSource,
    ],
    Field(discriminator="kind"),
]
SOURCE_KINDS = ("video", "images", "usb", "url", "gstreamer", "picamera2", "pattern")


# --- the rest of the device ----------------------------------------------------------


class Backoff(_Strict):
    """Exponential backoff between reopen attempts."""

    initial_s: float = Field(default=0.5, gt=0)
    max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Backoff":
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


class TriggerConfig(_Strict):
    """Run a task on the crops of another task's detections."""

    task: str = Field(description="the task whose detections fire this one")
    classes: list[str] = Field(default=[], description="labels that fire it; empty: any")
    min_score: float = Field(default=0.0, ge=0, le=1)
    max_crops: int = Field(default=3, gt=0, description="at most this many crops a frame")
    padding: float = Field(default=0.1, ge=0, le=1, description="added around each box, as a fraction of it")
    outcomes: list[Literal["accept", "reject", "unsure"]] = Field(
        default=[], description="fire only on detections with these outcomes (the decision policy's, else the "
                                "agent's unsure band); [unsure]: a verifier that runs on the uncertain cases only")


class TaskConfig(_Strict):
    """One model run on a camera's frames: every frame, every Nth, at most every T ms, or on crops."""

    name: str = Field(pattern=_ID)
    model: str = Field(description="name of an entry under `models`")
    priority: int = Field(default=0, description="higher runs first; the highest due task always runs")
    every_n_frames: int | None = Field(default=None, gt=0)
    min_interval_ms: float | None = Field(default=None, gt=0)
    trigger: TriggerConfig | None = None
    motion_gated: bool = Field(default=False, description="while the scene is still, run only at the keep-alive")
    starve_after: int = Field(default=10, gt=0, description="budget skips in a row before it runs anyway")

    @model_validator(mode="after")
    def _one_cadence(self) -> "TaskConfig":
        given = [k for k in ("every_n_frames", "min_interval_ms", "trigger") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of every_n_frames, min_interval_ms, trigger (got {', '.join(given)})")
        return self


class MotionConfig(_Strict):
    """Frame differencing on a small grey copy of each frame."""

    width: int = Field(default=160, ge=16, description="width of the grey copy compared")
    threshold: int = Field(default=25, gt=0, le=255, description="grey-level change that counts")
    min_area: float = Field(default=0.002, gt=0, le=1, description="share of pixels that must change")
    keepalive_ms: float = Field(default=5000.0, gt=0, description="a gated task still runs this often")


class CameraConfig(_Strict):
    id: str = Field(pattern=_ID)
    source: SourceConfig
    model: str | None = Field(default=None, description="shorthand for one task running this model every frame")
    tasks: list[TaskConfig] = []
    budget_ms: float | None = Field(default=None, gt=0, description="per frame; default 1000 / source fps")
    motion: MotionConfig = MotionConfig()
    stale_after_s: float = Field(default=5.0, gt=0, description="no frame for this long: stale")
    frozen_after_s: float = Field(default=10.0, gt=0, description="identical frames this long: frozen")
    reopen: Backoff = Backoff()

    @model_validator(mode="after")
    def _tasks(self) -> "CameraConfig":
        if (self.model is None) == (not self.tasks):
            raise ValueError("give either `model` or `tasks`")
        names = [t.name for t in self.tasks]
        for i, task in enumerate(self.tasks):
            if task.name in names[:i]:
                raise _KeyedError(f"tasks[{i}].name", f"duplicate task name {task.name!r}")
            parent = task.trigger.task if task.trigger else None
            if parent is not None and (parent == task.name or parent not in names):
                raise _KeyedError(f"tasks[{i}].trigger.task", f"no other task named {parent!r}")
        if _has_trigger_cycle(self.tasks):
            raise ValueError("triggers form a cycle")
        return self

    def effective_tasks(self) -> list[TaskConfig]:
        """The tasks, with the `model` shorthand expanded."""
        if self.model is not None:
            return [TaskConfig(name=self.model, model=self.model)]
        return list(self.tasks)


def _has_trigger_cycle(tasks: list[TaskConfig]) -> bool:
    parent = {t.name: t.trigger.task for t in tasks if t.trigger}
    for start in parent:
        seen, node = set(), start
        while node in parent:
            if node in seen:
                return True
            seen.add(node)
            node = parent[node]
    return False


class ModelConfig(_Strict):
    path: ConfigPath
    manifest: ConfigPath | None = Field(
        default=None, description="defaults to the model path with a .yaml suffix"
    )


class DelegateConfig(_Strict):
    library: str = Field(min_length=1, description="e.g. libedgetpu.so.1")
    options: dict[str, str] = {}


class SchedulerConfig(_Strict):
    executors: int = Field(default=1, gt=0, description="inference threads, each owning its interpreters")
    overlap: bool = Field(default=False, description="prepare inputs on the capture threads and decode outputs "
                          "and run the sinks on a thread of their own, while the next invoke runs")
    estimate_window: int = Field(default=20, ge=4, description="recent runs a task's cost estimate is taken over")
    estimate_percentile: float = Field(default=90.0, gt=0, le=100)
    stuck_factor: float = Field(default=20.0, gt=1, description="an invoke this many times its estimate is stuck")
    stuck_min_ms: float = Field(default=2000.0, gt=0, description="never call an invoke stuck sooner")
    stuck_limit_ms: float = Field(default=30000.0, gt=0, description="stuck after this long, whatever the estimate")


class RuntimeConfig(_Strict):
    num_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)
    delegate: DelegateConfig | None = None
    scheduler: SchedulerConfig = SchedulerConfig()
    stats_file: ConfigPath | None = Field(default=None, description="the stats snapshot `edge stats` reads")
    heartbeat_file: ConfigPath | None = Field(default=None, description="touched while the daemon is alive")


class LoggingConfig(_Strict):
    format: Literal["json", "human"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    stats_interval_s: float = Field(default=5.0, gt=0)


class DeviceInfo(_Strict):
    id: str = Field(pattern=_ID)
    site: str = "default"
    line: str = "default"


class TlsConfig(_Strict):
    """TLS to the broker; without ``ca_file`` the system's CAs are trusted."""

    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: ConfigPath | None = None


class MqttConfig(_Strict):
    """The broker the device syncs its outbox through (see DESIGN.md, MQTT contract)."""

    host: str = Field(default="localhost", min_length=1)
    port: int = Field(default=1883, gt=0, le=65535)
    prefix: str = Field(default=DEFAULT_PREFIX, pattern=r"^[^$/#+]([^#+]*[^#+/])?$")
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    keepalive_s: int = Field(default=30, ge=5, le=65535)
    session_expiry_s: int = Field(default=7 * 86400, ge=0, description="broker keeps the session (acks) this long")
    reconnect: Backoff = Field(default=Backoff(initial_s=1.0, max_s=60.0),
                               description="exponential backoff between attempts, with jitter")


class OutboxConfig(_Strict):
    """The local SQLite outbox and how it is synced (see docs/outbox.md)."""

    path: ConfigPath = Path("/var/lib/edgecam/outbox.db")
    max_rows: int = Field(default=1_000_000, gt=0)
    max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024,
                           description="the outbox's files on disk: database, WAL, WAL index and reserve")
    synchronous: Literal["normal", "full"] = Field(
        default="normal", description="normal: a commit survives a process kill; full: also a power cut")
    handoff: int = Field(default=10_000, gt=0, description="events waiting for the writer; beyond, append drops")
    commit_interval_s: float = Field(default=0.05, gt=0, le=5, description="longest wait before a commit")
    batch_events: int = Field(default=500, gt=0, le=MAX_BATCH_EVENTS)
    batch_bytes: int = Field(default=256 * 1024, ge=MAX_EVENT_BYTES + BATCH_OVERHEAD, le=MAX_BATCH_BYTES)
    window: int = Field(default=4, gt=0, le=16, description="batches in flight awaiting the fleet's ack")
    ack_timeout_s: float = Field(default=30.0, gt=0, description="re-send a batch not acked this long")
    resend_max_s: float = Field(default=900.0, gt=0, description="re-sends back off up to this interval")


class SnapshotConfig(_Strict):
    """JPEGs of alert and unsure frames, kept on the device only."""

    dir: ConfigPath = Path("/var/lib/edgecam/snapshots")
    max_mb: float = Field(default=200, gt=0, description="oldest files go first beyond this")
    max_age_h: float = Field(default=72, gt=0)
    jpeg_quality: int = Field(default=85, ge=10, le=100)


class DecisionsConfig(_Strict):
    """Outcomes, rules and alerts (the rules themselves are the policy file)."""

    policy: ConfigPath | None = Field(default=None, description="the policy YAML; reloaded on SIGHUP")
    max_pending_alerts: int = Field(default=1000, gt=0, description="alerts held while the broker is away")
    snapshots: SnapshotConfig | None = Field(default=None, description="without it no snapshots are kept")


class SmokeConfig(_Strict):
    """The test a new model passes on the device before it serves."""

    invokes: int = Field(default=3, gt=0, le=50, description="timed runs on a recent real frame")
    latency_factor: float = Field(default=1.0, gt=0, description="median run must fit the camera budget x this")


class HealthConfig(_Strict):
    """The window a swapped-in model is watched for before it is committed."""

    window_s: float = Field(default=60.0, gt=0)
    min_results: int = Field(default=20, gt=0, description="new-model results needed for a verdict")
    max_error_rate: float = Field(default=0.02, ge=0, le=1)
    latency_factor: float = Field(default=1.0, gt=0, description="p95 of a run against the camera budget x this")
    max_unsure_rate: float = Field(default=0.3, ge=0, le=1)
    max_unsure_increase: float = Field(default=0.15, ge=0, le=1, description="over the previous model's rate")
    max_confidence_drop: float = Field(default=0.2, ge=0, le=1)
    detections_ratio: tuple[float, float] = Field(default=(0.5, 2.0), description="new / previous detections a frame")
    unsure_band: tuple[float, float] = Field(
        default=(0.25, 0.5), description="scores in [low, high) are unsure, until a policy decides")

    @model_validator(mode="after")
    def _ordered(self) -> "HealthConfig":
        for key in ("detections_ratio", "unsure_band"):
            low, high = getattr(self, key)
            if not 0 <= low <= high:
                raise _KeyedError(key, "must be [low, high] with 0 <= low <= high")
        return self


class CrashLoopConfig(_Strict):
    restarts: int = Field(default=3, gt=0, description="starts within `minutes` of an activation")
    minutes: float = Field(default=10.0, gt=0)


class DownloadConfig(_Strict):
    retries: int = Field(default=5, ge=0, description="unanswered chunk requests in a row")
    chunk_timeout_s: float = Field(default=5.0, gt=0)
    backoff: Backoff = Backoff(initial_s=0.5, max_s=10.0)
    min_free_mb: float = Field(default=50.0, ge=0, description="left free on the disk after a download")


class AgentConfig(_Strict):
    """The model agent: takes models and policies the fleet assigns (needs `mqtt`)."""

    public_keys: list[ConfigPath] = Field(
        default=[], max_length=8,
        description="the fleet's Ed25519 public keys (PEM) the device pins; desired states and artifacts must "
                    "verify with one of them (a list, so a new key is pinned before the fleet signs with it)")
    public_key: ConfigPath | None = Field(default=None, description="one pinned key (the same as a list of one)")
    state_dir: ConfigPath = Path("/var/lib/edgecam/models")
    keep: int = Field(default=3, ge=0, description="unused model versions kept on disk")
    swap_timeout_s: float = Field(default=10.0, gt=0)
    smoke: SmokeConfig = SmokeConfig()
    health: HealthConfig = HealthConfig()
    crash_loop: CrashLoopConfig = CrashLoopConfig()
    download: DownloadConfig = DownloadConfig()

    @model_validator(mode="after")
    def _some_key(self) -> "AgentConfig":
        if not self.public_keys and self.public_key is None:
            raise _KeyedError("public_keys", "the agent needs at least one pinned key (public_keys or public_key)")
        return self

    def pinned(self) -> list[tuple[str, Path]]:
        """Every pinned key file with the key that names it."""
        named = [(f"public_keys[{i}]", p) for i, p in enumerate(self.public_keys)]
        return named + ([("public_key", self.public_key)] if self.public_key is not None else [])


class MetricsConfig(_Strict):
    """Prometheus exposition on ``http://{listen}/metrics`` (see edge/observe/metrics.py)."""

    listen: str = Field(description="host:port to serve /metrics on, e.g. 127.0.0.1:9108 ([::1]:9108 for IPv6)")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        listen_address(value)
        return value

    @property
    def address(self) -> tuple[str, int]:
        return listen_address(self.listen)


def listen_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as a pair; ValueError saying what is wrong."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9_.-]+):(\d{1,5})", value)
    if m is None:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9108)")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 < int(port) <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    return host, int(port)


class DriftConfig(_Strict):
    """Result drift per camera and model version: windows compared with a baseline."""

    enabled: bool = True
    window_s: float = Field(default=600.0, gt=0, description="each window becomes one drift event")
    min_frames: int = Field(default=10, gt=0, description="a shorter window (at a stop) is not reported")
    baselines: ConfigPath | None = Field(
        default=None, description="JSON file keeping learned baselines across restarts; unset: relearned")


class QualityConfig(_Strict):
    """Image quality and tamper measures on a small grey copy of the frames."""

    enabled: bool = True
    interval_s: float = Field(default=1.0, gt=0, description="measure a camera's frame at most this often")
    width: int = Field(default=160, ge=32, le=1280, description="width of the grey copy measured")


class ObserveConfig(_Strict):
    drift: DriftConfig = DriftConfig()
    quality: QualityConfig = QualityConfig()


class Deadband(_Strict):
    """How much a measured value must move before Sparkplug reports it (report by exception)."""

    fps: float = Field(default=0.5, ge=0, description="processed frames a second, absolute")
    ratio: float = Field(default=0.05, ge=0, le=1, description="quality and drift measures, relative to the last sent")


_SPARKPLUG_ID = r"^[^/#+]{1,64}$"  # one topic level, no wildcards (the specification's only rule)


class SparkplugConfig(_Strict):
    """A Sparkplug B edge node (``spBv1.0/{group_id}/...``): the device is the edge node,
    each camera a device (see edge/comms/sparkplug.py)."""

    group_id: str = Field(pattern=_SPARKPLUG_ID)
    edge_node_id: str = Field(pattern=_SPARKPLUG_ID)
    bdseq_file: ConfigPath = Field(default=Path("/var/lib/edgecam/sparkplug.json"),
                                   description="keeps the birth/death sequence number across restarts")
    deadband: Deadband = Deadband()
    scan_ms: float = Field(default=100.0, ge=10, le=10000, description="how often changes are looked for")


class HomeAssistantConfig(_Strict):
    """Home Assistant MQTT discovery: one retained device config with an entity per rule."""

    discovery_prefix: str = Field(default=HA_DISCOVERY_PREFIX, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


class CommandsConfig(_Strict):
    """Commands from line controllers on the plain command topic (and Sparkplug DCMD)."""

    state_file: ConfigPath = Field(default=Path("/var/lib/edgecam/commands.json"),
                                   description="keeps rule controls (disabled, muted, acknowledged) across restarts")


class PrivacyConfig(_Strict):
    """Whether any pixel may leave the device: only a snapshot an operator fetches for
    review, and only with ``snapshot_export`` on."""

    snapshot_export: bool = Field(default=False, description="let operators fetch kept snapshots for review "
                                                             "(off: every fetch is refused, no pixel leaves)")
    reviewers: list[Annotated[str, Field(pattern=_ID)]] = Field(
        default=[], description="operator identities allowed to fetch (empty: any operator the broker lets ask)")
    max_fetches: int = Field(default=20, gt=0, le=10_000, description="fetches served per `per_s` seconds")
    per_s: float = Field(default=3600.0, gt=0, description="the rate limit's window")


class DeviceConfig(_Strict):
    """The whole ``edge run`` config file."""

    device: DeviceInfo
    runtime: RuntimeConfig = RuntimeConfig()
    logging: LoggingConfig = LoggingConfig()
    models: dict[Annotated[str, Field(pattern=_ID)], ModelConfig] = Field(min_length=1)
    cameras: list[CameraConfig] = Field(min_length=1)
    mqtt: MqttConfig | None = Field(default=None, description="without it the outbox fills but never syncs")
    outbox: OutboxConfig = OutboxConfig()
    agent: AgentConfig | None = Field(default=None, description="model updates from the fleet")
    decisions: DecisionsConfig = DecisionsConfig()
    metrics: MetricsConfig | None = Field(default=None, description="without it no /metrics is served")
    observe: ObserveConfig = ObserveConfig()
    sparkplug: SparkplugConfig | None = Field(default=None, description="a Sparkplug B edge node beside the alerts")
    homeassistant: HomeAssistantConfig | None = Field(default=None, description="Home Assistant MQTT discovery")
    commands: CommandsConfig | None = Field(default=None, description="rule commands from line controllers")
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _export_needs_snapshots(self) -> "DeviceConfig":
        if self.privacy.snapshot_export:
            if self.mqtt is None:
                raise _KeyedError("privacy.snapshot_export", "needs `mqtt`: a fetch comes and goes through the broker")
            if self.decisions.snapshots is None:
                raise _KeyedError("privacy.snapshot_export", "needs `decisions.snapshots`: no snapshot is kept "
                                                             "without it, so there is nothing to fetch")
        return self

    @model_validator(mode="after")
    def _agent_needs_mqtt(self) -> "DeviceConfig":
        why = {"agent": "assignments and artifacts come through the broker",
               "sparkplug": "births, data and commands go through the broker",
               "homeassistant": "discovery and states go through the broker",
               "commands": "commands come through the broker"}
        for key, reason in why.items():
            if getattr(self, key) is not None and self.mqtt is None:
                raise _KeyedError(key, f"needs `mqtt`: {reason}")
        return self

    @model_validator(mode="after")
    def _references(self) -> "DeviceConfig":
        seen: set[str] = set()
        known = ", ".join(sorted(self.models))
        for i, cam in enumerate(self.cameras):
            if cam.model is not None and cam.model not in self.models:
                raise _KeyedError(f"cameras[{i}].model", f"unknown model {cam.model!r} (known: {known})")
            for j, task in enumerate(cam.tasks):
                if task.model not in self.models:
                    raise _KeyedError(f"cameras[{i}].tasks[{j}].model", f"unknown model {task.model!r} (known: {known})")
            if cam.id in seen:
                raise _KeyedError(f"cameras[{i}].id", f"duplicate camera id {cam.id!r}")
            seen.add(cam.id)
        return self


class _KeyedError(ValueError):
    """A cross-field error that knows which key it belongs to."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")


# --- loading and error formatting -----------------------------------------------------


def load_config(path: str | Path) -> DeviceConfig:
    """Read and validate a device config file, or raise ConfigError naming the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    return parse_config(data, base_dir=path.resolve().parent, name=str(path))


def parse_config(data: Any, *, base_dir: Path | None = None, name: str = "config") -> DeviceConfig:
    """Validate already-parsed config data."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of keys")
    try:
        return DeviceConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(f"{name}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each `path: message`; the first problem comes first."""
    lines = []
    for err in exc.errors(include_url=False):
        message = _message(err)
        path = _loc_to_path(err["loc"])
        if err["type"] == "value_error" and re.match(r"^[\w\[\].]+: ", message):
            # a cross-field error names its key relative to the model that raised it
            lines.append(f"{path}.{message}" if path else message)
            continue
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    prev: Any = None
    for part in loc:
        # a tagged union puts the tag in the location; the operator never wrote it
        if prev == "source" and part in SOURCE_KINDS:
            prev = part
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-after"):
            pass
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out


_MESSAGES = {
    "greater_than": "must be > {gt:g}",
    "greater_than_equal": "must be >= {ge:g}",
    "less_than": "must be < {lt:g}",
    "less_than_equal": "must be <= {le:g}",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "too_short": "must have at least {min_length} item(s)",
    "string_pattern_mismatch": "must match {pattern}",
    "union_tag_invalid": "unknown kind {tag!r}; expected one of {expected_tags}",
    "union_tag_not_found": "needs a `kind` ({kinds})",
}


def _message(err: Any) -> str:
    ctx = dict(err.get("ctx") or {})
    template = _MESSAGES.get(err["type"])
    if err["type"] == "union_tag_not_found":
        ctx["kinds"] = ", ".join(SOURCE_KINDS)
    if template:
        try:
            return template.format(**ctx)
        except (KeyError, ValueError):
            pass
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def missing_files(cfg: DeviceConfig) -> list[str]:
    """``key: file not found`` for each model, manifest or media path that does not exist,
    and for a stats, heartbeat or comms state file whose directory does not."""
    problems = []
    for slot, model in cfg.models.items():
        for key, path in (("path", model.path), ("manifest", model.manifest)):
            if path is not None and not path.exists():
                problems.append(f"models.{slot}.{key}: file not found: {path}")
    for i, cam in enumerate(cfg.cameras):
        path = getattr(cam.source, "path", None)
        if path is not None and not path.exists():
            problems.append(f"cameras[{i}].source.path: not found: {path}")
    for key, path in (("stats_file", cfg.runtime.stats_file), ("heartbeat_file", cfg.runtime.heartbeat_file)):
        if path is not None and not path.parent.is_dir():
            problems.append(f"runtime.{key}: directory not found: {path.parent}")
    for key, path in (("sparkplug.bdseq_file", cfg.sparkplug.bdseq_file if cfg.sparkplug else None),
                      ("commands.state_file", cfg.commands.state_file if cfg.commands else None)):
        if path is not None and not path.parent.is_dir():
            problems.append(f"{key}: directory not found: {path.parent}")
    if cfg.decisions.policy is not None and not cfg.decisions.policy.exists():
        problems.append(f"decisions.policy: file not found: {cfg.decisions.policy}")
    for key, path in cfg.agent.pinned() if cfg.agent is not None else []:
        if not path.is_file():
            problems.append(f"agent.{key}: file not found: {path}")
    tls = cfg.mqtt.tls if cfg.mqtt is not None else None
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key) if tls is not None else None
        if path is not None and not path.is_file():
            problems.append(f"mqtt.tls.{key}: file not found: {path}")
    return problems


def config_schema() -> dict[str, Any]:
    """JSON Schema of the device config."""
    return DeviceConfig.model_json_schema()
