"""Prometheus exposition of a snapshot, rendered once per snapshot.

The families of each part come from its own module's `metric_families(snapshot)`
(metrics_health, metrics_cost, metrics_tuning, calibration.metrics); this module adds the
core per-GPU gauges and the info metrics, then renders the whole exposition to bytes that the
HTTP server hands out until the next snapshot. A scrape never touches NVML and never waits for the loop.
"""
from __future__ import annotations

import logging
import math
import platform
import re
from typing import Dict, Iterable, List, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from gpucostd import __version__
from gpucostd.snapshot import CLOCK_EVENT_REASONS, NodeSnapshot, GpuState

LOG = logging.getLogger("gpucostd")

# (metric name, help, GpuReading attribute, scale)
_GPU_GAUGES = (
    ("gpucostd_gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius", 1),
    ("gpucostd_gpu_power_draw_watts", "Power draw.", "power_draw_watts", 1),
    ("gpucostd_gpu_power_limit_watts", "Enforced power limit.", "power_limit_watts", 1),
    ("gpucostd_gpu_power_limit_min_watts", "Minimum settable power limit.",
     "power_limit_min_watts", 1),
    ("gpucostd_gpu_power_limit_max_watts", "Maximum settable power limit.",
     "power_limit_max_watts", 1),
    ("gpucostd_gpu_power_limit_default_watts", "Default power limit.",
     "power_limit_default_watts", 1),
    ("gpucostd_gpu_sm_clock_hertz", "Current SM clock.", "sm_clock_mhz", 1e6),
    ("gpucostd_gpu_sm_clock_max_hertz", "Maximum SM clock.", "sm_clock_max_mhz", 1e6),
    ("gpucostd_gpu_utilization_ratio", "GPU utilization (0..1).", "utilization_percent", 0.01),
    ("gpucostd_gpu_persistence_mode", "Persistence mode (1 on, 0 off).", "persistence_mode", 1),
    ("gpucostd_gpu_ecc_mode", "ECC mode (1 enabled, 0 disabled).", "ecc_mode", 1),
    # GPU Performance Monitoring (Hopper and later): work done, not GPU-Util
    ("gpucostd_gpu_gpm_supported", "1 if the GPU has GPU Performance Monitoring (activity "
     "readings), 0 if not.", "gpm_supported", 1),
    ("gpucostd_gpu_sm_active_ratio", "Share of SMs busy between two GPM samples (0..1; "
     "GPU-Util only says a kernel ran).", "activity.sm", 1),
    ("gpucostd_gpu_sm_occupancy_ratio", "Warps resident over the maximum (0..1, GPM).",
     "activity.sm_occupancy", 1),
    ("gpucostd_gpu_tensor_active_ratio", "Share of time any tensor pipe was busy (0..1, GPM; "
     "FP8 included).", "activity.tensor", 1),
    ("gpucostd_gpu_tensor_hmma_active_ratio", "Share of time the HMMA (FP16/BF16) tensor pipe "
     "was busy (0..1, GPM).", "activity.tensor_hmma", 1),
    ("gpucostd_gpu_tensor_imma_active_ratio", "Share of time the IMMA (integer) tensor pipe was "
     "busy (0..1, GPM).", "activity.tensor_imma", 1),
    ("gpucostd_gpu_dram_active_ratio", "DRAM bandwidth used over the maximum (0..1, GPM).",
     "activity.dram", 1),
    ("gpucostd_gpu_fp16_active_ratio", "Share of time the non-tensor FP16 pipe was busy (0..1, "
     "GPM).", "activity.fp16", 1),
    ("gpucostd_gpu_fp32_active_ratio", "Share of time the non-tensor FP32 pipe was busy (0..1, "
     "GPM).", "activity.fp32", 1),
)


def _value(g, attr):
    """A GpuReading attribute, or one of its activity's ("activity.sm"); None when absent."""
    if attr.startswith("activity."):
        act = g.activity
        return None if act is None else getattr(act, attr[9:])
    return getattr(g, attr)


def _labels(g):
    return [str(g.index), g.uuid or ""]


