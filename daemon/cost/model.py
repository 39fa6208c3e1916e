"""The cost model: pure functions over GPU readings (no state, no I/O).

The model and its assumptions are documented in docs/cost.md; in one breath:

- reference clock = application SM clock when one is set, else the max SM clock;
- busy = utilization >= ``[cost] busy_utilization_percent`` and GpuIdle not active (a MIG GPU
  without GPU-Util: an instance's GPM SM activity at or above it);
- loss ratio = 1 - sm_clock / reference while busy and at least one THROTTLE_REASONS reason is
  active, else 0;
- capacity lost = integral of the loss ratio over time, split equally among the active reasons;
  violation counters (where supported) give the throttled time, the sampled clock the depth;
  without counters the samples are integrated with the trapezoid rule (``integrate``);
- effective cost multiplier = 1 / (1 - loss ratio);
- measured tokens lost: a least-squares fit of tokens/s against the relative clock
  (``fit_tokens_vs_clock``).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.snapshot import (GpuReading, GpuState, THROTTLE_REASONS, VIOLATION_REASONS,
                               VIOLATION_REPLACED_BY)

MAX_SAMPLE_GAP_SECONDS = 120.0  # sampled (counter-less) integration skips longer gaps
MAX_LOSS_FOR_MULTIPLIER = 0.99

# reason order for stable output
_REASON_ORDER = {r: i for i, r in enumerate(THROTTLE_REASONS)}
_COUNTER_GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = tuple(
    (k, v) for k, v in VIOLATION_REASONS.items() if v)


# =========================================================================== small helpers
def _finite(x: Any) -> bool:
    """A usable non-negative number (not NaN, an infinity, a negative value or a string)."""
    return isinstance(x, (int, float)) and 0.0 <= x < math.inf


def _counters(v: Optional[Mapping[str, Any]]) -> Optional[Dict[str, float]]:
    """Violation counters with unusable values dropped (that counter falls back to sampling
    for the interval instead of poisoning the totals)."""
    if not v:
        return None
    out = {k: float(x) for k, x in v.items()
           if isinstance(x, (int, float)) and 0.0 <= x < math.inf}
    # an old coarse counter beside the finer ones that replace it would count twice
    for old, finer in VIOLATION_REPLACED_BY.items():
        if old in out and any(k in out for k in finer):
            del out[old]
    return out or None


def _r(x: Optional[float], nd: int = 6) -> Optional[float]:
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return round(float(x), nd)


def _sorted_reasons(d: Mapping[str, Any]):
    return sorted(d.items(), key=lambda kv: (_REASON_ORDER.get(kv[0], 99), kv[0]))


def reference_clock(g: GpuReading) -> Optional[float]:
    """The clock a busy GPU would run at: the application clock when set, else the max."""
    if g.app_sm_clock_mhz:
        return float(g.app_sm_clock_mhz)
    if g.sm_clock_max_mhz:
        return float(g.sm_clock_max_mhz)
    return None


def is_busy(g: GpuReading, busy_percent: float) -> bool:
    """Busy = utilization at or above the threshold and GpuIdle not active. Unknown
    utilization counts as not busy (we do not claim a loss we cannot show), except on a MIG
    GPU (where NVML hides GPU-Util): busy while an instance's own SM activity (GPM) is at or
    above the threshold."""
    reasons = g.clock_event_reasons or ()
    if "GpuIdle" in reasons:
        return False
    if g.utilization_percent is None:
        return any(m.activity is not None and _finite(m.activity.sm) and
                   100.0 * m.activity.sm >= busy_percent for m in g.mig)
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


# =========================================================================== tokens fit
class SlidingSums:
    """Samples ``(t, v1, v2, ...)`` in a time window with the sums of their values kept as they
    come and go (a cycle reads the window's totals without summing its 300 samples); recounted
    from the samples every RECOUNT additions, so rounding never piles up."""

    RECOUNT = 1000

    def __init__(self, width: int):
        self.rows: "deque[Tuple[float, ...]]" = deque()
        self.sums = [0.0] * width
        self._adds = 0

    def __len__(self) -> int:
        return len(self.rows)

    def first_time(self) -> float:
        return self.rows[0][0]

    def add(self, t: float, *values: float) -> None:
        self.rows.append((t,) + values)
        self._adds += 1
        if self._adds >= self.RECOUNT:
            self._adds = 0
            self.sums = [math.fsum(r[k + 1] for r in self.rows) for k in range(len(self.sums))]
            return
        sums = self.sums
        for k, v in enumerate(values):
            sums[k] += v

    def expire(self, before: float) -> None:
        """Drop the samples older than `before`."""
        rows, sums = self.rows, self.sums
        while rows and rows[0][0] < before:
            old = rows.popleft()
            for k in range(len(sums)):
                sums[k] -= old[k + 1]
        if not rows:
            self.sums = [0.0] * len(sums)


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


# the names other modules import (the module itself keeps its short private ones)
COUNTER_GROUPS = _COUNTER_GROUPS
is_finite = _finite
counter_values = _counters
rounded = _r
sorted_reasons = _sorted_reasons
GpuSample = _Sample
