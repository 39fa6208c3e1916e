"""Cost reports: the types the accountant hands out each cycle (``CostReport`` and its parts)
and what people read of them: the breakdown of ``gpucostd cost`` (by GPU and reason, over a
window), the status lines and the replay summary's rounding. Pure: no state, no I/O.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from gpucostd.config import PRICES_FIX  # noqa: F401 (one text, kept with the config)
from gpucostd.cost.mig import status_lines as mig_status_lines
from gpucostd.cost.model import (is_finite as _finite, rounded as _r,
                                 sorted_reasons as _sorted_reasons)

BUCKET_SECONDS = 60            # history granularity
HISTORY_SECONDS = 86400        # history kept (24 h)
LATENCY_NOTE = ("an under-loaded GPU pays for throttling in latency rather than throughput; "
                "only busy time counts here.")


# =========================================================================== report types
@dataclass
class ReasonCost:
    throttled_seconds: float = 0.0
    capacity_lost_seconds: float = 0.0
    dollars: float = 0.0

    def to_json(self) -> Dict[str, float]:
        return {"throttled_seconds": _r(self.throttled_seconds),
                "capacity_lost_seconds": _r(self.capacity_lost_seconds),
                "dollars": _r(self.dollars)}


@dataclass
class WindowCost:
    """Dollars and capacity lost over a trailing window (last hour, last 24 h)."""
    seconds: float
    capacity_lost_seconds: float = 0.0
    dollars: float = 0.0
    top_reason: Optional[str] = None
    by_reason: Dict[str, ReasonCost] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"seconds": self.seconds, "capacity_lost_seconds": _r(self.capacity_lost_seconds),
                "dollars": _r(self.dollars), "top_reason": self.top_reason,
                "reasons": {r: c.to_json() for r, c in _sorted_reasons(self.by_reason)}}


@dataclass
class GpuCost:
    index: int
    uuid: Optional[str]
    name: Optional[str]
    price_per_hour: float
    busy: Optional[bool]                  # None: no usable reading this cycle
    loss_ratio: Optional[float]           # now; None: no usable reading
    effective_cost_multiplier: Optional[float]
    active_reasons: Tuple[str, ...]       # throttle reasons active now
    source: str                           # "counters" | "sampled" | "mixed" | "none"
    reasons: Dict[str, ReasonCost]        # totals since accounting began (persisted)
    last_hour: WindowCost
    last_24h: WindowCost
    extra: Dict[str, Any] = field(default_factory=dict)   # energy and idle totals (efficiency)

    @property
    def capacity_lost_seconds(self) -> float:
        return sum(c.capacity_lost_seconds for c in self.reasons.values())

    @property
    def dollars(self) -> float:
        return sum(c.dollars for c in self.reasons.values())

    def to_json(self) -> Dict[str, Any]:
        return {
            "index": self.index, "uuid": self.uuid, "name": self.name,
            "price_per_hour": self.price_per_hour, "busy": self.busy,
            "loss_ratio": _r(self.loss_ratio), "effective_cost_multiplier":
                _r(self.effective_cost_multiplier),
            "active_reasons": list(self.active_reasons), "source": self.source,
            "capacity_lost_seconds": _r(self.capacity_lost_seconds),
            "dollars": _r(self.dollars),
            "reasons": {r: c.to_json() for r, c in _sorted_reasons(self.reasons)},
            "last_hour": self.last_hour.to_json(), "last_24h": self.last_24h.to_json(),
            **self.extra,
        }


@dataclass
class TokenCost:
    tokens_per_second: Optional[float] = None
    tokens_per_dollar: Optional[float] = None
    cost_per_million_tokens: Optional[float] = None
    tokens_lost_total: float = 0.0          # modelled: tokens/s x loss/(1-loss), integrated
    tokens_total: Optional[float] = None    # the server's counter, last value
    measured: Optional[Dict[str, Any]] = None  # clock-fit result (see fit_tokens_vs_clock)
    measured_tokens_lost_total: float = 0.0  # by the fit, while it is usable (not persisted)
    tokens_per_joule: Optional[float] = None
    endpoints: List[Dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return {"tokens_per_second": _r(self.tokens_per_second),
                "tokens_per_joule": _r(self.tokens_per_joule),
                "endpoints": [dict(e) for e in self.endpoints],
                "tokens_per_dollar": _r(self.tokens_per_dollar),
                "cost_per_million_tokens": _r(self.cost_per_million_tokens),
                "tokens_lost_total": _r(self.tokens_lost_total),
                "tokens_total": self.tokens_total, "measured": self.measured,
                "measured_tokens_lost_total": _r(self.measured_tokens_lost_total)}


class CostReport:
    """The cost view of one cycle. Built by CostAccountant.update; tokens are filled in by
    update_tokens in the same cycle (before the snapshot is built)."""

    def __init__(self, time: float, monotonic: float, currency: str, gpus: Tuple[GpuCost, ...],
                 node_dollars_per_hour: float, node_throttle_dollars_per_hour: float,
                 node_loss_ratio: Optional[float], last_hour: WindowCost, last_24h: WindowCost,
                 tokens: Optional[TokenCost] = None, notes: Tuple[str, ...] = (),
                 history: Optional[Mapping[int, Any]] = None,
                 totals_since: Optional[float] = None):
        self.time = time
        self.monotonic = monotonic
        self.currency = currency
        self.gpus = gpus
        self.node_dollars_per_hour = node_dollars_per_hour
        self.node_throttle_dollars_per_hour = node_throttle_dollars_per_hour
        self.node_loss_ratio = node_loss_ratio
        self.last_hour = last_hour
        self.last_24h = last_24h
        self.tokens = tokens
        self.notes = notes
        self._history = history
        self.totals_since = totals_since
        self.efficiency: Optional[Dict[str, Any]] = None   # EfficiencyBook.node_figures
        self.efficiency_history: Optional[Mapping[int, Any]] = None
        self.mig: List[Dict[str, Any]] = []     # MIG instances (gpucostd.cost.mig.MigBook)

    @property
    def priced(self) -> bool:
        return self.node_dollars_per_hour > 0 or any(g.dollars > 0 for g in self.gpus)

    @property
    def capacity_lost_seconds(self) -> float:
        return sum(g.capacity_lost_seconds for g in self.gpus)

    @property
    def dollars(self) -> float:
        return sum(g.dollars for g in self.gpus)

    def to_json(self, history: bool = False) -> Dict[str, Any]:
        """Stable keys, documented in docs/cost.md. history=True adds the per-minute buckets
        (for `gpucostd cost --since`)."""
        node_reasons: Dict[str, ReasonCost] = {}
        for g in self.gpus:
            _add_reasons(node_reasons, g.reasons)
        out: Dict[str, Any] = {
            "schema": 1,
            "time": self.time,
            "currency": self.currency,
            "priced": self.priced,
            "totals_since": self.totals_since,
            "node": {
                "cost_dollars_per_hour": _r(self.node_dollars_per_hour),
                "throttle_dollars_per_hour": _r(self.node_throttle_dollars_per_hour),
                "loss_ratio": _r(self.node_loss_ratio),
                "capacity_lost_seconds": _r(self.capacity_lost_seconds),
                "dollars": _r(self.dollars),
                "reasons": {r: c.to_json() for r, c in _sorted_reasons(node_reasons)},
                "last_hour": self.last_hour.to_json(),
                "last_24h": self.last_24h.to_json(),
                "tokens": self.tokens.to_json() if self.tokens is not None else None,
                "efficiency": _eff_json(self.efficiency, self.gpus),
            },
            "gpus": [g.to_json() for g in self.gpus],
            "mig": list(self.mig),
            "notes": list(self.notes) + [LATENCY_NOTE[0].upper() + LATENCY_NOTE[1:]],
        }
        if history and self._history is not None:
            out["history"] = _history_json(self._history)
        if history and self.efficiency_history is not None:
            out["efficiency_history"] = {str(b): {k: list(v) for k, v in list(per.items())}
                                         for b, per in list(self.efficiency_history.items())}
        return out


def _eff_json(fig: Optional[Mapping[str, Any]], gpus) -> Optional[Dict[str, Any]]:
    """The node's energy and idle figures (docs/cost.md)."""
    if fig is None:
        return None
    totals = {k: 0.0 for k in ("energy_joules", "energy_dollars", "idle_seconds",
                               "idle_dollars", "underused_seconds", "underused_dollars",
                               "paid_seconds")}
    for g in gpus:
        for k in totals:
            totals[k] += g.extra.get(k) or 0.0
    floor = dict(fig.get("floor") or {})
    return {"cost_dollars_per_hour": _r(fig.get("cost_dollars_per_hour")),
            "gpu_dollars_per_hour": _r(fig.get("gpu_dollars_per_hour")),
            "energy_dollars_per_hour": _r(fig.get("energy_dollars_per_hour")),
            "power_watts": _r(fig.get("power_watts"), 3),
            "tokens_per_second": _r(fig.get("tokens_per_second")),
            "tokens_per_dollar": _r(fig.get("tokens_per_dollar")),
            "cost_per_million_tokens": _r(fig.get("cost_per_million_tokens")),
            "tokens_per_joule": _r(fig.get("tokens_per_joule")),
            "idle_ratio": _r(fig.get("idle_ratio")),
            "idle_basis": fig.get("idle_basis"),
            "min_tokens_per_dollar": fig.get("min_tokens_per_dollar"),
            "below_floor_seconds": _r(floor.get("below_seconds"), 3),
            "inefficient": bool(floor.get("inefficient")),
            **{k: _r(v) for k, v in totals.items()}}


