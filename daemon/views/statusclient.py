"""The client half of the status API (see statusapi.py): one request line to the daemon's Unix
socket, one JSON line back. `gpucostd status` imports this module and nothing heavier than json
and socket (no logging, threading or socketserver)."""
from __future__ import annotations

import json

try:  # the C module: socket.py would add selectors, select, array and more to the start-up
    import _socket as _sock
except ImportError:  # pragma: no cover - another Python implementation
    import socket as _sock

TIMEOUT = 5.0


class StatusClientError(Exception):
    pass


class DaemonRefused(StatusClientError):
    """The daemon answered and refused the request (e.g. it is starting): it runs."""


class UntrustedServer(StatusClientError):
    """The socket is served by a process of another user: nothing was sent to it."""


def peer_uid(sock) -> "int | None":
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    import struct
    try:
        creds = sock.getsockopt(_sock.SOL_SOCKET, _sock.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except (OSError, AttributeError):   # AttributeError: no SO_PEERCRED on this platform
        return None


def _check_server(sock, path: str) -> None:
    """The daemon runs as root (the system service) or as this user (the demo): a socket that
    any other user serves may be a fake one put there to read an `ack` or to show a false OK."""
    import os
    uid = peer_uid(sock)
    if uid is None or uid in (0, os.getuid()):
        return
    raise UntrustedServer(
        f"{path} is served by a process of uid {uid}, neither root nor you: not gpucostd's "
        f"socket (another user may have put it there); nothing was sent. Check who owns "
        f"{os.path.dirname(path) or '.'} and restart the daemon")


def request(path: str, message: dict, timeout: float = TIMEOUT) -> dict:
    """Send one request to the daemon; raise StatusClientError with the reason in words."""
    try:
        s = _sock.socket(_sock.AF_UNIX, _sock.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(path)
            _check_server(s, path)      # before a byte is sent: `ack` must reach only gpucostd
            s.sendall(json.dumps(message).encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
        finally:
            s.close()
    except FileNotFoundError:
        raise StatusClientError(f"no daemon socket at {path}") from None
    except PermissionError:
        raise StatusClientError(
            f"permission denied on {path}: join the gpucostd group "
            f"(sudo usermod -aG gpucostd $USER, then log in again) or use sudo") from None
    except ConnectionRefusedError:
        raise StatusClientError(f"nothing listens on {path} (stale socket)") from None
    except _sock.timeout:
        raise StatusClientError(f"the daemon at {path} did not answer in {timeout:.0f} s") \
            from None
    except OSError as e:
        raise StatusClientError(f"cannot talk to {path}: {e.strerror or e}") from None
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusClientError(f"the daemon at {path} sent a malformed answer") from None
    if not reply.get("ok"):
        raise DaemonRefused(reply.get("error") or "the daemon refused the request")
    return reply
