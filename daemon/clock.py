"""Clocks: the real one for the daemon, a virtual one for `gpucostd replay` and tests.

Everything time-dependent (the loop, the simulator's timeline, health windows, cost integration)
takes a clock, so replay runs the daemon's own code on virtual time as fast as the CPU allows.
"""
from __future__ import annotations

import threading
import time


class RealClock:
    virtual = False

    def __init__(self):
        self._stop = threading.Event()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; return True early if wake() was called."""
        woke = self._stop.wait(max(0.0, seconds))
        self._stop.clear()
        return woke

    def wake(self) -> None:
        self._stop.set()


class VirtualClock:
    """Time moves only when sleep() or advance() is called."""

    virtual = True

    def __init__(self, start_wall: float = 1_700_000_000.0):
        self._wall0 = start_wall
        self._t = 0.0

    def time(self) -> float:
        return self._wall0 + self._t

    def monotonic(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        self._t += max(0.0, seconds)

    def sleep(self, seconds: float) -> bool:
        self.advance(seconds)
        return False

    def wake(self) -> None:
        pass
