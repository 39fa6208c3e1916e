"""Prometheus families of the drain (part "drain", gpucostd.parts.drain): the back end, the
node's drain state as the engine holds it, the actions and their results."""
from __future__ import annotations

from gpucostd.snapshot import NodeSnapshot

STATES = ("free", "ours", "others", "unknown")
REFUSED_KINDS = ("brake", "blocked", "opt_out", "operator", "manual_undrain")


def metric_families(snapshot: NodeSnapshot):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    result = snapshot.part("drain")
    data = result.data if result is not None and result.ok else None
    if data is None:
        return []
    info = GaugeMetricFamily("gpucostd_drain_info", "The drain back end (value 1): backend "
                             "none, slurm or kubernetes; dry_run true/false.",
                             labels=["backend", "dry_run"])
    info.add_metric([data.backend, "true" if data.dry_run else "false"], 1)
    out = [info]
    if data.backend == "none":
        return out
    state = GaugeMetricFamily("gpucostd_drain_state", "1 for the node's drain state in the "
                              "engine: free, ours (drained by gpucostd), others (drained by "
                              "someone else), unknown (not read yet or the engine fails).",
                              labels=["state"])
    now = "unknown" if data.failing else data.state
    for s in STATES:
        state.add_metric([s], 1 if s == now else 0)
    refused = GaugeMetricFamily("gpucostd_drain_refused", "1 while a drain the node's health "
                                "asks for is refused, by kind: brake, opt_out, operator, "
                                "manual_undrain, blocked.", labels=["kind"])
    now_refused = data.refused if data.refused and data.want else None
    for kind in REFUSED_KINDS:                  # every kind, 0 or 1 (absent is not "no")
        refused.add_metric([kind], 1 if kind == now_refused else 0)
    actions = CounterMetricFamily("gpucostd_drain_actions", "Drain actions by action (drain, "
                                  "undrain, reboot) and result (requested, ok, failed, "
                                  "refused, dry_run).", labels=["action", "result"])
    for (action, res), n in sorted(data.actions.items()):
        actions.add_metric([action, res], n)
    return out + [state, refused, actions]
