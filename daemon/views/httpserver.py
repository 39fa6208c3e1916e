"""HTTP for Prometheus: /metrics (the latest rendered exposition) and /healthz.

Handlers only read what the loop published: a scrape never calls NVML and never waits for the
loop. Bad requests get a 4xx and never reach anything else.
"""
from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Tuple

LOG = logging.getLogger("gpucostd")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Published:
    """What the loop hands to the HTTP server: rendered bytes and the time of the last cycle."""

    def __init__(self, monotonic: Callable[[], float]):
        self._lock = threading.Lock()
        self._metrics = b""
        self._last_cycle: Optional[float] = None
        self._monotonic = monotonic
        self.interval = 1.0

    def publish(self, metrics: bytes, at: float) -> None:
        with self._lock:
            self._metrics = metrics
            self._last_cycle = at

    def read(self) -> Tuple[bytes, Optional[float]]:
        with self._lock:
            return self._metrics, self._last_cycle

    def alive(self) -> Tuple[bool, str]:
        _, last = self.read()
        if last is None:
            return False, "no cycle completed yet"
        age = self._monotonic() - last
        if age > 3 * self.interval:
            return False, f"last cycle {age:.1f} s ago (interval {self.interval:g} s)"
        return True, f"last cycle {age:.1f} s ago"


def _handler_for(published: Published):
    class Handler(BaseHTTPRequestHandler):
        server_version = "gpucostd"
        sys_version = ""
        timeout = 10

        def do_GET(self):  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, last = published.read()
                if last is None:
                    self._send(503, b"no snapshot yet\n")
                else:
                    self._send(200, body, CONTENT_TYPE)
            elif path == "/healthz":
                ok, why = published.alive()
                self._send(200 if ok else 503, (("ok: " if ok else "stalled: ") + why + "\n")
                           .encode())
            elif path == "/":
                self._send(200, b"gpucostd: see /metrics and /healthz\n")
            else:
                self._send(404, b"not found: try /metrics or /healthz\n")

        def do_HEAD(self):  # noqa: N802
            self.do_GET()

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, fmt, *args):  # access logs off; errors only at debug
            LOG.debug("http %s: " + fmt, self.client_address[0], *args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    def __init__(self, address: str, published: Published):
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        cls = _Server6 if ":" in host else _Server
        self.httpd = cls((host, int(port)), _handler_for(published))
        self.address = address
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
