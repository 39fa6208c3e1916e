"""Physics of a simulated GPU and of the inference server on it: pure functions, no time, no I/O.

The model follows what the field measures on LLM serving (sources in docs/scenarios.md,
"Physics"): a GPU's power comes from the work it does, not from GPU-Util.

Work. A busy GPU (u = utilization/100 of the time a kernel runs) spends its busy time in two
phases: **prefill** (compute-bound: SMs and tensor pipes busy; its pace follows the clock,
elasticity ``prefill_clock_elasticity`` 0.8-1) and **decode** (memory-bound: HBM streams the
weights and KV cache; its pace barely follows the clock, ``decode_clock_elasticity`` ~ 0.2).
``decode_share`` d0 (a GPU field of the scenario) is decode's share of the busy time at the max
clock. With x = f / max_sm_clock each phase takes x ^ -elasticity as long, so::

    T(x) = d0 x^-a_d + (1 - d0) x^-a_p        time per unit of work, relative to max clock
    R(x) = 1 / T(x)                           throughput, relative to max clock
    d(x) = d0 x^-a_d / T(x)                   decode's share of busy time at clock x

Power (``PowerModel``)::

    P = idle_watts + u x [ d(x) D(x) + (1 - d(x)) C(x) ]
    C(x) = (full_load_watts - idle_watts) x^k                      prefill: switching power
    D(x) = (decode_watts - idle_watts - decode_memory_watts) x^k    decode: its SM part
           + decode_memory_watts x^a_d                              and HBM traffic, which
                                                                    follows decode's pace
                                                                    (not the clock)

k is ``clock_exponent`` (dynamic power ~ f V^2 with V rising with f in the boost range, and
leakage with V: 3 to 4 near the top of the curve; 3.5 reproduces a power cap's published cost). With decode_share = 0 this is the classic P = idle + (full - idle) u x^k.

Power cap: the scenario's ``sm_clock`` is the clock the GPU would run at unconstrained (the
*demanded* clock; a locked clock range caps it, ``LOCKED_CLOCKS``). When P at that clock is
above the power limit, SwPowerCap engages and the clock drops to the highest whole MHz at which
the draw fits (never below ``min_sm_clock``). P grows with f, so a bisection finds it.

Activity (what NVML's GPU Performance Monitoring reads, ratios 0..1): each phase has its SM
activity, SM occupancy, tensor, FP16/FP32 pipe and DRAM bandwidth figures at the max clock
(``PHYSICS_KEYS``); a GPU's reading is u x (d(x) decode + (1 - d(x)) prefill), with DRAM
bandwidth following each phase's pace (x ^ elasticity). GPU-Util (u) stays what NVML's
utilization says: the share of time any kernel ran, not the work done.

Tokens (``ServingModel``), per GPU::

    tokens/s = base_tokens_per_second x u x R(x)

An endpoint serving several GPUs as one tensor-parallel group runs at the pace of its slowest
GPU: n x min(per-GPU rate); a data-parallel endpoint sums its GPUs.

``steady_state``, ``best_power_limit`` and ``best_locked_clock`` answer analytically what a GPU
does at a given power limit or locked SM clock (tokens/s, watts, tokens per joule, tokens per
dollar): tests and ``gpucostd calibrate`` compute the true optimum from the same functions the
simulator runs on.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.snapshot import CLOCK_EVENT_REASONS

POWER_REASON = "SwPowerCap"
# GPU state keys the physics reads beyond the scenario's fields: a locked SM clock range
# ((min, max) MHz, as nvmlDeviceSetGpuLockedClocks sets it; absent or None: unlocked).
LOCKED_CLOCKS = "locked_sm_clocks"
DECODE_SHARE = "decode_share"
# Setter-changed keys after which a state's physics must be recomputed (apply_power).
PHYSICS_INPUTS = ("power_limit", LOCKED_CLOCKS)
# The activity readings the physics gives (ratios 0..1), in this order.
ACTIVITY_NAMES = ("graphics", "sm", "sm_occupancy", "tensor", "tensor_hmma", "tensor_imma",
                  "dram", "fp16", "fp32")


# --------------------------------------------------------------------------- power
@dataclass(frozen=True)
class PowerModel:
    idle_watts: float = 70.0
    full_load_watts: float = 900.0
    clock_exponent: float = 3.5
    min_sm_clock: int = 345
    decode_watts: float = 300.0
    decode_memory_watts: float = 100.0
    decode_clock_elasticity: float = 0.2
    prefill_clock_elasticity: float = 0.8
    decode_sm_activity: float = 0.30
    prefill_sm_activity: float = 0.90
    decode_sm_occupancy: float = 0.15
    prefill_sm_occupancy: float = 0.40
    decode_tensor_activity: float = 0.10
    prefill_tensor_activity: float = 0.60
    tensor_imma_share: float = 0.0
    decode_dram_activity: float = 0.80
    prefill_dram_activity: float = 0.30
    decode_fp16_activity: float = 0.02
    prefill_fp16_activity: float = 0.04
    decode_fp32_activity: float = 0.05
    prefill_fp32_activity: float = 0.08

    # ---- the phase mix
    def mix(self, x: float, decode_share: float) -> Tuple[float, float]:
        """(R, d): throughput relative to the max clock and decode's share of busy time, at
        relative clock x (0 < x)."""
        d0 = min(1.0, max(0.0, float(decode_share or 0.0)))
        sd = x ** -self.decode_clock_elasticity
        sp = x ** -self.prefill_clock_elasticity
        t = d0 * sd + (1.0 - d0) * sp
        return 1.0 / t, d0 * sd / t

    def relative_rate(self, sm_clock: float, max_sm_clock: float,
                      decode_share: float = 0.0) -> float:
        """Throughput at `sm_clock` relative to the max clock (R above); 0 at clock 0."""
        if max_sm_clock <= 0 or sm_clock <= 0:
            return 0.0
        return self.mix(float(sm_clock) / float(max_sm_clock), decode_share)[0]

    def power(self, sm_clock: float, max_sm_clock: float, utilization: float,
              decode_share: float = 0.0) -> float:
        """Draw in watts at SM clock `sm_clock` (MHz), `utilization` (percent) and decode's
        share of the busy time at the max clock `decode_share` (0..1)."""
        if max_sm_clock <= 0 or sm_clock <= 0:
            return self.idle_watts
        x = float(sm_clock) / float(max_sm_clock)
        u = min(100.0, max(0.0, float(utilization))) / 100.0
        if u <= 0:
            return self.idle_watts
        _r, d = self.mix(x, decode_share)
        xk = x ** self.clock_exponent
        compute = (self.full_load_watts - self.idle_watts) * xk
        decode = (max(0.0, self.decode_watts - self.idle_watts - self.decode_memory_watts) * xk
                  + self.decode_memory_watts * x ** self.decode_clock_elasticity)
        return self.idle_watts + u * (d * decode + (1.0 - d) * compute)

    def capped_clock(self, limit: float, max_sm_clock: float, utilization: float,
                     decode_share: float = 0.0, ceiling: Optional[float] = None) -> int:
        """The highest whole MHz (<= ceiling, default max_sm_clock) whose draw fits `limit`;
        min_sm_clock when none does."""
        top = int(max_sm_clock if ceiling is None else min(ceiling, max_sm_clock))
        floor_ = int(min(self.min_sm_clock, top))
        if self.power(top, max_sm_clock, utilization, decode_share) <= limit:
            return top
        lo, hi = floor_, top          # power(hi) > limit
        if self.power(lo, max_sm_clock, utilization, decode_share) > limit:
            return floor_
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.power(mid, max_sm_clock, utilization, decode_share) <= limit:
                lo = mid
            else:
                hi = mid
        return lo

    def operating_point(self, demand_clock: float, max_sm_clock: float, utilization: float,
                        limit: float, decode_share: float = 0.0) -> Tuple[int, float, bool]:
        """(sm_clock, power_watts, capped) of a GPU that wants `demand_clock` under `limit`."""
        demand = self.power(demand_clock, max_sm_clock, utilization, decode_share)
        if demand <= limit:
            return int(demand_clock), _mw(demand), False
        f = self.capped_clock(limit, max_sm_clock, utilization, decode_share,
                              ceiling=demand_clock)
        return f, _mw(self.power(f, max_sm_clock, utilization, decode_share)), True

    def activity(self, sm_clock: float, max_sm_clock: float, utilization: float,
                 decode_share: float = 0.0) -> Dict[str, float]:
        """What GPM reads (ACTIVITY_NAMES, ratios 0..1) at this operating point."""
        u = min(100.0, max(0.0, float(utilization))) / 100.0
        if max_sm_clock <= 0 or sm_clock <= 0 or u <= 0:
            return {name: 0.0 for name in ACTIVITY_NAMES}
        x = min(1.0, float(sm_clock) / float(max_sm_clock))
        _r, d = self.mix(x, decode_share)
        p = 1.0 - d

        def both(dec: float, pre: float) -> float:
            return min(1.0, u * (d * dec + p * pre))

        tensor = both(self.decode_tensor_activity, self.prefill_tensor_activity)
        return {
            "graphics": u,
            "sm": both(self.decode_sm_activity, self.prefill_sm_activity),
            "sm_occupancy": both(self.decode_sm_occupancy, self.prefill_sm_occupancy),
            "tensor": tensor,
            "tensor_hmma": tensor * (1.0 - self.tensor_imma_share),
            "tensor_imma": tensor * self.tensor_imma_share,
            "dram": both(self.decode_dram_activity * x ** self.decode_clock_elasticity,
                         self.prefill_dram_activity * x ** self.prefill_clock_elasticity),
            "fp16": both(self.decode_fp16_activity, self.prefill_fp16_activity),
            "fp32": both(self.decode_fp32_activity, self.prefill_fp32_activity),
        }


DEFAULT_MODEL = PowerModel()


def _mw(watts: float) -> float:
    """Watts rounded to the milliwatt NVML reports."""
    return round(watts * 1000.0) / 1000.0


# Keys the physics adds to a GPU state: what the scenario asked for before the power cap.
DEMAND_CLOCK = "demand_sm_clock"
DEMAND_REASONS = "demand_clock_event_reasons"


def demanded_clock(state: Mapping[str, Any]) -> float:
    """The clock a GPU state asks for before the power cap: the scenario's clock, at most the
    top of a locked clock range."""
    demand = state.get(DEMAND_CLOCK, state["sm_clock"])
    locked = state.get(LOCKED_CLOCKS)
    if locked:
        demand = min(demand, locked[1])
    return demand


def apply_power(state: Dict[str, Any], model: PowerModel) -> Dict[str, Any]:
    """Fill `state` (a GPU state dict of the scenario) with the physics: sm_clock, power_draw
    and SwPowerCap from its demanded clock (a locked clock range caps it), utilization,
    decode_share and power limit. Idempotent: the demanded values are kept under
    DEMAND_CLOCK / DEMAND_REASONS, so a state whose power limit or locked clocks changed (a
    setter) is recomputed from them."""
    state.setdefault(DEMAND_CLOCK, state["sm_clock"])
    reasons = tuple(state.get(DEMAND_REASONS, state["clock_event_reasons"]))
    state[DEMAND_REASONS] = reasons
    demand = demanded_clock(state)
    f, p, capped = model.operating_point(demand, state["max_sm_clock"], state["utilization"],
                                         state["power_limit"], state.get(DECODE_SHARE) or 0.0)
    state["sm_clock"] = f
    state["power_draw"] = p
    if capped and POWER_REASON not in reasons and \
            POWER_REASON in state["supported_clock_event_reasons"]:
        reasons = reasons + (POWER_REASON,)
    state["clock_event_reasons"] = _ordered(reasons, state)
    return state


def state_activity(state: Mapping[str, Any], model: Optional[PowerModel]) -> Dict[str, float]:
    """PowerModel.activity of a scenario GPU state (all 0 while lost); `model` None: the
    defaults (a scenario without [physics] still has GPM readings)."""
    if state.get("lost"):
        return {name: 0.0 for name in ACTIVITY_NAMES}
    return (model or DEFAULT_MODEL).activity(state["sm_clock"], state["max_sm_clock"],
                                             state["utilization"],
                                             state.get(DECODE_SHARE) or 0.0)


def _ordered(reasons: Sequence[str], state: Mapping[str, Any]) -> Tuple[str, ...]:
    have = set(reasons)
    return tuple(name for _bit, name in CLOCK_EVENT_REASONS if name in have)


# --------------------------------------------------------------------------- serving
@dataclass(frozen=True)
class EndpointModel:
    """One simulated inference server: its GPUs and what its /metrics shows besides tokens."""
    index: int
    gpus: Tuple[int, ...]
    parallel: str = "tensor"              # "tensor": n x slowest GPU; "data": sum of GPUs
    requests_running: float = 32.0
    requests_waiting: float = 0.0
    kv_cache_usage: float = 0.45          # 0..1
    preemptions_per_second: float = 0.0
    queue_time_seconds: float = 0.05      # mean time a request waits before it runs
    inference_time_seconds: float = 8.0   # mean time a request runs (prefill + decode)
    model_name: str = "meta-llama/Llama-3.1-70B-Instruct"
    # MIG instances ("GPU/GI/CI", [[mig]]) it runs on; gpus are then their parent GPUs
    instances: Optional[Tuple[str, ...]] = None


@dataclass(frozen=True)
class ServingModel:
    base_tokens_per_second: float = 2000.0     # per GPU at 100% utilization and max clock
    prompt_tokens_per_generated: float = 2.0
    tokens_per_request: float = 256.0
    endpoints: Tuple[EndpointModel, ...] = field(default_factory=tuple)
    physics: PowerModel = DEFAULT_MODEL        # the phases' clock elasticities (R(x))

    def gpu_rate(self, sm_clock: float, max_sm_clock: float, utilization: float,
                 decode_share: float = 0.0) -> float:
        """Generated tokens per second of one GPU."""
        if max_sm_clock <= 0 or sm_clock <= 0:
            return 0.0
        u = min(100.0, max(0.0, float(utilization))) / 100.0
        return self.base_tokens_per_second * u * \
            self.physics.relative_rate(sm_clock, max_sm_clock, decode_share)

    def state_rate(self, state: Mapping[str, Any]) -> float:
        """gpu_rate of a scenario GPU state (0 while lost)."""
        if state.get("lost"):
            return 0.0
        return self.gpu_rate(state["sm_clock"], state["max_sm_clock"], state["utilization"],
                             state.get(DECODE_SHARE) or 0.0)

    def endpoint_rate(self, endpoint: EndpointModel, rates: Sequence[float]) -> float:
        """Tokens/s of an endpoint from its GPUs' rates (in endpoint.gpus order)."""
        if not rates:
            return 0.0
        if endpoint.parallel == "tensor":
            return len(rates) * min(rates)
        return float(sum(rates))


