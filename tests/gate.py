"""A TCP gate between one client and the broker: a network link the test can cut.

Clients connect to ``gate.port``; the gate forwards to the broker. :meth:`Gate.close`
cuts every connection through it and refuses new ones (connection refused) until
:meth:`Gate.open`, so a test decides which side of a broker restart comes back first.
"""

from __future__ import annotations

import socket
import threading

from broker import free_port


class Gate:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.host, self.port = "127.0.0.1", free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        """Accept connections again."""
        with self._lock:
            if self._listener is not None:
                return
            self._listener = socket.create_server((self.host, self.port))
            self._listener.settimeout(0.05)
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        """Cut every connection through the gate and refuse new ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            listener.close()
        for s in sockets:
            _drop(s)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=2)
            except OSError:  # the broker is down: so is this connection
                _drop(client)
                continue
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._listener is not listener:
                    _drop(client)
                    _drop(server)
                    return
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side gone: so is the other
            with self._lock:
                self._sockets -= {src, dst}
            _drop(src)
            _drop(dst)


def _drop(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
