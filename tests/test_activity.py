"""Cost and diagnosis from the work done (issue 21): idle and underused capacity priced from SM
activity where GPM exists (GPU-Util the fallback, and the report says which), the three GPM
findings with their figures and action, and the demo showing GPM activity per GPU in status,
status --json and /metrics."""
from __future__ import annotations

import pytest

from conftest import metric_value, wait_for
from gpucostd import config as cfgmod
from gpucostd.clock import VirtualClock
from gpucostd.cost.accountant import CostAccountant
from gpucostd.cost.report import status_lines
from gpucostd.health.efficiency import EfficiencyJudge
from gpucostd.probes.inference import InferenceReading
from gpucostd.snapshot import GpuActivity, GpuReading

H100 = "NVIDIA H100 80GB HBM3"
URL = "http://127.0.0.1:8000/metrics"
# decode-heavy serving as builtin:h100x8 reads it (gpucostd.sim.physics)
DECODE = GpuActivity(sm=0.3135, sm_occupancy=0.154, tensor=0.119, tensor_hmma=0.119,
                     tensor_imma=0.0, dram=0.736, fp16=0.02, fp32=0.049, seconds=1.0)


def cfg(text=""):
    return cfgmod.parse(text, None)


def gpu(index=0, **kw):
    base = dict(index=index, uuid=f"GPU-{index}", name=H100, sm_clock_mhz=1980.0,
                sm_clock_max_mhz=1980.0, utilization_percent=95.0, clock_event_reasons=(),
                power_draw_watts=317.0, gpm_supported=True, activity=DECODE)
    base.update(kw)
    return GpuReading(**base)


def serving(gpus=(0, 1), waiting=0.0, kv=0.45, total=1000.0):
    return [InferenceReading(total, 0.0, "vllm:generation_tokens_total", 1, None, url=URL,
                             gpus=gpus, server="vllm", requests_waiting=waiting,
                             kv_cache_usage=kv)]


# ---------------------------------------------------------------------- cost
def test_underused_capacity_is_priced_from_sm_activity_where_gpm_exists():
    """Done-when: a GPU whose SMs are 30% active at 95% GPU-Util is priced from the 30%."""
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 3.6\n"), None, clock)
    act30 = GpuActivity(sm=0.30, tensor=0.1, dram=0.7)
    rep = None
    for t in range(0, 1001):
        clock._t = float(t)
        rep = acc.update([gpu(0, activity=act30),                    # GPM: 30% of the SMs
                          gpu(1, gpm_supported=False, activity=None)], float(t))  # GPU-Util
    g0, g1 = [g.to_json() for g in rep.gpus]
    assert g0["idle_seconds"] == 0
    assert g0["underused_seconds"] == pytest.approx(0.70 * 1000)     # 1 - 30%, not 1 - 95%
    assert g0["underused_dollars"] == pytest.approx(0.70)            # at $3.60 per GPU-hour
    assert g0["idle_basis"] == "sm_activity"
    assert g1["underused_seconds"] == 0 and g1["idle_basis"] == "utilization"
    eff = rep.to_json()["node"]["efficiency"]
    assert eff["idle_basis"] == "mixed"
    assert eff["idle_ratio"] == pytest.approx(0.70 / 2)


def test_status_and_the_cost_report_say_what_idle_was_priced_on():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 2.0\n"), None, clock)
    for t in range(0, 31):
        clock._t = float(t)
        acc.update([gpu(0), gpu(1)], float(t))
        rep = acc.update_tokens(serving(total=1000.0 * t)[0:1], float(t))
    text = "\n".join(status_lines(rep))
    assert "idle 69% (of SM activity)" in text, text
    from gpucostd.cost.report import format_cost
    out = format_cost(rep.to_json())
    assert "underused = unused share of busy GPUs' work: SM activity (GPM) on GPU 0,1" in out


# ---------------------------------------------------------------------- findings
def judge(gpus, readings):
    return {f.code: f for f in EfficiencyJudge(hold_seconds=0).judge(gpus, None, readings,
                                                                      cfg(), 0.0)}


def test_memory_bound_serving_at_max_clock_says_lock_clocks_with_its_figures():
    f = judge([gpu(0), gpu(1)], serving())
    got = f["serving_memory_bound_at_max_clock"]
    assert got.severity == 0 and "lock" in got.action and "calibrate" in got.action
    for figure in ("DRAM 74% busy", "SMs 31%", "tensor pipes 12%", "1980/1980 MHz",
                   "GPU-Util 95%"):
        assert figure in got.message, got.message
    # clocks already locked lower, or compute-bound work: not this finding
    assert "serving_memory_bound_at_max_clock" not in judge(
        [gpu(0, sm_clock_mhz=1590.0), gpu(1, sm_clock_mhz=1590.0)], serving())
    busy = GpuActivity(sm=0.85, tensor=0.55, dram=0.33)
    assert "serving_memory_bound_at_max_clock" not in judge(
        [gpu(0, activity=busy), gpu(1, activity=busy)], serving())
    # no GPM: nothing is claimed from GPU-Util
    assert not {"serving_memory_bound_at_max_clock", "tensor_pipes_idle_while_serving",
                "serving_pipeline_bottleneck"} & set(judge(
                    [gpu(0, activity=None, gpm_supported=False)], serving(gpus=(0,))))