# --------------------------------------------------------------------------- the optimum
def steady_state(power: PowerModel, serving: ServingModel, power_limit: Optional[float] = None,
                 max_sm_clock: float = 1980, demand_clock: Optional[float] = None,
                 utilization: float = 95.0, decode_share: float = 0.0,
                 locked_clock: Optional[float] = None, gpu_hour_usd: float = 0.0,
                 energy_usd_per_kwh: float = 0.0, pue: float = 1.0) -> Dict[str, Any]:
    """What one GPU does in steady state at `power_limit` (W; None: no limit) with its SM
    clock locked at most at `locked_clock` (MHz; None: unlocked): sm_clock_mhz, power_watts,
    capped (the limit binds), tokens_per_second, tokens_per_joule, the GPM activity
    (``activity``) and, with a price, dollars_per_hour and tokens_per_dollar. Pure; the
    simulator gives the same numbers."""
    demand = max_sm_clock if demand_clock is None else demand_clock
    if locked_clock is not None:
        demand = min(demand, locked_clock)
    limit = math.inf if power_limit is None else power_limit
    f, p, capped = power.operating_point(demand, max_sm_clock, utilization, limit,
                                         decode_share)
    rate = serving.gpu_rate(f, max_sm_clock, utilization, decode_share)
    usd_h = gpu_hour_usd + p / 1000.0 * pue * energy_usd_per_kwh
    return {"power_limit_watts": None if power_limit is None else float(power_limit),
            "locked_sm_clock_mhz": locked_clock, "sm_clock_mhz": f, "power_watts": p,
            "capped": capped, "tokens_per_second": rate,
            "tokens_per_joule": rate / p if p > 0 else None,
            "activity": power.activity(f, max_sm_clock, utilization, decode_share),
            "dollars_per_hour": usd_h,
            "tokens_per_dollar": rate * 3600.0 / usd_h if usd_h > 0 else None}


