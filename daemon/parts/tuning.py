"""Part "tuning": the saved originals' state, an interrupted calibration's limits put back,
then apply once at start (and after a reload) and verify every verify interval; never while
the saved originals are unreadable (tuning would lose them for good)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from gpucostd.part import Cycle, Part
from gpucostd.snapshot import Event, GpuState, Setting, Severity

LOG = logging.getLogger("gpucostd")
ORIGINALS_ACTION = ("fix or move aside originals.json, then `systemctl reload gpucostd` "
                    "(docs/tuning.md, saved originals unreadable)")


@dataclass(frozen=True)
class TuningData:
    settings: Tuple[Setting, ...] = ()
    originals_problem: Optional[str] = None
    originals_since: Optional[float] = None
    nic_rings: Dict[str, Any] = field(default_factory=dict)


class TuningPart(Part):
    name = "tuning"

    def __init__(self, tuning, tuning_section, gpu_tuning, gpu_overrides, nic_tuning,
                 recover=None):
        self.tuning = tuning                # gpucostd.tuners.manager.TuningManager
        self.recover = recover              # (gpus) -> events: an interrupted calibration
        self._sections(tuning_section, gpu_tuning, gpu_overrides, nic_tuning)
        self.applied = False
        self.settings: Tuple[Setting, ...] = ()
        self._originals_reported: Optional[str] = None
        self._originals_since: Optional[float] = None

    def _sections(self, tuning_section, gpu_tuning, gpu_overrides, nic_tuning) -> None:
        del tuning_section              # (the manager keeps its own verify interval)
        # with GPU settings configured, the first apply waits for a readable GPU (NVML not
        # up yet, or every GPU lost at start: apply later, not never)
        self.gpu_tuning = any(v is not None for v in gpu_tuning.values()) or bool(gpu_overrides)
        self.nic_tuning = bool(nic_tuning)

    def reconfigure(self, config) -> None:
        self._sections(config.tuning, config.gpu_tuning, config.gpu_overrides,
                       config.nic_tuning)
        self.applied = False           # apply the new desired state at the next cycle

    def run(self, cycle: Cycle) -> TuningData:
        gpus = cycle.data("gpu", ())
        now, events = cycle.now, cycle.events
        problem = self.tuning.originals_problem
        events.extend(self._originals_events(now, problem))
        if self.recover is not None and gpus and problem is None:
            recover, self.recover = self.recover, None
            events.extend(recover(gpus) or [])
        if gpus or self.nic_tuning:
            if not self.applied and problem is None and (
                    not self.gpu_tuning or any(g.state == GpuState.OK for g in gpus)):
                changes = self.tuning.apply(gpus)
                self.applied = True
                events.extend(change_events(now, changes, "setting_applied", gpus))
            settings, drift_events = self.tuning.verify(gpus, cycle.monotonic)
            self.settings = tuple(settings)
            events.extend(drift_events)
        return TuningData(self.settings, problem, self._originals_since,
                          dict(self.tuning.nic_rings))

    def _originals_events(self, now: float, problem: Optional[str]) -> List[Event]:
        """One event (and one log line) when the saved originals become unreadable, one when
        they are usable again."""
        if problem == self._originals_reported:
            return []
        was, self._originals_reported = self._originals_reported, problem
        if problem is not None:
            self._originals_since = now
            LOG.error("%s", problem)
            return [Event(now, "node", "originals_unreadable", Severity.WARN, ORIGINALS_ACTION,
                          problem)]
        self._originals_since = None
        msg = "saved originals readable again; tuning resumes"
        LOG.warning("%s (was: %s)", msg, was)
        return [Event(now, "node", "originals_recovered", Severity.OK, "none", msg)]


def change_events(now: float, changes, code: str, gpus=()) -> List[Event]:
    """setting_applied / setting_restored events (setting_failed for a refusal)."""
    uuids = {g.index: g.uuid for g in gpus or ()}
    out = []
    for c in changes or ():
        gpu = int(c.subject[4:]) if c.subject.startswith("gpu:") and c.subject[4:].isdigit() \
            else None
        ok = getattr(c, "ok", True)
        verb = {"setting_applied": "set", "setting_restored": "restored"}.get(code, code)
        if ok:
            msg = f"{c.subject}: {c.name} {verb} {c.old} -> {c.new}"
        else:
            msg = f"{c.subject}: {c.name} not {verb}: {c.error}"
        out.append(Event(now, c.subject, code if ok else "setting_failed",
                         Severity.OK if ok else Severity.WARN,
                         "none" if ok else "see message", msg, gpu=gpu, uuid=uuids.get(gpu),
                         fields={"setting": c.name, "old": c.old, "new": c.new}))
    return out
