"""The throughput cost of throttling: capacity, dollars and tokens lost, per GPU and per node.

Pure accounting: readings in, a CostReport out. No hardware access; the only I/O is the small
state file ``state_dir/cost.json`` that carries the totals and the 24-hour history across
restarts. The model and its assumptions are documented in docs/cost.md; in one breath:

- reference clock = application SM clock when one is set, else the max SM clock;
- busy = utilization >= ``[cost] busy_utilization_percent`` and GpuIdle not active;
- loss ratio = 1 - sm_clock / reference while busy and at least one THROTTLE_REASONS reason is
  active, else 0;
- capacity lost = integral of the loss ratio over time, split equally among the active reasons;
  violation counters (where supported) give the throttled time, the sampled clock the depth;
  without counters the samples are integrated with the trapezoid rule;
- dollars = price per GPU-hour / 3600 x capacity-lost seconds, accumulated interval by
  interval with the price in force during that interval;
- effective cost multiplier = 1 / (1 - loss ratio).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time as _time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from gpucostd.snapshot import GpuReading, GpuState, THROTTLE_REASONS, VIOLATION_REASONS
from gpucostd.statefile import write_atomic

LOG = logging.getLogger("gpucostd.cost")

STATE_FILE = "cost.json"
STATE_VERSION = 1
BUCKET_SECONDS = 60            # history granularity
HISTORY_SECONDS = 86400        # history kept (24 h)
RATE_WINDOW_SECONDS = 300.0    # window of the node's throttle $/h and loss fraction
TOKEN_WINDOW_SECONDS = 300.0   # window of tokens per second
SAVE_EVERY_SECONDS = 5.0       # real seconds between state-file writes
HISTORY_SAVE_EVERY_SECONDS = 60.0   # real seconds between re-serializations of the history
MAX_SAMPLE_GAP_SECONDS = 120.0  # sampled (counter-less) integration skips longer gaps
MAX_LOSS_FOR_MULTIPLIER = 0.99
FIT_EVERY_SECONDS = 15.0       # the tokens-vs-clock fit is recomputed this often
LATENCY_NOTE = ("an under-loaded GPU pays for throttling in latency rather than throughput; "
                "only busy time counts here.")

# reason order for stable output
_REASON_ORDER = {r: i for i, r in enumerate(THROTTLE_REASONS)}
_COUNTER_GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = tuple(
    (k, v) for k, v in VIOLATION_REASONS.items() if v)


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

    def to_json(self) -> Dict[str, Any]:
        return {"tokens_per_second": _r(self.tokens_per_second),
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
            },
            "gpus": [g.to_json() for g in self.gpus],
            "notes": list(self.notes) + [LATENCY_NOTE[0].upper() + LATENCY_NOTE[1:]],
        }
        if history and self._history is not None:
            out["history"] = _history_json(self._history)
        return out


# =========================================================================== small helpers
def _finite(x: Any) -> bool:
    """A usable non-negative number (not NaN, an infinity, a negative value or a string)."""
    return isinstance(x, (int, float)) and 0.0 <= x < math.inf


def _counters(v: Optional[Mapping[str, Any]]) -> Optional[Dict[str, float]]:
    """Violation counters with unusable values dropped (that counter falls back to sampling
    for the interval instead of poisoning the totals)."""
    if not v:
        return None
    return {k: float(x) for k, x in v.items()
            if isinstance(x, (int, float)) and 0.0 <= x < math.inf} or None


def _r(x: Optional[float], nd: int = 6) -> Optional[float]:
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return round(float(x), nd)


def _sorted_reasons(d: Mapping[str, Any]):
    return sorted(d.items(), key=lambda kv: (_REASON_ORDER.get(kv[0], 99), kv[0]))


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


def reference_clock(g: GpuReading) -> Optional[float]:
    """The clock a busy GPU would run at: the application clock when set, else the max."""
    if g.app_sm_clock_mhz:
        return float(g.app_sm_clock_mhz)
    if g.sm_clock_max_mhz:
        return float(g.sm_clock_max_mhz)
    return None


def is_busy(g: GpuReading, busy_percent: float) -> bool:
    """Busy = utilization at or above the threshold and GpuIdle not active. Unknown
    utilization counts as not busy (we do not claim a loss we cannot show)."""
    reasons = g.clock_event_reasons or ()
    if "GpuIdle" in reasons:
        return False
    if g.utilization_percent is None:
        return False
    return g.utilization_percent >= busy_percent


def active_throttle_reasons(g: GpuReading) -> Tuple[str, ...]:
    reasons = g.clock_event_reasons or ()
    return tuple(r for r in THROTTLE_REASONS if r in reasons)


def loss_ratio(g: GpuReading, busy_percent: float, reference: Optional[float] = None
               ) -> Optional[float]:
    """Throughput-loss ratio now: 1 - sm/reference while busy and throttled, else 0.
    None when the GPU gave no usable reading."""
    if g.state != GpuState.OK:
        return None
    if not is_busy(g, busy_percent) or not active_throttle_reasons(g):
        return 0.0
    ref = reference if reference is not None else reference_clock(g)
    if ref is None or g.sm_clock_mhz is None:
        return None
    return min(1.0, max(0.0, 1.0 - float(g.sm_clock_mhz) / ref))


def cost_multiplier(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    return 1.0 / (1.0 - min(loss, MAX_LOSS_FOR_MULTIPLIER))


# =========================================================================== integration
class _Sample:
    __slots__ = ("t", "loss", "busy", "reasons", "counters")

    def __init__(self, t: float, loss: float, busy: bool, reasons: frozenset,
                 counters: Optional[Mapping[str, float]]):
        self.t = t
        self.loss = loss
        self.busy = busy
        self.reasons = reasons
        self.counters = counters


def integrate(dt: float, s0: _Sample, s1: _Sample, carry: Dict[str, float],
              last_depth: float, last_group_reason: Dict[str, str]
              ) -> Tuple[Dict[str, List[float]], float, str]:
    """Capacity lost and throttled time per reason over one interval between two samples.

    Returns ({reason: [throttled_seconds, capacity_lost_seconds]}, depth, source).

    Units of throttled time: each violation counter supported on both samples is one unit
    (its delta is the exact throttled time of its reasons); every other throttle reason is a
    unit of its own with trapezoid time dt x (active at start + active at end) / 2. Units
    active in the same interval are assumed nested (the shorter inside the longer), which is
    exact whenever at most one of them starts or ends between two samples. Over each nested
    segment the loss is split equally among the reasons active in it. The depth (loss ratio
    while throttled) comes from the samples that show a throttle reason; when none does
    (a blip between samples seen only by a counter) the last throttled depth is used.
    """
    units: List[Tuple[float, Dict[str, float], frozenset]] = []   # (time, weights, members)
    covered = set()
    used_counters = False
    c0, c1 = s0.counters, s1.counters
    if c0 and c1:
        for key, group in _COUNTER_GROUPS:
            v0, v1 = c0.get(key), c1.get(key)
            if v0 is None or v1 is None:
                continue
            used_counters = True
            covered.update(group)
            delta = v1 - v0
            if delta < 0:
                # the counter restarted (GPU reset) inside the interval: rebase on zero. Its
                # value is the throttled time since the reset; the part of the interval before
                # the reset is unknown and not counted (the GPU may have been lost meanwhile).
                # Never negative, never counted twice.
                delta = max(0.0, min(v1, dt))
                carry.pop(key, None)
            delta += carry.pop(key, 0.0)
            if delta > dt:                 # counter read jitter: keep the excess for later
                carry[key] = min(delta - dt, dt)
                delta = dt
            if delta <= 1e-12:
                continue
            weights = {}
            for r in group:
                w = (r in s0.reasons) + (r in s1.reasons)
                if w:
                    weights[r] = float(w)
            if not weights:
                weights = {last_group_reason.get(key, group[0]): 1.0}
            units.append((delta, weights, frozenset(group)))
    sampled = dt <= MAX_SAMPLE_GAP_SECONDS
    any_sampled = False
    for r in THROTTLE_REASONS:
        if r in covered:
            continue
        a = (r in s0.reasons) + (r in s1.reasons)
        if a:
            any_sampled = True
            if sampled:
                units.append((dt * a / 2.0, {r: 1.0}, frozenset((r,))))
    source = ("mixed" if any_sampled else "counters") if used_counters else "sampled"
    if not units:
        return {}, last_depth, source

    th0, th1 = bool(s0.reasons), bool(s1.reasons)
    if th0 and th1:
        depth = (s0.loss + s1.loss) / 2.0
    elif th0:
        depth = s0.loss
    elif th1:
        depth = s1.loss
    else:
        depth = last_depth if (s0.busy or s1.busy) else 0.0

    out: Dict[str, List[float]] = {}
    for t_u, weights, _members in units:
        wmax = max(weights.values())
        for r, w in weights.items():
            out.setdefault(r, [0.0, 0.0])[0] += t_u * w / wmax
    if depth > 0.0 or s0.loss > 0.0 or s1.loss > 0.0:
        units.sort(key=lambda u: -u[0])
        ns = [sum(w.values()) / max(w.values()) for _, w, _m in units]
        # which units each sample shows: a nested segment whose set of active units matches
        # a sample takes that sample's depth (the clock while exactly those reasons were on)
        shown = [frozenset(i for i, u in enumerate(units) if u[2] & s.reasons)
                 for s in (s0, s1)]
        k = len(units)
        for j in range(k):
            seg = units[j][0] - (units[j + 1][0] if j + 1 < k else 0.0)
            if seg <= 0:
                continue
            active = frozenset(range(j + 1))
            match = [s.loss for s, sh in zip((s0, s1), shown) if sh == active]
            d = sum(match) / len(match) if match else depth
            if d <= 0.0:
                continue
            n_total = sum(ns[: j + 1])
            for u in range(j + 1):
                share = d * seg * ns[u] / n_total
                weights = units[u][1]
                wsum = sum(weights.values())
                for r, w in weights.items():
                    out[r][1] += share * w / wsum
    return out, depth, source


class _GpuTrack:
    __slots__ = ("key", "index", "uuid", "name", "prev", "totals", "carry", "last_depth",
                 "last_group_reason", "source", "price_changes", "last_capacity",
                 "last_depth_interval", "loss_now", "app_exceeded")

    def __init__(self, key: str, index: int, uuid: Optional[str], name: Optional[str]):
        self.key = key
        self.index = index
        self.uuid = uuid
        self.name = name
        self.prev: Optional[_Sample] = None
        self.totals: Dict[str, List[float]] = {}   # reason -> [throttled, capacity, dollars]
        self.carry: Dict[str, float] = {}
        self.last_depth = 0.0
        self.last_group_reason: Dict[str, str] = {}
        self.source = "none"
        # reloads since the last sample: (monotonic time, price per hour in force before it)
        self.price_changes: List[Tuple[float, float]] = []
        self.last_capacity = 0.0             # capacity lost in the latest interval
        self.last_depth_interval = 0.0
        self.loss_now: Optional[float] = None
        self.app_exceeded: Optional[float] = None   # an app clock this GPU ran above


def _interval_price(t0: float, t1: float, changes: Sequence[Tuple[float, float]],
                    price: float) -> float:
    """The mean price per hour over [t0, t1] when the price changed at reloads inside it
    (`changes`: (time, price before it), in time order; `price`: the price now)."""
    acc, start = 0.0, t0
    for t_c, before in changes:
        t_c = min(max(t_c, start), t1)
        acc += before * (t_c - start)
        start = t_c
    return (acc + price * (t1 - start)) / (t1 - t0)


def _gpu_key(g: GpuReading) -> str:
    return g.uuid if g.uuid else f"index:{g.index}"


def _acc_bucket(into: Dict[str, Dict[str, List[float]]],
                per_gpu: Mapping[str, Mapping[str, List[float]]], sign: float) -> None:
    for key, per_reason in per_gpu.items():
        d = into.get(key)
        if d is None:
            d = into[key] = {}
        for r, v in per_reason.items():
            a = d.get(r)
            if a is None:
                a = d[r] = [0.0, 0.0, 0.0]
            for i in (0, 1, 2):
                x = a[i] + sign * v[i]
                a[i] = x if x > 1e-9 else 0.0     # no float dust below zero


def _compact_history(history: Mapping[int, Mapping[str, Mapping[str, List[float]]]]
                     ) -> Dict[str, Any]:
    """{bucket: {gpu: {reason: [thr, cap, usd]}}} -> compact rows for the state file."""
    keys: Dict[str, int] = {}
    reasons: Dict[str, int] = {}
    rows = []
    for b in sorted(history):
        for key, per_reason in history[b].items():
            ki = keys.setdefault(key, len(keys))
            for r, v in per_reason.items():
                ri = reasons.setdefault(r, len(reasons))
                rows.append([b, ki, ri, round(v[0], 6), round(v[1], 6), round(v[2], 9)])
    return {"bucket_seconds": BUCKET_SECONDS, "keys": list(keys), "reasons": list(reasons),
            "rows": rows}


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


# =========================================================================== accountant
class CostAccountant:
    """Accumulates throttle cost cycle by cycle. Not thread-safe: the loop owns it."""

    def __init__(self, config, state_dir: Optional[str], clock=None,
                 save_every_seconds: float = SAVE_EVERY_SECONDS):
        self.config = config
        self.state_dir = state_dir
        self.clock = clock
        self.save_every_seconds = save_every_seconds
        self._tracks: Dict[str, _GpuTrack] = {}
        self._by_index: Dict[int, str] = {}
        self._cycle_ok: List[_GpuTrack] = []   # tracks with an OK reading in the latest cycle
        self._history: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
        self._rate: Deque[Tuple[float, float, float]] = deque()   # (mono, dollars, capacity)
        self._tokens = TokenCost()
        self._token_samples: Deque[Tuple[float, float]] = deque()   # (mono, tokens_total)
        self._token_clock: Deque[Tuple[float, float, float]] = deque()  # (mono, tok/s, clock)
        self._last_token_mono: Optional[float] = None
        self._fit_at = -1e18
        self._last_report: Optional[CostReport] = None
        self._notes: List[str] = []
        self._dirty = False
        self._last_save = -1e18
        self._history_json: Optional[str] = None
        self._history_saved_at = -1e18
        self._window_cache: Optional[Tuple[int, Dict[str, Any]]] = None
        self._totals_since: Optional[float] = None
        self._no_save = False         # set when a bad state file could not be moved aside
        self._load()

    # ------------------------------------------------------------------ config
    def reconfigure(self, config) -> None:
        """A reloaded config. Cost already accumulated keeps its price; intervals after the
        reload use the new one (an interval spanning the reload is split at the reload)."""
        if self.clock is not None:
            now = self.clock.monotonic()
            for tr in self._tracks.values():
                if tr.prev is not None:      # an interval from prev will span the reload
                    tr.price_changes.append((now, self._price(tr.name)))
        self.config = config

    def _price(self, name: Optional[str]) -> float:
        try:
            price = float(self.config.price_for_model(name))
        except Exception:   # noqa: BLE001 - a bad price never breaks accounting
            return 0.0
        return price if _finite(price) else 0.0

    @property
    def currency(self) -> str:
        return str(getattr(self.config.cost, "currency", "USD"))

    # ------------------------------------------------------------------ the cycle
    @staticmethod
    def _reference(g: GpuReading, tr: "_GpuTrack") -> Optional[float]:
        """The application clock is the reference only while it caps the GPU: NVML reports
        the (default) application clock even when none was set, and a GPU seen running above
        it is not capped by it, so its max clock stays the reference."""
        app, mx, sm = g.app_sm_clock_mhz, g.sm_clock_max_mhz, g.sm_clock_mhz
        if app and mx and app < mx:
            if sm is not None and sm > app + 1.0:
                tr.app_exceeded = app
            if tr.app_exceeded == app:
                return float(mx)
        return reference_clock(g)

    def update(self, gpus: Sequence[GpuReading], now_mono: float, inference=None) -> CostReport:
        now_wall = self.clock.time() if self.clock is not None else _time.time()
        busy_pct = float(self.config.cost.busy_utilization_percent)
        node_dollars = 0.0
        node_capacity = 0.0
        bucket = int(now_wall // BUCKET_SECONDS)
        hist = self._history.get(bucket)
        present = []
        cycle_ok = self._cycle_ok = []
        used = {g.uuid for g in gpus if g.uuid}
        for g in gpus:
            # a GPU that lost its identity (LOST/UNKNOWN readings carry no uuid) stays the
            # GPU last seen at its index, unless that GPU is read elsewhere in this cycle
            # (re-enumerated): then it is only "the GPU at this index"
            key = g.uuid
            if not key:
                key = self._by_index.get(g.index)
                if key is None or key in used:
                    key = _gpu_key(g)
                used.add(key)
            self._by_index[g.index] = key
            tr = self._tracks.get(key)
            if tr is None:
                tr = self._tracks[key] = _GpuTrack(key, g.index, g.uuid, g.name)
            tr.index = g.index
            if g.name:
                tr.name = g.name
            price = self._price(g.name or tr.name)
            present.append((g, tr, price))
            tr.last_capacity = 0.0
            tr.loss_now = None
            if g.state != GpuState.OK:
                continue
            cycle_ok.append(tr)
            reasons = active_throttle_reasons(g)
            busy = is_busy(g, busy_pct)
            loss = loss_ratio(g, busy_pct, self._reference(g, tr))
            tr.loss_now = loss
            counters = _counters(g.violation_seconds)
            s1 = _Sample(now_mono, loss or 0.0, busy, frozenset(reasons), counters)
            s0 = tr.prev
            tr.prev = s1
            if s0 is not None and now_mono > s0.t:
                dt = now_mono - s0.t
                per, depth, tr.source = integrate(dt, s0, s1, tr.carry, tr.last_depth,
                                                  tr.last_group_reason)
                # the price in force: split the interval at reloads inside it
                p = price
                if tr.price_changes:
                    p = _interval_price(s0.t, now_mono, tr.price_changes, price)
                if per:
                    if hist is None:
                        hist = self._history[bucket] = {}
                    hg = hist.get(key)
                    if hg is None:
                        hg = hist[key] = {}
                    cap_sum = 0.0
                    for r, (thr, cap) in per.items():
                        usd = cap * p / 3600.0
                        tot = tr.totals.get(r)
                        if tot is None:
                            tot = tr.totals[r] = [0.0, 0.0, 0.0]
                        tot[0] += thr
                        tot[1] += cap
                        tot[2] += usd
                        h = hg.get(r)
                        if h is None:
                            h = hg[r] = [0.0, 0.0, 0.0]
                        h[0] += thr
                        h[1] += cap
                        h[2] += usd
                        node_dollars += usd
                        node_capacity += cap
                        cap_sum += cap
                    tr.last_capacity = cap_sum
                    tr.last_depth_interval = depth
                    self._dirty = True
            if s1.reasons and s1.loss > 0:
                tr.last_depth = s1.loss
            for key_g, group in _COUNTER_GROUPS:
                for r in group:
                    if r in s1.reasons:
                        tr.last_group_reason[key_g] = r
                        break
            tr.price_changes.clear()
        if self._totals_since is None and present:
            self._totals_since = now_wall
        self._rate.append((now_mono, node_dollars, node_capacity))
        while self._rate and self._rate[0][0] < now_mono - RATE_WINDOW_SECONDS:
            self._rate.popleft()
        report = self._report(present, now_wall, now_mono, bucket)
        self._last_report = report
        if inference is not None:
            self.update_tokens(inference, now_mono)
        self._maybe_save()
        return report

    # ------------------------------------------------------------------ report
    def _windows(self, bucket: int) -> Dict[str, Any]:
        """Sums of the completed buckets inside the last hour / 24 h, per GPU and reason.
        Kept incrementally: when the minute changes, the buckets that completed are added and
        the ones that left a window subtracted (a full recount only after a long gap). The
        current bucket is added at report time."""
        cache = self._window_cache
        if cache is not None and cache[0] == bucket:
            return cache[1]
        hour_n = 3600 // BUCKET_SECONDS
        day_n = HISTORY_SECONDS // BUCKET_SECONDS
        if cache is None or bucket < cache[0] or bucket - cache[0] > hour_n:
            self._prune(bucket)
            sums = {"hour": {}, "day": {}}
            for b, per_gpu in self._history.items():
                if b < bucket:
                    if b > bucket - hour_n:
                        _acc_bucket(sums["hour"], per_gpu, 1.0)
                    if b > bucket - day_n:
                        _acc_bucket(sums["day"], per_gpu, 1.0)
        else:
            prev, sums = cache
            for b in range(prev, bucket):            # buckets that completed
                per_gpu = self._history.get(b)
                if per_gpu:
                    if b > bucket - hour_n:
                        _acc_bucket(sums["hour"], per_gpu, 1.0)
                    if b > bucket - day_n:
                        _acc_bucket(sums["day"], per_gpu, 1.0)
            for b in range(prev - hour_n + 1, min(prev, bucket - hour_n + 1)):   # left 1 h
                per_gpu = self._history.get(b)
                if per_gpu:
                    _acc_bucket(sums["hour"], per_gpu, -1.0)
            for b in range(prev - day_n + 1, min(prev, bucket - day_n + 1)):     # left 24 h
                per_gpu = self._history.get(b)
                if per_gpu:
                    _acc_bucket(sums["day"], per_gpu, -1.0)
            self._prune(bucket)
        self._window_cache = (bucket, sums)
        return sums

    def _prune(self, bucket: int) -> None:
        oldest = bucket - (HISTORY_SECONDS // BUCKET_SECONDS)
        for b in [b for b in self._history if b < oldest]:
            del self._history[b]

    def _window_for(self, key: str, done: Mapping[str, Dict[str, List[float]]],
                    current: Optional[Mapping[str, Dict[str, List[float]]]],
                    seconds: float) -> WindowCost:
        w = WindowCost(seconds)
        for src in (done.get(key), (current or {}).get(key)):
            if not src:
                continue
            for r, v in src.items():
                c = w.by_reason.get(r)
                if c is None:
                    c = w.by_reason[r] = ReasonCost()
                c.throttled_seconds += v[0]
                c.capacity_lost_seconds += v[1]
                c.dollars += v[2]
        return _finish_window(w)

    def _report(self, present, now_wall: float, now_mono: float, bucket: int) -> CostReport:
        busy_pct = float(self.config.cost.busy_utilization_percent)
        windows = self._windows(bucket)
        current = self._history.get(bucket)
        gpus_out: List[GpuCost] = []
        node_price = 0.0
        node_hour = WindowCost(3600.0)
        node_day = WindowCost(float(HISTORY_SECONDS))
        for g, tr, price in sorted(present, key=lambda x: x[0].index):
            node_price += price
            loss = tr.loss_now if g.state == GpuState.OK else None
            busy = is_busy(g, busy_pct) if g.state == GpuState.OK else None
            hour = self._window_for(tr.key, windows["hour"], current, 3600.0)
            day = self._window_for(tr.key, windows["day"], current, float(HISTORY_SECONDS))
            _add_reasons(node_hour.by_reason, hour.by_reason)
            _add_reasons(node_day.by_reason, day.by_reason)
            gpus_out.append(GpuCost(
                index=g.index, uuid=g.uuid or tr.uuid, name=g.name or tr.name,
                price_per_hour=price,
                busy=busy, loss_ratio=loss, effective_cost_multiplier=cost_multiplier(loss),
                active_reasons=active_throttle_reasons(g) if g.state == GpuState.OK else (),
                source=tr.source,
                reasons={r: ReasonCost(*v) for r, v in _sorted_reasons(tr.totals)},
                last_hour=hour, last_24h=day))
        _finish_window(node_hour)
        _finish_window(node_day)
        # node rates over the last 5 minutes (or since start when younger)
        span = RATE_WINDOW_SECONDS
        if self._rate:
            span = min(RATE_WINDOW_SECONDS, max(0.0, now_mono - self._rate[0][0]))
        usd = sum(x[1] for x in self._rate)
        cap = sum(x[2] for x in self._rate)
        per_hour = usd * 3600.0 / span if span > 0 else 0.0
        node_loss = (cap / (span * len(present))) if span > 0 and present else None
        tokens = self._tokens if self._token_samples or self._tokens.tokens_lost_total else None
        return CostReport(now_wall, now_mono, self.currency, tuple(gpus_out), node_price,
                          per_hour, node_loss, node_hour, node_day, tokens,
                          tuple(self._notes), self._history, self._totals_since)

    # ------------------------------------------------------------------ tokens
    def update_tokens(self, reading, now_mono: Optional[float] = None) -> Optional[CostReport]:
        """Fold one inference-server reading (probes.inference.InferenceReading) into the
        latest report: tokens/s over the window, tokens per dollar, cost per million tokens,
        tokens lost (modelled: tokens/s x loss/(1-loss) integrated over the interval)."""
        if reading is None or getattr(reading, "error", None):
            return self._last_report
        total = getattr(reading, "tokens_total", None)
        if total is None:
            return self._last_report
        try:
            total = float(total)
        except (TypeError, ValueError):
            return self._last_report
        if not _finite(total):
            return self._last_report
        if now_mono is None:
            now_mono = self.clock.monotonic() if self.clock is not None else _time.monotonic()
        samples = self._token_samples
        if samples and total < samples[-1][1]:      # the server restarted: start over
            samples.clear()
        samples.append((now_mono, total))
        while len(samples) > 2 and samples[0][0] < now_mono - TOKEN_WINDOW_SECONDS:
            samples.popleft()
        tk = self._tokens
        tk.tokens_total = total
        rate = None
        if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
            rate = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
        tk.tokens_per_second = rate
        report = self._last_report
        node_price = report.node_dollars_per_hour if report is not None else 0.0
        if rate is not None and rate > 0 and node_price > 0:
            tk.tokens_per_dollar = rate * 3600.0 / node_price
            tk.cost_per_million_tokens = node_price / (rate * 3600.0) * 1e6
        else:
            tk.tokens_per_dollar = None
            tk.cost_per_million_tokens = None
        # only GPUs read in the latest cycle: a GPU lost or gone makes no tokens and loses none
        busy = [t for t in self._cycle_ok if t.prev is not None and t.prev.busy]
        # modelled tokens lost over the latest interval: each busy GPU makes rate/N tokens/s;
        # at loss L it would have made rate/N x 1/(1-L), so it lost rate/N x L/(1-L).
        if rate is not None and rate > 0 and self._last_token_mono != now_mono:
            n = max(1, len(busy))
            lost = 0.0
            for t in self._cycle_ok:
                if t.last_capacity > 0:
                    d = min(t.last_depth_interval, MAX_LOSS_FOR_MULTIPLIER)
                    lost += rate / n * t.last_capacity / (1.0 - d)
            if lost:
                tk.tokens_lost_total += lost
                self._dirty = True
        self._last_token_mono = now_mono
        # beyond the model: how tokens/s responds to the SM clock (mean over busy GPUs)
        if rate is not None and busy:
            mean_loss = sum(t.prev.loss for t in busy) / len(busy)
            (t0, v0), (t1, v1) = samples[-2], samples[-1]
            if t1 > t0:
                self._token_clock.append((now_mono, (v1 - v0) / (t1 - t0), 1.0 - mean_loss))
                while self._token_clock and self._token_clock[0][0] < now_mono - 3600.0:
                    self._token_clock.popleft()
                if now_mono - self._fit_at >= FIT_EVERY_SECONDS or tk.measured is None:
                    self._fit_at = now_mono
                    tk.measured = fit_tokens_vs_clock(list(self._token_clock), mean_loss)
                m = tk.measured
                if m and m.get("usable") and m.get("slope_tokens_per_second"):
                    # measured tokens lost over the latest interval, by the fit's slope
                    tk.measured_tokens_lost_total += max(
                        0.0, m["slope_tokens_per_second"] * mean_loss * (t1 - t0))
        if report is not None:
            report.tokens = tk
        return report

    # ------------------------------------------------------------------ persistence
    def _state_path(self) -> Optional[str]:
        return os.path.join(self.state_dir, STATE_FILE) if self.state_dir else None

    def _load(self) -> None:
        path = self._state_path()
        if not path or not os.path.exists(path):
            return
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            for key, g in (data.get("gpus") or {}).items():
                tr = _GpuTrack(key, int(g.get("index", 0)), g.get("uuid"), g.get("name"))
                for r, v in (g.get("reasons") or {}).items():
                    tr.totals[str(r)] = _triple(v, f"GPU {key} {r}")
                self._tracks[key] = tr
            self._history.update(_expand_history(data.get("history")))
            tokens_lost = data.get("tokens_lost_total") or 0.0
            since = data.get("totals_since")
            if not _finite(tokens_lost) or not (since is None or _finite(since)):
                raise ValueError("tokens_lost_total or totals_since is not a number")
            self._tokens.tokens_lost_total = float(tokens_lost)
            self._totals_since = since
            # a GPU that comes back without its identity (LOST readings carry no uuid) is the
            # one last seen at its index
            for key, tr in sorted(self._tracks.items()):
                if tr.uuid:
                    self._by_index.setdefault(tr.index, key)
        except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            # keep every bad file: an earlier one may hold totals someone still wants
            bad, n = path + ".bad", 0
            while os.path.lexists(bad):
                n += 1
                bad = f"{path}.bad.{n}"
            try:
                os.replace(path, bad)
                kept = f"the old file is kept as {bad}"
            except OSError as e2:
                # never overwrite what could not be moved aside: totals stay in memory only
                self._no_save = True
                kept = (f"it could not be moved aside ({e2.strerror or e2}), so the totals are "
                        f"not saved until it is moved away and the daemon restarted")
            self._tracks.clear()
            self._history.clear()
            self._by_index.clear()
            msg = f"{path}: unreadable cost state ({e}); totals start from zero; {kept}"
            LOG.warning(msg)
            self._notes.append(msg)

    def state(self, history: bool = True) -> Dict[str, Any]:
        out = {
            "version": STATE_VERSION,
            "saved_at": self.clock.time() if self.clock is not None else _time.time(),
            "totals_since": self._totals_since,
            "currency": self.currency,
            "gpus": {k: {"index": t.index, "uuid": t.uuid, "name": t.name,
                         "reasons": {r: v for r, v in _sorted_reasons(t.totals)}}
                     for k, t in sorted(self._tracks.items())},
            "tokens_lost_total": self._tokens.tokens_lost_total,
        }
        if history:
            out["history"] = _compact_history(self._history)
        return out

    def _maybe_save(self) -> None:
        if not self._dirty:
            return
        now = _time.monotonic()     # real time: the file is I/O, not part of the model
        if now - self._last_save < self.save_every_seconds:
            return
        self._last_save = now
        self.flush(history=now - self._history_saved_at >= HISTORY_SAVE_EVERY_SECONDS)

    def _serialize(self, history: bool) -> str:
        """The state as JSON. The history (the big part) is re-serialized only when asked;
        otherwise the last serialized history is written again with fresh totals."""
        if history or self._history_json is None:
            self._history_json = json.dumps(_compact_history(self._history),
                                            separators=(",", ":"))
            self._history_saved_at = _time.monotonic()
        rest = self.state(history=False)
        body = json.dumps(rest, separators=(",", ":"), sort_keys=True)
        return '{"history":' + self._history_json + "," + body[1:]

    def flush(self, history: bool = True) -> None:
        """Write the state file now (atomically, fsynced). Errors are logged, not raised."""
        path = self._state_path()
        if not path or self._no_save:
            return
        self._prune(int((self.clock.time() if self.clock else _time.time()) // BUCKET_SECONDS))
        try:
            write_atomic(path, self._serialize(history))
            self._dirty = False
        except OSError as e:
            LOG.warning("cannot save cost totals to %s: %s (check that the directory is "
                        "writable by the daemon); retrying later", path, e.strerror or e)

    # ------------------------------------------------------------------ metrics
    def metric_families(self, snapshot):
        return metric_families(snapshot)


# =========================================================================== tokens fit
def fit_tokens_vs_clock(points: Sequence[Tuple[float, float, float]], loss_now: float,
                        min_points: int = 30, min_spread: float = 0.03
                        ) -> Dict[str, Any]:
    """Least-squares fit tokens/s = a + b x relative clock over the window (points are
    (mono, tokens/s, sm_clock/reference)). Returns the measured tokens/s lost now
    (fit at full clock minus fit at the current clock) with R^2, or a reason it is not
    usable (too few points, the clock hardly varied)."""
    n = len(points)
    if n < min_points:
        return {"usable": False, "why": f"{n} points, need {min_points}", "points": n}
    xs = [p[2] for p in points]
    ys = [p[1] for p in points]
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if max(xs) - min(xs) < min_spread or sxx <= 0:
        return {"usable": False, "why": "the SM clock hardly varied in the window", "points": n}
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx
    a = my - b * mx
    r2 = (sxy * sxy / (sxx * syy)) if syy > 0 else 0.0
    rel = 1.0 - loss_now
    lost_per_second = max(0.0, (a + b) - (a + b * rel))
    return {"usable": r2 >= 0.5, "why": None if r2 >= 0.5 else f"poor fit (R^2 {r2:.2f})",
            "points": n, "slope_tokens_per_second": _r(b), "intercept": _r(a),
            "r2": _r(r2, 4), "tokens_lost_per_second": _r(lost_per_second)}


# =========================================================================== history views
def _history_json(history: Mapping[int, Any]) -> Dict[str, Any]:
    """A copy of the live history: the status socket's thread renders it while the loop adds
    to it (each list(...items()) is one C call, so no "changed size during iteration")."""
    return {"bucket_seconds": BUCKET_SECONDS,
            "buckets": {str(b): {k: {r: list(v) for r, v in list(per_reason.items())}
                                 for k, per_reason in list(per_gpu.items())}
                        for b, per_gpu in sorted(list(history.items()))}}


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
    rows = []
    node: Dict[str, ReasonCost] = {}
    for key in sorted(set(names) | set(per_gpu),
                      key=lambda k: (names.get(k, {}).get("index") is None,
                                     names.get(k, {}).get("index") or 0, k)):
        info = names.get(key, {"index": None, "uuid": None if key.startswith("index:") else key,
                               "name": None})
        reasons = {r: ReasonCost(*[float(x) for x in v][:3])
                   for r, v in _sorted_reasons(per_gpu.get(key, {}))}
        _add_reasons(node, reasons)
        rows.append({"index": info.get("index"), "uuid": info.get("uuid"),
                     "name": info.get("name"),
                     "capacity_lost_seconds": _r(sum(c.capacity_lost_seconds
                                                     for c in reasons.values())),
                     "dollars": _r(sum(c.dollars for c in reasons.values())),
                     "top_reason": _top_reason(reasons),
                     "reasons": {r: c.to_json() for r, c in reasons.items()}})
    return {"since_seconds": since_seconds, "truncated_to_seconds":
            HISTORY_SECONDS if truncated else None, "currency": currency,
            "time": now, "gpus": rows,
            "node": {"capacity_lost_seconds": _r(sum(c.capacity_lost_seconds
                                                     for c in node.values())),
                     "dollars": _r(sum(c.dollars for c in node.values())),
                     "top_reason": _top_reason(node),
                     "reasons": {r: c.to_json() for r, c in _sorted_reasons(node)}}}


def breakdown(accountant: "CostAccountant", since_seconds: Optional[float] = None
              ) -> Dict[str, Any]:
    """cost_breakdown of a running accountant (the status socket's "cost" request)."""
    report = accountant._last_report
    if report is not None:
        return cost_breakdown(report, since_seconds)
    now = accountant.clock.time() if accountant.clock is not None else _time.time()
    return cost_breakdown(accountant.state(), since_seconds, now=now)


def breakdown_from_state(config, since_seconds: Optional[float] = None,
                         now: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """cost_breakdown from the saved state file (`gpucostd cost` without a running daemon).
    None when there is no readable state file."""
    path = os.path.join(config.daemon.state_dir, STATE_FILE)
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return None
        return cost_breakdown(data, since_seconds, now=_time.time() if now is None else now)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def parse_since(text: str) -> float:
    """'90s', '15m', '6h', '1d', '3600' -> seconds. ValueError with the accepted forms."""
    t = text.strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if t and t[-1] in mult:
            v = float(t[:-1]) * mult[t[-1]]
        else:
            v = float(t)
    except ValueError:
        raise ValueError(f"--since {text!r}: use a number of seconds or N s/m/h/d, e.g. 24h") \
            from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"--since {text!r} must be positive, e.g. 24h")
    return v


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
    lines.append("Note: an under-loaded GPU pays for throttling in latency rather than "
                 "throughput;")
    lines.append("      only busy time is counted here.")
    return "\n".join(_clip(line) for line in lines) + "\n"


def _clip(line: str, width: int = 100) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


# =========================================================================== status view
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
    tk = node.get("tokens")
    if tk and tk.get("tokens_per_second") is not None:
        t = f"  Tokens: {tk['tokens_per_second']:.0f}/s"
        if tk.get("cost_per_million_tokens") is not None:
            t += f", {_money(tk['cost_per_million_tokens'], currency)} per million"
        t += f", {tk['tokens_lost_total']:.0f} lost to throttling (modelled)"
        m = tk.get("measured") or {}
        measured = (f"measured {m['tokens_lost_per_second']:.0f}/s now (R2 {m['r2']:.2f})"
                    if m.get("usable") else "")
        if measured and len(t) + 2 + len(measured) > 100:
            lines += [_clip(t), _clip("    " + measured)]
        else:
            lines.append(_clip(t + ("; " + measured if measured else "")))
    lines.append(_clip("  Note: an under-loaded GPU pays for throttling in latency rather than "
                       "throughput."))
    return lines


# =========================================================================== metrics
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


__all__ = ["CostAccountant", "CostReport", "GpuCost", "ReasonCost", "WindowCost", "TokenCost",
           "status_lines", "status_lines_from_json", "cost_breakdown", "format_cost",
           "breakdown", "breakdown_from_state",
           "parse_since", "metric_families", "loss_ratio", "reference_clock", "is_busy",
           "cost_multiplier", "integrate", "fit_tokens_vs_clock", "LATENCY_NOTE"]
