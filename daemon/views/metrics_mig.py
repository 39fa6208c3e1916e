"""Prometheus families of MIG (Multi-Instance GPU): each GPU's MIG mode, and per instance its
identity, memory and GPU Performance Monitoring activity.

Labels as dcgm-exporter's GPU_I_ID / GPU_I_PROFILE, in our style: `gpu` and `uuid` of the parent
GPU, `gpu_instance`, `compute_instance` and `profile`; the instance's own "MIG-..." UUID only on
`gpucostd_mig_instance_info` (join on the other labels). Power, clocks and temperatures stay per
GPU: the instances of a GPU share them (docs/metric-reference.md, "MIG").

Series budget (docs/metric-reference.md): 2 per GPU and at most 7 per instance, so a fully
sliced 8-GPU node (8 x 7 instances) adds at most 8 x 2 + 56 x 7 = 408 series here.
"""
from __future__ import annotations

from typing import Iterable, List

from prometheus_client.core import GaugeMetricFamily

from gpucostd.snapshot import NodeSnapshot

_INSTANCE_LABELS = ["gpu", "uuid", "gpu_instance", "compute_instance", "profile"]
# (metric name, help, MigInstance attribute or activity.<field>)
_INSTANCE_GAUGES = (
    ("gpucostd_mig_memory_used_bytes", "Memory used in the MIG instance.", "memory_used_bytes"),
    ("gpucostd_mig_memory_total_bytes", "Memory of the MIG instance.", "memory_total_bytes"),
    ("gpucostd_mig_sm_active_ratio", "Share of the instance's SMs busy between two GPM samples "
     "(0..1, nvmlGpmMigSampleGet).", "activity.sm"),
    ("gpucostd_mig_tensor_active_ratio", "Share of time the instance's tensor pipes were busy "
     "(0..1, GPM).", "activity.tensor"),
    ("gpucostd_mig_dram_active_ratio", "The instance's DRAM bandwidth used over its maximum "
     "(0..1, GPM).", "activity.dram"),
    ("gpucostd_mig_share_ratio", "The instance's compute slices over its GPU's (1g of 7 = "
     "1/7): its share of the GPU-hour.", "share"),
)
SERIES_PER_GPU = 2
SERIES_PER_INSTANCE = 1 + len(_INSTANCE_GAUGES)


def _value(m, attr):
    if attr.startswith("activity."):
        return None if m.activity is None else getattr(m.activity, attr[9:])
    return getattr(m, attr)


def metric_families(snap: NodeSnapshot) -> Iterable:
    mode = GaugeMetricFamily("gpucostd_gpu_mig_mode", "MIG mode of the GPU now (1 on, 0 off; "
                             "absent: the GPU has no MIG).", labels=["gpu", "uuid"])
    pending = GaugeMetricFamily("gpucostd_gpu_mig_mode_pending", "MIG mode of the GPU after its "
                                "next reset (1 on, 0 off): differs from gpucostd_gpu_mig_mode "
                                "while a change waits for the reset.", labels=["gpu", "uuid"])
    info = GaugeMetricFamily("gpucostd_mig_instance_info", "A MIG instance (value 1) and its "
                             "\"MIG-...\" UUID; power and clocks are its GPU's, shared.",
                             labels=_INSTANCE_LABELS + ["mig_uuid"])
    gauges: List = [(GaugeMetricFamily(n, h, labels=_INSTANCE_LABELS), attr)
                    for n, h, attr in _INSTANCE_GAUGES]
    for g in snap.gpus:
        gl = [str(g.index), g.uuid or ""]
        if g.mig_mode is not None:
            mode.add_metric(gl, 1 if g.mig_mode else 0)
        if g.mig_mode_pending is not None:
            pending.add_metric(gl, 1 if g.mig_mode_pending else 0)
        for m in g.mig:
            lab = gl + [str(m.gi_id), str(m.ci_id), m.profile]
            info.add_metric(lab + [m.uuid or ""], 1)
            for fam, attr in gauges:
                v = _value(m, attr)
                if v is not None:
                    fam.add_metric(lab, float(v))
    yield mode
    yield pending
    yield info
    for fam, _attr in gauges:
        yield fam
