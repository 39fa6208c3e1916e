"""Prometheus families of the cost report (snapshot.cost): throughput loss, capacity and money
lost by reason, the node's price and tokens."""
from __future__ import annotations

from typing import Any, Iterable

from gpucostd.cost.model import _sorted_reasons
from gpucostd.cost.report import CostReport


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
    return out
