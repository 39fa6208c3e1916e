"""Physics of a simulated GPU and of the inference server on it: pure functions, no time, no I/O.

Power (``PowerModel``)::

    P(f, u) = idle_watts + (full_load_watts - idle_watts) x u/100 x (f / max_sm_clock) ^ k

f the SM clock (MHz), u the utilization (percent), k ``clock_exponent`` (dynamic power grows
with clock x voltage^2, and voltage with the clock in the boost range, so k is between 2 and 3).
The defaults (70 W idle, 720 W at 100% and max clock, k = 2.5) put an H100 SXM at 1980 MHz and
95% at 687.5 W, close to its 700 W limit, and at the 1410 MHz of a thermal slowdown at 334 W.

Power cap: the scenario's ``sm_clock`` is the clock the GPU would run at unconstrained (the
*demanded* clock). When P(demanded, u) is above the power limit, SwPowerCap engages and the
clock drops to the highest whole MHz at which the draw fits (never below ``min_sm_clock``)::

    f_cap = floor(max_sm_clock x ((limit - idle) / ((full - idle) x u/100)) ^ (1/k))

Tokens (``ServingModel``), per GPU::

    tokens/s = base_tokens_per_second x u/100 x (f / max_sm_clock) ^ alpha

alpha the workload's clock elasticity (1 compute-bound; about 0.3 for memory-bound decode).
An endpoint serving several GPUs as one tensor-parallel group runs at the pace of its slowest
GPU: n x min(per-GPU rate); a data-parallel endpoint sums its GPUs.

``steady_state`` and ``best_power_limit`` answer analytically what a GPU does at a given power
limit (tokens/s, watts, tokens per joule, tokens per dollar): tests and ``gpucostd calibrate``
compute the true optimum from the same functions the simulator runs on.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.snapshot import CLOCK_EVENT_REASONS

POWER_REASON = "SwPowerCap"


# --------------------------------------------------------------------------- power
@dataclass(frozen=True)
class PowerModel:
    idle_watts: float = 70.0
    full_load_watts: float = 720.0
    clock_exponent: float = 2.5
    min_sm_clock: int = 345

    def power(self, sm_clock: float, max_sm_clock: float, utilization: float) -> float:
        """Draw in watts at SM clock `sm_clock` (MHz) and `utilization` (percent)."""
        if max_sm_clock <= 0:
            return self.idle_watts
        rel = max(0.0, float(sm_clock)) / float(max_sm_clock)
        u = min(100.0, max(0.0, float(utilization))) / 100.0
        return self.idle_watts + (self.full_load_watts - self.idle_watts) * u * \
            rel ** self.clock_exponent

    def capped_clock(self, limit: float, max_sm_clock: float, utilization: float) -> int:
        """The highest whole MHz (<= max_sm_clock) whose draw fits `limit`; min_sm_clock when
        none does."""
        u = min(100.0, max(0.0, float(utilization))) / 100.0
        dyn = (self.full_load_watts - self.idle_watts) * u
        if dyn <= 0 or limit >= self.idle_watts + dyn:
            return int(max_sm_clock)
        room = float(limit) - self.idle_watts
        if room <= 0:
            return int(min(self.min_sm_clock, max_sm_clock))
        f = int(math.floor(max_sm_clock * (room / dyn) ** (1.0 / self.clock_exponent)))
        while f > self.min_sm_clock and self.power(f, max_sm_clock, utilization) > limit:
            f -= 1          # float rounding at the boundary
        return int(max(min(self.min_sm_clock, max_sm_clock), min(f, max_sm_clock)))

    def operating_point(self, demand_clock: float, max_sm_clock: float, utilization: float,
                        limit: float) -> Tuple[int, float, bool]:
        """(sm_clock, power_watts, capped) of a GPU that wants `demand_clock` under `limit`."""
        demand = self.power(demand_clock, max_sm_clock, utilization)
        if demand <= limit:
            return int(demand_clock), _mw(demand), False
        f = min(int(demand_clock), self.capped_clock(limit, max_sm_clock, utilization))
        return f, _mw(self.power(f, max_sm_clock, utilization)), True


def _mw(watts: float) -> float:
    """Watts rounded to the milliwatt NVML reports."""
    return round(watts * 1000.0) / 1000.0


# Keys the physics adds to a GPU state: what the scenario asked for before the power cap.
DEMAND_CLOCK = "demand_sm_clock"
DEMAND_REASONS = "demand_clock_event_reasons"


def apply_power(state: Dict[str, Any], model: PowerModel) -> Dict[str, Any]:
    """Fill `state` (a GPU state dict of the scenario) with the physics: sm_clock, power_draw
    and SwPowerCap from its demanded clock, utilization and power limit. Idempotent: the
    demanded values are kept under DEMAND_CLOCK / DEMAND_REASONS, so a state whose power limit
    changed (a setter) is recomputed from them."""
    demand = state.get(DEMAND_CLOCK, state["sm_clock"])
    reasons = tuple(state.get(DEMAND_REASONS, state["clock_event_reasons"]))
    state[DEMAND_CLOCK] = demand
    state[DEMAND_REASONS] = reasons
    f, p, capped = model.operating_point(demand, state["max_sm_clock"], state["utilization"],
                                         state["power_limit"])
    state["sm_clock"] = f
    state["power_draw"] = p
    if capped and POWER_REASON not in reasons and \
            POWER_REASON in state["supported_clock_event_reasons"]:
        reasons = reasons + (POWER_REASON,)
    state["clock_event_reasons"] = _ordered(reasons, state)
    return state


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
    model_name: str = "meta-llama/Llama-3.1-70B-Instruct"


@dataclass(frozen=True)
class ServingModel:
    base_tokens_per_second: float = 2000.0     # per GPU at 100% utilization and max clock
    clock_elasticity: float = 0.3              # alpha
    prompt_tokens_per_generated: float = 2.0
    tokens_per_request: float = 256.0
    endpoints: Tuple[EndpointModel, ...] = field(default_factory=tuple)

    def gpu_rate(self, sm_clock: float, max_sm_clock: float, utilization: float) -> float:
        """Generated tokens per second of one GPU."""
        if max_sm_clock <= 0 or sm_clock <= 0:
            return 0.0
        u = min(100.0, max(0.0, float(utilization))) / 100.0
        return self.base_tokens_per_second * u * \
            (float(sm_clock) / float(max_sm_clock)) ** self.clock_elasticity

    def state_rate(self, state: Mapping[str, Any]) -> float:
        """gpu_rate of a scenario GPU state (0 while lost)."""
        if state.get("lost"):
            return 0.0
        return self.gpu_rate(state["sm_clock"], state["max_sm_clock"], state["utilization"])

    def endpoint_rate(self, endpoint: EndpointModel, rates: Sequence[float]) -> float:
        """Tokens/s of an endpoint from its GPUs' rates (in endpoint.gpus order)."""
        if not rates:
            return 0.0
        if endpoint.parallel == "tensor":
            return len(rates) * min(rates)
        return float(sum(rates))