def test_tensor_pipes_idle_while_serving_says_check_build_and_quantization():
    fp32 = GpuActivity(sm=0.7, tensor=0.0, tensor_hmma=0.0, dram=0.4, fp32=0.6)
    got = judge([gpu(0, activity=fp32), gpu(1, activity=fp32)], serving())[
        "tensor_pipes_idle_while_serving"]
    assert got.severity == 1
    assert "tensor cores / FP8" in got.action and "quantization" in got.action
    assert "SMs 70% busy but the tensor pipes 0%" in got.message and "FP32 pipe 60%" in \
        got.message
    assert "tensor_pipes_idle_while_serving" not in judge([gpu(0), gpu(1)], serving())


def test_low_activity_with_a_waiting_queue_is_a_pipeline_bottleneck():
    starved = GpuActivity(sm=0.08, tensor=0.02, dram=0.10)
    f = judge([gpu(0, activity=starved), gpu(1, activity=starved)], serving(waiting=12.0))
    got = f["serving_pipeline_bottleneck"]
    assert got.severity == 1 and "before the GPU" in got.action
    assert "12 requests waiting" in got.message and "SMs 8%" in got.message and \
        "GPU-Util 95%" in got.message
    assert "serving_bottleneck_before_gpu" not in f            # said once, from GPM
    # memory-bound decode with a queue (DRAM busy) is not starved; nothing waiting: no finding
    assert "serving_pipeline_bottleneck" not in judge([gpu(0), gpu(1)], serving(waiting=12.0))
    assert "serving_pipeline_bottleneck" not in judge(
        [gpu(0, activity=starved), gpu(1, activity=starved)], serving(waiting=0.0))


# ---------------------------------------------------------------------- the demo
def test_the_demo_shows_gpm_activity_per_gpu_and_prices_idle_from_it(daemon_factory):
    d = daemon_factory(interval=0.5, extra_config="[efficiency]\nwindow_seconds = 1\n").start()

    def ready():
        _rc, st = d.status_json()
        codes = {f["code"] for f in st["node"]["findings"]}
        eff = ((st.get("cost") or {}).get("node") or {}).get("efficiency") or {}
        if all(g.get("activity") for g in st["gpus"]) and eff.get("idle_basis") and \
                "serving_memory_bound_at_max_clock" in codes:
            return st
        return None
    st = wait_for(ready, 45, what="GPM activity, idle basis and the clock finding in status")
    g = st["gpus"][5]
    assert g["gpm_supported"] is True and g["utilization_percent"] == 95
    assert g["activity"]["sm"] == pytest.approx(0.3135, abs=1e-3)
    assert g["activity"]["dram"] == pytest.approx(0.736, abs=1e-3)
    assert st["cost"]["node"]["efficiency"]["idle_basis"] == "sm_activity"
    text = d.cli("status").stdout
    assert "SM/TC/MEM" in text and "31/12/74%" in text
    assert "(of SM activity)" in text
    m = d.metrics()
    assert metric_value(m, "gpucostd_gpu_sm_active_ratio", gpu="5") == pytest.approx(0.3135,
                                                                                   abs=1e-3)
    assert metric_value(m, "gpucostd_gpu_gpm_supported", gpu="0") == 1
    assert metric_value(m, "gpucostd_gpu_utilization_ratio", gpu="5") == pytest.approx(0.95)


def test_queue_time_against_inference_time_names_the_pipeline_bottleneck():
    """The server's histograms (vLLM: request_queue_time_seconds, request_inference_time_
    seconds): requests that wait longer than they run while the GPUs do little."""
    starved = GpuActivity(sm=0.08, tensor=0.02, dram=0.10)
    gpus = [gpu(0, activity=starved), gpu(1, activity=starved)]
    judge_ = EfficiencyJudge(hold_seconds=0)

    def reading(queue_s, inference_s, n):
        return [InferenceReading(1000.0, 0.0, "vllm:generation_tokens_total", 1, None, url=URL,
                                 gpus=(0, 1), server="vllm", requests_waiting=0.0,
                                 queue_seconds_total=queue_s, queue_requests_total=n,
                                 inference_seconds_total=inference_s,
                                 inference_requests_total=n)]
    first = judge_.judge(gpus, None, reading(100.0, 50.0, 40.0), cfg(), 0.0)
    assert "serving_pipeline_bottleneck" not in {f.code for f in first}   # no delta yet
    got = {f.code: f for f in judge_.judge(gpus, None, reading(124.0, 58.0, 50.0), cfg(), 1.0)}
    msg = got["serving_pipeline_bottleneck"].message
    assert "2.40 s in the queue for 0.80 s of inference each" in msg, msg
    # requests that run longer than they wait, nothing waiting: no finding
    calm = EfficiencyJudge(hold_seconds=0)
    calm.judge(gpus, None, reading(0.0, 0.0, 0.0), cfg(), 0.0)
    assert "serving_pipeline_bottleneck" not in {
        f.code for f in calm.judge(gpus, None, reading(1.0, 80.0, 10.0), cfg(), 1.0)}


def test_the_simulated_vllm_serves_queue_and_inference_time_histograms():
    from gpucostd.probes.inference import Exposition, serving_figures
    from gpucostd.sim.nvml import SimulatedNode
    from gpucostd.sim.serving import SimulatedServing
    clock = VirtualClock()
    node = SimulatedNode("builtin:serving", clock)
    clock.advance(120.0)
    fig = serving_figures(Exposition(SimulatedServing(node).fetch(1)), "vllm")
    ep = node.scenario.serving.endpoints[1]
    assert fig["queue_requests"] == fig["inference_requests"] > 0
    assert fig["queue_seconds"] == pytest.approx(fig["queue_requests"] * ep.queue_time_seconds)
    assert fig["inference_seconds"] == pytest.approx(
        fig["inference_requests"] * ep.inference_time_seconds)