def _add_reasons(into: Dict[str, ReasonCost], src: Mapping[str, ReasonCost]) -> None:
    for r, c in src.items():
        t = into.get(r)
        if t is None:
            t = into[r] = ReasonCost()
        t.throttled_seconds += c.throttled_seconds
        t.capacity_lost_seconds += c.capacity_lost_seconds
        t.dollars += c.dollars


def _finish_window(w: WindowCost) -> WindowCost:
    """Fill a window's totals and top reason from its per-reason costs."""
    w.capacity_lost_seconds = sum(c.capacity_lost_seconds for c in w.by_reason.values())
    w.dollars = sum(c.dollars for c in w.by_reason.values())
    w.top_reason = _top_reason(w.by_reason)
    return w


def _top_reason(by_reason: Mapping[str, ReasonCost]) -> Optional[str]:
    best, key = None, (0.0, 0.0)
    for r, c in _sorted_reasons(by_reason):
        k = (c.dollars, c.capacity_lost_seconds)
        if k > key:
            best, key = r, k
    return best


# =========================================================================== history views
def _triple(v: Any, where: str) -> List[float]:
    """[throttled_s, capacity_s, dollars] from a state file; ValueError unless it is three
    finite non-negative numbers."""
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_finite(x) for x in v):
        raise ValueError(f"{where}: {str(v)[:60]} is not three non-negative numbers")
    return [float(x) for x in v]