def steady_state(power: PowerModel, serving: ServingModel, power_limit: float,
                 max_sm_clock: float = 1980, demand_clock: Optional[float] = None,
                 utilization: float = 95.0, gpu_hour_usd: float = 0.0,
                 energy_usd_per_kwh: float = 0.0, pue: float = 1.0) -> Dict[str, Any]:
    """What one GPU does at `power_limit` in steady state: sm_clock, power_watts, capped,
    tokens_per_second, tokens_per_joule and (with a price) dollars_per_hour and
    tokens_per_dollar. Pure; the simulator gives the same numbers."""
    demand = max_sm_clock if demand_clock is None else demand_clock
    f, p, capped = power.operating_point(demand, max_sm_clock, utilization, power_limit)
    rate = serving.gpu_rate(f, max_sm_clock, utilization)
    usd_h = gpu_hour_usd + p / 1000.0 * pue * energy_usd_per_kwh
    return {"power_limit_watts": float(power_limit), "sm_clock_mhz": f, "power_watts": p,
            "capped": capped, "tokens_per_second": rate,
            "tokens_per_joule": rate / p if p > 0 else None,
            "dollars_per_hour": usd_h,
            "tokens_per_dollar": rate * 3600.0 / usd_h if usd_h > 0 else None}


def best_power_limit(power: PowerModel, serving: ServingModel, lo: float, hi: float,
                     step: float = 1.0, objective: str = "tokens_per_dollar",
                     **kw: Any) -> Dict[str, Any]:
    """The power limit in [lo, hi] (a grid of `step` W) that maximizes `objective`
    ("tokens_per_dollar", "tokens_per_joule" or "tokens_per_second") of steady_state(**kw);
    ties go to the lower limit. Returns that steady_state."""
    best: Optional[Dict[str, Any]] = None
    n = int(math.floor((hi - lo) / step + 1e-9))
    for i in range(n + 1):
        st = steady_state(power, serving, lo + i * step, **kw)
        v = st.get(objective)
        if v is None:
            continue
        if best is None or v > best[objective] * (1 + 1e-12):
            best = st
    if best is None:
        raise ValueError(f"{objective} is undefined over {lo:g}..{hi:g} W (set a price for "
                         "tokens_per_dollar)")
    return best


