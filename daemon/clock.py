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


# An early cycle (a wake-up) starts at least this many seconds after the last cycle ended.
EARLY_GAP = 1.0


def wait_for_cycle(clock, regular_at: float, early_at: float, stopped: threading.Event,
                   notifier=None) -> None:
    """Sleep until the regular cycle is due (monotonic `regular_at`) or, once woken, until
    `early_at` if that is sooner; return at once when `stopped` is set. With a systemd watchdog
    (notifier.watchdog_seconds) it is fed at least every half of WatchdogSec meanwhile, so a long
    interval never lets systemd kill a healthy daemon."""
    feed = getattr(notifier, "watchdog_seconds", None)
    feed = 0.5 * feed if feed else None
    woken = False
    while not stopped.is_set():
        now = clock.monotonic()
        until = min(regular_at, early_at) if woken else regular_at
        if now >= until:
            return
        wait = until - now if feed is None else min(until - now, feed)
        if clock.sleep(wait):
            woken = True
        elif feed is not None and wait == feed:
            notifier.watchdog()
