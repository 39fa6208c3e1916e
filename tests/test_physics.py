"""Simulated power physics and the simulated inference server ([physics], [serving]).

The physics must behave like the hardware where a user can see it (issue 21, sources in
docs/scenarios.md): decode-heavy LLM serving is memory-bound and draws far below the 700 W
limit of an H100 (a limit above the draw changes nothing; a locked SM clock is the lever),
compute-bound prefill runs at the cap; a power limit below the draw engages SwPowerCap and
lowers the clock until the draw fits (the power violation counter advances meanwhile), the
energy counter is the integral of the draw, and the tokens/s of a served model follow the
clock through the phase mix -- tensor-parallel groups at the pace of their slowest GPU.
"""
from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpucostd.clock import RealClock, VirtualClock
from gpucostd.hw.nvml import NvmlGateway
from gpucostd.probes.gpu import GpuProbe
from gpucostd.sim import physics
from gpucostd.sim.nvml import SimulatedNode
from gpucostd.sim.scenario import ScenarioError, load_scenario, parse_scenario
from gpucostd.sim.serving import SimulatedServing

H100 = physics.PowerModel()      # the documented defaults = builtin:h100x8's [physics]


def sim(spec="builtin:h100x8"):
    clock = VirtualClock()
    node = SimulatedNode(load_scenario(spec) if isinstance(spec, str) else spec, clock)
    gw = NvmlGateway(library=node.library, clock=clock)
    assert gw.ensure_initialized(), gw.error
    return node, gw, clock


DECODE = 0.95                    # builtin:h100x8's decode_share (decode-heavy serving)


def relative_rate(x, d0, a_d=0.2, a_p=0.8):
    """The documented R(x) of the phase mix, written out here on its own."""
    return 1.0 / (d0 * x ** -a_d + (1 - d0) * x ** -a_p)


def test_decode_heavy_serving_draws_far_below_the_cap_and_prefill_runs_at_it():
    # arXiv 2605.11999: decode draws 137-300 W on a 700 W H200; issue 21: 150-350 W at max clock
    p = H100.power(1980, 1980, 95, DECODE)
    assert 150 <= p <= 350
    assert H100.power(1980, 1980, 95, 1.0) < p              # pure decode draws less still
    # compute-bound work (prefill, batch) demands more than the 700 W limit: it runs at the cap
    assert H100.power(1980, 1980, 95, 0.0) > 700
    assert H100.power(1980, 1980, 0, DECODE) == H100.idle_watts
    # monotone in clock and in load, whatever the mix
    for d0 in (0.0, 0.5, DECODE, 1.0):
        assert H100.power(1410, 1980, 95, d0) < H100.power(1755, 1980, 95, d0) < \
            H100.power(1980, 1980, 95, d0)
        assert H100.power(1980, 1980, 50, d0) < H100.power(1980, 1980, 95, d0)
    # with no decode the classic model: idle + (full - idle) x u x (f/fmax)^k
    assert H100.power(1500, 1980, 80) == pytest.approx(
        70 + (900 - 70) * 0.8 * (1500 / 1980) ** 3.5)


def test_a_power_limit_above_the_decode_draw_changes_nothing_one_below_engages_swpowercap():
    node, gw, clock = sim()
    probe = GpuProbe(gw)
    clock.advance(100.0)              # GPU 0 healthy at 1980 MHz, 95 %
    g = probe.read()[3]
    p_max = H100.power(1980, 1980, 95, DECODE)
    assert (g.sm_clock_mhz, g.clock_event_reasons) == (1980, ())
    assert g.power_draw_watts == pytest.approx(p_max, abs=1e-3)
    power0 = g.violation_seconds["power"]
    gw.set_power_limit(3, 450)        # above the draw: does not bind
    clock.advance(10.0)
    g = probe.read()[3]
    assert (g.sm_clock_mhz, g.clock_event_reasons) == (1980, ())
    assert g.power_draw_watts == pytest.approx(p_max, abs=1e-3)
    gw.set_power_limit(3, 250)        # below the draw: binds
    clock.advance(10.0)
    g = probe.read()[3]
    assert "SwPowerCap" in g.clock_event_reasons
    assert g.power_draw_watts <= 250 and g.power_draw_watts > 249     # fits, just below
    f = g.sm_clock_mhz
    assert f < 1980
    assert H100.power(f, 1980, 95, DECODE) <= 250 < H100.power(f + 1, 1980, 95, DECODE)
    # the throttle duration counter advanced with it: 10 s capped
    assert g.violation_seconds["power"] - power0 == pytest.approx(10.0)
    # back to the default limit: the cap lifts, the counter stops
    gw.set_power_limit(3, 700)
    clock.advance(5.0)
    g = probe.read()[3]
    assert (g.sm_clock_mhz, g.clock_event_reasons) == (1980, ())
    assert g.violation_seconds["power"] - power0 == pytest.approx(10.0)