def gpu_at_power_limit(scenario: Any, index: int, t: float, power_limit: float,
                       **prices: Any) -> Dict[str, Any]:
    """steady_state of GPU `index` of a scenario (with [physics] and [serving]) at time t, had
    its power limit been `power_limit`: its demanded clock and utilization at t."""
    st = scenario.state_ref(index, t)
    return steady_state(scenario.physics, scenario.serving, power_limit,
                        max_sm_clock=st["max_sm_clock"],
                        demand_clock=st.get(DEMAND_CLOCK, st["sm_clock"]),
                        utilization=st["utilization"], **prices)


def endpoint_at_power_limits(scenario: Any, endpoint: int, t: float,
                             limits: Mapping[int, float]) -> float:
    """Tokens/s of simulated endpoint `endpoint` at time t with these power limits
    ({GPU index: watts}; GPUs not named keep their limit at t)."""
    sv = scenario.serving
    ep = sv.endpoints[endpoint]
    rates = []
    for i in ep.gpus:
        st = scenario.state_ref(i, t)
        limit = limits.get(i, st["power_limit"])
        rates.append(gpu_at_power_limit(scenario, i, t, limit)["tokens_per_second"])
    return sv.endpoint_rate(ep, rates)


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
    "idle_watts": ("number", 70.0, "Draw at 0% utilization, W.", 0, 10000),
    "full_load_watts": ("number", 720.0, "Draw at 100% utilization and max_sm_clock, W.", 1,
                        10000),
    "clock_exponent": ("number", 2.5, "Dynamic power grows with (clock / max) ^ this.", 0.1, 10),
    "min_sm_clock": ("int", 345, "Lowest clock the power cap may set, MHz.", 1, 100000),
}
SERVING_KEYS: Dict[str, Tuple[str, Any, str, Optional[float], Optional[float]]] = {
    "base_tokens_per_second": ("number", 2000.0, "Generated tokens/s of one GPU at 100% "
                               "utilization and max clock.", 0, 1e9),
    "clock_elasticity": ("number", 0.3, "alpha: tokens/s grow with (clock / max) ^ alpha "
                         "(1 compute-bound, ~0.3 memory-bound decode).", 0, 2),
    "prompt_tokens_per_generated": ("number", 2.0, "Prompt tokens per generated token.", 0, 1e6),
    "tokens_per_request": ("number", 256.0, "Generated tokens per request.", 1, 1e9),
}
ENDPOINT_KEYS: Dict[str, Tuple[str, Any, str, Optional[float], Optional[float]]] = {
    "gpus": ("int_list", None, "GPU indexes this server runs on (default: all).", 0, 63),
    "parallel": ("choice", "tensor", "\"tensor\" (one group: n x slowest GPU) or \"data\" "
                 "(sum of GPUs).", None, None),
    "requests_running": ("number", 32.0, "vllm:num_requests_running.", 0, 1e9),
    "requests_waiting": ("number", 0.0, "vllm:num_requests_waiting.", 0, 1e9),
    "kv_cache_usage": ("number", 0.45, "vllm:kv_cache_usage_perc, 0..1.", 0, 1),
    "preemptions_per_second": ("number", 0.0, "Rate of vllm:num_preemptions_total.", 0, 1e9),
    "queue_time_seconds": ("number", 0.05, "Each request's vllm:request_queue_time_seconds.", 0,
                           1e6),
    "model_name": ("str", "meta-llama/Llama-3.1-70B-Instruct", "The model_name label.", None,
                   None),
}
PARALLEL_CHOICES = ("tensor", "data")


def check_value(kind: str, value: Any, lo: Optional[float], hi: Optional[float]
                ) -> Tuple[Any, Optional[str]]:
    """(value, None) or (None, why it is not allowed) for one [physics]/[serving] value."""
    if kind == "str":
        return (value, None) if isinstance(value, str) else (None, "wrong type; expected a string")
    if kind == "choice":
        if value in PARALLEL_CHOICES:
            return value, None
        return None, "allowed: " + ", ".join(f'"{c}"' for c in PARALLEL_CHOICES)
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