def _best(states: Sequence[Dict[str, Any]], objective: str, min_throughput: float,
          what: str) -> Dict[str, Any]:
    top = max((s["tokens_per_second"] for s in states), default=0.0)
    best: Optional[Dict[str, Any]] = None
    for st in states:
        v = st.get(objective)
        if v is None or st["tokens_per_second"] < min_throughput * top * (1 - 1e-12):
            continue
        if best is None or v > best[objective] * (1 + 1e-12):
            best = st
    if best is None:
        raise ValueError(f"{objective} is undefined over {what} (set a price for "
                         "tokens_per_dollar)")
    return best


def best_power_limit(power: PowerModel, serving: ServingModel, lo: float, hi: float,
                     step: float = 1.0, objective: str = "tokens_per_dollar",
                     min_throughput: float = 0.0, **kw: Any) -> Dict[str, Any]:
    """The power limit in [lo, hi] (a grid of `step` W, from lo) that maximizes `objective`
    ("tokens_per_dollar", "tokens_per_joule" or "tokens_per_second") of steady_state(**kw)
    among the limits giving at least `min_throughput` (0..1) of the grid's best tokens/s;
    ties go to the lower limit. Returns that steady_state."""
    n = int(math.floor((hi - lo) / step + 1e-9))
    states = [steady_state(power, serving, lo + i * step, **kw) for i in range(n + 1)]
    return _best(states, objective, min_throughput, f"{lo:g}..{hi:g} W")


