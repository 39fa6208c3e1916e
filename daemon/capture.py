"""`gpucostd capture`: write the node as it is now as a scenario file for the simulator.

Run on a real GPU host, it turns one set of readings into a scenario (initial state only, no
timeline) so the simulator's fixtures come from real hardware: readings NVML does not support
become `unsupported`, a GPU without violation counters gets `violation_counters = false`.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from gpucostd.config import dump_toml
from gpucostd.snapshot import GpuReading, GpuState

# GpuReading attribute -> scenario field (docs/scenarios.md)
FIELD_MAP = (
    ("temperature_celsius", "temperature"),
    ("memory_temperature_celsius", "memory_temperature"),
    ("temp_slowdown_celsius", "slowdown_temperature"),
    ("temp_shutdown_celsius", "shutdown_temperature"),
    ("power_draw_watts", "power_draw"),
    ("power_limit_watts", "power_limit"),
    ("power_limit_min_watts", "power_limit_min"),
    ("power_limit_max_watts", "power_limit_max"),
    ("power_limit_default_watts", "power_limit_default"),
    ("persistence_mode", "persistence_mode"),
    ("sm_clock_mhz", "sm_clock"),
    ("sm_clock_max_mhz", "max_sm_clock"),
    ("app_sm_clock_mhz", "app_sm_clock"),
    ("utilization_percent", "utilization"),
    ("clock_event_reasons", "clock_event_reasons"),
    ("supported_reasons", "supported_clock_event_reasons"),
    ("ecc_mode", "ecc_mode"),
    ("ecc_volatile_corrected", "ecc_volatile_corrected"),
    ("ecc_volatile_uncorrected", "ecc_volatile_uncorrected"),
    ("ecc_aggregate_corrected", "ecc_aggregate_corrected"),
    ("ecc_aggregate_uncorrected", "ecc_aggregate_uncorrected"),
    ("retired_pages_sbe", "retired_pages_sbe"),
    ("retired_pages_dbe", "retired_pages_dbe"),
    ("retired_pages_pending", "retired_pages_pending"),
    ("remapped_rows_correctable", "remapped_rows_correctable"),
    ("remapped_rows_uncorrectable", "remapped_rows_uncorrectable"),
    ("remapped_rows_pending", "remapped_rows_pending"),
    ("remapped_rows_failure", "remapped_rows_failure"),
    ("pcie_link_gen", "pcie_link_gen"),
    ("pcie_link_gen_max", "pcie_link_gen_max"),
    ("pcie_link_width", "pcie_link_width"),
    ("pcie_link_width_max", "pcie_link_width_max"),
    ("pcie_replay_count", "pcie_replay_count"),
    ("gpu_recovery_action", "recovery_action"),
)
_INTS = {"sm_clock", "max_sm_clock", "app_sm_clock", "pcie_link_gen", "pcie_link_gen_max",
         "pcie_link_width", "pcie_link_width_max", "pcie_replay_count", "ecc_volatile_corrected",
         "ecc_volatile_uncorrected", "ecc_aggregate_corrected", "ecc_aggregate_uncorrected",
         "retired_pages_sbe", "retired_pages_dbe", "remapped_rows_correctable",
         "remapped_rows_uncorrectable", "recovery_action"}


def gpu_table(g: GpuReading) -> Dict[str, Any]:
    out: Dict[str, Any] = {"index": g.index}
    for attr, key in (("pci_bus_id", "pci_bus_id"), ("uuid", "uuid"), ("name", "name")):
        if getattr(g, attr):
            out[key] = getattr(g, attr)
    unsupported: List[str] = []
    for attr, key in FIELD_MAP:
        value = getattr(g, attr)
        if value is None:
            unsupported.append(key)
        elif isinstance(value, tuple):
            out[key] = list(value)
        elif key in _INTS:
            out[key] = int(value)
        else:
            out[key] = value
    if g.violation_seconds is None:
        out["violation_counters"] = False
    if g.gpm_supported is False:          # no GPU Performance Monitoring (docs/scenarios.md)
        unsupported.append("gpm")
    if g.mig_mode is None:                # no MIG (or not read)
        unsupported.append("mig")
    else:
        out["mig_mode"] = g.mig_mode
        if g.mig_mode_pending is not None and g.mig_mode_pending != g.mig_mode:
            out["mig_mode_pending"] = g.mig_mode_pending
    if unsupported:
        out["unsupported"] = unsupported
    return out


def mig_tables(g: GpuReading) -> List[Dict[str, Any]]:
    """The GPU's MIG instances as [[mig]] tables (docs/scenarios.md): profile, GPU instance id,
    UUID and memory used, so the node's slicing replays in the simulator."""
    out: List[Dict[str, Any]] = []
    for m in g.mig:
        if not m.profile or m.profile == "?":
            continue                      # its attributes did not answer: no profile to replay
        t: Dict[str, Any] = {"gpu": g.index, "profile": m.profile, "gi_id": m.gi_id}
        if m.uuid:
            t["uuid"] = m.uuid
        if m.memory_used_bytes is not None:
            t["memory_used_mib"] = round(m.memory_used_bytes / (1 << 20), 1)
        busy = _busy_percent(m.activity, g)
        if busy is not None:
            t["utilization"] = busy
        out.append(t)
    return out