def _expand_history(data: Any) -> Dict[int, Dict[str, Dict[str, List[float]]]]:
    """Either history form (compact rows, or {"buckets": nested}, or nested) -> nested.
    ValueError (or TypeError, KeyError, IndexError) when it is malformed."""
    out: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
    if not data:
        return out
    if isinstance(data, dict) and "rows" in data:
        keys, reasons = data["keys"], data["reasons"]
        for b, ki, ri, *v in data["rows"]:
            if not (0 <= ki < len(keys) and 0 <= ri < len(reasons)):
                raise ValueError(f"history row {[b, ki, ri]}: no such GPU or reason")
            out.setdefault(int(b), {}).setdefault(str(keys[ki]), {})[str(reasons[ri])] = \
                _triple(v, f"history minute {b}")
        return out
    if isinstance(data, dict) and "buckets" in data:
        data = data["buckets"]
    for b, per_gpu in data.items():
        out[int(b)] = {str(k): {str(r): _triple(v, f"history minute {b} {k} {r}")
                                for r, v in pr.items()}
                       for k, pr in per_gpu.items()}
    return out


def _history_json(history: Mapping[int, Any]) -> Dict[str, Any]:
    """A copy of the live history: the status socket's thread renders it while the loop adds
    to it (each list(...items()) is one C call, so no "changed size during iteration")."""
    return {"bucket_seconds": BUCKET_SECONDS,
            "buckets": {str(b): {k: {r: list(v) for r, v in list(per_reason.items())}
                                 for k, per_reason in list(per_gpu.items())}
                        for b, per_gpu in sorted(list(history.items()))}}


