"""The status API: JSON over a Unix stream socket, one request line, one response line.

Requests: {"cmd": "status"} | {"cmd": "events", "since": EPOCH, "limit": N} |
{"cmd": "cost", "since_seconds": S} | {"cmd": "ack", "gpu": N|null, "code": STR|null} (root only,
checked with SO_PEERCRED). Responses: {"ok": true, ...} or {"ok": false, "error": "..."}.
The client half (`request`, in statusclient.py) imports only json and socket: `gpucostd status`
stays light.
"""
from __future__ import annotations

import errno
import grp
import json
import logging
import math
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from typing import Any, Callable, Dict, Optional

from gpucostd.views.statusclient import (TIMEOUT, StatusClientError,  # noqa: F401
                                          UntrustedServer, peer_uid, request)

LOG = logging.getLogger("gpucostd")
MAX_REQUEST = 64 * 1024
MAX_INT_DIGITS = 18         # larger numbers in a request are refused (no handler takes them)
REQUEST_DEADLINE = 2.0      # the server's limit for one whole exchange (a request is one line)
# With every slot taken, the connection that has waited longest for its request line (at least
# this long) is cut off to make room: a client sends its line as soon as it connects.
EVICT_AFTER = 0.25


class NotReady(Exception):
    """Raised by a handler that has nothing to answer yet (the daemon is starting)."""


# ------------------------------------------------------------------ server
def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"number {text[:20]}... has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number the API takes")