def part_families(snap: NodeSnapshot) -> Iterable:
    """Each part of the cycle (gpucostd.part): did its last run succeed, how long it took."""
    ok = GaugeMetricFamily("gpucostd_part_last_success",
                           "1 if the part's last run in the cycle succeeded, 0 if it raised "
                           "(see the part_failed finding).", labels=["part"])
    took = GaugeMetricFamily("gpucostd_part_duration_seconds",
                             "How long the part's last run in the cycle took.",
                             labels=["part"])
    for r in snap.parts:
        ok.add_metric([r.name], 1 if r.ok else 0)
        took.add_metric([r.name], float(r.seconds))
    yield ok
    yield took
    yield from discovery_families(snap)


def discovery_families(snap: NodeSnapshot) -> Iterable:
    """The inference endpoints discovery found (part "discovery"; absent when it does not run)."""
    status = next((r.data for r in snap.parts if r.name == "discovery" and r.ok), None)
    if status is None:
        return
    found = GaugeMetricFamily(
        "gpucostd_inference_discovered",
        "Inference endpoints found by discovery (value 1): url, the server its exposition "
        "names, the process and port it was found by.",
        labels=["url", "server", "process", "pid", "address", "port"])
    for ep in status.endpoints:
        found.add_metric([ep.url, ep.server, ep.process, str(ep.pid), ep.address,
                          str(ep.port)], 1)
    yield found
    skipped = GaugeMetricFamily(
        "gpucostd_inference_discovery_skipped",
        "Ports of known inference server processes that were asked once and not read (no "
        "token counter; see status).", labels=["url"])
    for url, _how, _why in status.skipped:
        skipped.add_metric([url], 1)
    yield skipped


def core_families(snap: NodeSnapshot) -> Iterable:
    build = GaugeMetricFamily("gpucostd_build_info", "gpucostd build information.",
                              labels=["version", "python"])
    build.add_metric([__version__, platform.python_version()], 1)
    yield build
    up = GaugeMetricFamily("gpucostd_nvml_up", "1 if NVML answers, 0 if not (see status).")
    up.add_metric([], 1 if snap.nvml_available else 0)
    yield up
    yield CounterMetricFamily("gpucostd_cycles", "Poll cycles completed.", value=snap.cycle)
    yield CounterMetricFamily("gpucostd_kernel_log_lines_lost",
                              "Kernel log records overwritten before they were read (a flood).",
                              value=int(snap.kernel_log.lines_lost or 0))
    usable = GaugeMetricFamily("gpucostd_state_dir_usable",
                               "1 if the state directory takes writes (there, writable, not "
                               "full), 0 if not.")
    usable.add_metric([], 1 if snap.state_dir.usable else 0)
    yield usable
    pending = GaugeMetricFamily("gpucostd_events_pending",
                                "Events held in memory because the event database cannot be "
                                "written.")
    pending.add_metric([], int(snap.state_dir.events_pending or 0))
    yield pending
    yield from part_families(snap)
    age = GaugeMetricFamily("gpucostd_snapshot_timestamp_seconds",
                            "Wall time of the snapshot these metrics come from.")
    age.add_metric([], snap.time)
    yield age
    info = GaugeMetricFamily("gpucostd_gpu_info", "GPU identity (value 1).",
                             labels=["gpu", "uuid", "model", "pci_bus_id", "driver"])
    state = GaugeMetricFamily("gpucostd_gpu_state", "1 for the GPU's current state.",
                              labels=["gpu", "uuid", "state"])
    reasons = GaugeMetricFamily("gpucostd_gpu_clock_event_reason_active",
                                "1 while the clock-event (throttle) reason is active.",
                                labels=["gpu", "uuid", "reason"])
    gauges = [(GaugeMetricFamily(n, h, labels=["gpu", "uuid"]), attr, scale)
              for n, h, attr, scale in _GPU_GAUGES]
    for g in snap.gpus:
        lab = _labels(g)
        info.add_metric(lab + [g.name or "", g.pci_bus_id or "", snap.driver_version or ""], 1)
        for s in GpuState:
            state.add_metric(lab + [s.value], 1 if g.state == s else 0)
        if g.clock_event_reasons is not None:
            active = set(g.clock_event_reasons)
            supported = set(g.supported_reasons) if g.supported_reasons is not None else None
            for _, name in CLOCK_EVENT_REASONS:
                if supported is None or name in supported or name in active:
                    reasons.add_metric(lab + [name], 1 if name in active else 0)
        for fam, attr, scale in gauges:
            v = _value(g, attr)
            if v is not None:
                fam.add_metric(lab, float(v) * scale)
    yield info
    yield state
    yield reasons
    for fam, _, _ in gauges:
        yield fam
    margin = GaugeMetricFamily("gpucostd_gpu_temperature_margin_celsius",
                               "Degrees below the GPU's slowdown threshold (negative: above).",
                               labels=["gpu", "uuid"])
    for g in snap.gpus:
        if g.temperature_celsius is not None and g.temp_slowdown_celsius is not None:
            margin.add_metric(_labels(g), g.temp_slowdown_celsius - g.temperature_celsius)
    yield margin


