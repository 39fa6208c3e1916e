"""Part "cost": the accountant integrates this cycle's readings (throttling, idle capacity,
energy) and the endpoints' token counters into the cost report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from gpucostd.part import Cycle, Part


@dataclass(frozen=True)
class CostData:
    report: Any = None                        # gpucostd.cost.report.CostReport
    floor_transition: Optional[str] = None    # "inefficient" | "efficient" this cycle


class CostPart(Part):
    name = "cost"

    def __init__(self, accountant, endpoints: Sequence = ()):
        self.accountant = accountant          # gpucostd.cost.accountant.CostAccountant
        self.endpoints = endpoints            # the inference probes (the loop's list)

    def run(self, cycle: Cycle) -> CostData:
        acc = self.accountant
        report = acc.update(cycle.data("gpu", ()), cycle.monotonic)
        if self.endpoints:
            readings = cycle.data("inference", ())
            # stamped with the time of the scrape, not of the cycle start: a slow cycle must
            # not skew tokens per second
            stamp = max((r.time for r in readings if r is not None), default=cycle.monotonic)
            report = acc.update_tokens(readings, stamp) or report
        return CostData(report, getattr(acc, "floor_transition", None))

    def reconfigure(self, config) -> None:
        self.accountant.reconfigure(config)
