"""MIG in the health judge: which instance a MIG-form Xid concerns, a MIG mode change waiting
for a GPU reset, and instances that appear or disappear between cycles (docs/health.md, "MIG").

An Xid line in the MIG form (``NVRM: Xid (PCI:0000:01:00 GPU-I:05 GPU-CI:01): 94, ...``,
gpucostd.probes.kernel_parser) names its GPU by PCI address and the instance by its GPU instance
and compute instance ids. The GPU's health takes the fault (an instance shares its GPU's
memory controllers, copy engines and driver state: a fault in one can stop the board), and the
finding and the event name the instance: its key ("gpu/gi/ci", gpucostd.snapshot.MigInstance),
its profile and its MIG UUID, taken from the layout last read. An instance gone from the layout
by the time its line is read is still named by its key (profile unknown).

Pure bookkeeping over readings; the judge owns one ``MigWatch`` and holds its lock.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from gpucostd.health.texts import mig_text
from gpucostd.snapshot import Event, GpuReading, GpuState, MigInstance, Severity

ACTION_MIG_RESET = ("reset the GPU when it is idle (stop its work, then nvidia-smi -r -i {i}) "
                    "or reboot; until then the GPU runs in its old mode")
ACTION_GONE = ("none if the MIG layout was changed on purpose; else look for an Xid on the GPU "
               "and check the layout (nvidia-smi mig -lgi; nvidia-smi mig -lci)")


def _mode(on: Optional[bool]) -> str:
    return "enabled" if on else "disabled"


class MigWatch:
    """The MIG layout of each GPU as last read, and what changed in it."""

    def __init__(self) -> None:
        # GPU index -> {instance key: MigInstance}; a GPU is here once it was read OK
        self._layout: Dict[int, Dict[str, MigInstance]] = {}
        # (GPU index, gi, ci) -> the instance last seen there (kept after it is gone, so a
        # line read late still names its profile)
        self._known: Dict[Tuple[int, int, int], MigInstance] = {}
        # instance key -> worst severity of the faults this cycle's findings name on it
        self.instance_health: Dict[str, Severity] = {}

    # ------------------------------------------------------------------ layout
    def observe(self, gpus: Sequence[GpuReading], now: float, events: List[Event]) -> None:
        """This cycle's layouts: one event per instance that appeared or disappeared on a GPU
        read OK in both cycles (the first sight of a GPU, a lost or unreadable GPU, and a GPU
        whose MIG mode was not read say nothing about its layout)."""
        for g in gpus:
            if g.state != GpuState.OK or (g.mig_mode is None and not g.mig):
                continue
            now_layout = {m.key: m for m in (g.mig or ())}
            for m in now_layout.values():
                self._known[(m.gpu_index, m.gi_id, m.ci_id)] = m
            before = self._layout.get(g.index)
            self._layout[g.index] = now_layout
            if before is None:
                continue
            for key in sorted(set(before) - set(now_layout)):
                m = before[key]
                events.append(self._event(now, g, m, "mig_instance_gone", Severity.WARN,
                                          ACTION_GONE,
                                          f"MIG instance {key} ({m.profile}) on GPU {g.index} is "
                                          f"gone from the layout"))
            for key in sorted(set(now_layout) - set(before)):
                m = now_layout[key]
                events.append(self._event(now, g, m, "mig_instance_new", Severity.OK, "none",
                                          f"MIG instance {key} ({m.profile}) appeared on GPU "
                                          f"{g.index}"))

    @staticmethod
    def _event(now: float, g: GpuReading, m: MigInstance, code: str, sev: Severity,
               action: str, msg: str) -> Event:
        return Event(now, f"gpu:{g.index}", code, sev, action, msg, gpu=g.index, uuid=g.uuid,
                     fields=instance_fields(m))

    # ------------------------------------------------------------------ faults
    def instance_of(self, gpu: Optional[int], fault: Any) -> Tuple[Optional[str], Optional[MigInstance]]:
        """(instance key, the instance as last read) of a MIG-form fault on GPU `gpu`; (None,
        None) for a line that names no instance or a GPU not known. A line that names only the
        GPU instance is the compute instance when that GPU instance has one."""
        gi = getattr(fault, "gpu_instance", None)
        ci = getattr(fault, "compute_instance", None)
        if gpu is None or not isinstance(gi, int):
            return None, None
        if isinstance(ci, int):
            m = self._known.get((gpu, gi, ci))
            return (m.key if m is not None else f"{gpu}/{gi}/{ci}"), m
        same = [m for m in (self._layout.get(gpu) or {}).values() if m.gi_id == gi]
        if len(same) == 1:
            return same[0].key, same[0]
        return None, None

    def describe(self, gpu: Optional[int], fault: Any) -> Tuple[str, Dict[str, Any]]:
        """(the words that name the instance, the event fields) for a fault; ("", {}) when it
        names none."""
        key, m = self.instance_of(gpu, fault)
        if key is None:
            return "", {}
        if m is None:           # not in a layout read: the line's own words (key in fields)
            return mig_text(fault), {"mig_instance": key}
        return f"MIG instance {key} {m.profile}", instance_fields(m)

    # ------------------------------------------------------------------ mode
    @staticmethod
    def mode_finding(g: GpuReading) -> Optional[Tuple[str, Severity, str, str]]:
        """(code, severity, action, message) when the GPU's MIG mode changes at its next reset:
        the mode asked for is not the mode it runs in."""
        if g.mig_mode is None or g.mig_mode_pending is None or g.mig_mode == g.mig_mode_pending:
            return None
        return ("mig_mode_pending", Severity.WARN, ACTION_MIG_RESET.format(i=g.index),
                f"MIG mode is {_mode(g.mig_mode)} and becomes {_mode(g.mig_mode_pending)} at the "
                f"next GPU reset: the layout asked for is not in effect")

    def judge_instances(self, findings: Sequence[Any], latched: Dict[str, Dict[str, Any]]) -> None:
        """Each instance's health this cycle: the worst latched fault that names it (OK for the
        rest of the layout)."""
        out: Dict[str, Severity] = {}
        for layout in self._layout.values():
            for key in layout:
                out[key] = Severity.OK
        for f in findings:
            rec = latched.get(f.subject, {}).get(f.code) if f.subject.startswith("gpu:") else None
            keys = (rec or {}).get("instances")
            for key in keys if isinstance(keys, list) else ():
                if isinstance(key, str):
                    out[key] = max(out.get(key, Severity.OK), f.severity)
        self.instance_health = out


def instance_fields(m: MigInstance) -> Dict[str, Any]:
    """The structured fields that name an instance in an event (journal, hooks, the store)."""
    fields: Dict[str, Any] = {"mig_instance": m.key, "mig_profile": m.profile,
                              "gpu_instance": m.gi_id, "compute_instance": m.ci_id}
    if m.uuid:
        fields["mig_uuid"] = m.uuid
    return fields


__all__ = ["MigWatch", "instance_fields", "ACTION_MIG_RESET"]