def breakdown(accountant: Any, since_seconds: Optional[float] = None) -> Dict[str, Any]:
    """cost_breakdown of a running CostAccountant (the status socket's "cost" request)."""
    report = accountant._last_report
    if report is not None:
        return cost_breakdown(report, since_seconds)
    now = accountant.clock.time() if accountant.clock is not None else time.time()
    return cost_breakdown(accountant.state(), since_seconds, now=now)


def cost_breakdown(data: Union[CostReport, Mapping[str, Any]],
                   since_seconds: Optional[float] = None, now: Optional[float] = None
                   ) -> Dict[str, Any]:
    """Breakdown by GPU and reason for `gpucostd cost [--since S]`.

    `data` is a CostReport, its to_json(history=True) output, or a persisted cost.json.
    since_seconds None = all-time totals; otherwise the history buckets whose minute overlaps
    the last `since_seconds` (at most 24 h, minute resolution)."""
    if isinstance(data, CostReport):
        data = data.to_json(history=True)
    data = dict(data)
    currency = data.get("currency", "USD")
    names: Dict[str, Dict[str, Any]] = {}
    if now is None:
        now = data.get("time") or data.get("saved_at")
    gpus_src = data.get("gpus")
    if isinstance(gpus_src, list):      # a report's JSON
        for g in gpus_src:
            key = g.get("uuid") or f"index:{g['index']}"
            names[key] = {"index": g["index"], "uuid": g.get("uuid"), "name": g.get("name"),
                          "idle_basis": g.get("idle_basis"),
                          "reasons": {r: [v["throttled_seconds"], v["capacity_lost_seconds"],
                                          v["dollars"]] for r, v in g["reasons"].items()}}
    else:                               # the state file
        for key, g in (gpus_src or {}).items():
            names[key] = {"index": g.get("index"), "uuid": g.get("uuid"), "name": g.get("name"),
                          "reasons": g.get("reasons") or {}}
    truncated = False
    if since_seconds is None:
        per_gpu = {k: v["reasons"] for k, v in names.items()}
    else:
        history = _expand_history(data.get("history"))
        since_seconds = float(since_seconds)
        if not (since_seconds > 0 and math.isfinite(since_seconds)):
            raise ValueError(f"since_seconds {since_seconds!r} must be a positive number of "
                             f"seconds, e.g. 86400 for the last 24 hours")
        if since_seconds > HISTORY_SECONDS:
            truncated = True
        first = int(((now or 0) - min(since_seconds, HISTORY_SECONDS)) // BUCKET_SECONDS)
        per_gpu = {}
        for b, bucket in history.items():
            if int(b) < first:
                continue
            for key, per_reason in bucket.items():
                d = per_gpu.setdefault(key, {})
                for r, v in per_reason.items():
                    a = d.setdefault(r, [0.0, 0.0, 0.0])
                    for i in range(3):
                        a[i] += v[i]
    eff_rows = _efficiency_rows(data, gpus_src, since_seconds, now)
    rows = []
    node: Dict[str, ReasonCost] = {}
    for key in sorted(set(names) | set(per_gpu) | set(eff_rows),
                      key=lambda k: (names.get(k, {}).get("index") is None,
                                     names.get(k, {}).get("index") or 0, k)):
        info = names.get(key, {"index": None, "uuid": None if key.startswith("index:") else key,
                               "name": None})
        reasons = {r: ReasonCost(*[float(x) for x in v][:3])
                   for r, v in _sorted_reasons(per_gpu.get(key, {}))}
        _add_reasons(node, reasons)
        rows.append({"index": info.get("index"), "uuid": info.get("uuid"),
                     "name": info.get("name"), "idle_basis": info.get("idle_basis"),
                     "capacity_lost_seconds": _r(sum(c.capacity_lost_seconds
                                                     for c in reasons.values())),
                     "dollars": _r(sum(c.dollars for c in reasons.values())),
                     "top_reason": _top_reason(reasons),
                     "reasons": {r: c.to_json() for r, c in reasons.items()},
                     **{k: _r(v) for k, v in eff_rows.get(key, {}).items() if k != "index"}})
        if info.get("index") is None and key in eff_rows and rows[-1]["index"] is None:
            rows[-1]["index"] = eff_rows[key].get("index")
    eff_node = {k: _r(sum((eff_rows.get(key) or {}).get(k) or 0.0 for key in eff_rows))
                for k in EFF_KEYS} if eff_rows else {}
    return {"since_seconds": since_seconds, "truncated_to_seconds":
            HISTORY_SECONDS if truncated else None, "currency": currency,
            "time": now, "gpus": rows,
            "node": {"capacity_lost_seconds": _r(sum(c.capacity_lost_seconds
                                                     for c in node.values())),
                     "dollars": _r(sum(c.dollars for c in node.values())),
                     "top_reason": _top_reason(node),
                     "reasons": {r: c.to_json() for r, c in _sorted_reasons(node)},
                     **eff_node}}


EFF_KEYS = ("energy_joules", "energy_dollars", "idle_seconds", "idle_dollars",
            "underused_seconds", "underused_dollars")


def _efficiency_rows(data: Mapping[str, Any], gpus_src: Any, since: Optional[float],
                     now: Optional[float]) -> Dict[str, Dict[str, float]]:
    """GPU key -> energy and idle figures: all-time totals, or the minute history's sums over
    the last `since` seconds. From a report's JSON or from the state file."""
    from gpucostd.cost.efficiency import history_totals
    state = data.get("efficiency") if isinstance(data.get("efficiency"), dict) else None
    index: Dict[str, Any] = {}
    totals: Dict[str, Dict[str, float]] = {}
    if isinstance(gpus_src, list):
        for g in gpus_src:
            key = g.get("uuid") or f"index:{g['index']}"
            index[key] = g.get("index")
            if g.get("paid_seconds") is not None:
                totals[key] = {k: float(g.get(k) or 0.0) for k in EFF_KEYS}
        history = data.get("efficiency_history")
    elif state is not None:
        for key, g in (state.get("gpus") or {}).items():
            index[key] = g.get("index")
            totals[key] = {k: float(g.get(k) or 0.0) for k in EFF_KEYS}
        history = state.get("history")
    else:
        return {}
    if since is not None:
        first = int(((now or 0) - min(since, HISTORY_SECONDS)) // BUCKET_SECONDS)
        totals = history_totals(history or {}, first)
    for key, row in totals.items():
        row["index"] = index.get(key)
    return totals


def _since_words(s: Optional[float]) -> str:
    if s is None:
        return "since accounting began"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"over the last {int(s // n)}{unit}"
    return f"over the last {s:g}s"


def _money(x: Optional[float], currency: str) -> str:
    if x is None:
        return "-"
    sym = "$" if currency == "USD" else ""
    suffix = "" if sym else f" {currency}"
    if abs(x) >= 100:
        return f"{sym}{x:,.0f}{suffix}"
    if abs(x) >= 1:
        return f"{sym}{x:.2f}{suffix}"
    return f"{sym}{x:.3f}{suffix}"


def _gpu_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} GPU-h"
    if s >= 60:
        return f"{s / 60:.1f} GPU-min"
    return f"{s:.1f} GPU-s"


def format_cost(data: Mapping[str, Any], since: Optional[float] = None) -> str:
    """Text for `gpucostd cost`: `data` is cost_breakdown() output (or anything it accepts,
    which is then broken down `since` seconds back). Fits 100 columns."""
    if "since_seconds" not in data:       # not a breakdown yet
        data = cost_breakdown(data, since)
    currency = data.get("currency", "USD")
    priced = any((g.get("dollars") or 0) > 0 for g in data["gpus"])
    lines = [f"Throttling cost {_since_words(data.get('since_seconds'))}"
             + (" (history holds 24h)" if data.get("truncated_to_seconds") else "")]
    hdr = f"{'GPU':>3}  {'reason':<22}{'throttled':>12}{'capacity lost':>16}"
    if priced:
        hdr += f"{'cost':>14}"
    lines.append(hdr)
    for g in data["gpus"]:
        idx = "?" if g.get("index") is None else str(g["index"])
        if not g["reasons"]:
            lines.append(f"{idx:>3}  (no throttling)")
            continue
        for r, c in g["reasons"].items():
            line = (f"{idx:>3}  {r:<22}{c['throttled_seconds']:>11.0f}s"
                    f"{_gpu_seconds(c['capacity_lost_seconds']):>16}")
            if priced:
                line += f"{_money(c['dollars'], currency):>14}"
            lines.append(line)
            idx = ""
    node = data["node"]
    total = f"node total: {_gpu_seconds(node['capacity_lost_seconds'] or 0)} of capacity lost"
    if priced:
        total += f", {_money(node['dollars'], currency)}"
    if node.get("top_reason"):
        total += f"; top reason {node['top_reason']}"
    lines.append(total)
    lines.extend(_format_efficiency(data, currency))
    lines.append("Note: an under-loaded GPU pays for throttling in latency rather than "
                 "throughput;")
    lines.append("      only busy time is counted here.")
    return "\n".join(_clip(line) for line in lines) + "\n"


def _format_efficiency(data: Mapping[str, Any], currency: str) -> List[str]:
    rows = [g for g in data["gpus"] if g.get("energy_joules") is not None]
    if not rows:
        return []
    lines = ["", f"Energy and idle capacity {_since_words(data.get('since_seconds'))}",
             f"{'GPU':>3}  {'energy':>11}{'energy cost':>13}{'idle':>14}{'idle cost':>12}"
             f"{'underused':>14}{'underused cost':>16}"]
    for g in rows + [dict(data["node"], index="all")]:
        idx = "?" if g.get("index") is None else str(g["index"])
        lines.append(f"{idx:>3}  {(g.get('energy_joules') or 0) / 3.6e6:>8.2f} kWh"
                     f"{_money(g.get('energy_dollars') or 0, currency):>13}"
                     f"{_gpu_seconds(g.get('idle_seconds') or 0):>14}"
                     f"{_money(g.get('idle_dollars') or 0, currency):>12}"
                     f"{_gpu_seconds(g.get('underused_seconds') or 0):>14}"
                     f"{_money(g.get('underused_dollars') or 0, currency):>16}")
    by_basis: Dict[str, List[str]] = {}
    for g in rows:
        if g.get("idle_basis") and g.get("index") is not None:
            by_basis.setdefault(g["idle_basis"], []).append(str(g["index"]))
    words = {"sm_activity": "SM activity (GPM)", "utilization": "GPU-Util (no GPM)",
             "mig_instances": "its MIG instances' work"}
    if by_basis:
        lines.append("underused = unused share of busy GPUs' work: " + "; ".join(
            f"{words.get(b, b)} on GPU {','.join(ix)}" for b, ix in sorted(by_basis.items())))
    return lines


def _clip(line: str, width: int = 100) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


# =========================================================================== status view
# A simulated node priced at its scenario's [prices] (gpucostd.sim.sections) carries a cost
# note that starts so; the status lines and the systemd status line say it from that note.
ILLUSTRATIVE_NOTE = "Prices are illustrative"


def priced_illustratively(notes: Any) -> bool:
    return any(str(n).startswith(ILLUSTRATIVE_NOTE) for n in notes or ())


def status_lines(report: Union[CostReport, Mapping[str, Any]],
                 currency: Optional[str] = None) -> List[str]:
    """The cost section of `gpucostd status`: each line fits 100 columns."""
    data = report.to_json() if isinstance(report, CostReport) else report
    return status_lines_from_json(data, currency)


def status_lines_from_json(data: Mapping[str, Any], currency: Optional[str] = None
                           ) -> List[str]:
    if not data:
        return []
    currency = currency or data.get("currency") or "USD"
    priced = bool(data.get("priced"))
    node = data["node"]
    lines = []
    top = node["last_24h"].get("top_reason")
    top = f"; top reason {top}" if top else ""
    if priced:
        lines.append(_clip(
            f"Cost: node {_money(node['cost_dollars_per_hour'], currency)}/h; throttling costs "
            f"{_money(node['throttle_dollars_per_hour'], currency)}/h (last 5 min)"))
        if priced_illustratively(data.get("notes")):
            lines.append(_clip("  prices: illustrative (the scenario's); set [cost] gpu_hour_usd, "
                               "energy_usd_per_kwh for yours"))
        lines.append(_clip(
            f"  lost to throttling: {_money(node['last_hour']['dollars'], currency)} last 1h, "
            f"{_money(node['last_24h']['dollars'], currency)} last 24h{top}"))
    else:
        loss = node.get("loss_ratio")
        lines.append(_clip("Cost: no price set ([cost] gpu_hour_usd), capacity only"
                           + (f"; {loss * 100:.1f}% of node capacity lost (last 5 min)"
                              if loss is not None else "")))
        lines.append(_clip(
            f"  lost to throttling: {_gpu_seconds(node['last_hour']['capacity_lost_seconds'])} "
            f"last 1h, {_gpu_seconds(node['last_24h']['capacity_lost_seconds'])} last 24h{top}"))
    quiet = []
    for g in data.get("gpus") or []:
        day, hour = g["last_24h"], g["last_hour"]
        loss = g.get("loss_ratio")
        if not day["capacity_lost_seconds"] and not loss:
            quiet.append(str(g["index"]))
            continue
        mult = g.get("effective_cost_multiplier")
        now = "loss now  -  " if loss is None else (
            f"loss now {loss * 100:4.1f}% (x{mult:.2f} per unit of work)"
            if loss and mult is not None else "loss now  0%")
        if priced:
            won = (f"lost {_money(hour['dollars'], currency)} 1h, "
                   f"{_money(day['dollars'], currency)} 24h")
        else:
            won = (f"lost {_gpu_seconds(hour['capacity_lost_seconds'])} 1h, "
                   f"{_gpu_seconds(day['capacity_lost_seconds'])} 24h")
        top = day.get("top_reason")
        line = f"  GPU {g['index']}: {now}; {won}" + (f"; top {top}" if top else "")
        if len(line) > 100:     # long money, GPU-hours or reason: keep the reason, drop words
            line = line.replace(" per unit of work)", ")", 1)
        lines.append(_clip(line))
    if quiet and len(quiet) < len(data.get("gpus") or []):
        lines.append(_clip(f"  GPUs {','.join(quiet)}: no throttling cost in 24h"))
    lines.extend(efficiency_lines(node, currency, priced))
    lines.extend(mig_status_lines(data.get("mig") or (), lambda x: _money(x, currency), _big))
    lines.append(_clip("  Note: an under-loaded GPU pays for throttling in latency rather than "
                       "throughput."))
    return lines


def _big(x: Optional[float]) -> str:
    if x is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}" if abs(x) < 10 * div else f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


