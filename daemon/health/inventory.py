"""The node's GPUs, remembered: a GPU that drops out of NVML's count without an Xid is noticed.

A GPU can vanish with nothing in the kernel log that gpucostd reads (the Xid scrolled out before
the daemon started, a reboot or driver reload left it undetected, a PCIe link that never came
up). So the daemon keeps the node's GPUs in ``<state_dir>/gpu_inventory.json``: UUID, last PCI
bus id, last index and name, learned when it first sees every GPU with a UUID. The file is not
cleared by a reboot (a reboot is when a GPU most often goes missing).

Each cycle, with NVML answering: when fewer GPUs are visible than expected (``[health]
expected_gpu_count``, or the number in the inventory), the node has a CRIT ``gpu_missing``
finding that names each known GPU not seen, with its UUID and last bus id, and a
``gpu_missing`` event once per GPU (not again after a restart while it stays missing). When the
count is back, the finding goes and a ``gpu_found`` event says so. With as many GPUs visible as
expected, the inventory follows what is there (a replaced GPU's new UUID is learned, with a
``gpu_inventory`` event).

An operator accepts a smaller node with ``gpucostd ack node gpu_missing`` (the GPUs visible now
become the inventory), or by setting ``[health] expected_gpu_count``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

from gpucostd.probes.kernel_parser import normalize_bus_id
from gpucostd.snapshot import Event, Finding, GpuReading, GpuState, Severity
from gpucostd.statefile import plausible_epoch, read_json, set_aside, write_atomic

LOG = logging.getLogger("gpucostd")
FILE_NAME = "gpu_inventory.json"
CODE = "gpu_missing"
ACTION = ("reseat or replace the GPU (check dmesg, the BMC's event log and PCIe link); if the "
          "node is meant to have fewer GPUs: gpucostd ack node gpu_missing")


class Inventory:
    def __init__(self, state_dir: str, expected_count: int = 0):
        self.path = os.path.join(str(state_dir), FILE_NAME)
        self.expected_count = int(expected_count or 0)
        self.gpus: List[Dict[str, Any]] = []        # [{uuid, pci_bus_id, index, name}]
        self.reported: Dict[str, float] = {}        # uuid -> when reported missing
        self.missing: List[Dict[str, Any]] = []     # as judged last cycle
        self.visible_count: Optional[int] = None
        self.since: Optional[float] = None
        self._dirty = False
        self._load()

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        try:
            data = read_json(self.path)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            gpus = data.get("gpus")
            if not isinstance(gpus, list):
                raise ValueError("no gpus list")
            self.gpus = [{"uuid": str(g["uuid"]), "pci_bus_id": str(g.get("pci_bus_id") or ""),
                          "index": g.get("index") if isinstance(g.get("index"), int) else None,
                          "name": str(g.get("name") or "")}
                         for g in gpus if isinstance(g, dict) and isinstance(g.get("uuid"), str)]
            rep = data.get("reported") or {}
            self.reported = {str(k): float(v) for k, v in rep.items() if plausible_epoch(v)}
            since = data.get("since")
            self.since = float(since) if plausible_epoch(since) else None
        except FileNotFoundError:
            return
        except (ValueError, TypeError, KeyError, AttributeError) as e:   # UnreadableFile too
            set_aside(self.path, "GPU inventory", e, "learning the node's GPUs again")
            self.gpus, self.reported, self.since = [], {}, None

    def save(self) -> None:
        if not self._dirty:
            return
        data = {"version": 1, "gpus": self.gpus, "reported": self.reported,
                "since": self.since}
        try:
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))
            self._dirty = False
        except OSError as e:
            LOG.error("cannot write the GPU inventory %s: %s (check daemon.state_dir)",
                      self.path, e)

    # ------------------------------------------------------------------ the rule
    def judge(self, gpus: Sequence[GpuReading], now: float,
              events: List[Event]) -> List[Finding]:
        """Findings for the node (CRIT gpu_missing) and the events of changes."""
        if not gpus or all(g.state == GpuState.UNKNOWN for g in gpus):
            # NVML unavailable: cannot tell; a GPU judged missing before stays so
            return self._findings(now)
        self.visible_count = len(gpus)
        seen = {g.uuid: g for g in gpus if g.uuid}
        expected = self.expected_count or len(self.gpus)
        if not self.gpus or len(gpus) >= expected:
            if len(seen) == len(gpus):       # every GPU read with its UUID: learn them
                self._learn(gpus, now, events)
            missing: List[Dict[str, Any]] = []
        else:
            missing = [g for g in self.gpus if g["uuid"] not in seen]
        before = {g["uuid"] for g in self.missing}
        for g in missing:
            if g["uuid"] not in self.reported:
                self.reported[g["uuid"]] = now
                self._dirty = True
                events.append(Event(now, "node", CODE, Severity.CRIT, ACTION,
                                    f"GPU {g['uuid']} (last at {g['pci_bus_id'] or '?'}, index "
                                    f"{g['index']}) is not visible to NVML "
                                    f"({len(gpus)} of {expected} GPUs)",
                                    gpu=None, uuid=g["uuid"],
                                    fields={"pci_bus_id": g["pci_bus_id"], "index": g["index"],
                                            "visible": len(gpus), "expected": expected}))
        found = [u for u in list(self.reported) if u in seen or not missing]
        for u in found:
            del self.reported[u]
            self._dirty = True
            if u in seen or u in before:
                events.append(Event(now, "node", "gpu_found", Severity.OK, "none",
                                    f"GPU {u} is visible again" if u in seen else
                                    f"GPU {u} is no longer expected ({len(gpus)} GPUs)",
                                    uuid=u, fields={"visible": len(gpus)}))
        self.missing = missing
        if missing and self.since is None:
            self.since, self._dirty = now, True
        elif not missing and self.since is not None:
            self.since, self._dirty = None, True
        if not missing and len(gpus) < expected:
            return [self._short_finding(len(gpus), expected, now)]
        return self._findings(now)

    def _findings(self, now: float) -> List[Finding]:
        if not self.missing:
            return []
        expected = self.expected_count or len(self.gpus)
        names = "; ".join(f"{g['uuid']} (last at {g['pci_bus_id'] or '?'}, index {g['index']})"
                          for g in self.missing)
        msg = (f"GPU missing: {self.visible_count} of {expected} GPUs visible, no Xid needed; "
               f"not seen: {names}")
        return [Finding("node", CODE, Severity.CRIT, ACTION, msg[:600],
                        since=self.since if self.since is not None else now)]

    def _short_finding(self, visible: int, expected: int, now: float) -> Finding:
        # fewer than [health] expected_gpu_count, but every GPU we know of is there
        if self.since is None:
            self.since, self._dirty = now, True
        return Finding("node", CODE, Severity.CRIT, ACTION,
                       f"GPU missing: {visible} of {expected} GPUs visible "
                       f"([health] expected_gpu_count = {expected})", since=self.since)

    def _learn(self, gpus: Sequence[GpuReading], now: float, events: List[Event]) -> None:
        new = [{"uuid": g.uuid, "pci_bus_id": _bus(g.pci_bus_id), "index": g.index,
                "name": g.name or ""} for g in sorted(gpus, key=lambda g: g.index)]
        if new == self.gpus:
            return
        old = {g["uuid"] for g in self.gpus}
        now_set = {g["uuid"] for g in new}
        if self.gpus and old != now_set:
            gone, added = sorted(old - now_set), sorted(now_set - old)
            LOG.info("GPU inventory changed: gone %s, new %s", gone, added)
            events.append(Event(now, "node", "gpu_inventory", Severity.OK, "none",
                                f"GPU inventory: {len(new)} GPUs" +
                                (f"; no longer listed: {', '.join(gone)}" if gone else "") +
                                (f"; new: {', '.join(added)}" if added else ""),
                                fields={"gone": ",".join(gone), "new": ",".join(added),
                                        "count": len(new)}))
        elif not self.gpus:
            LOG.info("GPU inventory learned: %d GPUs", len(new))
        self.gpus = new
        self._dirty = True

    def accept(self, gpus: Sequence[GpuReading], now: float) -> List[str]:
        """Operator: the GPUs visible now are the node's. Returns the UUIDs no longer expected."""
        readable = [g for g in gpus if g.uuid and g.state != GpuState.UNKNOWN]
        if not readable:
            return []
        dropped = sorted({g["uuid"] for g in self.gpus} - {g.uuid for g in readable})
        self.gpus = [{"uuid": g.uuid, "pci_bus_id": _bus(g.pci_bus_id), "index": g.index,
                      "name": g.name or ""} for g in sorted(readable, key=lambda g: g.index)]
        for u in dropped:
            self.reported.pop(u, None)
        self.missing, self.since = [], None
        self._dirty = True
        return dropped

    def to_json(self) -> Dict[str, Any]:
        """For status --json: what the node should have and what is missing."""
        return {"expected": self.expected_count or len(self.gpus),
                "visible": self.visible_count,
                "missing": [{"uuid": g["uuid"], "pci_bus_id": g["pci_bus_id"],
                             "index": g["index"], "name": g["name"]} for g in self.missing]}


def _bus(text: Optional[str]) -> str:
    """NVML's "00000000:1B:00.0" -> "0000:1b:00.0" (the form findings use)."""
    return normalize_bus_id(text) or str(text or "")
