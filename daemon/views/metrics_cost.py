"""Prometheus families of the cost report (snapshot.cost): throughput loss, capacity and money
lost by reason, the node's price and tokens."""
from __future__ import annotations

from typing import Any, Iterable

from gpucostd.cost.model import sorted_reasons as _sorted_reasons
from gpucostd.cost.report import CostReport
from gpucostd.views.metrics_mig_cost import mig_cost_families


def metric_families(snapshot) -> Iterable[Any]:
    """Prometheus families from snapshot.cost (a CostReport). Counters start from the persisted
    totals, so a restart is not a reset. Values are in the configured currency; the currency
    is on gpucostd_cost_info, not on every series (a currency change must not split series)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    report = getattr(snapshot, "cost", None)
    if report is None or not isinstance(report, CostReport):
        return []
    info = GaugeMetricFamily("gpucostd_cost_info",
                             "Cost accounting metadata (value 1): the currency of *_dollars*",
                             labels=["currency"])
    info.add_metric([report.currency], 1)
    loss = GaugeMetricFamily("gpucostd_gpu_throughput_loss_ratio",
                             "Fraction of throughput lost to throttling now "
                             "(1 - sm_clock/reference while busy and throttled)",
                             labels=["gpu", "uuid"])
    mult = GaugeMetricFamily("gpucostd_gpu_effective_cost_multiplier",
                             "1/(1 - loss ratio): how much more each unit of work costs now",
                             labels=["gpu", "uuid"])
    cap = CounterMetricFamily("gpucostd_gpu_throttle_capacity_lost_seconds",
                              "GPU-seconds of capacity lost to throttling, by reason",
                              labels=["gpu", "uuid", "reason"])
    thr = CounterMetricFamily("gpucostd_gpu_throttled_seconds",
                              "Seconds a throttle reason was active, by reason",
                              labels=["gpu", "uuid", "reason"])
    usd = CounterMetricFamily("gpucostd_gpu_throttle_cost_dollars",
                              "Money lost to throttling (capacity lost x price), by reason",
                              labels=["gpu", "uuid", "reason"])
    any_usd = False
    for g in report.gpus:
        lab = [str(g.index), g.uuid or ""]
        if g.loss_ratio is not None:
            loss.add_metric(lab, g.loss_ratio)
            mult.add_metric(lab, g.effective_cost_multiplier)
        priced = g.price_per_hour > 0 or g.dollars > 0
        for r, c in _sorted_reasons(g.reasons):
            cap.add_metric(lab + [r], c.capacity_lost_seconds)
            thr.add_metric(lab + [r], c.throttled_seconds)
            if priced:
                usd.add_metric(lab + [r], c.dollars)
                any_usd = True
    out = [info, loss, mult, cap, thr]
    if any_usd:
        out.append(usd)
    if report.priced:
        g1 = GaugeMetricFamily("gpucostd_node_throttle_cost_dollars_per_hour",
                               "Money lost to throttling per hour, over the last 5 minutes")
        g1.add_metric([], report.node_throttle_dollars_per_hour)
        g2 = GaugeMetricFamily("gpucostd_node_cost_dollars_per_hour",
                               "Price of the node per hour (sum of its GPUs' prices)")
        g2.add_metric([], report.node_dollars_per_hour)
        out += [g1, g2]
    if report.node_loss_ratio is not None:
        g3 = GaugeMetricFamily("gpucostd_node_throughput_loss_ratio",
                               "Fraction of the node's GPU capacity lost to throttling over "
                               "the last 5 minutes")
        g3.add_metric([], report.node_loss_ratio)
        out.append(g3)
    tk = report.tokens
    if tk is not None:
        for name, doc, value in (
                ("gpucostd_node_tokens_per_second",
                 "Tokens generated per second by the inference server (5-minute window)",
                 tk.tokens_per_second),
                ("gpucostd_node_tokens_per_dollar",
                 "Tokens generated per unit of money at the node's price", tk.tokens_per_dollar),
                ("gpucostd_node_cost_per_million_tokens_dollars",
                 "Cost of one million generated tokens at the node's price",
                 tk.cost_per_million_tokens)):
            if value is not None:
                m = GaugeMetricFamily(name, doc)
                m.add_metric([], value)
                out.append(m)
        m = CounterMetricFamily("gpucostd_node_tokens_lost",
                                "Tokens not generated because of throttling (modelled: "
                                "tokens/s x loss/(1-loss))")
        m.add_metric([], tk.tokens_lost_total)
        out.append(m)
    out.extend(_efficiency_families(report))
    out.extend(mig_cost_families(report))
    return out


def _efficiency_families(report: CostReport) -> Iterable[Any]:
    """Energy, idle capacity, endpoints and the floor (docs/cost.md)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    out = []
    energy = CounterMetricFamily("gpucostd_gpu_energy_joules",
                                 "Energy drawn by the GPU since accounting began (its energy "
                                 "counter, else the integral of the power draw)",
                                 labels=["gpu", "uuid"])
    energy_usd = CounterMetricFamily("gpucostd_gpu_energy_cost_dollars",
                                     "Money paid for the GPU's energy (x PUE)",
                                     labels=["gpu", "uuid"])
    idle = CounterMetricFamily("gpucostd_gpu_idle_seconds",
                               "Paid GPU-seconds unused: kind=idle while not busy, "
                               "kind=underused the unused share while busy below the target "
                               "utilization", labels=["gpu", "uuid", "kind"])
    idle_usd = CounterMetricFamily("gpucostd_gpu_idle_cost_dollars",
                                   "Money paid for unused GPU capacity, by kind",
                                   labels=["gpu", "uuid", "kind"])
    energy_priced = idle_priced = False
    for g in report.gpus:
        x = g.extra or {}
        if x.get("paid_seconds") is None:
            continue
        lab = [str(g.index), g.uuid or ""]
        energy.add_metric(lab, x.get("energy_joules") or 0.0)
        idle.add_metric(lab + ["idle"], x.get("idle_seconds") or 0.0)
        idle.add_metric(lab + ["underused"], x.get("underused_seconds") or 0.0)
        if x.get("energy_dollars"):
            energy_priced = True
        energy_usd.add_metric(lab, x.get("energy_dollars") or 0.0)
        if g.price_per_hour > 0 or x.get("idle_dollars") or x.get("underused_dollars"):
            idle_priced = True
        idle_usd.add_metric(lab + ["idle"], x.get("idle_dollars") or 0.0)
        idle_usd.add_metric(lab + ["underused"], x.get("underused_dollars") or 0.0)
    out += [energy, idle]
    gpu_rate = GaugeMetricFamily("gpucostd_gpu_tokens_per_second", "The GPU's share of its "
                                 "inference endpoint's tokens per second",
                                 labels=["gpu", "uuid"])
    for g in report.gpus:
        rate = (g.extra or {}).get("tokens_per_second")
        if rate is not None:
            gpu_rate.add_metric([str(g.index), g.uuid or ""], rate)
    if gpu_rate.samples:
        out.append(gpu_rate)
    if energy_priced:
        out.append(energy_usd)
    if idle_priced:
        out.append(idle_usd)
    eff = report.efficiency or {}

    def gauge(name: str, doc: str, value: Any) -> None:
        if value is not None:
            m = GaugeMetricFamily(name, doc)
            m.add_metric([], float(value))
            out.append(m)
    gauge("gpucostd_node_idle_ratio", "Share of paid GPU-time unused (idle + underused) over "
          "the last 5 minutes", eff.get("idle_ratio"))
    if eff.get("energy_dollars_per_hour"):
        gauge("gpucostd_node_energy_cost_dollars_per_hour", "Energy price of the node per hour "
              "now (power x PUE x energy price)", eff.get("energy_dollars_per_hour"))
    gauge("gpucostd_node_tokens_per_joule", "Tokens generated per joule the GPUs draw",
          eff.get("tokens_per_joule"))
    floor = eff.get("min_tokens_per_dollar")
    if floor:
        gauge("gpucostd_node_min_tokens_per_dollar", "The tokens-per-dollar floor "
              "([efficiency] min_tokens_per_dollar)", floor)
        gauge("gpucostd_node_below_floor", "1 while tokens per dollar has been below the floor "
              "for the whole window (on_inefficient ran)",
              1.0 if (eff.get("floor") or {}).get("inefficient") else 0.0)
    tk = report.tokens
    if tk is not None:
        m = CounterMetricFamily("gpucostd_node_tokens", "Tokens generated on the node, counted "
                                "from the inference servers' counters")
        m.add_metric([], tk.tokens_total or 0.0)
        out.append(m)
        info = GaugeMetricFamily("gpucostd_inference_endpoint_info", "Inference endpoints "
                                 "(value 1): index, url, the server detected",
                                 labels=["endpoint", "url", "server"])
        up = GaugeMetricFamily("gpucostd_inference_endpoint_up", "1 if the endpoint answered "
                               "with its token counter this cycle", labels=["endpoint"])
        rate = GaugeMetricFamily("gpucostd_inference_endpoint_tokens_per_second",
                                 "Tokens per second of one endpoint (5-minute window)",
                                 labels=["endpoint"])
        for i, ep in enumerate(tk.endpoints or ()):
            info.add_metric([str(i), str(ep.get("url")), str(ep.get("server") or "")], 1)
            up.add_metric([str(i)], 1.0 if ep.get("up") else 0.0)
            if ep.get("tokens_per_second") is not None:
                rate.add_metric([str(i)], ep["tokens_per_second"])
        out += [info, up, rate]
    return out