def test_energy_counter_is_the_integral_of_the_draw_and_follows_a_power_limit():
    node, gw, clock = sim()
    sc = node.scenario
    clock.advance(240.0)              # two whole cycles
    e0 = [node.energy_joules(i) for i in range(8)]
    # GPU 1: the decode draw all along; GPU 0: 60 s of every 120 at 1410 MHz
    p_full = round(H100.power(1980, 1980, 95, DECODE), 3)
    assert e0[1] == pytest.approx(p_full * 240)
    p_hot = H100.power(1410, 1980, 95, DECODE)
    assert e0[0] == pytest.approx(2 * (60 * p_hot + 60 * p_full), rel=1e-6)
    assert e0[0] == pytest.approx(sc.energy_joules_at(0, 240.0))
    # through NVML, in mJ
    read = gw.call(1, "energy", lambda h: __import__("pynvml").nvmlDeviceGetTotalEnergyConsumption(h))
    assert read == round(e0[1] * 1000)
    gw.set_power_limit(1, 250)
    clock.advance(100.0)
    assert node.energy_joules(1) - e0[1] == pytest.approx(100 * node.state(1)["power_draw"])
    assert node.state(1)["power_draw"] <= 250


def test_token_rate_follows_the_phase_mix_and_tensor_parallel_waits_for_the_slowest():
    sc = load_scenario("builtin:h100x8")
    sv = sc.serving
    assert [ep.gpus for ep in sv.endpoints] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    full = sv.gpu_rate(1980, 1980, 95, DECODE)
    assert full == pytest.approx(2000 * 0.95)
    hot = sv.gpu_rate(1410, 1980, 95, DECODE)
    assert hot == pytest.approx(2000 * 0.95 * relative_rate(1410 / 1980, DECODE))
    # decode barely follows the clock (elasticity ~0.2-0.3 near max), prefill follows it
    x = 0.9
    elasticity = math.log(relative_rate(x, DECODE)) / math.log(x)
    assert 0.2 <= elasticity <= 0.3
    assert sv.gpu_rate(1782, 1980, 95, 0.0) == pytest.approx(2000 * 0.95 * 0.9 ** 0.8)
    # endpoint 0 holds GPU 0: while it is hot the whole group runs at its pace
    assert sc.endpoint_rate_at(0, 30.0) == pytest.approx(4 * hot)
    assert sc.endpoint_rate_at(0, 100.0) == pytest.approx(4 * full)
    assert sc.endpoint_rate_at(1, 30.0) == pytest.approx(4 * full)
    assert sc.endpoint_tokens_at(0, 240.0) == pytest.approx(2 * (60 * 4 * hot + 60 * 4 * full))


def test_steady_state_is_what_the_simulator_does_at_that_limit():
    node, gw, clock = sim()
    sv, pm = node.scenario.serving, node.scenario.physics
    for g in (4, 5, 6, 7):
        gw.set_power_limit(g, 250)
    t0 = 100.0
    clock.advance(t0)
    n0 = node.endpoint_tokens(1)
    clock.advance(10.0)
    got = (node.endpoint_tokens(1) - n0) / 10.0
    want = physics.steady_state(pm, sv, 250, utilization=95, decode_share=DECODE)
    assert got == pytest.approx(4 * want["tokens_per_second"])
    assert node.state(4)["power_draw"] == pytest.approx(want["power_watts"])
    assert want["capped"] and want["power_watts"] <= 250
    # the same from the scenario's own state at that time
    assert physics.endpoint_at_power_limits(node.scenario, 1, t0, {g: 250 for g in (4, 5, 6, 7)}) \
        == pytest.approx(got)
    assert physics.gpu_at_power_limit(node.scenario, 4, t0, 250)["power_watts"] == \
        pytest.approx(want["power_watts"])
    # the analytic optimum: with a GPU-hour price and an energy price, the best limit for
    # tokens per dollar is inside the range and beats both ends
    kw = dict(utilization=95, gpu_hour_usd=2.0, energy_usd_per_kwh=0.15, pue=1.3,
              decode_share=0.0)
    best = physics.best_power_limit(pm, sv, 200, 700, **kw)
    assert best["tokens_per_dollar"] >= physics.steady_state(pm, sv, 700, **kw)["tokens_per_dollar"]
    per_joule = physics.best_power_limit(pm, sv, 200, 700, objective="tokens_per_joule", **kw)
    assert per_joule["power_limit_watts"] < best["power_limit_watts"] <= 700