# what idle and underused capacity is priced on (EfficiencyBook.idle_basis), as status says it
_BASIS = {"sm_activity": "of SM activity", "utilization": "of GPU-Util, no GPM",
          "mixed": "SM activity where GPM, else GPU-Util", "mig_instances": "of MIG instances"}


def efficiency_lines(node: Mapping[str, Any], currency: str = "USD",
                     priced: bool = True) -> List[str]:
    """Tokens per dollar (one line: tokens/s, tokens per dollar, $ per million tokens, idle %,
    against the floor), then energy and idle capacity."""
    lines: List[str] = []
    tk = node.get("tokens") or {}
    eff = node.get("efficiency") or {}
    idle = eff.get("idle_ratio")
    idle_txt = f"idle {idle * 100:.0f}%" if idle is not None else "idle -"
    basis = _BASIS.get(eff.get("idle_basis") or "")
    if basis and idle is not None:
        idle_txt += f" ({basis})"
    if tk:
        down = [e for e in tk.get("endpoints") or () if not e.get("up")]
        if tk.get("tokens_per_second") is None:
            t = "  Tokens: no reading" + (f" ({len(down)} endpoint(s) down)" if down else "")
        else:
            t = f"  Tokens: {_big(tk['tokens_per_second'])}/s"
            if tk.get("tokens_per_dollar") is not None:
                t += (f", {_big(tk['tokens_per_dollar'])} per {'$' if currency == 'USD' else currency}"
                      f", {_money(tk.get('cost_per_million_tokens'), currency)} per million")
            t += f", {idle_txt}"
            floor = eff.get("min_tokens_per_dollar")
            if floor:
                state = "BELOW" if eff.get("inefficient") else (
                    "below" if eff.get("below_floor_seconds") is not None else "ok")
                t += f"; floor {_big(floor)} {state}"
            if down:
                t += f"; {len(down)} endpoint(s) down"
        lines.append(_clip(t))
        lost = f"    {tk.get('tokens_lost_total') or 0:.0f} lost to throttling (modelled tokens)"
        m = tk.get("measured") or {}
        if m.get("usable"):
            lost += f"; measured {m['tokens_lost_per_second']:.0f}/s now (R2 {m['r2']:.2f})"
        if tk.get("tokens_per_joule") is not None:
            lost += f"; {tk['tokens_per_joule']:.2f} tokens/J"
        lines.append(_clip(lost))
    if eff and eff.get("paid_seconds"):
        e = "  Energy:"
        if eff.get("power_watts") is not None:
            e += f" {eff['power_watts'] / 1000:.2f} kW now"
        e += f", {(eff.get('energy_joules') or 0) / 3.6e6:.2f} kWh counted"
        if eff.get("energy_dollars"):
            e += (f" ({_money(eff['energy_dollars'], currency)}, "
                  f"{_money(eff.get('energy_dollars_per_hour'), currency)}/h now)")
        unused = (eff.get("idle_seconds") or 0) + (eff.get("underused_seconds") or 0)
        if priced:
            e += (f"; idle capacity {_money((eff.get('idle_dollars') or 0) + (eff.get('underused_dollars') or 0), currency)}"
                  f" ({_gpu_seconds(unused)})")
        else:
            e += f"; idle capacity {_gpu_seconds(unused)}"
        lines.append(_clip(e))
    return lines


# the names other modules import (the module itself keeps its short private ones)
add_reasons = _add_reasons
finish_window = _finish_window
triple = _triple
expand_history = _expand_history
