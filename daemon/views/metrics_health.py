"""Prometheus families of health and hardware faults: health levels, Xid counts, ECC, row
remapping, retired pages, PCIe, thresholds and violation counters (from one snapshot)."""
from __future__ import annotations

from typing import Dict

from gpucostd.snapshot import GpuState, NodeSnapshot, VIOLATION_POLICIES


def metric_families(snapshot: NodeSnapshot):
    """Health and hardware-fault metrics of one snapshot; readings that are None are left out."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    L = ["gpu", "uuid"]
    health = GaugeMetricFamily("gpucostd_gpu_health",
                               "GPU health: 0 OK, 1 WARN, 2 CRIT, 3 UNKNOWN", labels=L)
    node = GaugeMetricFamily("gpucostd_node_health",
                             "Node health: 0 OK, 1 WARN, 2 CRIT, 3 UNKNOWN")
    xids = CounterMetricFamily("gpucostd_gpu_xid_errors",
                               "NVRM Xid errors recorded (gpu empty: not mapped to a GPU)",
                               labels=L + ["xid"])
    ecc = CounterMetricFamily("gpucostd_gpu_ecc_errors", "ECC errors reported by NVML",
                              labels=L + ["type", "counter"])
    remapped = GaugeMetricFamily("gpucostd_gpu_remapped_rows", "Remapped memory rows",
                                 labels=L + ["kind"])
    pending = GaugeMetricFamily("gpucostd_gpu_remapped_rows_pending",
                                "1 while a row remapping waits for a GPU reset", labels=L)
    failure = GaugeMetricFamily("gpucostd_gpu_remapped_rows_failure",
                                "1 when a row remapping failed", labels=L)
    retired = GaugeMetricFamily("gpucostd_gpu_retired_pages", "Retired memory pages",
                                labels=L + ["cause"])
    retired_pending = GaugeMetricFamily("gpucostd_gpu_retired_pages_pending",
                                        "1 while page retirement waits for a GPU reset",
                                        labels=L)
    lost = GaugeMetricFamily("gpucostd_gpu_lost", "1 when the GPU is lost (fell off the bus)",
                             labels=L)
    gen = GaugeMetricFamily("gpucostd_gpu_pcie_link_generation", "PCIe link generation",
                            labels=L + ["kind"])
    width = GaugeMetricFamily("gpucostd_gpu_pcie_link_width", "PCIe link width (lanes)",
                              labels=L + ["kind"])
    replay = CounterMetricFamily("gpucostd_gpu_pcie_replay_errors", "PCIe replay counter",
                                 labels=L)
    thresholds = GaugeMetricFamily("gpucostd_gpu_temperature_threshold_celsius",
                                   "GPU temperature thresholds", labels=L + ["threshold"])
    memtemp = GaugeMetricFamily("gpucostd_gpu_memory_temperature_celsius",
                                "GPU memory (HBM) temperature", labels=L)
    sxids = CounterMetricFamily("gpucostd_node_sxid_errors",
                                "NVSwitch SXid errors recorded, by switch (PCI bus id) and SXid",
                                labels=["switch", "sxid"])
    recovery = GaugeMetricFamily("gpucostd_gpu_recovery_action",
                                 "NVML's GPU recovery action: 0 none, 1 GPU reset, 2 node reboot, "
                                 "3 drain P2P, 4 drain and reset (nvmlDeviceGpuRecoveryAction_t)",
                                 labels=L)
    expected = GaugeMetricFamily("gpucostd_node_gpus_expected",
                                 "GPUs the node should show (learned at first start or "
                                 "[health] expected_gpu_count)")
    missing = GaugeMetricFamily("gpucostd_gpu_missing",
                                "1 for a known GPU that NVML no longer lists (gpu: its last "
                                "index; its last bus id is in status)", labels=L)
    violation = CounterMetricFamily("gpucostd_gpu_violation_seconds",
                                    "Time clocks were held below target, per perf policy",
                                    labels=L + ["policy"])

    uuids: Dict[int, str] = {}
    for g in snapshot.gpus:
        gl = [str(g.index), g.uuid or ""]
        uuids[g.index] = g.uuid or ""
        if g.state != GpuState.UNKNOWN:          # NVML unavailable: we cannot tell
            lost.add_metric(gl, 1.0 if g.state == GpuState.LOST else 0.0)
        for typ, counter, v in (("corrected", "volatile", g.ecc_volatile_corrected),
                                ("uncorrected", "volatile", g.ecc_volatile_uncorrected),
                                ("corrected", "aggregate", g.ecc_aggregate_corrected),
                                ("uncorrected", "aggregate", g.ecc_aggregate_uncorrected)):
            if v is not None:
                ecc.add_metric(gl + [typ, counter], float(v))
        if g.remapped_rows_correctable is not None:
            remapped.add_metric(gl + ["correctable"], float(g.remapped_rows_correctable))
        if g.remapped_rows_uncorrectable is not None:
            remapped.add_metric(gl + ["uncorrectable"], float(g.remapped_rows_uncorrectable))
        if g.remapped_rows_pending is not None:
            pending.add_metric(gl, 1.0 if g.remapped_rows_pending else 0.0)
        if g.remapped_rows_failure is not None:
            failure.add_metric(gl, 1.0 if g.remapped_rows_failure else 0.0)
        if g.retired_pages_sbe is not None:
            retired.add_metric(gl + ["sbe"], float(g.retired_pages_sbe))
        if g.retired_pages_dbe is not None:
            retired.add_metric(gl + ["dbe"], float(g.retired_pages_dbe))
        if g.retired_pages_pending is not None:
            retired_pending.add_metric(gl, 1.0 if g.retired_pages_pending else 0.0)
        for fam, cur, mx in ((gen, g.pcie_link_gen, g.pcie_link_gen_max),
                             (width, g.pcie_link_width, g.pcie_link_width_max)):
            if cur is not None:
                fam.add_metric(gl + ["current"], float(cur))
            if mx is not None:
                fam.add_metric(gl + ["max"], float(mx))
        if g.pcie_replay_count is not None:
            replay.add_metric(gl, float(g.pcie_replay_count))
        if g.gpu_recovery_action is not None:
            recovery.add_metric(gl, float(g.gpu_recovery_action))
        if g.temp_slowdown_celsius is not None:
            thresholds.add_metric(gl + ["slowdown"], float(g.temp_slowdown_celsius))
        if g.temp_shutdown_celsius is not None:
            thresholds.add_metric(gl + ["shutdown"], float(g.temp_shutdown_celsius))
        if g.memory_temperature_celsius is not None:
            memtemp.add_metric(gl, float(g.memory_temperature_celsius))
        if g.violation_seconds:
            for policy, _ in VIOLATION_POLICIES:
                v = g.violation_seconds.get(policy)
                if v is not None:
                    violation.add_metric(gl + [policy], float(v))
    for index, sev in sorted((snapshot.gpu_health or {}).items()):
        health.add_metric([str(index), uuids.get(index, "")], float(int(sev)))
    node.add_metric([], float(int(snapshot.node_health)))
    totals = (snapshot.counters or {}).get("xid_totals") or {}
    for (gpu, xid), count in sorted(totals.items(), key=lambda kv: (
            -1 if kv[0][0] is None else kv[0][0], kv[0][1])):
        label_gpu = "" if gpu is None else str(gpu)
        xids.add_metric([label_gpu, uuids.get(gpu, "") if gpu is not None else "", str(xid)],
                        float(count))
    for (switch, sxid), count in sorted(((snapshot.counters or {}).get("sxid_totals")
                                         or {}).items()):
        sxids.add_metric([str(switch), str(sxid)], float(count))
    inv = snapshot.gpu_inventory or {}
    if inv.get("expected"):
        expected.add_metric([], float(inv["expected"]))
    for m in inv.get("missing") or ():
        missing.add_metric(["" if m.get("index") is None else str(m["index"]), m["uuid"]], 1.0)
    return [health, node, xids, sxids, recovery, expected, missing, ecc, remapped, pending, failure, retired, retired_pending, lost,
            gen, width, replay, thresholds, memtemp, violation]