@pytest.mark.parametrize("spec", ["builtin:decode", "builtin:h100x8"])
def test_decode_heavy_the_power_limit_does_not_bind_and_a_locked_clock_is_the_lever(spec):
    """Issue 21: on a decode-heavy endpoint every power limit above the draw changes tokens/s
    and watts by under 2%, and a locked SM clock gives at least 20% more tokens per joule at
    95% or more of the best throughput (arXiv 2605.11999: up to 32% of decode energy)."""
    sc = load_scenario(spec)
    pm, sv = sc.physics, sc.serving
    kw = dict(utilization=95, decode_share=sc.gpu_state_at(1, 100.0)["decode_share"])
    top = physics.steady_state(pm, sv, 700, **kw)
    assert not top["capped"] and 150 <= top["power_watts"] <= 350
    for limit in range(int(math.ceil(top["power_watts"])), 701, 10):
        st = physics.steady_state(pm, sv, limit, **kw)
        assert not physics.limit_binds(pm, limit, **kw)
        assert st["tokens_per_second"] == pytest.approx(top["tokens_per_second"], rel=0.02)
        assert st["power_watts"] == pytest.approx(top["power_watts"], rel=0.02)
    best = physics.best_locked_clock(pm, sv, physics.clock_grid(795, 1980, 15),
                                     objective="tokens_per_joule", min_throughput=0.95, **kw)
    assert best["tokens_per_second"] >= 0.95 * top["tokens_per_second"]
    assert best["tokens_per_joule"] >= 1.2 * top["tokens_per_joule"]
    assert 1400 <= best["sm_clock_mhz"] <= 1800
    # GPM tells it apart from GPU-Util: 95% busy, about a third of the SMs active, HBM busy
    act = top["activity"]
    assert act["graphics"] == pytest.approx(0.95)
    assert 0.25 <= act["sm"] <= 0.40 and act["dram"] > 0.6 and act["tensor"] < 0.2


def test_the_simulator_honours_a_locked_clock_as_the_analytic_function_does():
    sc = load_scenario("builtin:decode")
    st = dict(sc.state_ref(0, 10.0))
    st[physics.LOCKED_CLOCKS] = (1605, 1605)
    physics.apply_power(st, sc.physics)
    want = physics.steady_state(sc.physics, sc.serving, 700, locked_clock=1605, utilization=95,
                                decode_share=0.95)
    assert (st["sm_clock"], st["power_draw"]) == (1605, want["power_watts"])
    assert sc.serving.state_rate(st) == pytest.approx(want["tokens_per_second"])
    st[physics.LOCKED_CLOCKS] = None          # unlocked again: back to the demanded clock
    physics.apply_power(st, sc.physics)
    assert st["sm_clock"] == 1980


def test_prefill_heavy_runs_at_the_cap_where_the_power_limit_is_the_lever():
    sc = load_scenario("builtin:prefill")
    kw = dict(utilization=95, decode_share=sc.gpu_state_at(0, 10.0)["decode_share"])
    top = physics.steady_state(sc.physics, sc.serving, 700, **kw)
    assert top["capped"] and top["power_watts"] == pytest.approx(700, abs=1)
    assert sc.gpu_state_at(0, 10.0)["clock_event_reasons"] == ("SwPowerCap",)
    lower = physics.steady_state(sc.physics, sc.serving, 500, **kw)
    assert lower["tokens_per_joule"] > 1.1 * top["tokens_per_joule"]
    assert lower["tokens_per_second"] < 0.95 * top["tokens_per_second"]
    assert top["activity"]["sm"] > 0.7 and top["activity"]["tensor"] > 0.4


def test_simulated_vllm_endpoint_serves_the_exact_token_integral_as_vllm_does():
    node, _gw, clock = sim()
    serving = SimulatedServing(node)
    clock.advance(240.0)
    text = serving.fetch(0)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    # vLLM's own families (prometheus_client strips _total from counter family names)
    for name in ("vllm:generation_tokens", "vllm:prompt_tokens", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions", "vllm:request_queue_time_seconds"):
        assert name in fams, name
    gen = [s for s in fams["vllm:generation_tokens"].samples if s.name.endswith("_total")][0]
    assert gen.value == math.floor(node.scenario.endpoint_tokens_at(0, 240.0))
    assert gen.labels == {"engine": "0", "model_name": "meta-llama/Llama-3.1-70B-Instruct"}
    assert fams["vllm:request_queue_time_seconds"].type == "histogram"


def test_simulated_endpoint_answers_http_on_loopback():
    node = SimulatedNode(load_scenario("builtin:h100x8"), RealClock())
    serving = SimulatedServing(node)
    urls = serving.start()
    try:
        assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        with urllib.request.urlopen(urls[1], timeout=5) as r:
            body = r.read().decode()
        assert "vllm:generation_tokens_total{" in body
    finally:
        serving.stop()


BASE = """
[node]
gpu_count = 2
[physics]
idle_watts = 70
"""


@pytest.mark.parametrize("extra, line, words", [
    ("[gpu_defaults]\npower_draw = 500\n", 7, "computed by [physics]"),
    ("[physics.x]\n", None, "unknown key"),
    ("[serving]\nclock_elasticity = 0.3\n", 7, "decode_clock_elasticity"),
    ("[gpu_defaults]\ndecode_share = 1.5\n", 7, "out of range"),
    ("[serving]\n[[serving.endpoint]]\ngpus = [0]\n[[serving.endpoint]]\ngpus = [0, 1]\n", 10,
     "already served"),
    ("[serving]\n[[serving.endpoint]]\ngpus = [2]\n", 8, "out of range"),
    ("[serving]\n[[serving.endpoint]]\nparallel = \"pipeline\"\n", 8, "tensor"),
])
def test_bad_physics_or_serving_names_file_line_and_fix(extra, line, words):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(BASE + extra, "/tmp/s.toml")
    assert words in str(e.value)
    if line:
        assert str(e.value).startswith(f"/tmp/s.toml:{line}:"), str(e.value)