def best_locked_clock(power: PowerModel, serving: ServingModel, clocks: Sequence[float],
                      objective: str = "tokens_per_joule", min_throughput: float = 0.0,
                      **kw: Any) -> Dict[str, Any]:
    """The locked SM clock among `clocks` (MHz) that maximizes `objective` of
    steady_state(locked_clock=..., **kw) among the clocks giving at least `min_throughput`
    (0..1) of the best tokens/s of those clocks; ties go to the lower clock. Returns that
    steady_state. Pass the power limit in force as ``power_limit=`` (steady_state's default
    is none: a compute-bound GPU locked near the max clock would then draw above its cap)."""
    states = [steady_state(power, serving, locked_clock=c, **kw) for c in sorted(clocks)]
    return _best(states, objective, min_throughput, "those clocks")


def clock_grid(lo: float, hi: float, step: float) -> List[int]:
    """Whole-MHz clocks from hi down to lo in `step` MHz (hi first), as a sweep visits them."""
    out, f = [], float(hi)
    while f >= lo - 1e-9:
        out.append(int(round(f)))
        f -= step
    return out


def limit_binds(power: PowerModel, power_limit: float, max_sm_clock: float = 1980,
                utilization: float = 95.0, decode_share: float = 0.0,
                demand_clock: Optional[float] = None) -> bool:
    """Whether a power limit lowers the clock of a GPU doing this work (SwPowerCap)."""
    demand = max_sm_clock if demand_clock is None else demand_clock
    return power.power(demand, max_sm_clock, utilization, decode_share) > power_limit