def _busy_percent(act: Any, g: GpuReading) -> Optional[float]:
    """The `utilization` that makes the simulator's instance read the SM activity it read here
    (GPM; NVML has no GPU-Util on a MIG GPU): the default physics at the GPU's clock, where SM
    activity grows in proportion to the time busy. None without a reading."""
    if act is None or act.sm is None or not g.sm_clock_mhz:
        return None
    from gpucostd.sim.physics import DEFAULT_MODEL
    full = DEFAULT_MODEL.activity(g.sm_clock_mhz, g.sm_clock_max_mhz or g.sm_clock_mhz,
                                  100.0)["sm"]
    return round(min(100.0, 100.0 * act.sm / full), 2) if full > 0 else None


def _mig_parent_busy(g: GpuReading, tables: List[Dict[str, Any]]) -> Optional[float]:
    """A MIG GPU's own `utilization` for the simulator's physics (its power, its GPM): what its
    instances add up to, slice by slice."""
    shares = {m.gi_id: m.share for m in g.mig}
    if not tables or any("utilization" not in t for t in tables):
        return None
    return round(min(100.0, sum(shares.get(t["gi_id"], 0.0) * t["utilization"]
                                for t in tables)), 2)


def scenario_text(gpus: Sequence[GpuReading], driver: Optional[str], cuda: Optional[str],
                  hostname: str = "") -> str:
    ok = [g for g in gpus if g.state == GpuState.OK]
    node: Dict[str, Any] = {"gpu_count": len(gpus)}
    if ok and ok[0].name:
        node["model"] = ok[0].name
    if driver:
        node["driver_version"] = driver
    if cuda:
        node["cuda_version"] = cuda
    skipped = [g.index for g in gpus if g.state != GpuState.OK]
    head = (f"# Captured by `gpucostd capture` on {hostname or 'a GPU host'} at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}.\n"
            "# Initial state only; add [[at]] entries for a timeline (docs/scenarios.md).\n")
    if skipped:
        head += (f"# GPUs {', '.join(map(str, skipped))} did not answer; their entries carry "
                 "only identity and are marked lost.\n")
    tables = []
    for g in gpus:
        t = gpu_table(g) if g.state == GpuState.OK else {
            k: v for k, v in (("index", g.index), ("pci_bus_id", g.pci_bus_id),
                              ("uuid", g.uuid), ("name", g.name), ("lost", True)) if v}
        if g.state == GpuState.OK and g.mig and g.utilization_percent is None:
            busy = _mig_parent_busy(g, mig_tables(g))
            if busy is not None:      # NVML answers NOT_SUPPORTED; the physics needs it
                t["utilization"] = busy
        tables.append(t)
    data: Dict[str, Any] = {"node": node, "gpu": tables}
    mig = [t for g in gpus if g.state == GpuState.OK for t in mig_tables(g)]
    if mig:
        data["mig"] = mig
    return head + "\n" + dump_toml(data)
