"""HTTP for Prometheus: /metrics, /healthz and a landing page at /.

What the loop hands over is a snapshot; the exposition is rendered from it only when somebody
scrapes, at most once per snapshot (the bytes, and their gzip form, are cached until the next
snapshot). Publishing swaps a reference under a lock held for nanoseconds and rendering runs in
the scraping thread under its own lock, so a scrape never waits for the loop and the loop never
waits for a scrape.

The server is built to stay up against slow and many clients:

- at most `max_connections` connections at once (one thread each); when they are all taken, the
  one that has waited longest for its request head (or for its TLS handshake) is cut off to make
  room; a connection past the cap that finds none to cut off gets the reserved slot if it is
  free (one request, `/healthz` only, a 2 s deadline: probes keep answering whatever holds the
  other slots), else a short 503 (on a TLS port: closed without a word, plaintext there would
  only be a TLS error) and it holds no thread and no descriptor;
- every request has one overall deadline (`request_deadline` seconds from the moment the server
  starts waiting for it until the response is written), so a client that trickles its header one
  byte at a time is cut off however slowly it sends; the request head is capped in size too;
- a listen backlog of 128 (socketserver's default is 5);
- when accept() fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) the
  accept loop backs off (up to a second) instead of spinning a core;
- with a web config (webconfig.py): TLS, optional client certificates, basic auth with bcrypt
  hashes, extra response headers; the file is re-read when it changes. Password checks are a
  bounded queue (webconfig.MAX_PENDING_CHECKS running or waiting, fewer for a connection that
  sent a wrong password before): past it a request gets 429 at once, so a wrong-password flood
  holds no slot for long and a connection's first request always finds a place.

Bad requests get a 4xx and never reach anything else.
"""
from __future__ import annotations

import base64
import errno
import gzip as gziplib
import html
import logging
import select
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Dict, Optional, Tuple

from gpucostd import __version__

LOG = logging.getLogger("gpucostd")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MAX_CONNECTIONS = 64          # connections served at once (one thread each)
REQUEST_DEADLINE = 10.0       # seconds for one request: head in, response out
MAX_HEAD_BYTES = 256 * 1024   # request line + headers
LISTEN_BACKLOG = 128
KEEPALIVE_REQUESTS = 100      # requests on one connection before the server closes it
RESERVED_DEADLINE = 2.0       # the reserved /healthz slot: one request within this
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Published:
    """The latest snapshot from the loop, rendered on demand and cached per snapshot."""

    def __init__(self, monotonic: Callable[[], float],
                 renderer: Optional[Callable[[Any], bytes]] = None):
        self._lock = threading.Lock()          # guards the snapshot reference only
        self._render_lock = threading.Lock()   # one render at a time, outside the loop
        self._snap: Any = None
        self._raw: Optional[bytes] = None      # pre-rendered bytes (publish())
        self._seq = 0
        self._cache: Tuple[int, Optional[bytes], Optional[bytes]] = (-1, None, None)
        self._last_cycle: Optional[float] = None
        self._monotonic = monotonic
        self._renderer = renderer
        self.renders = 0                       # how many times the exposition was rendered
        self.interval = 1.0

    def publish_snapshot(self, snap: Any, at: float) -> None:
        """Called by the loop each cycle: cheap, renders nothing."""
        with self._lock:
            self._snap, self._raw = snap, None
            self._seq += 1
            self._last_cycle = at

    def publish(self, metrics: bytes, at: float) -> None:
        """Publish already rendered bytes (tests, tools without a snapshot)."""
        with self._lock:
            self._snap, self._raw = None, metrics
            self._seq += 1
            self._last_cycle = at

    def read(self) -> Tuple[bytes, Optional[float]]:
        body = self.exposition()
        return (body or b""), self._last_cycle

    def exposition(self, gzip: bool = False) -> Optional[bytes]:
        """The exposition of the latest snapshot (None before the first one)."""
        with self._lock:
            seq, snap, raw = self._seq, self._snap, self._raw
        if snap is None and raw is None:
            return None
        cseq, plain, packed = self._cache
        if cseq != seq or (gzip and packed is None):
            with self._render_lock:
                cseq, plain, packed = self._cache
                if cseq != seq:
                    if raw is not None:
                        plain = raw
                    else:
                        plain = self._renderer(snap)
                        self.renders += 1
                    packed = None
                if gzip and packed is None:
                    packed = gziplib.compress(plain, compresslevel=6, mtime=0)
                self._cache = (seq, plain, packed)
        return packed if gzip else plain

    def alive(self) -> Tuple[bool, str]:
        with self._lock:
            last = self._last_cycle
        if last is None:
            return False, "no cycle completed yet"
        age = self._monotonic() - last
        if age > 3 * self.interval:
            return False, f"last cycle {age:.1f} s ago (interval {self.interval:g} s)"
        return True, f"last cycle {age:.1f} s ago"