def parse_request(line: bytes) -> Dict[str, Any]:
    """One request line as a dict with a str "cmd"; ValueError (with the reason) otherwise.
    Numbers are finite and of sane size, nesting is bounded: nothing reaches a handler that
    would overflow or recurse."""
    try:
        req = json.loads(line, parse_int=_bounded_int, parse_float=_finite_float,
                         parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:     # JSONDecodeError, UnicodeDecodeError and ours
        raise ValueError(str(e).split(":")[0][:80]) from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise ValueError('send one JSON object with "cmd"')
    return req


class _Evicted(Exception):
    """This connection was cut off to make room (it had not sent its request)."""


class _Handler(socketserver.BaseRequestHandler):
    """One request line, one reply line. The whole exchange runs under one deadline (not a
    timeout per read, which a client trickling a byte at a time would renew for ever)."""

    def handle(self):
        sock = self.request
        deadline = time.monotonic() + self.server.request_deadline
        buf = b""
        waiting = self.server.waiting
        with self.server.waiting_lock:
            waiting[sock] = time.monotonic()
        try:
            try:
                self._read_request(sock, deadline, buf)
            finally:
                with self.server.waiting_lock:
                    waiting.pop(sock, None)
        except _Evicted:
            return

    def _read_request(self, sock, deadline: float, buf: bytes) -> None:
        try:
            while b"\n" not in buf and len(buf) <= MAX_REQUEST:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                sock.settimeout(left)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            self._reply({"ok": False, "error": f"request not complete within "
                                               f"{self.server.request_deadline:g} s"})
            return
        except OSError:
            return
        with self.server.waiting_lock:
            evicted = self.server.waiting.pop(sock, None) is None
        if evicted:                     # cut off to make room: it said nothing in time
            raise _Evicted
        line = buf.split(b"\n", 1)[0]
        if len(line) > MAX_REQUEST:
            reply = {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
        elif not line.strip():
            return
        else:
            reply = self.server.dispatch(line, self._peer_uid())
        self._reply(reply)

    def _reply(self, reply: Dict[str, Any]) -> None:
        try:
            data = json.dumps(reply, default=str).encode() + b"\n"
        except (ValueError, TypeError, RecursionError) as e:
            data = json.dumps({"ok": False, "error": f"cannot encode the answer: {e}"}
                              ).encode() + b"\n"
        try:
            self.request.settimeout(self.server.request_deadline)
            self.request.sendall(data)
        except OSError:
            pass

    def _peer_uid(self) -> Optional[int]:
        return peer_uid(self.request)


class StatusServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    # hundreds of `gpucostd status` at once must all get in: the kernel queues what is not
    # accepted yet (at most net.core.somaxconn)
    request_queue_size = 512
    # at most this many connections are open at once; the others wait in the listen queue
    # (they cost the daemon no file descriptor there)
    max_connections = 64
    request_deadline = REQUEST_DEADLINE

    def __init__(self, path: str, handlers: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]],
                 group: Optional[str] = None, root_only=("ack",)):
        self.path = path
        self.handlers = handlers
        self.root_only = set(root_only)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        # connections still waiting for their request line: socket -> when accepted
        self.waiting: Dict[Any, float] = {}
        self.waiting_lock = threading.Lock()
        self._accept_error_logged = 0.0
        # refused (UnsafePathError) when another user could replace the socket
        from gpucostd.statefile import ensure_private_dir
        ensure_private_dir(os.path.dirname(os.path.abspath(path)), 0o755, "socket directory",
                           shared_ok=True)
        _remove_stale(path)
        old = os.umask(0o117)       # created 0660
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(old)
        self._set_group(group)
        self._thread: Optional[threading.Thread] = None

    def get_request(self):
        """Accept only while a connection slot is free, and back off on a descriptor shortage
        (EMFILE and friends): the accept loop never spins a core."""
        if not self._slots.acquire(blocking=False):
            # full: cut off the connection that has waited longest without sending its request
            # (silent clients must not queue a `gpucostd status` past its timeout)
            self._evict_silent()
            if not self._slots.acquire(timeout=0.2):
                raise OSError(errno.EBUSY, "all connection slots busy")   # polled again
        try:
            return super().get_request()
        except OSError as e:
            self._release_slot()
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                now = time.monotonic()
                if now - self._accept_error_logged > 60:
                    self._accept_error_logged = now
                    LOG.error("status socket: cannot accept connections: %s (too many open "
                              "files?); retrying every 0.1 s", e.strerror or e)
                time.sleep(0.1)
            raise

    def _evict_silent(self) -> None:
        now = time.monotonic()
        with self.waiting_lock:
            if not self.waiting:
                return
            sock, since = min(self.waiting.items(), key=lambda kv: kv[1])
            if now - since < EVICT_AFTER:
                return
            del self.waiting[sock]
        try:
            sock.shutdown(socket.SHUT_RDWR)     # its recv() returns at once; the slot frees
        except OSError:
            pass

    def shutdown_request(self, request) -> None:
        try:
            super().shutdown_request(request)
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        try:
            self._slots.release()
        except ValueError:
            pass

    def _set_group(self, group: Optional[str]) -> None:
        if not group:
            return
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            LOG.info("group %s does not exist; the status socket %s is for its owner only",
                     group, self.path)
            return
        try:
            os.chown(self.path, -1, gid)
            os.chmod(self.path, 0o660)
        except OSError as e:
            LOG.warning("cannot give the status socket %s to group %s: %s", self.path, group,
                        e.strerror)

    def dispatch(self, line: bytes, uid: Optional[int]) -> Dict[str, Any]:
        try:
            req = parse_request(line)
        except ValueError as e:
            return {"ok": False, "error": f'malformed request ({e}): send one JSON object with '
                                          f'"cmd"'}
        cmd = req["cmd"]
        handler = self.handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd[:40]!r}; known: "
                                          + ", ".join(sorted(self.handlers))}
        if cmd in self.root_only and uid != 0:
            return {"ok": False, "error": f"{cmd} needs root: run it with sudo"}
        try:
            return dict({"ok": True}, **handler(req))
        except NotReady as e:
            return {"ok": False, "error": str(e)}
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            return {"ok": False, "error": f"bad {cmd} request: {str(e)[:200]}"}
        except Exception as e:  # noqa: BLE001 - a request never takes the daemon down
            LOG.exception("status API %s failed", cmd)
            return {"ok": False, "error": f"{cmd} failed inside the daemon: {e}"}

    def start(self) -> None:
        # no poll interval: the accept loop sleeps in select until a connection comes (an
        # idle daemon wakes for nothing); shutdown() wakes it by shutting the socket down
        self._thread = threading.Thread(target=self.serve_forever, name="status-api",
                                         kwargs={"poll_interval": None}, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop serve_forever: ask it to stop (socketserver's shutdown, which waits for it),
        and shut the listening socket down, which wakes its select (accept then fails and the
        loop sees the request). No connection is made, so no handler outlives the stop."""
        asking = threading.Thread(target=super().shutdown, name="status-api-stop", daemon=True)
        asking.start()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        asking.join()

    def stop(self) -> None:
        if self._thread is not None:      # shutdown() waits for serve_forever: only if it runs
            self.shutdown()
            self._thread = None
        self.close()

    def close(self) -> None:
        """Close the socket and remove its path (also for a server that was never started)."""
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _remove_stale(path: str) -> None:
    """Remove a socket left by a crashed daemon; refuse to start beside a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket; remove it or set daemon.socket_path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise OSError(f"another gpucostd already listens on {path}; stop it first")
