"""Prometheus families of the MIG instances' cost (snapshot.cost.mig, gpucostd.cost.mig): each
instance's price per hour, its idle and underused capacity, and the tokens per dollar of the
endpoint that serves on it; each instance-endpoint's tokens per dollar at its instances' price.

Labels as the MIG families of gpucostd.views.metrics_mig: the parent GPU's `gpu` and `uuid`,
`gpu_instance`, `compute_instance`, `profile` (join on them for the `MIG-...` UUID on
gpucostd_mig_instance_info). The energy an instance drew is an estimate (NVML measures energy
per GPU only): it is in `status --json` (cost.mig[].energy_joules), not a counter here, so no
dashboard adds it up as a measurement.

Series budget: at most SERIES_PER_INSTANCE per instance (cost per hour; idle and underused
seconds; their money; tokens/s and tokens per dollar where an endpoint serves on it), 392 on a
fully sliced 8-GPU node (8 x 7 instances), plus one per instance-endpoint.
"""
from __future__ import annotations

from typing import Any, Iterable, List

LABELS = ["gpu", "uuid", "gpu_instance", "compute_instance", "profile"]
SERIES_PER_INSTANCE = 7


def mig_cost_families(report: Any) -> List[Any]:
    """The families of report.mig (a CostReport's MIG instances) and of its instance-endpoints.
    Money only where priced; none at all on a node without MIG instances."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    instances = getattr(report, "mig", None) or []
    out: List[Any] = []
    if instances:
        cost = GaugeMetricFamily("gpucostd_gpu_instance_cost_dollars_per_hour",
                                 "Price of the MIG instance per hour: its share of its GPU's "
                                 "hour (or its profile's price) plus its estimated energy now",
                                 labels=LABELS)
        idle = CounterMetricFamily("gpucostd_gpu_instance_idle_seconds",
                                   "Paid instance-seconds unused: kind=idle while the instance "
                                   "did no work, kind=underused the unused share while it "
                                   "worked below the target", labels=LABELS + ["kind"])
        idle_usd = CounterMetricFamily("gpucostd_gpu_instance_idle_cost_dollars",
                                       "Money paid for the instance's unused capacity, at its "
                                       "price (an idle 1g slice of 7: 1/7 of its GPU's idle "
                                       "cost), by kind", labels=LABELS + ["kind"])
        rate = GaugeMetricFamily("gpucostd_gpu_instance_tokens_per_second",
                                 "Tokens per second of the endpoint serving on the instance "
                                 "(split over its instances by share)", labels=LABELS)
        tpd = GaugeMetricFamily("gpucostd_gpu_instance_tokens_per_dollar",
                                "Tokens per unit of money of the instance at its own price "
                                "(not the whole GPU's)", labels=LABELS)
        priced = False
        for d in instances:
            lab = [str(d.get("gpu")), str(d.get("gpu_uuid") or ""), str(d.get("gpu_instance")),
                   str(d.get("compute_instance")), str(d.get("profile") or "")]
            for kind in ("idle", "underused"):
                idle.add_metric(lab + [kind], float(d.get(f"{kind}_seconds") or 0.0))
            if (d.get("price_per_hour") or 0) > 0 or d.get("idle_dollars") or \
                    d.get("underused_dollars"):
                priced = True
            for kind in ("idle", "underused"):
                idle_usd.add_metric(lab + [kind], float(d.get(f"{kind}_dollars") or 0.0))
            if d.get("cost_dollars_per_hour"):
                cost.add_metric(lab, float(d["cost_dollars_per_hour"]))
            if d.get("tokens_per_second") is not None:
                rate.add_metric(lab, float(d["tokens_per_second"]))
            if d.get("tokens_per_dollar") is not None:
                tpd.add_metric(lab, float(d["tokens_per_dollar"]))
        out.append(idle)
        if priced:
            out += [idle_usd, cost]
        out += [f for f in (rate, tpd) if f.samples]
    tokens = getattr(report, "tokens", None)
    ep_tpd = GaugeMetricFamily("gpucostd_inference_endpoint_tokens_per_dollar",
                               "Tokens per unit of money of an endpoint on MIG instances, priced "
                               "at its instances' shares of their GPUs' hours (plus their "
                               "estimated energy)", labels=["endpoint"])
    for i, ep in enumerate(getattr(tokens, "endpoints", None) or ()):
        if ep.get("instances") and ep.get("tokens_per_dollar") is not None:
            ep_tpd.add_metric([str(i)], float(ep["tokens_per_dollar"]))
    if ep_tpd.samples:
        out.append(ep_tpd)
    return out


__all__ = ["mig_cost_families", "SERIES_PER_INSTANCE", "LABELS"]
