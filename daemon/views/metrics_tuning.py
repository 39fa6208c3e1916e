"""Prometheus families of the tuned settings: desired and actual values, drift, NIC rings,
IOMMU and the host checks (from snapshot.settings, counters, extra and checks)."""
from __future__ import annotations

from typing import Any, Optional


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def metric_families(snapshot) -> list:
    """Setting, drift, NIC ring, IOMMU and check metrics from one snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    desired = GaugeMetricFamily("gpucostd_setting_desired",
                                "Desired value of a tuned setting (booleans as 0/1).",
                                labels=["setting", "subject"])
    actual = GaugeMetricFamily("gpucostd_setting_actual",
                               "Value of a tuned setting as last read (booleans as 0/1).",
                               labels=["setting", "subject"])
    in_sync = GaugeMetricFamily("gpucostd_setting_in_sync",
                                "1 when the setting has its desired value, else 0.",
                                labels=["setting", "subject"])
    for s in snapshot.settings or ():
        labels = [s.name, s.subject]
        d, a = _num(s.desired), _num(s.actual)
        if d is not None:
            desired.add_metric(labels, d)
        if a is not None:
            actual.add_metric(labels, a)
        in_sync.add_metric(labels, 1.0 if s.in_sync else 0.0)
    drift = CounterMetricFamily("gpucostd_setting_drift",
                                "Times a setting was found changed behind gpucostd's back.",
                                labels=["setting", "subject"])
    for key, n in sorted(((snapshot.counters or {}).get("drift") or {}).items()):
        setting, subject = key
        drift.add_metric([str(setting), str(subject)], float(n))
    rings = GaugeMetricFamily("gpucostd_nic_ring_entries",
                              "NIC ring buffer size in descriptors (current and maximum).",
                              labels=["interface", "queue", "kind"])
    for ifname, info in sorted((snapshot.nic_rings or {}).items()):
        for kind in ("current", "max"):
            for queue, n in sorted((info.get(kind) or {}).items()):
                if n is not None:
                    rings.add_metric([ifname, queue, kind], float(n))
    fams = [desired, actual, in_sync, drift, rings]
    host = snapshot.host
    enabled = host.get("iommu_enabled") if isinstance(host, dict) else \
        getattr(host, "iommu_enabled", None)
    if enabled is not None:
        fams.append(GaugeMetricFamily("gpucostd_iommu_enabled",
                                      "1 when the kernel has the IOMMU enabled (including "
                                      "passthrough), else 0.", value=1.0 if enabled else 0.0))
    checks = GaugeMetricFamily("gpucostd_check_passed",
                               "1 when the host check passed, 0 on warn or fail.",
                               labels=["check"])
    for c in snapshot.checks or ():
        checks.add_metric([c.name], 1.0 if c.status == "pass" else 0.0)
    fams.append(checks)
    return fams
