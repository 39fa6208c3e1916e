"""Energy, idle capacity and tokens per inference endpoint: the "tokens per dollar" side of
the cost (the throttle side is gpucostd.cost.accountant). Pure integration over readings, no
I/O; the accountant persists ``EfficiencyBook.state()`` in cost.json and the floor's state
(floor_step) in floor.json.

Per GPU, over each interval between two OK readings (docs/cost.md):

- energy: the delta of the GPU's energy counter (nvmlDeviceGetTotalEnergyConsumption) where
  both readings have it, else the trapezoid of the power draw; energy dollars = joules / 3.6e6
  x ``[cost] energy_usd_per_kwh`` x ``pue``;
- paid GPU-seconds = the interval; idle = not busy (below ``busy_utilization_percent`` or
  GpuIdle); underused = busy with its work below ``[efficiency] target_utilization_percent``,
  counting the unused share 1 - work; both by the trapezoid rule, priced at the GPU-hour price.
  The work is the SM activity where the GPU has GPU Performance Monitoring (GPM: the share of
  SMs busy), else GPU-Util (the share of time any kernel ran, which a memory-starved or badly
  batched GPU keeps near 100%); ``idle_basis`` says which ("sm_activity", "utilization", or
  "mixed" across GPUs).

Per endpoint: tokens/s over the last 5 minutes from its counter (a restart of the counter, or
a different counter after a reload, starts the window over and never counts the new value as
tokens; a failing endpoint has no tokens/s until it answers again); the node's tokens/s is the
sum over the endpoints that answer. Node cost per hour = GPU-hour prices + power now x PUE x
energy price; tokens per dollar, cost per million tokens and tokens per joule follow from it.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.cost.mig import MigBook, gpu_unused
from gpucostd.cost.model import (MAX_SAMPLE_GAP_SECONDS, SlidingSums, is_finite as _finite,
                                 rounded as _r, is_busy)
from gpucostd.snapshot import GpuReading, GpuState

WINDOW_SECONDS = 300.0            # window of tokens/s, idle share and energy $/h
# A saved token total above this is not believed (the probe refuses such counters:
# gpucostd.probes.inference.MAX_TOKEN_COUNT, docs/cost.md "Plausible token counts"): it starts
# from zero again, else a saved 1.7e308 would swallow every later delta for ever.
MAX_TOKEN_COUNT = 1e18
MAX_WATTS = 5000.0                # an energy-counter delta above this x dt is not believed
TOTAL_KEYS = ("energy_joules", "energy_dollars", "paid_seconds", "idle_seconds",
              "idle_dollars", "underused_seconds", "underused_dollars")
HISTORY_KEYS = ("energy_joules", "energy_dollars", "idle_seconds", "idle_dollars",
                "underused_seconds", "underused_dollars")
BUCKET_SECONDS = 60
HISTORY_SECONDS = 86400


def work_percent(g: GpuReading) -> Tuple[Optional[float], str]:
    """(work done in percent, its basis): the SM activity where GPM gives it, else GPU-Util."""
    act = g.activity
    if act is not None and _finite(act.sm):
        return 100.0 * float(act.sm), "sm_activity"
    if g.utilization_percent is None:
        return None, "utilization"
    return float(g.utilization_percent), "utilization"


def _short(g: GpuReading, target_pct: float) -> float:
    """The unused share of a GPM reading's work (its SM activity, a mean over the interval
    before it) below the target, busy or not at the sample."""
    work, _basis = work_percent(g)
    return max(0.0, 1.0 - work / 100.0) if work is not None and work < target_pct else 0.0


def _unused(g: GpuReading, busy_pct: float, target_pct: float) -> Tuple[float, float, str]:
    """(idle share, underused share, basis) of one reading: idle when not busy (GPU-Util),
    underused by the unused share of its work (SM activity where GPM exists). A MIG GPU: its
    instances' shares weighted by their slices (gpucostd.cost.mig)."""
    if g.mig:
        return gpu_unused(g, busy_pct, target_pct)
    work, basis = work_percent(g)
    if not is_busy(g, busy_pct):
        return 1.0, 0.0, basis
    u = float(work or 0.0)
    if u < target_pct:
        return 0.0, max(0.0, 1.0 - u / 100.0), basis
    return 0.0, 0.0, basis


