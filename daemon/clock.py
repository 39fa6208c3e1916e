"""Clocks: the real one for the daemon, a virtual one for `gpucostd replay` and tests.

Everything time-dependent (the loop, the simulator's timeline, health windows, cost integration)
takes a clock, so replay runs the daemon's own code on virtual time as fast as the CPU allows.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, Mapping, Optional

# Tests only: a file holding seconds added to the wall clock, so a test can step the daemon's
# clock (40 days forward, an hour back) without touching the host's. Read at most every 0.1 s.
_OFFSET_FILE = os.environ.get("GPUCOSTD_TEST_WALL_OFFSET_FILE") or None
_offset_cache = [0.0, -1.0]       # offset, monotonic time read


def _test_offset() -> float:
    now = time.monotonic()
    if now - _offset_cache[1] >= 0.1:
        _offset_cache[1] = now
        try:
            with open(_OFFSET_FILE, "r", encoding="ascii") as f:    # type: ignore[arg-type]
                _offset_cache[0] = float(f.read().strip() or 0)
        except (OSError, ValueError):
            pass
    return _offset_cache[0]


class RealClock:
    virtual = False

    def __init__(self):
        self._stop = threading.Event()

    def time(self) -> float:
        if _OFFSET_FILE:
            return time.time() + _test_offset()
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


# --------------------------------------------------------------------------- wall-clock steps
# The wall clock can be stepped (an operator's `date -s`, NTP correcting a wrong clock at
# boot); the boot clock cannot. A jump of the wall clock against the boot clock beyond this
# (plus 0.1% of the time between the two readings: NTP slews at most 0.05%) is a step. History
# kept by wall time (events, the cost minutes) is pruned or re-keyed by the step, not erased.
STEP_SECONDS = 60.0


def boot_seconds() -> float:
    """Seconds since boot, suspend included (CLOCK_BOOTTIME; the monotonic clock elsewhere)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "r", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def wall_step(wall0: float, boot0: float, wall1: float, boot1: float) -> float:
    """The step of the wall clock between two readings (wall, boot seconds); 0.0 for none."""
    step = (wall1 - wall0) - (boot1 - boot0)
    return step if abs(step) > STEP_SECONDS + 0.001 * abs(boot1 - boot0) else 0.0


def stamp(clock: Any) -> Dict[str, Any]:
    """What a state file saves so the next load can tell a clock step from time passing."""
    return {"saved_at": clock.time(), "saved_boot_seconds": boot_seconds(), "boot_id": boot_id()}


def step_since(saved: Mapping[str, Any], clock: Any) -> float:
    """The wall-clock step since `saved` (a stamp()) was taken, in this boot; 0.0 when none can
    be told (another boot, a virtual clock, an older file without the stamp)."""
    if getattr(clock, "virtual", False):
        return 0.0
    try:
        if not saved.get("boot_id") or saved.get("boot_id") != boot_id():
            return 0.0
        return wall_step(float(saved["saved_at"]), float(saved["saved_boot_seconds"]),
                         clock.time(), boot_seconds())
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0.0


class StepWatch:
    """Tells, call after call, whether the wall clock was stepped since the last call."""

    def __init__(self, clock: Any):
        self.clock = clock
        self._last: Optional[tuple] = None

    def check(self) -> float:
        if getattr(self.clock, "virtual", False):
            return 0.0
        now = (self.clock.time(), boot_seconds())
        last, self._last = self._last, now
        return wall_step(last[0], last[1], now[0], now[1]) if last is not None else 0.0