def _state_kw(st: Mapping[str, Any]) -> Dict[str, Any]:
    return {"max_sm_clock": st["max_sm_clock"],
            "demand_clock": st.get(DEMAND_CLOCK, st["sm_clock"]),
            "utilization": st["utilization"], "decode_share": st.get(DECODE_SHARE) or 0.0}


def gpu_at(scenario: Any, index: int, t: float, power_limit: Optional[float] = None,
           locked_clock: Optional[float] = None, **prices: Any) -> Dict[str, Any]:
    """steady_state of GPU `index` of a scenario (with [physics] and [serving]) at time t, had
    its power limit been `power_limit` (None: its limit at t) and its clock locked at most at
    `locked_clock`: its demanded clock, utilization and decode share at t."""
    st = scenario.state_ref(index, t)
    limit = st["power_limit"] if power_limit is None else power_limit
    return steady_state(scenario.physics, scenario.serving, limit, locked_clock=locked_clock,
                        **_state_kw(st), **prices)


def gpu_at_power_limit(scenario: Any, index: int, t: float, power_limit: float,
                       **prices: Any) -> Dict[str, Any]:
    """gpu_at with a power limit."""
    return gpu_at(scenario, index, t, power_limit=power_limit, **prices)


def endpoint_at(scenario: Any, endpoint: int, t: float,
                limits: Optional[Mapping[int, float]] = None,
                locked: Optional[Mapping[int, float]] = None) -> float:
    """Tokens/s of simulated endpoint `endpoint` at time t with these power limits and locked
    clocks ({GPU index: watts}, {GPU index: MHz}; GPUs not named keep their setting at t)."""
    sv = scenario.serving
    ep = sv.endpoints[endpoint]
    limits, locked = limits or {}, locked or {}
    rates = [gpu_at(scenario, i, t, limits.get(i), locked.get(i))["tokens_per_second"]
             for i in ep.gpus]
    return sv.endpoint_rate(ep, rates)