class _Expired(Exception):
    """The request's overall deadline passed."""


class _TooLarge(Exception):
    """The request head is larger than MAX_HEAD_BYTES."""


class _DeadlineReader:
    """A file-like reader over a socket in which every read counts against one deadline."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = b""
        self.deadline = 0.0
        self.budget = MAX_HEAD_BYTES

    def _fill(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Expired()
        if self.budget <= 0:
            raise _TooLarge()
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(min(65536, self.budget))
        except socket.timeout:
            raise _Expired() from None
        except ssl.SSLError:
            return False
        self.budget -= len(chunk)
        self._buf += chunk
        return bool(chunk)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0 and (limit < 0 or nl < limit):
                line, self._buf = self._buf[:nl + 1], self._buf[nl + 1:]
                return line
            if 0 <= limit <= len(self._buf):
                line, self._buf = self._buf[:limit], self._buf[limit:]
                return line
            if not self._fill():
                line, self._buf = self._buf, b""
                return line

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            if not self._fill():
                break
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        pass


_LANDING = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>gpucostd</title></head>
<body>
<h1>gpucostd {version}</h1>
<p>Node-level NVIDIA GPU tuning and health daemon.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus exposition (gzip on request)</li>
<li><a href="/healthz">/healthz</a>: 200 while the poll loop is alive, 503 otherwise</li>
</ul>
</body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    server_version = "gpucostd/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # set per server (see MetricsServer._handler_class)
    published: Published
    web: Any = None
    deadline_seconds = REQUEST_DEADLINE
    health_only = False       # the reserved slot: one request, /healthz only
    failed_auth = False       # a check on this connection failed or found the queue full

    def version_string(self):
        return self.server_version

    def setup(self):
        self.connection = self.request
        self.rfile = _DeadlineReader(self.request)
        self.wfile = _Writer(self.request)

    def handle(self):
        self.close_connection = True
        for n in range(1 if self.health_only else KEEPALIVE_REQUESTS):
            self.rfile.deadline = time.monotonic() + self.deadline_seconds
            self.rfile.budget = MAX_HEAD_BYTES
            self.wfile.reader = self.rfile
            # its response says Connection: close
            self.last_allowed = self.health_only or n + 1 >= KEEPALIVE_REQUESTS
            self.server.waiting(self.request, time.monotonic(), idle=n > 0)
            try:
                self.handle_one_request()
            except _TooLarge:
                self._plain_error(431, "request head too large")
                return
            except (_Expired, OSError):
                return
            if self.close_connection:
                return

    def finish(self):
        pass

    def _plain_error(self, code: int, message: str) -> None:
        try:
            self.request.settimeout(1.0)
            self.request.sendall(f"HTTP/1.1 {code} {message}\r\nContent-Length: 0\r\n"
                                 f"Connection: close\r\n\r\n".encode())
        except OSError:
            pass

    # ------------------------------------------------------------ requests
    def parse_request(self):
        ok = super().parse_request()                # reads the headers
        if not self.server.waiting(self.request, None):     # evicted while its head came in:
            self.close_connection = True                    # answering would be cut mid-way
            return False
        return ok                                   # the head is in: no longer a slow client

    def do_GET(self):  # noqa: N802 - http.server API
        if self.headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        path = self.path.split("?", 1)[0]
        web = self.web.current() if self.web is not None else None
        if path == "/healthz":      # never behind auth: kubelet and systemd probes use it
            ok, why = self.published.alive()
            self._send(200 if ok else 503,
                       (("ok: " if ok else "stalled: ") + why + "\n").encode(), web=web)
            return
        if self.health_only:
            self._send(503, b"busy: every connection slot is taken; only /healthz is served "
                            b"now\n", web=web, extra={"Retry-After": "1"})
            return
        authorized = self._authorized(web) if web is not None and web.users else True
        if authorized is None:      # the password-check queue is full: answer now, not later
            self._send(429, b"too many password checks at once; retry\n", web=web,
                       extra={"Retry-After": "1"})
            return
        if not authorized:
            self._send(401, b"unauthorized\n", web=web,
                       extra={"WWW-Authenticate": 'Basic realm="gpucostd"'})
            return
        if path == "/metrics":
            gz = _wants_gzip(self.headers.get("Accept-Encoding", ""))
            try:
                body = self.published.exposition(gzip=gz)
            except Exception:  # noqa: BLE001 - a render bug must not kill the connection
                LOG.exception("rendering /metrics failed")
                self._send(500, b"rendering the metrics failed; see the daemon log\n", web=web)
                return
            if body is None:
                self._send(503, b"no snapshot yet\n", web=web)
            else:
                self._send(200, body, CONTENT_TYPE, web=web,
                           extra={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
                           if gz else {"Vary": "Accept-Encoding"})
        elif path == "/":
            body = _LANDING.format(version=html.escape(__version__)).encode()
            self._send(200, body, "text/html; charset=utf-8", web=web)
        else:
            self._send(404, b"not found: try /metrics or /healthz\n", web=web)

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def _authorized(self, web) -> Optional[bool]:
        """Whether the request's basic auth is right; None when the check queue is full."""
        value = self.headers.get("Authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        ok = web.check_password(user, password, self.client_address[0],
                                suspect=self.failed_auth)
        self.failed_auth = self.failed_auth or ok is not True
        return ok

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              web=None, extra: Optional[Dict[str, str]] = None):
        # the response counts against the same deadline (sendall honours the timeout in total)
        left = max(0.001, self.rfile.deadline - time.monotonic())
        self.request.settimeout(left)
        self.send_response(code)
        if web is not None:
            for name, value in web.headers.items():
                self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if getattr(self, "last_allowed", False):
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        # head and body in one write: two small writes on a keep-alive connection meet Nagle's
        # algorithm and the client's delayed ACK, about 40 ms per response
        self._headers_buffer.append(b"\r\n")
        head, self._headers_buffer = b"".join(self._headers_buffer), []
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def send_error(self, code, message=None, explain=None):
        self.close_connection = True
        super().send_error(code, message, explain)

    def log_message(self, fmt, *args):  # access logs off; errors only at debug
        LOG.debug("http %s: " + fmt, self.client_address[0], *args)