class _GpuBook:
    __slots__ = ("key", "index", "t", "energy", "power", "idle", "under", "totals", "source",
                 "power_now", "basis")

    def __init__(self, key: str, index: int):
        self.key = key
        self.index = index
        self.t: Optional[float] = None
        self.energy: Optional[float] = None
        self.power: Optional[float] = None
        self.idle = 0.0
        self.under = 0.0
        self.totals: Dict[str, float] = {k: 0.0 for k in TOTAL_KEYS}
        self.source = "none"            # "counter" | "power" | "none"
        self.power_now: Optional[float] = None
        self.basis: Optional[str] = None  # "sm_activity" | "utilization": what idle is priced on


class _Endpoint:
    __slots__ = ("url", "counter", "samples", "rate", "up", "error", "gpus", "parallel",
                 "server", "reading", "last_total", "instant", "instances")

    def __init__(self, url: str):
        self.url = url
        self.counter: Optional[str] = None
        self.samples: Deque[Tuple[float, float]] = deque()
        self.rate: Optional[float] = None
        self.up = False
        self.error: Optional[str] = None
        self.gpus: Optional[Tuple[int, ...]] = None
        self.parallel = "tensor"
        self.server: Optional[str] = None
        self.reading: Any = None
        self.last_total: Optional[float] = None
        self.instant: Optional[float] = None     # tokens/s over the latest interval
        self.instances: Optional[Tuple[str, ...]] = None   # the MIG instances it serves on


