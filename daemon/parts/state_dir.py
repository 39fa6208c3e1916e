"""Part "state_dir": is the state directory usable (there, ours, writable, not full)? Makes
one that vanished again, points the event store at it, writes the events kept in memory once
it takes writes and cuts the WAL back when the disk is full."""
from __future__ import annotations

import logging
from typing import Optional

from gpucostd.part import Cycle, Part
from gpucostd.snapshot import Event, Severity, StateDirStatus
from gpucostd.statefile import (check_private_dir, dir_identity, ensure_private_dir,
                                state_dir_problem, take_notices)

LOG = logging.getLogger("gpucostd")
STATE_RESET_ACTION = ("none needed: the daemon started that file fresh; the old one is kept "
                      "beside it as .bad for a look (delete it when done)")


class StateDirPart(Part):
    name = "state_dir"

    def __init__(self, state_dir: str, store, on_recreated=None):
        self.state_dir = state_dir
        self.store = store                  # gpucostd.record.events.EventStore
        self.on_recreated = on_recreated    # the tuners read their saved originals again
        self._identity = dir_identity(state_dir)
        self._reported: Optional[str] = None
        self._was_bad = False
        self._since: Optional[float] = None

    def run(self, cycle: Cycle) -> StateDirStatus:
        now, events = cycle.now, cycle.events
        # state files set aside since the last cycle (moved, kept, started fresh)
        events.extend(Event(now, "node", "state_file_reset", Severity.WARN, STATE_RESET_ACTION,
                            msg) for msg in take_notices(self.state_dir))
        problem = state_dir_problem(self.state_dir, self._identity)
        if problem is not None and problem[0] in ("vanished", "replaced"):
            try:
                if problem[0] == "vanished":
                    ensure_private_dir(self.state_dir, 0o750, "state directory")
                else:
                    check_private_dir(self.state_dir, what="state directory")
            except OSError as e:
                LOG.debug("state dir: %s", e)
            else:
                self._identity = dir_identity(self.state_dir)
                self.store.reopen()
                if self.on_recreated is not None:
                    self.on_recreated()
                LOG.warning("%s; made it again (events, saved originals and cost totals "
                            "are written there from now on)", problem[1])
                events.append(Event(now, "node", "state_dir_recreated", Severity.WARN,
                                    "find what removed daemon.state_dir", problem[1]))
                problem = state_dir_problem(self.state_dir, self._identity)
        if problem is not None and problem[0] == "full" and self._reported is None:
            self.store.checkpoint()
        pending = self.store.retry(reopen_now=problem is None and self._was_bad)
        self._was_bad = problem is not None
        message = problem[1] if problem is not None else None
        if message is None and pending:
            why = self.store.error or "the event database cannot be written"
            message = f"{pending} events held in memory: {why}"
        if (message is None) != (self._reported is None):
            if message is not None:
                self._since = now
                LOG.error("%s", message)
                events.append(Event(now, "node", "state_dir_unusable", Severity.WARN,
                                    "free space on / make writable daemon.state_dir", message))
            else:
                LOG.warning("state directory %s usable again", self.state_dir)
                events.append(Event(now, "node", "state_dir_recovered", Severity.OK, "none",
                                    f"state directory {self.state_dir} usable again"))
        self._reported = message
        return StateDirStatus(message, self._since if message else None,
                              int(self.store.pending or 0))
