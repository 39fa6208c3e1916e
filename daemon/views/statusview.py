"""The on-call view, daemon side: snapshot -> status JSON (the CLI side, status JSON -> text, is
statustext.py, re-exported here).

The CLI renders from the JSON alone, so `gpucostd status` imports nothing heavy. The JSON schema
is documented in README.md ("status --json"); keys are stable, new keys may be added.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional

from gpucostd.snapshot import (ACTIVITY_FIELDS, Event, Finding, GpuReading, MigInstance,
                               NodeSnapshot, Severity, THROTTLE_REASONS, printable, printable_tree)

# the CLI side lives in statustext.py (light: `gpucostd status` imports only that)
from gpucostd.views.statustext import (EXIT_CODES, SCHEMA_VERSION, WIDTH,  # noqa: F401,E402
                                       cost_lines, exit_code, render_status, use_colour)


# ------------------------------------------------------------------ daemon side
def _finding_json(f: Finding) -> Dict[str, Any]:
    return {"subject": f.subject, "gpu": f.gpu, "code": f.code, "severity": f.severity.name,
            "action": f.action, "message": f.message, "since": f.since}


def event_json(e: Event) -> Dict[str, Any]:
    return {"id": e.id, "time": e.time, "subject": e.subject, "code": e.code,
            "severity": e.severity.name, "action": e.action, "message": e.message,
            "gpu": e.gpu, "uuid": e.uuid, "xid": e.xid,
            "fields": {k: v for k, v in (e.fields or {}).items() if k != "dedupe_key"}}


def with_pending_faults(doc: Dict[str, Any], faults: List[Any]) -> Dict[str, Any]:
    """The status document with the kernel faults read but not yet judged put first among its
    events (a copy; `doc` is the cached one). Such an event says what the log said, with
    ``"pending": true``: its severity, the GPU's health and the exit code come from the cycle
    that judges it, at most a second later in a burst (docs/performance.md)."""
    if not faults:
        return doc
    by_bus = {str(g.get("pci_bus_id") or "").lower()[-7:]: g.get("index")
              for g in doc.get("gpus") or () if g.get("pci_bus_id")}
    pending = []
    for f in reversed(faults):          # newest first, as the events are
        bus = str(getattr(f, "pci_bus_id", "") or "")
        gpu = by_bus.get(bus.lower()[-7:]) if bus else None
        xid = getattr(f, "xid", None)
        sxid = getattr(f, "sxid", None)
        what = (f"Xid {xid}" if xid is not None else f"SXid {sxid}" if sxid is not None
                else "NVRM fault")
        where = f"GPU {gpu}" if gpu is not None else (bus or "the node")
        text = str(getattr(f, "message", "") or "")
        # kernel text is data from anyone who can write to the log: printable only, as the
        # stored events are (no terminal escapes into an on-call's terminal)
        fields = {"pending": True, "pci_bus_id": printable(bus) or None,
                  "raw": printable(str(getattr(f, "raw", "") or "")[:2000])}
        pending.append({"id": None, "time": getattr(f, "time", None),
                        "subject": f"gpu:{gpu}" if gpu is not None else "node",
                        "code": "xid" if xid is not None else "kernel_fault",
                        "severity": Severity.UNKNOWN.name, "action": "none yet",
                        "message": printable(f"{what} on {where}: {text} (read from the kernel "
                                             "log; judged at the next cycle)"[:300]),
                        "gpu": gpu, "uuid": None, "xid": xid, "fields": fields})
    return dict(doc, events=pending + list(doc.get("events") or ()))


def _recovery_name(value: Any) -> Any:
    from gpucostd.health.recovery import recovery_action
    ra = recovery_action(value)
    return ra.name if ra is not None else None


def _gpu_json(g: GpuReading, health: Severity, findings: List[Finding]) -> Dict[str, Any]:
    reasons = list(g.clock_event_reasons or ())
    return {
        "index": g.index, "uuid": g.uuid, "pci_bus_id": g.pci_bus_id, "name": g.name,
        "model": g.model_short, "state": g.state.value, "error": g.error,
        "health": health.name,
        "temperature_celsius": g.temperature_celsius,
        "power_draw_watts": g.power_draw_watts, "power_limit_watts": g.power_limit_watts,
        "sm_clock_mhz": g.sm_clock_mhz, "sm_clock_max_mhz": g.sm_clock_max_mhz,
        "utilization_percent": g.utilization_percent,
        # GPU Performance Monitoring: ratios 0..1 of the last cycle, null where not supported
        # (gpm_supported false) or not yet read (the first cycle)
        "gpm_supported": g.gpm_supported,
        "activity": (None if g.activity is None else
                     {k: getattr(g.activity, k) for k in ACTIVITY_FIELDS + ("seconds",)}),
        "persistence_mode": g.persistence_mode,
        # MIG: mode now and after the next reset (null: no MIG), one entry per instance
        "mig_mode": g.mig_mode, "mig_mode_pending": g.mig_mode_pending,
        "mig_instances": [mig_json(m) for m in g.mig],
        "recovery_action": _recovery_name(g.gpu_recovery_action),
        "recovery_action_value": g.gpu_recovery_action,
        "clock_event_reasons": reasons,
        "throttle_reasons": [r for r in reasons if r in THROTTLE_REASONS],
        "findings": [_finding_json(f) for f in findings],
    }


def mig_json(m: MigInstance) -> Dict[str, Any]:
    """One MIG instance in status JSON: identity, memory, GPM activity (ratios 0..1, null where
    not read). Power, clocks and temperatures are its GPU's, shared."""
    return {"key": m.key, "gpu_instance": m.gi_id, "compute_instance": m.ci_id,
            "profile": m.profile, "slices": m.slices, "gpu_slices": m.gpu_slices,
            "share": m.share, "uuid": m.uuid, "memory_used_bytes": m.memory_used_bytes,
            "memory_total_bytes": m.memory_total_bytes,
            "activity": (None if m.activity is None else
                         {k: getattr(m.activity, k) for k in ACTIVITY_FIELDS + ("seconds",)})}


