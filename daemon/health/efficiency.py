"""Serving diagnosis and the tokens-per-dollar floor: findings (with the fix in words) about how
well the node turns paid GPU-time into tokens. Fed from the cycle's snapshot parts: the GPU
readings, the cost report (gpucostd.cost) and the inference endpoints' readings.

Rules (docs/cost.md, "Serving diagnosis"), each held for ``HOLD_SECONDS`` (at most
``[efficiency] window_seconds``) before it is reported, so one odd scrape says nothing:

- ``serving_bottleneck_before_gpu`` (WARN): requests wait while the endpoint's GPUs are below
  the target utilization -> the bottleneck is before the GPU;
- ``serving_memory_bound`` (WARN): KV-cache usage at or above 95%, or preemptions rising;
- ``serving_over_provisioned`` (OK, advice): GPUs under the target with nothing waiting;
- ``tokens_falling_not_hardware`` (OK, advice): tokens/s fell by a fifth or more while the SM
  clocks held -> not a hardware cause;
- the GPM activity findings of gpucostd.health.activity (memory-bound at max clock, tensor
  pipes idle while serving, a pipeline bottleneck);
- ``tokens_per_dollar_below_floor`` (WARN): the floor's state (the event that runs
  ``[hooks] on_inefficient`` is made by ``floor_event``).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from gpucostd.health.activity import activity_findings
from gpucostd.snapshot import Event, Finding, GpuReading, GpuState, Severity

HOLD_SECONDS = 30.0
KV_FULL = 0.95
FALL_RATIO = 0.8              # tokens/s below this share of the recent best: "falling"
FALL_WINDOW_SECONDS = 600.0
CLOCK_HOLD = 0.01             # clocks "hold" when their mean moved less than this share


def _mean_util(gpus: Sequence[GpuReading], indexes: Optional[Sequence[int]]) -> Optional[float]:
    vals = [g.utilization_percent for g in gpus if g.state == GpuState.OK and
            g.utilization_percent is not None and (indexes is None or g.index in indexes)]
    return sum(vals) / len(vals) if vals else None


def _mean_clock(gpus: Sequence[GpuReading]) -> Optional[float]:
    vals = [g.sm_clock_mhz / g.sm_clock_max_mhz for g in gpus if g.state == GpuState.OK and
            g.sm_clock_mhz and g.sm_clock_max_mhz]
    return sum(vals) / len(vals) if vals else None


class EfficiencyJudge:
    """Keeps what the rules need across cycles (since when a condition holds, preemption
    counters, recent tokens/s)."""

    def __init__(self, hold_seconds: float = HOLD_SECONDS):
        self.hold_seconds = hold_seconds
        self._since: Dict[Tuple[str, str], float] = {}
        self._preempt: Dict[str, float] = {}
        self._rates: Deque[Tuple[float, float, float]] = deque()   # (time, tokens/s, clock)
        self._totals: Dict[str, Tuple[Optional[float], ...]] = {}  # url -> timing totals

    def judge(self, gpus: Sequence[GpuReading], cost: Any, readings: Sequence[Any], config: Any,
              now: float) -> List[Finding]:
        target = float(config.efficiency.target_utilization_percent)
        hold = min(self.hold_seconds, float(config.efficiency.window_seconds))
        held: Dict[Tuple[str, str], Tuple[Severity, str, str]] = {}
        activity_findings(gpus, readings, config, held,     # GPM: gpucostd.health.activity
                          self._timing(readings))
        for r in readings or ():
            if r is None or getattr(r, "error", None):
                continue
            url = r.url
            util = _mean_util(gpus, r.gpus)
            waiting = r.requests_waiting
            which = "its GPUs" if r.gpus is not None else "the GPUs"
            if ("serving_pipeline_bottleneck", url) in held:
                pass                        # the same, said from the GPM activity
            elif waiting and waiting >= 1 and util is not None and util < target:
                held[("serving_bottleneck_before_gpu", url)] = (
                    Severity.WARN,
                    "look before the GPU: preprocessing, tokenization, the scheduler, or the "
                    "server's batch limits (max concurrent sequences) holding requests back",
                    f"{url}: {waiting:.0f} requests waiting while {which} run at {util:.0f}% "
                    f"(target {target:.0f}%): the bottleneck is before the GPU")
            elif util is not None and util < target and waiting is not None and waiting < 1:
                held[("serving_over_provisioned", url)] = (
                    Severity.OK,
                    "consolidate: serve this load on fewer GPUs, or send this server more "
                    "traffic",
                    f"{url}: {which} run at {util:.0f}% (target {target:.0f}%) with nothing "
                    f"waiting: over-provisioned")
            preempt = r.preemptions_total
            last = self._preempt.get(url)
            rising = preempt is not None and last is not None and preempt > last
            if preempt is not None:
                self._preempt[url] = preempt
            kv = r.kv_cache_usage
            if (kv is not None and kv >= KV_FULL) or rising:
                what = (f"KV cache {kv * 100:.0f}% full" if kv is not None and kv >= KV_FULL
                        else "requests are being preempted")
                held[("serving_memory_bound", url)] = (
                    Severity.WARN,
                    "memory-bound: quantize the model or the KV cache, lower the number of "
                    "concurrent sequences, or add GPUs",
                    f"{url}: {what}: the server is memory-bound")
        self._falling(gpus, cost, now, held)
        eff = getattr(cost, "efficiency", None) or {}
        floor = eff.get("floor") or {}
        if floor.get("inefficient"):
            tpd = eff.get("tokens_per_dollar")
            held[("tokens_per_dollar_below_floor", "node")] = (
                Severity.WARN,
                "find the cause below (idle, throttling, serving), then drain and reboot the "
                "node ([hooks] on_inefficient runs once per episode)",
                f"tokens per dollar {_n(tpd)} below the floor "
                f"{_n(config.efficiency.min_tokens_per_dollar)} for "
                f"{config.efficiency.window_seconds:g} s or more")
        out: List[Finding] = []
        for key, (sev, action, message) in held.items():
            since = self._since.setdefault(key, now)
            if key[0] == "tokens_per_dollar_below_floor" or now - since >= hold:
                out.append(Finding("node", key[0], sev, action, message, since=since))
        for key in [k for k in self._since if k not in held]:
            del self._since[key]
        return out

    def _timing(self, readings: Sequence[Any]) -> Dict[str, Tuple[Optional[float],
                                                                  Optional[float]]]:
        """{url: (mean queue time, mean inference time)} of the requests the server finished
        since the last cycle, from its histograms' sums and counts (None where it has none,
        or none finished)."""
        out: Dict[str, Tuple[Optional[float], Optional[float]]] = {}
        for r in readings or ():
            if r is None or getattr(r, "error", None):
                continue
            now = tuple(getattr(r, k, None) for k in (
                "queue_seconds_total", "queue_requests_total", "inference_seconds_total",
                "inference_requests_total"))
            last = self._totals.get(r.url)
            self._totals[r.url] = now
            if last is None:
                continue
            means = []
            for (s1, n1), (s0, n0) in ((now[0:2], last[0:2]), (now[2:4], last[2:4])):
                ok = None not in (s1, n1, s0, n0) and n1 > n0 and s1 >= s0
                means.append((s1 - s0) / (n1 - n0) if ok else None)
            out[r.url] = (means[0], means[1])
        return out

    def _falling(self, gpus, cost, now: float, held) -> None:
        tk = getattr(cost, "tokens", None)
        rate = getattr(tk, "tokens_per_second", None)
        clock = _mean_clock(gpus)
        if rate is None or clock is None:
            return
        self._rates.append((now, rate, clock))
        while self._rates and self._rates[0][0] < now - FALL_WINDOW_SECONDS:
            self._rates.popleft()
        best = max(self._rates, key=lambda x: x[1])
        if best[1] > 0 and rate < FALL_RATIO * best[1] and abs(clock - best[2]) <= CLOCK_HOLD:
            held[("tokens_falling_not_hardware", "node")] = (
                Severity.OK,
                "not a hardware cause: look at the request mix (prompt and output lengths), the "
                "server's settings and its clients",
                f"tokens/s fell to {rate:.0f} from {best[1]:.0f} while the SM clocks held "
                f"({clock * 100:.0f}% of max)")


def _n(x: Any) -> str:
    if x is None:
        return "-"
    return f"{float(x):,.0f}"


def floor_event(transition: str, cost: Any, config: Any, now: float) -> Event:
    """The event of a floor transition: "inefficient" (runs [hooks] on_inefficient) or
    "efficient" (runs on_efficient). Its fields carry the figures to the hook's environment."""
    eff = getattr(cost, "efficiency", None) or {}
    floor = float(config.efficiency.min_tokens_per_dollar)
    window = float(config.efficiency.window_seconds)
    fields = {"tokens_per_dollar": eff.get("tokens_per_dollar"),
              "min_tokens_per_dollar": floor, "window_seconds": window,
              "tokens_per_second": eff.get("tokens_per_second"),
              "cost_dollars_per_hour": eff.get("cost_dollars_per_hour"),
              "cost_per_million_tokens": eff.get("cost_per_million_tokens"),
              "idle_ratio": eff.get("idle_ratio")}
    if transition == "inefficient":
        return Event(now, "node", "node_inefficient", Severity.WARN,
                     "drain the node and reboot it ([hooks] on_inefficient)",
                     f"tokens per dollar {_n(fields['tokens_per_dollar'])} stayed below the "
                     f"floor {_n(floor)} for {window:g} s", fields=fields)
    return Event(now, "node", "node_efficient", Severity.OK,
                 "undrain the node if gpucostd drained it ([hooks] on_efficient)",
                 f"tokens per dollar {_n(fields['tokens_per_dollar'])} back at or above the "
                 f"floor {_n(floor)} for {window:g} s", fields=fields)
