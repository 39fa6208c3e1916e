"""Findings from what the GPUs' units did (GPM activity: gpucostd.snapshot.GpuActivity), not
from GPU-Util. Pure rules over one cycle's GPU readings and inference endpoint readings; the
serving diagnosis (gpucostd.health.efficiency) holds them like its own before reporting.

- ``serving_memory_bound_at_max_clock`` (OK, advice): a serving GPU that is memory-bound (DRAM
  bandwidth busy, SMs and tensor pipes mostly not) runs at its max SM clock: decode does not
  use those clocks, and locking them lower saves energy at almost the same tokens/s
  (arXiv:2605.11999: up to 32% of decode energy);
- ``tensor_pipes_idle_while_serving`` (WARN): a serving GPU's SMs work but its tensor pipes
  are idle: the model runs without tensor cores (FP32 kernels, a build without them, or no
  FP16/BF16/FP8 weights);
- ``serving_pipeline_bottleneck`` (WARN): requests wait (in the queue now, or longer in the
  queue than in inference, by the server's histograms) while the GPUs' SMs and DRAM are both
  mostly idle (whatever GPU-Util says): the requests are held back before the GPU.

Each names its figures (SM, tensor, DRAM activity, clock, GPU-Util, requests waiting).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from gpucostd.snapshot import GpuReading, GpuState, Severity

MEMORY_BOUND_DRAM = 0.5       # DRAM bandwidth share at or above which a GPU is memory-bound...
MEMORY_BOUND_SM = 0.5         # ... when its SMs are busy less than this
MAX_CLOCK_SHARE = 0.97        # "at max clock": SM clock at or above this share of the max
TENSOR_IDLE = 0.02            # tensor pipes "idle" below this share
TENSOR_IDLE_MIN_SM = 0.10     # ... while the SMs work at least this much
STARVED_SM = 0.25             # SMs "mostly idle" below this share ...
STARVED_DRAM = 0.25           # ... with DRAM below this share

Held = Dict[Tuple[str, str], Tuple[Severity, str, str]]


def _gpus_of(gpus: Sequence[GpuReading], indexes: Optional[Sequence[int]], busy_pct: float
             ) -> List[GpuReading]:
    """The endpoint's GPUs that are read, busy (GPU-Util) and have GPM activity."""
    return [g for g in gpus if g.state == GpuState.OK and g.activity is not None
            and g.activity.sm is not None and (indexes is None or g.index in indexes)
            and (g.utilization_percent or 0.0) >= busy_pct]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _names(gs: Sequence[GpuReading]) -> str:
    return "GPU " + ",".join(str(g.index) for g in gs)


def activity_findings(gpus: Sequence[GpuReading], readings: Sequence[Any], config: Any,
                      held: Held, timing: Optional[Dict[str, Tuple[Optional[float],
                                                                  Optional[float]]]] = None
                      ) -> None:
    """Add the activity findings of this cycle to `held` ({(code, subject): (severity,
    action, message)}), one per serving endpoint (subject: its URL). `timing`: {url: (mean
    queue time, mean inference time)} of the requests finished since the last cycle, where the
    server has the histograms (EfficiencyJudge keeps their totals)."""
    busy_pct = float(config.cost.busy_utilization_percent)
    for r in readings or ():
        if r is None or getattr(r, "error", None):
            continue
        url = r.url
        gs = _gpus_of(gpus, r.gpus, busy_pct)
        if not gs:
            continue
        sm = _mean([g.activity.sm for g in gs])
        dram = _mean([g.activity.dram for g in gs])
        tensor = _mean([g.activity.tensor for g in gs])
        util = _mean([g.utilization_percent for g in gs])
        at_max = [g for g in gs if g.sm_clock_mhz and g.sm_clock_max_mhz
                  and g.sm_clock_mhz >= MAX_CLOCK_SHARE * g.sm_clock_max_mhz]
        bound = [g for g in at_max if (g.activity.dram or 0.0) >= MEMORY_BOUND_DRAM
                 and g.activity.sm < MEMORY_BOUND_SM]
        if bound:
            clock = bound[0]
            held[("serving_memory_bound_at_max_clock", url)] = (
                Severity.OK,
                "clocks above what decode uses: lock the SM clocks lower ([tuning.gpu] "
                "locked_sm_clocks_mhz; `gpucostd calibrate --lever clocks` finds the clock "
                "with the most tokens per joule, docs/tuning.md)",
                f"{url}: {_names(bound)} memory-bound at the max clock "
                f"({clock.sm_clock_mhz:.0f}/{clock.sm_clock_max_mhz:.0f} MHz): DRAM "
                f"{_pct(_mean([g.activity.dram for g in bound]))} busy, SMs "
                f"{_pct(_mean([g.activity.sm for g in bound]))}, tensor pipes "
                f"{_pct(_mean([g.activity.tensor for g in bound]))} at GPU-Util "
                f"{_mean([g.utilization_percent for g in bound]):.0f}%")
        idle_tc = [g for g in gs if g.activity.tensor is not None
                   and g.activity.tensor < TENSOR_IDLE and g.activity.sm >= TENSOR_IDLE_MIN_SM]
        if idle_tc and getattr(r, "tokens_total", None) is not None:
            held[("tensor_pipes_idle_while_serving", url)] = (
                Severity.WARN,
                "the server is not using tensor cores / FP8: check the build (CUDA arch, "
                "kernels) and quantization (FP16/BF16 or FP8 weights, not FP32)",
                f"{url}: {_names(idle_tc)} serve with the SMs "
                f"{_pct(_mean([g.activity.sm for g in idle_tc]))} busy but the tensor pipes "
                f"{_pct(_mean([g.activity.tensor for g in idle_tc]))} (FP32 pipe "
                f"{_pct(_mean([g.activity.fp32 for g in idle_tc]))})")
        waiting = getattr(r, "requests_waiting", None)
        kv = getattr(r, "kv_cache_usage", None)
        queue, run = (timing or {}).get(url, (None, None))
        queued = waiting is not None and waiting >= 1
        slow_queue = queue is not None and run is not None and queue >= run > 0
        if (queued or slow_queue) and sm is not None and sm < STARVED_SM \
                and (dram is None or dram < STARVED_DRAM) and (kv is None or kv < 0.95):
            why = f"{waiting:.0f} requests waiting" if queued else "requests wait"
            if queue is not None and run is not None:
                why += f" ({queue:.2f} s in the queue for {run:.2f} s of inference each)"
            held[("serving_pipeline_bottleneck", url)] = (
                Severity.WARN,
                "look before the GPU: the request queue waits while the GPU does little "
                "(preprocessing, tokenization, the scheduler, the server's batch limits), "
                "compare the requests' queue time with their inference time",
                f"{url}: {why} while {_names(gs)} do little: SMs "
                f"{_pct(sm)}, DRAM {_pct(dram)}, tensor {_pct(tensor)} busy (GPU-Util "
                f"{util:.0f}%): a pipeline bottleneck")
