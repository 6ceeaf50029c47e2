"""The console's routes: the JSON API under ``/api/v1``, the dashboard pages, ``/metrics``.

Everything here reads; nothing changes the fleet (changes stay with the operator RPC and
its access control). Errors are JSON bodies ``{"error": code, "message": ...}``: 400
naming the parameter, 401 without the right token, 404 for an unknown device or
rollout, 503 when the store is busy or unreachable (the request is answered, the
manager goes on).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from edge.core.contract import EVENT_KINDS
from fleet import __version__
from fleet.store import DatabaseError

from .metrics import FleetCollector, registry
from .queries import BadParameter, EventFilter, Page, Queries
from .views import device_charts

log = logging.getLogger("fleet.web")

TEMPLATES = Path(__file__).with_name("templates")
COOKIE = "fleet_token"
LIVE_REFRESH_S = 3
KINDS_PATTERN = "^(" + "|".join(EVENT_KINDS) + ")$"


@dataclass(frozen=True)
class Console:
    """What the routes read: the store's queries, the manager's counters, and the retention in force."""

    queries: Queries
    stats: Callable[[], dict[str, Any]]
    ack_latency: Histogram | None = None
    retention: dict[str, float] | None = None  # event kind ("*": every kind) -> seconds kept
    token: str | None = None
    secure_cookie: bool = False

    def close(self) -> None:
        self.queries.store.close()


class NotFound(LookupError):
    pass


def create_app(console: Console) -> FastAPI:
    app = FastAPI(title="edgecam fleet", version=__version__, openapi_url="/api/v1/openapi.json",
                  docs_url=None, redoc_url=None,
                  description="Read-only: the fleet's devices, rollouts, registry and events.")
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["when"] = _when
    templates.env.filters["ago"] = _ago
    q = console.queries
    metrics = registry(FleetCollector(q, console.stats, console.ack_latency))

    @app.exception_handler(BadParameter)
    def _bad(request: Request, exc: BadParameter) -> JSONResponse:
        return _error(400, "bad_request", str(exc), parameter=exc.parameter)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        parameter = str(first["loc"][-1]) if first.get("loc") else "request"
        return _error(400, "bad_request", f"{parameter}: {first['msg']}", parameter=parameter)

    @app.exception_handler(NotFound)
    def _missing(request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, "not_found", str(exc))

    @app.exception_handler(DatabaseError)
    def _busy(request: Request, exc: DatabaseError) -> JSONResponse:
        log.warning("store unavailable for a request", extra={"fields": {
            "path": request.url.path, "error": str(getattr(exc, "orig", exc)).splitlines()[0][:200]}})
        response = _error(503, "store_unavailable", "the fleet store is busy or unreachable; try again")
        response.headers["Retry-After"] = "1"
        return response

    # --- API ------------------------------------------------------------------------------------

    @app.get("/api/v1/overview", summary="Devices by site, line and condition; active rollouts; alerts by rule")
    def overview() -> dict[str, Any]:
        return _overview(console, time.time())

    @app.get("/api/v1/devices", summary="Devices by id, with their latest health figures")
    def devices(cursor: str | None = None, limit: int = Query(100, ge=1, le=500), site: str | None = None,
                line: str | None = None, state: str | None = None) -> dict[str, Any]:
        return _page(q.devices(cursor=cursor, limit=limit, site=site, line=line, state=state))

    @app.get("/api/v1/devices/{device}", summary="One device: desired, reported, rollouts, jobs, health series")
    def device(device: str, points: int = Query(200, ge=1, le=2000)) -> dict[str, Any]:
        return _device(q, device, points)

    @app.get("/api/v1/rollouts", summary="Rollouts newest first, with their stages")
    def rollouts(cursor: str | None = None, limit: int = Query(50, ge=1, le=500),
                 state: str | None = Query(None, pattern="^(running|paused|completed|aborted|rolled_back)$")) -> dict:
        return _page(q.rollouts(cursor=cursor, limit=limit, state=state))

    @app.get("/api/v1/rollouts/{rollout}", summary="One rollout: stages, executions, failures and their reasons")
    def rollout(rollout: str) -> dict[str, Any]:
        doc = q.rollout(rollout)
        if doc is None:
            raise NotFound(f"no rollout {rollout!r}")
        return doc

    @app.get("/api/v1/models", summary="Models in the registry")
    def models() -> dict[str, Any]:
        return {"items": q.artifacts("model")}

    @app.get("/api/v1/policies", summary="Decision policies in the registry")
    def policies() -> dict[str, Any]:
        return {"items": q.artifacts("policy")}

    @app.get("/api/v1/events", summary="Events newest first, filtered, with cursor paging")
    def events(device: str | None = None, camera: str | None = None,
               kind: str | None = Query(None, pattern=KINDS_PATTERN), since: str | None = None,
               until: str | None = None, cursor: str | None = None,
               limit: int = Query(100, ge=1, le=500)) -> dict[str, Any]:
        return _page(q.events(_filter(device, camera, kind, since, until), cursor=cursor, limit=limit))

    @app.get("/api/v1/alerts", summary="Alert events newest first (the events filters, kind=alert)")
    def alerts(device: str | None = None, camera: str | None = None, since: str | None = None,
               until: str | None = None, cursor: str | None = None,
               limit: int = Query(100, ge=1, le=500)) -> dict[str, Any]:
        return _page(q.events(_filter(device, camera, "alert", since, until), cursor=cursor, limit=limit))

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    # --- pages ----------------------------------------------------------------------------------

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"retention": _retention(console), **context})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(request: Request, cursor: str | None = None) -> HTMLResponse:
        listing = q.devices(cursor=cursor, limit=100)
        return page(request, "overview.html", o=_overview(console, time.time()), devices=listing,
                    refresh=LIVE_REFRESH_S * 5)

    @app.get("/devices/{device}", response_class=HTMLResponse, include_in_schema=False)
    def device_page(request: Request, device: str) -> HTMLResponse:
        doc = _device(q, device, 300)
        return page(request, "device.html", d=doc, charts=device_charts(doc.pop("series")))

    @app.get("/rollouts/{rollout}", response_class=HTMLResponse, include_in_schema=False)
    def rollout_page(request: Request, rollout: str) -> HTMLResponse:
        doc = q.rollout(rollout)
        if doc is None:
            raise NotFound(f"no rollout {rollout!r}")
        live = doc["state"] in ("running", "paused")
        return page(request, "rollout.html", r=doc, refresh=LIVE_REFRESH_S if live else None)

    @app.get("/alerts", response_class=HTMLResponse, include_in_schema=False)
    def alerts_page(request: Request, device: str | None = None, camera: str | None = None,
                    since: str | None = None, until: str | None = None, cursor: str | None = None) -> HTMLResponse:
        found = q.events(_filter(device or None, camera or None, "alert", since or None, until or None),
                         cursor=cursor, limit=100)
        return page(request, "alerts.html", alerts=found, f={"device": device or "", "camera": camera or "",
                                                            "since": since or "", "until": until or ""})

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request) -> HTMLResponse:
        return page(request, "login.html", failed=False)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = await request.body()
        given = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0].strip()
        if console.token is None or not hmac.compare_digest(given.encode(), console.token.encode()):
            return templates.TemplateResponse(request, "login.html", {"failed": True, "retention": None},
                                              status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, given, httponly=True, samesite="strict", secure=console.secure_cookie)
        return response

    if console.token is not None:
        app.add_middleware(BearerAuth, token=console.token)
    return app


class BearerAuth:
    """Every request needs ``Authorization: Bearer <token>`` (or, for the pages, the
    cookie ``/login`` sets from the same token); 401 otherwise. Compared in constant time."""

    OPEN = ("/login",)

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN or self._allowed(scope):
            return await self.app(scope, receive, send)
        response = _error(401, "unauthorized", "a valid `Authorization: Bearer` token is needed")
        response.headers["WWW-Authenticate"] = 'Bearer realm="fleet"'
        if not scope["path"].startswith(("/api/", "/metrics")) and scope["method"] == "GET":
            response = RedirectResponse("/login", status_code=303)
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"cookie" and not given:
                m = re.search(rb"(?:^|;\s*)" + COOKIE.encode() + rb"=([^;]*)", value)
                if m:
                    given = m.group(1).strip(b'"')
        return bool(given) and hmac.compare_digest(given, self.token)


# --- documents ------------------------------------------------------------------------------------


def _overview(console: Console, now: float) -> dict[str, Any]:
    q = console.queries
    groups = q.fleet_counts(now)
    totals: dict[str, int] = {}
    for g in groups:
        totals[g["condition"]] = totals.get(g["condition"], 0) + g["devices"]
    active = [r for state in ("running", "paused") for r in q.rollouts(state=state, limit=20).items]
    return {"at": now, "totals": totals, "by_site_line": groups, "active_rollouts": active,
            "alerts_last_hour": q.alerts_by_rule(now - 3600), "oldest_event": q.oldest_event(),
            "retention": _retention(console)}


def _device(q: Queries, device: str, points: int) -> dict[str, Any]:
    row = q.device(device)
    desired, reported = q.desired_reported(device)
    if row is None and desired is None and reported is None:
        raise NotFound(f"no device {device!r}")
    return {"device": row, "health": q.latest_health([device]).get(device, {}), "desired": desired,
            "reported": reported, "executions": q.device_executions(device),
            "jobs": q.store.jobs(device=device, limit=50), "series": q.health_series(device, limit=points)}


def _page(page: Page) -> dict[str, Any]:
    return {"items": page.items, "next": page.next}


def _filter(device: str | None, camera: str | None, kind: str | None, since: str | None,
            until: str | None) -> EventFilter:
    f = EventFilter(device, camera, kind, _time("since", since), _time("until", until))
    if f.since is not None and f.until is not None and f.until <= f.since:
        raise BadParameter("until", "must be after since")
    return f


def _time(parameter: str, value: str | None) -> float | None:
    """Seconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None:
        return None
    try:
        t = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadParameter(parameter, f"{value!r} is neither seconds since the epoch nor an ISO 8601 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        t = parsed.timestamp()
    if not 0 <= t < 1e11:
        raise BadParameter(parameter, f"{value!r} is out of range")
    return t


def _retention(console: Console) -> dict[str, Any]:
    return {"kept_s": console.retention or {}}


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return f"{s:.0f} s ago"
