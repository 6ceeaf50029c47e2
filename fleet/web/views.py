"""What the device page plots, taken from its stored health and drift events."""

from __future__ import annotations

from typing import Any

from .charts import Series, line_chart


def device_charts(events: list[dict[str, Any]]) -> list[str]:
    """One SVG chart per figure, a line per camera (or per camera and reason / task / measure)."""
    fps: dict[str, list] = {}
    age: dict[str, list] = {}
    latency: dict[str, list] = {}
    drops: dict[str, list] = {}
    backlog: dict[str, list] = {}
    quality: dict[str, list] = {}
    drift: dict[str, list] = {}
    last_drops: dict[tuple[str, str], float] = {}
    for e in events:
        t, p, camera = e["captured_at"], e["payload"], e["camera"] or "device"
        if e["kind"] == "drift":
            for key in ("psi", "class_shift", "detections_ratio"):
                _add(drift, f"{camera}/{p.get('task', '?')} {key}", t, p.get(key))
            continue
        _add(fps, camera, t, p.get("processed_fps"))
        _add(age, camera, t, _get(p, "age_ms", "p99"))
        for task, doc in (p.get("tasks") or {}).items() if isinstance(p.get("tasks"), dict) else ():
            _add(latency, f"{camera}/{task} p95", t, _get(doc, "latency_ms", "p95"))
        dropped = p.get("dropped")
        if isinstance(dropped, dict):
            for reason, n in dropped.items():
                if _number(n):
                    before = last_drops.get((camera, reason))
                    last_drops[(camera, reason)] = n
                    if before is not None:  # drops since the previous snapshot (a restart counts from 0)
                        _add(drops, f"{camera} {reason}", t, n - before if n >= before else n)
        _add(backlog, camera, t, _get(p, "outbox", "rows"))
        q = p.get("quality")
        if isinstance(q, dict):
            for key, v in q.items():
                _add(quality, f"{camera} {key}", t, v)
    charts = [
        line_chart("Processed frames per second", "fps", _series(fps)),
        line_chart("Drops by reason", "frames per snapshot", _series(drops)),
        line_chart("Capture-to-result age, p99", "ms", _series(age)),
        line_chart("Inference latency", "ms", _series(latency)),
        line_chart("Outbox backlog", "rows", _series(backlog)),
    ]
    if quality:
        charts.append(line_chart("Image quality", "measure", _series(quality)))
    if drift:
        charts.append(line_chart("Drift against the baseline", "score", _series(drift)))
    return charts


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _add(into: dict[str, list], name: str, t: float, v: Any) -> None:
    if _number(v):
        into.setdefault(name, []).append((t, float(v)))


def _series(by_name: dict[str, list]) -> list[Series]:
    return [Series(name, points) for name, points in sorted(by_name.items())]