class EfficiencyBook:
    """Energy, idle capacity and endpoint tokens, integrated cycle by cycle. The loop owns it
    (through the accountant); not thread-safe."""

    def __init__(self):
        self.gpus: Dict[str, _GpuBook] = {}
        self.endpoints: Dict[str, _Endpoint] = {}
        self._window = SlidingSums(4)    # (mono, paid_s, idle_s, underused_s, energy_$)
        self.tokens_total = 0.0          # tokens counted from the endpoints' deltas
        # minute bucket -> GPU key -> HISTORY_KEYS values (24 h, for `gpucostd cost --since`)
        self.history: Dict[int, Dict[str, List[float]]] = {}
        self.last_cycle: Dict[str, Any] = {}
        self.mig = MigBook()             # each MIG instance's share (gpucostd.cost.mig)
        self._config: Any = None

    # ------------------------------------------------------------------ GPUs
    def update(self, present: Sequence[Tuple[GpuReading, str, float]], now: float,
               config: Any, wall: Optional[float] = None) -> None:
        """Fold one cycle of readings: (reading, track key, GPU-hour price) per GPU; `wall`
        (epoch seconds) files the interval in the minute history."""
        bucket = int(wall // BUCKET_SECONDS) if wall is not None else None
        cost = config.cost
        busy_pct = float(cost.busy_utilization_percent)
        target = float(config.efficiency.target_utilization_percent)
        usd_j = float(cost.energy_usd_per_kwh) * float(cost.pue) / 3.6e6
        d_paid = d_idle = d_under = d_usd = 0.0
        self._config = config
        for g, key, price in present:
            b = self.gpus.get(key)
            if b is None:
                b = self.gpus[key] = _GpuBook(key, g.index)
            b.index = g.index
            if g.state != GpuState.OK:
                b.power_now = None
                b.t = None          # an unreadable interval is not integrated
                self.mig.forget_gpu(g.index)
                continue
            power = g.power_draw_watts if _finite(g.power_draw_watts) else None
            energy = g.energy_joules if _finite(g.energy_joules) else None
            idle, under, b.basis = _unused(g, busy_pct, target)
            b.power_now = power
            joules = None
            if b.t is not None and now > b.t:
                dt = now - b.t
                joules = None
                if energy is not None and b.energy is not None and \
                        0.0 <= energy - b.energy <= MAX_WATTS * dt:
                    joules, b.source = energy - b.energy, "counter"
                elif power is not None and b.power is not None and dt <= MAX_SAMPLE_GAP_SECONDS:
                    joules, b.source = (power + b.power) / 2.0 * dt, "power"
                tot = b.totals
                if joules is not None:
                    tot["energy_joules"] += joules
                    tot["energy_dollars"] += joules * usd_j
                    d_usd += joules * usd_j
                i_s = u_s = 0.0
                if dt <= MAX_SAMPLE_GAP_SECONDS:
                    i_s = dt * (idle + b.idle) / 2.0
                    if b.basis == "sm_activity":
                        # GPM's reading is the mean over this very interval: its unused share
                        # counts when the interval began busy (after an idle sample the idle
                        # share counts the interval)
                        u_s = dt * _short(g, target) if not b.idle else 0.0
                    else:
                        u_s = dt * (under + b.under) / 2.0
                    tot["paid_seconds"] += dt
                    tot["idle_seconds"] += i_s
                    tot["underused_seconds"] += u_s
                    tot["idle_dollars"] += i_s * price / 3600.0
                    tot["underused_dollars"] += u_s * price / 3600.0
                    d_paid += dt
                    d_idle += i_s
                    d_under += u_s
                if bucket is not None and (joules or i_s or u_s):
                    h = self.history.setdefault(bucket, {}).setdefault(key, [0.0] * 6)
                    j = joules or 0.0
                    for n, v in enumerate((j, j * usd_j, i_s, i_s * price / 3600.0, u_s,
                                           u_s * price / 3600.0)):
                        h[n] += v
            self.mig.update_gpu(g, price, now, joules, power, config)
            b.t, b.energy, b.power, b.idle, b.under = now, energy, power, idle, under
        if bucket is not None:
            for old in [k for k in self.history if k < bucket - HISTORY_SECONDS // BUCKET_SECONDS]:
                del self.history[old]
        self._window.add(now, d_paid, d_idle, d_under, d_usd)
        self._window.expire(now - WINDOW_SECONDS)

    def idle_share(self) -> Optional[float]:
        """Unused share of paid GPU-time (idle + underused) over the window."""
        paid, idle, under, _usd = self._window.sums
        if paid <= 1e-9:                # none (a running sum may keep a rounding residue)
            return None
        return max(0.0, idle + under) / paid

    def idle_basis(self) -> Optional[str]:
        """What the idle and underused capacity of the GPUs read now is priced on:
        "sm_activity" (GPM), "utilization" (GPU-Util), "mixed", or None before any reading."""
        bases = {b.basis for b in self.gpus.values() if b.basis is not None and b.t is not None}
        if not bases:
            return None
        return bases.pop() if len(bases) == 1 else "mixed"

    def node_power(self) -> Optional[float]:
        watts = [b.power_now for b in self.gpus.values() if b.power_now is not None]
        return sum(watts) if watts else None

    # ------------------------------------------------------------------ tokens
    def update_tokens(self, readings: Sequence[Any], now: float) -> None:
        """Fold this cycle's endpoint readings (probes.inference.InferenceReading)."""
        seen = set()
        for r in readings:
            if r is None:
                continue
            url = getattr(r, "url", "") or ""
            seen.add(url)
            ep = self.endpoints.get(url)
            if ep is None:
                ep = self.endpoints[url] = _Endpoint(url)
            ep.reading = r
            ep.gpus = getattr(r, "gpus", None)
            ep.instances = getattr(r, "instances", None)
            ep.parallel = getattr(r, "parallel", "tensor")
            total = getattr(r, "tokens_total", None)
            if getattr(r, "error", None) or not _finite(total):
                # down: no tokens/s now (the last one is not current); the window is kept, so
                # tokens made meanwhile count once it answers with the same counter again
                ep.up, ep.rate = False, None
                ep.error = getattr(r, "error", None) or "no reading"
                continue
            total = float(total)
            counter = r.counter_id if hasattr(r, "counter_id") else url
            if ep.counter != counter:
                ep.samples.clear()           # another counter: never count its value
                ep.last_total = None
                ep.counter = counter
            elif ep.last_total is not None:
                delta = total - ep.last_total
                if delta < 0:                 # the server restarted: its counter from 0
                    ep.samples.clear()
                    delta = total
                self.tokens_total += delta
            ep.last_total = total
            ep.samples.append((now, total))
            while len(ep.samples) > 2 and ep.samples[0][0] < now - WINDOW_SECONDS:
                ep.samples.popleft()
            ep.up, ep.error = True, None
            ep.server = getattr(r, "server", None)
            ep.rate = ep.instant = None
            if len(ep.samples) >= 2 and ep.samples[-1][0] > ep.samples[0][0]:
                (t0, v0), (t1, v1) = ep.samples[0], ep.samples[-1]
                ep.rate = (v1 - v0) / (t1 - t0)
                (t0, v0), (t1, v1) = ep.samples[-2], ep.samples[-1]
                if t1 > t0:
                    ep.instant = (v1 - v0) / (t1 - t0)
        for url in [u for u in self.endpoints if u not in seen]:
            del self.endpoints[url]           # no longer configured

    def node_instant_rate(self) -> Optional[float]:
        rates = [ep.instant for ep in self.endpoints.values() if ep.up and ep.instant is not None]
        return sum(rates) if rates else None

    def node_rate(self) -> Optional[float]:
        rates = [ep.rate for ep in self.endpoints.values() if ep.up and ep.rate is not None]
        return sum(rates) if rates else None

    def gpu_rates(self, indexes: Sequence[int]) -> Dict[int, float]:
        """Each endpoint's tokens/s split evenly over its GPUs (all GPUs when it names none)."""
        out: Dict[int, float] = {}
        for ep in self.endpoints.values():
            if not ep.up or ep.rate is None:
                continue
            gpus = [i for i in (ep.gpus if ep.gpus is not None else indexes)]
            if not gpus:
                continue
            for i in gpus:
                out[i] = out.get(i, 0.0) + ep.rate / len(gpus)
        return out

    def tokens_lost(self, indexes: Sequence[int], lost: Mapping[int, Tuple[float, float]],
                    dt: float) -> float:
        """Modelled tokens lost over the latest interval (`lost`: GPU index -> (capacity
        lost seconds, loss depth) in it). A tensor-parallel group runs at its slowest GPU's
        pace, so that GPU's loss is the group's; data-parallel GPUs lose each their share."""
        total = 0.0
        for ep in self.endpoints.values():
            if not ep.up or not ep.rate:
                continue
            gpus = list(ep.gpus if ep.gpus is not None else indexes)
            if not gpus:
                continue
            parts = [lost.get(i, (0.0, 0.0)) for i in gpus]
            if ep.parallel == "tensor":
                cap, depth = max(parts, key=lambda p: p[0])
                if cap > 0:
                    total += ep.rate * cap / max(1e-9, 1.0 - min(depth, 0.99))
            else:
                for cap, depth in parts:
                    if cap > 0:
                        total += ep.rate / len(gpus) * cap / max(1e-9, 1.0 - min(depth, 0.99))
        return total

    def endpoints_json(self) -> List[Dict[str, Any]]:
        out = []
        for ep in self.endpoints.values():
            r = ep.reading
            out.append({"url": ep.url, "server": ep.server, "up": ep.up, "error": ep.error,
                        "gpus": list(ep.gpus) if ep.gpus is not None else None,
                        "parallel": ep.parallel, "tokens_per_second": _r(ep.rate),
                        **self._instance_cost(ep),
                        "requests_running": getattr(r, "requests_running", None),
                        "requests_waiting": getattr(r, "requests_waiting", None),
                        "kv_cache_usage": getattr(r, "kv_cache_usage", None),
                        "preemptions_total": getattr(r, "preemptions_total", None)})
        return out

    def _instance_cost(self, ep: _Endpoint) -> Dict[str, Any]:
        """An endpoint on MIG instances: its instances, priced at their shares of their GPUs'
        hours (plus their estimated energy), and its tokens per dollar at that price."""
        if ep.instances is None:
            return {}
        costs = [self.mig.cost_per_hour(k, self._config) for k in ep.instances]
        per_hour = sum(c for c in costs if c is not None) if self._config is not None and \
            any(c is not None for c in costs) else None
        tpd = ep.rate * 3600.0 / per_hour if ep.up and ep.rate is not None and per_hour else None
        return {"instances": list(ep.instances), "cost_dollars_per_hour": _r(per_hour),
                "tokens_per_dollar": _r(tpd) if tpd is None or math.isfinite(tpd) else None}

    def mig_json(self, entries: Optional[List[Dict[str, Any]]] = None
                 ) -> List[Dict[str, Any]]:
        """Every MIG instance's cost and tokens (gpucostd.cost.mig.MigBook.to_json); with
        `entries` (this cycle's, made before the endpoints were read), their tokens only."""
        if not self.mig.instances or self._config is None:
            return []
        if entries is not None:
            self.mig.add_tokens(entries, list(self.endpoints.values()), self._config)
            return entries
        return self.mig.to_json(list(self.endpoints.values()), self._config)

    # ------------------------------------------------------------------ node figures
    def node_figures(self, gpu_dollars_per_hour: float, config: Any) -> Dict[str, Any]:
        """Node cost per hour with energy, tokens per dollar, $ per million tokens, tokens per
        joule, idle share, and the floor (for the report)."""
        cost = config.cost
        power = self.node_power()
        energy_h = 0.0
        if power is not None:
            energy_h = power / 1000.0 * float(cost.pue) * float(cost.energy_usd_per_kwh)
        per_hour = gpu_dollars_per_hour + energy_h
        rate = self.node_rate()
        tpd = rate * 3600.0 / per_hour if rate is not None and per_hour > 0 else None
        if tpd is not None and not math.isfinite(tpd):
            tpd = None
        return {
            "tokens_per_second": rate,
            "cost_dollars_per_hour": per_hour,
            "energy_dollars_per_hour": energy_h,
            "power_watts": power,
            "tokens_per_dollar": tpd,
            "cost_per_million_tokens": (per_hour / (rate * 3600.0) * 1e6
                                        if rate and per_hour > 0 else None),
            "tokens_per_joule": rate / power if rate is not None and power else None,
            "idle_ratio": self.idle_share(),
            "idle_basis": self.idle_basis(),
            "min_tokens_per_dollar": float(config.efficiency.min_tokens_per_dollar) or None,
        }

    # ------------------------------------------------------------------ persistence
    def state(self) -> Dict[str, Any]:
        return {"gpus": {k: {"index": b.index, **{t: round(v, 6) for t, v in b.totals.items()}}
                         for k, b in sorted(self.gpus.items())},
                "tokens_total": round(self.tokens_total, 3),
                **({"mig": self.mig.state()} if self.mig.instances else {}),
                "history": {str(b): {k: [round(x, 6) for x in v] for k, v in per.items()}
                            for b, per in sorted(list(self.history.items()))}}

    def load(self, data: Any) -> None:
        """The saved totals; ValueError when malformed."""
        if not data:
            return
        if not isinstance(data, dict):
            raise ValueError("efficiency totals are not a table")
        tokens = data.get("tokens_total", 0.0)
        if not _finite(tokens):
            raise ValueError("efficiency tokens_total is not a number")
        self.tokens_total = float(tokens)
        if not 0.0 <= self.tokens_total <= MAX_TOKEN_COUNT:
            import logging
            logging.getLogger("gpucostd").warning(
                "cost state: the saved tokens_total %.3g is beyond any plausible count (at most "
                "%.0e); the token total starts from zero", self.tokens_total, MAX_TOKEN_COUNT)
            self.tokens_total = 0.0
        for key, g in (data.get("gpus") or {}).items():
            b = _GpuBook(str(key), int(g.get("index", 0)))
            for t in TOTAL_KEYS:
                v = g.get(t, 0.0)
                if not _finite(v):
                    raise ValueError(f"efficiency {key} {t} = {v!r} is not a number")
                b.totals[t] = float(v)
            self.gpus[str(key)] = b
        self.mig.load(data.get("mig"))
        for bucket, per in (data.get("history") or {}).items():
            self.history[int(bucket)] = {str(k): _six(v, f"efficiency history {bucket} {k}")
                                         for k, v in per.items()}

    def gpu_json(self, key: str) -> Optional[Dict[str, Any]]:
        b = self.gpus.get(key)
        if b is None:
            return None
        tot = b.totals
        return {"energy_joules": _r(tot["energy_joules"], 3),
                "energy_dollars": _r(tot["energy_dollars"]),
                "energy_source": b.source, "idle_basis": b.basis,
                "paid_seconds": _r(tot["paid_seconds"], 3),
                "idle_seconds": _r(tot["idle_seconds"], 3),
                "idle_dollars": _r(tot["idle_dollars"]),
                "underused_seconds": _r(tot["underused_seconds"], 3),
                "underused_dollars": _r(tot["underused_dollars"]),
                "idle_ratio": (_r((tot["idle_seconds"] + tot["underused_seconds"])
                                  / tot["paid_seconds"]) if tot["paid_seconds"] > 0 else None)}


def floor_step(state: Dict[str, Any], tokens_per_dollar: Optional[float], floor: float,
               window: float, now: float) -> Optional[str]:
    """The floor's state machine, one cycle. `state` holds below_since, above_since and
    inefficient (persisting across cycles). Returns "inefficient" when the node has been below
    the floor for the whole window (once), "efficient" when a node that was inefficient has
    been at or above it for the window again, else None. An unknown tokens per dollar (no
    endpoint answering) breaks both streaks: it proves neither."""
    if floor <= 0 or tokens_per_dollar is None or not math.isfinite(tokens_per_dollar):
        state["below_since"] = state["above_since"] = None
        if floor <= 0:
            state["inefficient"] = False
        return None
    if tokens_per_dollar < floor:
        state["above_since"] = None
        if state.get("below_since") is None:
            state["below_since"] = now
        if not state.get("inefficient") and now - state["below_since"] >= window:
            state["inefficient"] = True
            return "inefficient"
        return None
    state["below_since"] = None
    if state.get("inefficient"):
        if state.get("above_since") is None:
            state["above_since"] = now
        if now - state["above_since"] >= window:
            state["inefficient"] = False
            state["above_since"] = None
            return "efficient"
    return None


def _six(v: Any, where: str) -> List[float]:
    if not isinstance(v, list) or len(v) != 6 or not all(_finite(x) for x in v):
        raise ValueError(f"{where}: {str(v)[:60]} is not six non-negative numbers")
    return [float(x) for x in v]


def rebase_history(step: float, *histories: Dict[int, Any]) -> int:
    """The wall clock was stepped by `step` seconds: move every minute bucket with it, so the
    history stays in the clock's new frame (kept, and the last hour is still the last hour).
    Returns the minutes moved."""
    minutes = int(round(step / BUCKET_SECONDS))
    if minutes:
        for history in histories:
            moved = {b + minutes: per for b, per in history.items()}
            history.clear()
            history.update(moved)
    return minutes


def history_totals(history: Mapping[Any, Mapping[str, Sequence[float]]],
                   first_bucket: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """GPU key -> HISTORY_KEYS sums over the buckets from `first_bucket` on (all when None)."""
    out: Dict[str, Dict[str, float]] = {}
    for b, per in history.items():
        if first_bucket is not None and int(b) < first_bucket:
            continue
        for key, v in per.items():
            d = out.setdefault(key, {k: 0.0 for k in HISTORY_KEYS})
            for k, x in zip(HISTORY_KEYS, v):
                d[k] += float(x)
    return out
