"""sd_notify(3) for Type=notify: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

A plain datagram to $NOTIFY_SOCKET (no library needed); a no-op outside systemd.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional


class Notifier:
    def __init__(self, address: Optional[str] = None):
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: Optional[socket.socket] = None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_seconds: Optional[float] = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields) -> bool:
        """send(READY=1, STATUS="...") -> True if delivered."""
        if not self.address:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode("utf-8", "replace")
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, addr)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def reloading(self) -> None:
        # MONOTONIC_USEC is required by systemd >= 253 for Type=notify-reload; harmless before.
        self.send(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6))

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")
