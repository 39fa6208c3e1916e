"""Part "health": the GPU judge (gpucostd.health.judge) over this cycle's readings and kernel
faults: per-GPU health, findings and the events of changes. Its "already reported" state is
saved only once the events are stored (after_record)."""
from __future__ import annotations

from gpucostd.part import Cycle, Part


class HealthPart(Part):
    name = "health"

    def __init__(self, judge):
        self.judge = judge              # gpucostd.health.judge.HealthJudge

    def run(self, cycle: Cycle):
        faults = getattr(cycle.data("kernel_log"), "faults", ())
        report = self.judge.judge(cycle.data("gpu", ()), faults, cycle.now)
        cycle.events.extend(report.events)
        return report

    def reconfigure(self, config) -> None:
        self.judge.reconfigure(config)

    def after_record(self) -> None:
        self.judge.commit()