class _Writer:
    """wfile: sendall under the request's deadline."""

    def __init__(self, sock):
        self._sock = sock
        self.reader: Optional[_DeadlineReader] = None

    def write(self, data: bytes) -> int:
        if self.reader is not None:
            left = self.reader.deadline - time.monotonic()
            if left <= 0:
                raise _Expired()
            self._sock.settimeout(left)
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _wants_gzip(accept: str) -> bool:
    for part in accept.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


def parse_address(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """The HTTP server: one accept thread, one thread per connection up to a cap."""

    def __init__(self, address: str, published: Published, web=None,
                 max_connections: int = MAX_CONNECTIONS,
                 request_deadline: float = REQUEST_DEADLINE):
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        self.address = address
        self.port = sock.getsockname()[1]
        self.web = web
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._reserve = threading.BoundedSemaphore(1)      # for /healthz when all are taken
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._handler = type("Handler", (_Handler,), {
            "published": published, "web": web, "deadline_seconds": request_deadline})
        self._health_handler = type("HealthHandler", (_Handler,), {
            "published": published, "web": web, "health_only": True,
            "deadline_seconds": min(request_deadline, RESERVED_DEADLINE)})
        self.rejected = 0          # connections refused at the cap
        self.evicted = 0           # slow connections cut off to make room
        self.reserved = 0          # connections served on the reserved /healthz slot
        self._waiting: Dict[Any, Tuple[int, float]] = {}   # conn -> (new?, since)
        self._waiting_lock = threading.Lock()
        self.deadline = request_deadline

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:                      # wakes the accept loop's select at once
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(2.0)
        self.close()

    def close(self) -> None:
        """Close the listening socket (also for a server that was never started)."""
        try:
            self.socket.close()
        except OSError:
            pass

    # ------------------------------------------------------------ accept loop
    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                # an idle daemon wakes here every 5 s, not 5 times a second: stop() shuts
                # the socket down, which wakes the select at once
                ready, _, _ = select.select([self.socket], [], [], 5.0)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                conn, peer = self.socket.accept()
            except OSError as e:
                if e.errno in _ACCEPT_RESOURCE_ERRORS:
                    # out of descriptors: the pending connection stays readable, so retrying at
                    # once would spin. Wait, doubling up to a second, then try again.
                    backoff = min(1.0, max(0.01, backoff * 2))
                    LOG.warning("http: accept failed (%s); retrying in %.2f s",
                                e.strerror or e, backoff)
                    self._stop.wait(backoff)
                continue
            backoff = 0.0
            try:                  # small responses go out at once (no Nagle delay)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            slot = self._slots
            if not self._slots.acquire(blocking=False):
                # full: cut off the connection that has waited longest for its request head (a
                # real scraper sends its request at once, a slow client is the one waiting)
                if not (self._evict_oldest_waiting() and self._slots.acquire(timeout=1.0)):
                    if not self._reserve.acquire(blocking=False):
                        self.rejected += 1
                        self._refuse(conn)
                        continue
                    slot = self._reserve        # none to cut off: /healthz may still pass
                    self.reserved += 1
            try:
                threading.Thread(target=self._serve, args=(conn, peer, slot), name="http-conn",
                                 daemon=True).start()
            except RuntimeError:          # cannot start a thread: treat like the cap
                slot.release()
                self._refuse(conn)

    def _refuse(self, conn: socket.socket) -> None:
        web = self.web.current() if self.web is not None else None
        _refuse(conn, tls=web is not None and web.ssl_context is not None)

    def _evict_oldest_waiting(self) -> bool:
        with self._waiting_lock:
            if not self._waiting:
                return False
            conn = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[conn]
            try:    # under the lock: its handler cannot have taken its head in and be answering
                # the socket's own shutdown, also for a TLS socket (SSLSocket.shutdown would
                # drop its SSL object under the thread that uses it): the thread sees EOF, or
                # its handshake fails, and frees the slot
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        self.evicted += 1
        return True

    def rekey(self, old, new) -> None:
        """The connection `old` now lives on as `new` (wrap_socket detached the raw socket: a
        shutdown must reach the TLS socket that owns the descriptor now)."""
        with self._waiting_lock:
            if old in self._waiting:
                self._waiting[new] = self._waiting.pop(old)

    def waiting(self, conn, since: Optional[float], idle: bool = False) -> bool:
        """A connection starts (since = monotonic time) or stops waiting for a request head.
        `idle`: a keep-alive connection that was answered before; those are cut off first (their
        client expects that and reconnects), then the new connection that waited longest.
        Stopping answers whether it was still waiting: False when it was evicted meanwhile (its
        socket is shut down; nothing may be sent on it)."""
        with self._waiting_lock:
            if since is None:
                return self._waiting.pop(conn, None) is not None
            self._waiting[conn] = (0 if idle else 1, since)
            return True

    def _serve(self, conn: socket.socket, peer, slot=None) -> None:
        reserved = slot is self._reserve
        try:
            if not reserved:            # a slow TLS handshake can be evicted (not the reserve's:
                self.waiting(conn, time.monotonic())    # it has its own short deadline)
            holder = [conn]
            conn = self._wrap(conn, holder, RESERVED_DEADLINE if reserved else self.deadline)
            self.waiting(holder[0], None)
            if conn is None:
                return
            (self._health_handler if reserved else self._handler)(conn, peer, self)
        except Exception as e:  # noqa: BLE001 - one connection must never end the server
            LOG.debug("http %s: connection ended: %s", peer[0] if peer else "?", e)
        finally:
            self.waiting(conn, None)
            try:
                conn.close()
            except (OSError, AttributeError):
                pass
            (slot or self._slots).release()

    def _wrap(self, conn: socket.socket, holder: list, deadline: float):
        web = self.web.current() if self.web is not None else None
        ctx = web.ssl_context if web is not None else None
        if ctx is None:
            return conn

        def wrapped(tls):           # eviction now reaches the TLS socket
            self.rekey(conn, tls)
            holder[0] = tls
        try:
            tls = _handshake(ctx, conn, time.monotonic() + deadline, wrapped)
        except (OSError, ssl.SSLError, _Expired, ValueError) as e:
            LOG.debug("http: TLS handshake failed: %s", e or "deadline passed")
            try:
                holder[0].close()
            except OSError:
                pass
            return None
        if not web.san_allowed(tls.getpeercert()):
            LOG.debug("http: client certificate SAN not in client_allowed_sans")
            tls.close()
            return None
        return tls


def _handshake(ctx: ssl.SSLContext, conn: socket.socket, deadline: float,
               wrapped: Callable[[ssl.SSLSocket], None] = lambda tls: None) -> ssl.SSLSocket:
    """The server side of a TLS handshake under one overall deadline (a client that trickles
    its ClientHello is cut off like one that trickles its request head). `wrapped` is told the
    TLS socket as soon as it exists (the raw one is detached from then on)."""
    conn.setblocking(False)
    tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    wrapped(tls)
    poller = select.poll()
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Expired()
        poller.register(tls, events)
        ready = poller.poll(left * 1000)
        poller.unregister(tls)
        if not ready:
            raise _Expired()
    tls.setblocking(True)
    return tls


def _refuse(conn: socket.socket, tls: bool = False) -> None:
    """Close a connection past the cap: with a short plaintext 503, or on a TLS port without a
    word (before a handshake, plaintext bytes are only a TLS error to the client)."""
    try:
        conn.setblocking(False)
        if not tls:
            conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                      b"Retry-After: 1\r\nConnection: close\r\n\r\n")
    except OSError:
        pass
    finally:
        conn.close()