def _part_families(snap: NodeSnapshot) -> List:
    import gpucostd.calibration.metrics as metrics_calibration
    from gpucostd.views import (metrics_cost, metrics_drain, metrics_health, metrics_mig,
                                metrics_tuning)
    out = []
    for module in (metrics_health, metrics_cost, metrics_tuning, metrics_calibration,
                   metrics_drain, metrics_mig):
        try:
            out.extend(module.metric_families(snap))
        except Exception:  # noqa: BLE001 - one part's bug must not blank the whole scrape
            LOG.exception("metric families of %s failed", module.__name__)
    return out


def render(snap: NodeSnapshot) -> bytes:
    """The full exposition text for one snapshot (Prometheus text format 0.0.4)."""
    families = list(core_families(snap))
    families.extend(_part_families(snap))
    return exposition(families)


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_SUFFIX = {"counter": "_total", "gauge": ""}
_NEEDS_ESCAPE = re.compile(r'[\\\n"]')


def exposition(families: List) -> bytes:
    """The text format of prometheus_client's generate_latest, byte for byte, written directly:
    generate_latest re-validates and re-escapes every metric and label name of every sample
    (most of a render's CPU). Families outside the plain case (other types, timestamps,
    _created samples, names that need escaping) go to generate_latest unchanged."""
    out: List[str] = []
    append = out.append
    orders: Dict[tuple, Optional[List[str]]] = {}   # label names as given -> sorted, or None
    numbers: Dict[float, str] = {}
    needs_escape = _NEEDS_ESCAPE.search
    for fam in families:
        mtype = fam.type
        suffix = _SUFFIX.get(mtype)
        name = fam.name
        if suffix is None or not _METRIC_NAME.match(name):
            return _slow(families)
        hname = name + suffix
        doc = fam.documentation.replace("\\", r"\\").replace("\n", r"\n")
        append(f"# HELP {hname} {doc}\n# TYPE {hname} {mtype}\n")
        for s in fam.samples:
            sname = s.name
            if s.timestamp is not None or (sname != hname and sname != name) or \
                    not _METRIC_NAME.match(sname):
                return _slow(families)
            value = s.value
            if value == 0:          # 0.0 and -0.0 are one dict key but two texts
                text = "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
            else:
                text = numbers.get(value)
                if text is None:
                    text = numbers[value] = floatToGoString(value)
            labels = s.labels
            if labels:
                given = tuple(labels)
                keys = orders.get(given, 0)
                if keys == 0:
                    keys = orders[given] = (sorted(given) if all(_LABEL_NAME.match(k)
                                                                for k in given) else None)
                if keys is None:
                    return _slow(families)
                parts = []
                for k in keys:
                    v = labels[k]
                    if needs_escape(v):
                        v = v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
                    parts.append(f'{k}="{v}"')
                append(f"{sname}{{{','.join(parts)}}} {text}\n")
            else:
                append(f"{sname} {text}\n")
    return "".join(out).encode("utf-8")


def _slow(families: List) -> bytes:
    class _Families:
        def collect(self):
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)
