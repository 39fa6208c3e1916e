"""What happened, kept: each event stored (first: nothing reported is lost), journaled and
handed to the hooks; the Xid and SXid totals and the recent events the snapshot carries."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from gpucostd.snapshot import Event, printable_event

RECENT_EVENTS = 20


def _unguarded(what: str, fn, default=None):
    return fn()


class Recorder:
    def __init__(self, store, hooks, journal: bool = True, guard: Callable = _unguarded):
        self.store = store            # gpucostd.record.events.EventStore
        self.hooks = hooks            # gpucostd.record.hooks.HookRunner
        self.journal = journal        # False in replay: simulated events stay out of it
        self.guard = guard            # (what, fn, default): the loop logs and reports failures
        self.xid_totals: Dict[Tuple[Optional[int], int], int] = dict(store.xid_totals())
        # NVSwitch SXids per (switch bus id, SXid): the node's stored sxid events
        self.sxid_totals: Dict[Tuple[str, int], int] = {}
        for e in store.query(subject="node"):
            self._count_sxid(e)
        self.recent: List[Event] = list(store.recent(RECENT_EVENTS))

    def record(self, events: List[Event]) -> None:
        if not events:
            return
        from gpucostd.record.journal import send_event
        guard, stored = self.guard, []
        for e in events:
            e = printable_event(e)      # kernel text may carry terminal escapes
            key = e.fields.get("dedupe_key") if e.fields else None
            saved = guard("event store", lambda: self.store.append(e, key), e)
            if saved is None:          # a duplicate (e.g. a kernel line seen before a restart)
                continue
            stored.append(saved)
            if saved.xid is not None:
                k = (saved.gpu, saved.xid)
                self.xid_totals[k] = self.xid_totals.get(k, 0) + 1
            self._count_sxid(saved)
            if self.journal:
                guard("journal", lambda: send_event(saved))
        self.recent.extend(stored)
        del self.recent[:-RECENT_EVENTS]
        guard("hooks", lambda: self.hooks.on_events(stored))

    def _count_sxid(self, e: Event) -> None:
        if e.code == "sxid" and e.fields and isinstance(e.fields.get("sxid"), int):
            k = (str(e.fields.get("pci_bus_id", "")), e.fields["sxid"])
            self.sxid_totals[k] = self.sxid_totals.get(k, 0) + 1
