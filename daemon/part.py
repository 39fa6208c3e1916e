"""One contract for the parts of a cycle (node_exporter's collectors, gpud's components).

A **part** is one concern the loop runs every cycle: GPU readings, the kernel log, the state
directory, tuning, host facts, inference endpoints, the GPU judge, cost. It has a ``name`` and
one ``run(cycle)`` that reads (or acts) under its own deadline and returns typed data; the loop
holds a list of parts and runs it in order, each one timed and guarded, so a part that raises
costs that part alone: it shows as ``gpucostd_part_last_success{part="..."} 0`` and as one
``part_failed`` finding naming it (gpucostd.health.node), and the cycle goes on.

Three optional hooks, called by the loop when a part has them:
``after_record()`` once the cycle's events are stored (the kernel-log position, the judge's
"already reported" state are saved only then), ``reconfigure(config)`` after a reload, and
``close()`` when the daemon stops (a part's own threads: the kmsg reader, the drain worker).

Adding a concern is a new part (its file in daemon/parts/), its judge rule (a function given to
gpucostd.health.node.NodeJudge) and its view lines; the loop's body does not change.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from gpucostd.snapshot import Event

__all__ = ["Part", "PartResult", "Cycle"]


@dataclass(frozen=True)
class PartResult:
    """What one part returned in one cycle: its data, or the error that stopped it."""

    name: str
    ok: bool
    seconds: float              # how long its run took (monotonic, this process)
    error: Optional[str] = None  # "TypeError: ...", when ok is False
    data: Any = None


class Part:
    """The contract. Subclasses set ``name`` and implement ``run``."""

    name = ""

    def run(self, cycle: "Cycle") -> Any:
        raise NotImplementedError


class Cycle:
    """One cycle as the parts see it: its number and times, the data of the parts that ran
    before (``data(name)``) and the events the parts report (``events``)."""

    def __init__(self, number: int, now: float, monotonic: float, on_error=None):
        self.number = number
        self.on_error = on_error      # (part name, message): log it (called in the except)
        self.now = now
        self.monotonic = monotonic
        self.results: Dict[str, PartResult] = {}
        self.events: List[Event] = []

    def data(self, name: str, default: Any = None) -> Any:
        r = self.results.get(name)
        return r.data if r is not None and r.ok and r.data is not None else default

    def run(self, part: Part, timer=time.perf_counter) -> PartResult:
        """Run one part, timed; an exception it raises is its result, not the cycle's end."""
        start = timer()
        try:
            data = part.run(self)
        except Exception as e:  # noqa: BLE001 - one part's failure never ends the cycle
            result = PartResult(part.name, False, max(0.0, timer() - start),
                                f"{type(e).__name__}: {e}")
            if self.on_error is not None:
                self.on_error(part.name, result.error)
        else:
            result = PartResult(part.name, True, max(0.0, timer() - start), None, data)
        self.results[part.name] = result
        return result
