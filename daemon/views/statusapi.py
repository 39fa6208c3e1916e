"""The status API: JSON over a Unix stream socket, one request line, one response line.

Requests: {"cmd": "status"} | {"cmd": "events", "since": EPOCH, "limit": N} |
{"cmd": "cost", "since_seconds": S} | {"cmd": "ack", "gpu": N|null, "code": STR|null} (root only,
checked with SO_PEERCRED). Responses: {"ok": true, ...} or {"ok": false, "error": "..."}.
The client half (`request`, in statusclient.py) imports only json and socket: `gpucostd status`
stays light.
"""
from __future__ import annotations

import grp
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
from typing import Any, Callable, Dict, Optional

from gpucostd.views.statusclient import TIMEOUT, StatusClientError, request  # noqa: F401

LOG = logging.getLogger("gpucostd")
MAX_REQUEST = 64 * 1024


class NotReady(Exception):
    """Raised by a handler that has nothing to answer yet (the daemon is starting)."""


# ------------------------------------------------------------------ server
class _Handler(socketserver.StreamRequestHandler):
    timeout = TIMEOUT

    def handle(self):
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except (socket.timeout, OSError):
            return
        if len(line) > MAX_REQUEST:
            reply = {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
        else:
            reply = self.server.dispatch(line, self._peer_uid())
        try:
            self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")
        except OSError:
            pass

    def _peer_uid(self) -> Optional[int]:
        try:
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
            return struct.unpack("3i", creds)[1]
        except OSError:
            return None


class StatusServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: str, handlers: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]],
                 group: Optional[str] = None, root_only=("ack",)):
        self.path = path
        self.handlers = handlers
        self.root_only = set(root_only)
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        _remove_stale(path)
        old = os.umask(0o117)       # created 0660
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(old)
        self._set_group(group)
        self._thread: Optional[threading.Thread] = None

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
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError
        except ValueError:
            return {"ok": False, "error": 'malformed request: send one JSON object with "cmd"'}
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
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": f"bad {cmd} request: {e}"}
        except Exception as e:  # noqa: BLE001 - a request never takes the daemon down
            LOG.exception("status API %s failed", cmd)
            return {"ok": False, "error": f"{cmd} failed inside the daemon: {e}"}

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="status-api",
                                         kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
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