def _node_extra(snap: NodeSnapshot) -> Dict[str, Any]:
    """persistenced (running: true/false, null unknown), expected_gpu_count, missing_gpus[]
    (uuid, pci_bus_id, index, name) and nvswitch_sxids[] (switch, sxid, count)."""
    inv = snap.gpu_inventory or {}
    sxids = (snap.counters or {}).get("sxid_totals") or {}
    return {"persistenced": snap.persistenced,
            "expected_gpu_count": inv.get("expected") or None,
            "missing_gpus": list(inv.get("missing") or ()),
            "nvswitch_sxids": [{"switch": sw, "sxid": code, "count": n}
                               for (sw, code), n in sorted(sxids.items())]}


def snapshot_json(snap: NodeSnapshot) -> Dict[str, Any]:
    by_gpu: Dict[int, List[Finding]] = {}
    node_findings = []
    for f in snap.findings:
        if f.gpu is not None:
            by_gpu.setdefault(f.gpu, []).append(f)
        else:
            node_findings.append(f)
    d, kl = snap.daemon, snap.kernel_log
    cost = snap.cost.to_json() if snap.cost is not None and hasattr(snap.cost, "to_json") \
        else None
    cost_text = None
    if cost:
        from gpucostd.cost.report import status_lines_from_json
        cost_text = status_lines_from_json(cost)
    return printable_tree({
        "schema": SCHEMA_VERSION,
        "host": snap.hostname,
        "time": snap.time,
        "daemon": {
            "version": d.version or None, "pid": d.pid or None,
            "started_at": snap.started_at,
            "uptime_seconds": round(snap.monotonic - snap.started_monotonic, 1)
            if snap.started_monotonic is not None else round(snap.time - snap.started_at, 1),
            "cycle": snap.cycle, "config_path": d.config_path,
            "simulated_scenario": d.simulated,
            "kernel_log": kl.source, "kernel_log_error": kl.error,
            "kernel_log_lines_lost": kl.lines_lost,
        },
        "node": {
            "health": snap.node_health.name,
            "gpu_count": len(snap.gpus),
            "driver_version": snap.driver_version, "cuda_version": snap.cuda_version,
            "nvml_available": snap.nvml_available, "nvml_error": snap.nvml_error,
            "findings": [_finding_json(f) for f in node_findings],
            **_node_extra(snap),
        },
        "gpus": [_gpu_json(g, snap.gpu_health.get(g.index, Severity.UNKNOWN),
                           by_gpu.get(g.index, [])) for g in snap.gpus],
        "settings": [{"subject": s.subject, "name": s.name, "desired": s.desired,
                      "actual": s.actual, "source": s.source, "in_sync": s.in_sync,
                      "error": s.error} for s in snap.settings],
        "checks": [{"name": c.name, "status": c.status, "message": c.message, "fix": c.fix}
                   for c in snap.checks],
        "cost": cost,
        "cost_text": cost_text,
        "events": [event_json(e) for e in reversed(snap.recent_events)],
        # a running `gpucostd calibrate` (id, state, step, steps, limits, remaining_seconds)
        "calibration": ((snap.calibration or {}).get("progress")
                        if isinstance(snap.calibration, dict) else None),
        "inference_discovery": discovery_json(snap),
        "drain": drain_json(snap),
    })


def drain_json(snap: NodeSnapshot) -> Optional[Dict[str, Any]]:
    """The drain back end, the node's drain state in the engine and the last action (part
    "drain"); None where the part does not run (one-shot commands)."""
    result = snap.part("drain")
    d = result.data if result is not None and result.ok else None
    if d is None:
        return None
    return {"backend": d.backend, "node": d.node, "dry_run": d.dry_run, "state": d.state,
            "reason": d.reason or None, "wants": d.want, "refused": d.refused or None,
            "refused_message": d.refused_message or None, "failing": d.failing or None,
            "last_action": d.last_action, "last_result": d.last_result,
            "last_time": d.last_time, "last_message": d.last_message or None}


def discovery_json(snap: NodeSnapshot) -> Optional[Dict[str, Any]]:
    """What discovery found and how (part "discovery"); None where it does not run (a
    simulated node, [inference] discover = "off")."""
    status = next((r.data for r in snap.parts if r.name == "discovery" and r.ok), None)
    if status is None:
        return None
    return {"enabled": status.enabled, "interval_seconds": status.interval_seconds,
            "last_scan": status.last_scan, "error": status.error, "reason": status.reason or None,
            "endpoints": [{"url": e.url, "server": e.server, "how": e.how, "pid": e.pid,
                           "process": e.process, "address": e.address, "port": e.port,
                           "since": e.since} for e in status.endpoints],
            "skipped": [{"url": u, "how": how, "why": why} for u, how, why in status.skipped],
            "notes": list(status.notes)}


