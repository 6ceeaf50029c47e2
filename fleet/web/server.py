"""The console's HTTP server: uvicorn on a thread of its own, with a clean stop.

The socket is bound here, before the thread starts, so a port in use or an address
that is not ours is an error at ``fleet serve``'s start rather than a thread that died
quietly. Loopback unless told otherwise; an address beyond loopback needs TLS and a
token (:func:`check`), since the API shows the whole fleet.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from edge.core.errors import EdgeError
from edge.core.logs import fields

from .app import Console, create_app

log = logging.getLogger("fleet.web")

START_TIMEOUT_S = 10.0


class HttpError(EdgeError):
    """The console cannot start: a bad option, an unreadable token or certificate, a port in use."""

    exit_code = 2


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(settings: HttpSettings) -> str | None:
    """The settings made sound, and the token read; HttpError naming the option otherwise."""
    s = settings
    if (s.tls_cert is None) != (s.tls_key is None):
        raise HttpError("--http-tls-cert and --http-tls-key go together")
    for option, path in (("--http-tls-cert", s.tls_cert), ("--http-tls-key", s.tls_key)):
        if path is not None and not path.is_file():
            raise HttpError(f"{option}: no file {path}")
    if not is_loopback(s.host) and (not s.tls or s.token_file is None):
        raise HttpError(f"--http {s.host}:{s.port} listens beyond loopback: it needs --http-tls-cert, "
                        "--http-tls-key and --http-token-file (the API shows the whole fleet)")
    if s.token_file is None:
        return None
    try:
        token = s.token_file.read_text().strip()
    except OSError as exc:
        raise HttpError(f"--http-token-file: cannot read {s.token_file}: {exc.strerror}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise HttpError(f"--http-token-file: {s.token_file} must hold one token of at least 16 characters")
    return token


class HttpServer:
    """The console served until :meth:`stop`."""

    def __init__(self, settings: HttpSettings, console: Console) -> None:
        self.settings = settings
        self.console = console
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle off only on sockets that say
        # they are TCP, and with it on every kept-alive request waits out a delayed ACK (40 ms)
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((settings.host, settings.port))
        except OSError as exc:
            self._socket.close()
            raise HttpError(f"--http {settings.host}:{settings.port}: cannot listen: {exc.strerror}") from None
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            create_app(console), log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=3,
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)
        try:
            config.load()  # the certificate and key are read now: a bad one is an error at the start
        except Exception as exc:  # ssl.SSLError, OSError: whatever the files hold
            self._socket.close()
            raise HttpError(f"--http-tls-cert/--http-tls-key: cannot use them: {exc}") from None
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        return f"{'https' if self.settings.tls else 'http'}://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException:  # uvicorn exits with SystemExit on a startup failure
            log.exception("http server stopped")

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise HttpError(f"{self.url}: the HTTP server did not start")
        log.info("http serving", extra=fields(url=self.url, port=self.port, tls=self.settings.tls,
                                              token=self.settings.token_file is not None))

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()