def endpoint_at_power_limits(scenario: Any, endpoint: int, t: float,
                             limits: Mapping[int, float]) -> float:
    """endpoint_at with power limits only."""
    return endpoint_at(scenario, endpoint, t, limits=limits)


# --------------------------------------------------------------------------- integrals
class Piecewise:
    """A piecewise-constant rate over one cycle (`starts[i]` .. next start; the last piece runs
    to `period`, or forever without one), and its exact integral from 0 to t across cycles."""

    def __init__(self, starts: Sequence[float], rates: Sequence[float],
                 period: Optional[float] = None):
        self.starts = list(starts)
        self.rates = list(rates)
        self.period = period
        self.cum = [0.0]
        for i in range(1, len(self.starts)):
            self.cum.append(self.cum[-1] + self.rates[i - 1] * (self.starts[i] - self.starts[i - 1]))
        self.cycle_total = (self.cum[-1] + self.rates[-1] * (period - self.starts[-1])
                            if period else None)

    def rate_at(self, t: float) -> float:
        te = t % self.period if self.period else t
        return self.rates[bisect.bisect_right(self.starts, max(0.0, te)) - 1]

    def integral(self, t: float) -> float:
        if t <= 0:
            return 0.0
        k = 0
        te = t
        if self.period:
            k = int(t // self.period)
            te = t - k * self.period
        i = bisect.bisect_right(self.starts, te) - 1
        v = self.cum[i] + self.rates[i] * (te - self.starts[i])
        if k:
            v += k * self.cycle_total
        return v


def merged_starts(per_gpu_starts: Sequence[Sequence[float]]) -> List[float]:
    """The union of several GPUs' segment starts (an endpoint's pieces)."""
    out = set()
    for starts in per_gpu_starts:
        out.update(starts)
    return sorted(out)


# --------------------------------------------------------------------------- schema
# (type, default, doc, min, max) -- validated by the scenario loader like GPU fields.
PHYSICS_KEYS: Dict[str, Tuple[str, Any, str, Optional[float], Optional[float]]] = {
    "idle_watts": ("number", 70.0, "Draw of an idle GPU, W.", 0, 10000),
    "full_load_watts": ("number", 900.0, "Draw that compute-bound work (prefill) at 100% "
                        "utilization and max_sm_clock would demand, W (above the limit: it "
                        "runs at the cap).", 1, 10000),
    "clock_exponent": ("number", 3.5, "k: switching power grows with (clock / max) ^ k.", 0.1,
                       10),
    "min_sm_clock": ("int", 345, "Lowest clock the power cap may set, MHz.", 1, 100000),
    "decode_watts": ("number", 300.0, "Draw of memory-bound decode at 100% utilization and "
                     "max_sm_clock, W.", 0, 10000),
    "decode_memory_watts": ("number", 100.0, "The part of decode's draw above idle that is "
                            "HBM traffic (follows decode's pace, not the clock), W.", 0, 10000),
    "decode_clock_elasticity": ("number", 0.2, "a_d: decode's pace grows with (clock / max) ^ "
                                "a_d (memory-bound: about 0.2-0.3).", 0, 2),
    "prefill_clock_elasticity": ("number", 0.8, "a_p: prefill's pace grows with (clock / max) "
                                 "^ a_p (compute-bound: about 1).", 0, 2),
}
for _phase, _vals in (("decode", (0.30, 0.15, 0.10, 0.80, 0.02, 0.05)),
                      ("prefill", (0.90, 0.40, 0.60, 0.30, 0.04, 0.08))):
    for _name, _v, _what in zip(("sm_activity", "sm_occupancy", "tensor_activity",
                                 "dram_activity", "fp16_activity", "fp32_activity"), _vals,
                                ("SMs busy", "warps resident of the maximum",
                                 "tensor pipes busy (HMMA/IMMA)", "DRAM bandwidth used",
                                 "non-tensor FP16 pipe busy", "non-tensor FP32 pipe busy")):
        PHYSICS_KEYS[f"{_phase}_{_name}"] = ("number", _v, f"Share of {_what} while "
                                             f"{_phase} runs at max clock, 0..1 (GPM).", 0, 1)
PHYSICS_KEYS["tensor_imma_share"] = ("number", 0.0, "Share of tensor activity on the integer "
                                     "(IMMA) pipe; the rest is HMMA (FP16/BF16/FP8).", 0, 1)
SERVING_KEYS: Dict[str, Tuple[str, Any, str, Optional[float], Optional[float]]] = {
    "base_tokens_per_second": ("number", 2000.0, "Generated tokens/s of one GPU at 100% "
                               "utilization and max clock.", 0, 1e9),
    "prompt_tokens_per_generated": ("number", 2.0, "Prompt tokens per generated token.", 0, 1e6),
    "tokens_per_request": ("number", 256.0, "Generated tokens per request.", 1, 1e9),
}
ENDPOINT_KEYS: Dict[str, Tuple[str, Any, str, Optional[float], Optional[float]]] = {
    "gpus": ("int_list", None, "GPU indexes this server runs on (default: all).", 0, 63),
    "instances": ("instance_list", None, "MIG instances \"GPU/GI/CI\" this server runs on "
                  "([[mig]]; instead of gpus).", None, None),
    "parallel": ("choice", "tensor", "\"tensor\" (one group: n x slowest GPU) or \"data\" "
                 "(sum of GPUs).", None, None),
    "requests_running": ("number", 32.0, "vllm:num_requests_running.", 0, 1e9),
    "requests_waiting": ("number", 0.0, "vllm:num_requests_waiting.", 0, 1e9),
    "kv_cache_usage": ("number", 0.45, "vllm:kv_cache_usage_perc, 0..1.", 0, 1),
    "preemptions_per_second": ("number", 0.0, "Rate of vllm:num_preemptions_total.", 0, 1e9),
    "queue_time_seconds": ("number", 0.05, "Each request's vllm:request_queue_time_seconds.", 0,
                           1e6),
    "inference_time_seconds": ("number", 8.0, "Each request's "
                               "vllm:request_inference_time_seconds.", 0, 1e6),
    "model_name": ("str", "meta-llama/Llama-3.1-70B-Instruct", "The model_name label.", None,
                   None),
}
PARALLEL_CHOICES = ("tensor", "data")
# Keys of older scenario files and where their meaning went (the loader says so).
MOVED_KEYS = {
    ("serving", "clock_elasticity"): "the clock elasticity is the phases' now: set [physics] "
    "decode_clock_elasticity and prefill_clock_elasticity and each GPU's decode_share "
    "(docs/scenarios.md, \"Physics\")",
}


def check_value(kind: str, value: Any, lo: Optional[float], hi: Optional[float]
                ) -> Tuple[Any, Optional[str]]:
    """(value, None) or (None, why it is not allowed) for one [physics]/[serving] value."""
    if kind == "str":
        return (value, None) if isinstance(value, str) else (None, "wrong type; expected a string")
    if kind == "choice":
        if value in PARALLEL_CHOICES:
            return value, None
        return None, "allowed: " + ", ".join(f'"{c}"' for c in PARALLEL_CHOICES)
    if kind == "instance_list":
        if not isinstance(value, list) or not value or not all(
                isinstance(x, str) and re.match(r"^\d{1,3}/\d{1,3}/\d{1,3}$", x) for x in value):
            return None, 'wrong type; expected a non-empty list of MIG instances, "GPU/GI/CI"'
        if len(set(value)) != len(value):
            return None, "an instance is listed twice"
        return tuple(value), None
    if kind == "int_list":
        if not isinstance(value, list) or not value or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in value):
            return None, "wrong type; expected a non-empty list of GPU indexes"
        if len(set(value)) != len(value):
            return None, "a GPU is listed twice"
        return tuple(value), None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind == "int" and not isinstance(value, int)):
        return None, "wrong type; expected " + ("an integer" if kind == "int" else "a number")
    v = float(value) if kind == "number" else value
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        return None, f"out of range; allowed {lo:g}..{hi:g}"
    return v, None
