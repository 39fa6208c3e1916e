"""The one line of systemd's STATUS= (and the start notification): node health and cost in a
glance."""
from __future__ import annotations

from typing import Dict, Optional

from gpucostd.snapshot import NodeSnapshot, Severity


def summary_line(snap: Optional[NodeSnapshot]) -> str:
    """One line for systemd's STATUS=: `8 GPUs, 1 WARN, $0.42/h lost to throttling`."""
    if snap is None:
        return "starting"
    if not snap.nvml_available and not snap.gpus:
        return f"NVML unavailable: {snap.nvml_error or 'unknown reason'}"[:200]
    counts: Dict[str, int] = {}
    for sev in snap.gpu_health.values():
        if sev != Severity.OK:
            counts[sev.name] = counts.get(sev.name, 0) + 1
    parts = [f"{len(snap.gpus)} GPUs"]
    parts += [f"{n} {name}" for name, n in sorted(counts.items())] or ["all OK"]
    per_hour = getattr(snap.cost, "node_throttle_dollars_per_hour", None)
    if per_hour is not None and getattr(snap.cost, "priced", True):
        parts.append(f"${per_hour:.2f}/h lost to throttling")
    else:
        lost = getattr(snap.cost, "node_loss_ratio", None)
        if lost is not None:
            parts.append(f"{lost * 100:.1f}% capacity lost to throttling")
    tk = getattr(snap.cost, "tokens", None)
    if getattr(tk, "tokens_per_second", None) is not None:
        t = f"{tk.tokens_per_second:.0f} tokens/s"
        if tk.tokens_per_dollar is not None:
            from gpucostd.cost.report import priced_illustratively
            t += f" ({tk.tokens_per_dollar:,.0f} per $" + (
                " at illustrative prices)"
                if priced_illustratively(getattr(snap.cost, "notes", ())) else ")")
        parts.append(t)
    return ", ".join(parts)
