"""Part "kernel_log": the NVRM/NVSwitch faults read from the kernel log this cycle (a simulated
node's scenario lines too), less those already stored before a restart; and the reader's state
(source, error, records lost to a flood)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Tuple

from gpucostd.part import Cycle, Part
from gpucostd.snapshot import KernelLogStatus

LOG = logging.getLogger("gpucostd")


@dataclass(frozen=True)
class KernelLogData:
    faults: Tuple[Any, ...]
    status: KernelLogStatus


class KernelLogPart(Part):
    name = "kernel_log"

    def __init__(self, watcher, sim=None, sim_parser=None, seen=None):
        self.watcher = watcher          # gpucostd.probes.kernel_log.KernelLogWatcher or None
        self.sim = sim                  # the simulated node (its scenario's kernel lines)
        self.sim_parser = sim_parser    # one-shot commands parse those lines here
        self.seen = seen                # dedupe key -> already stored (the event store)
        self._lost_logged = 0

    def close(self) -> None:
        """The daemon stops: the reader thread ends."""
        if self.watcher is not None:
            self.watcher.stop()

    def run(self, cycle: Cycle) -> KernelLogData:
        faults = []
        if self.sim is not None:
            lines = self.sim.drain_kernel_lines() or []
            if lines and self.watcher is not None:
                self.watcher.feed_lines(lines)
            elif lines and self.sim_parser is not None:
                for line in lines:
                    faults.extend(self.sim_parser.feed(line))
        if self.watcher is not None:
            faults.extend(self.watcher.poll() or [])
        if faults and self.seen is not None:
            # a fault re-read after a crash between storing it and saving the kernel-log
            # position is already recorded: do not judge it twice
            faults = [f for f in faults if not (f.dedupe_key and self._seen(f.dedupe_key))]
        return KernelLogData(tuple(faults), self.status())

    def _seen(self, key) -> bool:
        try:
            return bool(self.seen(key))
        except Exception as e:  # noqa: BLE001 - the store's trouble is the state_dir part's
            LOG.debug("kernel log: cannot ask the event store about %s: %s", key, e)
            return False

    def status(self) -> KernelLogStatus:
        w = self.watcher
        lost = int(getattr(w, "lines_lost", 0) or 0)
        if lost > self._lost_logged:
            LOG.warning("kernel log: %d records overwritten before gpucostd read them (%d in "
                        "all); Xid faults among them are missed", lost - self._lost_logged, lost)
            self._lost_logged = lost
        return KernelLogStatus(source=getattr(w, "source_in_use", "none"),
                               error=getattr(w, "error", None), lines_lost=lost,
                               last_loss_time=getattr(w, "last_loss_time", None))

    def after_record(self) -> None:
        if self.watcher is not None:
            self.watcher.commit()


def kernel_log_reader(source: str, state_dir: str, clock, sim=None, one_shot: bool = False):
    """(watcher, parser): the kernel-log watcher of a daemon (None in one-shot commands), and
    for a one-shot command on a simulated node the parser of its scenario's kernel lines."""
    if clock.virtual or (sim is not None and source == "auto"):
        # replay, and a simulated node unless the config names a real log: only the
        # scenario's own kernel lines (the host's Xids are not the simulated GPUs')
        source = "none"
    if not one_shot:
        from gpucostd.probes.kernel_log import KernelLogWatcher
        return KernelLogWatcher(source, state_dir, clock=clock, on_fault=clock.wake), None
    if sim is not None:
        from gpucostd.probes.kernel_log import NvrmParser
        return None, NvrmParser()
    return None, None
