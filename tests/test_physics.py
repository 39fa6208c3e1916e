"""Simulated power physics and the simulated inference server ([physics], [serving]).

The physics must behave like the hardware where a user can see it: an H100 at full boost
draws close to its 700 W limit, a lower power limit engages SwPowerCap and lowers the clock
until the draw fits (the power violation counter advances meanwhile), the energy counter is
the integral of the draw, and the tokens/s of a served model follow the clock with the
workload's elasticity -- tensor-parallel groups at the pace of their slowest GPU.
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


def test_h100_at_full_boost_draws_close_to_its_700_w_limit():
    p = H100.power(1980, 1980, 95)
    assert 670 <= p <= 700
    assert H100.power(1980, 1980, 0) == H100.idle_watts
    # monotone in clock and in load
    assert H100.power(1410, 1980, 95) < H100.power(1755, 1980, 95) < p
    assert H100.power(1980, 1980, 50) < p


def test_a_power_limit_below_demand_engages_swpowercap_and_lowers_the_clock_until_it_fits():
    node, gw, clock = sim()
    probe = GpuProbe(gw)
    clock.advance(100.0)              # GPU 0 healthy at 1980 MHz, 95 %
    g = probe.read()[3]
    assert (g.sm_clock_mhz, g.clock_event_reasons) == (1980, ())
    assert g.power_draw_watts == pytest.approx(687.5)
    power0 = g.violation_seconds["power"]
    gw.set_power_limit(3, 450)
    clock.advance(10.0)
    g = probe.read()[3]
    assert "SwPowerCap" in g.clock_event_reasons
    assert g.power_draw_watts <= 450 and g.power_draw_watts > 449     # fits, just below
    f = g.sm_clock_mhz
    assert f < 1980
    assert H100.power(f, 1980, 95) <= 450 < H100.power(f + 1, 1980, 95)
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
    # GPU 1: 687.5 W all along; GPU 0: 60 s of every 120 at 1410 MHz
    assert e0[1] == pytest.approx(687.5 * 240)
    p_hot = H100.power(1410, 1980, 95)
    assert e0[0] == pytest.approx(2 * (60 * p_hot + 60 * 687.5), rel=1e-6)
    assert e0[0] == pytest.approx(sc.energy_joules_at(0, 240.0))
    # through NVML, in mJ
    read = gw.call(1, "energy", lambda h: __import__("pynvml").nvmlDeviceGetTotalEnergyConsumption(h))
    assert read == round(e0[1] * 1000)
    gw.set_power_limit(1, 400)
    clock.advance(100.0)
    assert node.energy_joules(1) - e0[1] == pytest.approx(100 * node.state(1)["power_draw"])
    assert node.state(1)["power_draw"] <= 400


def test_token_rate_follows_clock_with_elasticity_and_tensor_parallel_waits_for_the_slowest():
    sc = load_scenario("builtin:h100x8")
    sv = sc.serving
    assert [ep.gpus for ep in sv.endpoints] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    full = sv.gpu_rate(1980, 1980, 95)
    assert full == pytest.approx(2000 * 0.95)
    hot = sv.gpu_rate(1410, 1980, 95)
    assert hot == pytest.approx(2000 * 0.95 * (1410 / 1980) ** 0.3)
    # endpoint 0 holds GPU 0: while it is hot the whole group runs at its pace
    assert sc.endpoint_rate_at(0, 30.0) == pytest.approx(4 * hot)
    assert sc.endpoint_rate_at(0, 100.0) == pytest.approx(4 * full)
    assert sc.endpoint_rate_at(1, 30.0) == pytest.approx(4 * full)
    assert sc.endpoint_tokens_at(0, 240.0) == pytest.approx(2 * (60 * 4 * hot + 60 * 4 * full))


def test_steady_state_is_what_the_simulator_does_at_that_limit():
    node, gw, clock = sim()
    sv, pm = node.scenario.serving, node.scenario.physics
    for g in (4, 5, 6, 7):
        gw.set_power_limit(g, 500)
    t0 = 100.0
    clock.advance(t0)
    n0 = node.endpoint_tokens(1)
    clock.advance(10.0)
    got = (node.endpoint_tokens(1) - n0) / 10.0
    want = physics.steady_state(pm, sv, 500, utilization=95)
    assert got == pytest.approx(4 * want["tokens_per_second"])
    assert node.state(4)["power_draw"] == pytest.approx(want["power_watts"])
    assert want["capped"] and want["power_watts"] <= 500
    # the same from the scenario's own state at that time
    assert physics.endpoint_at_power_limits(node.scenario, 1, t0, {g: 500 for g in (4, 5, 6, 7)}) \
        == pytest.approx(got)
    assert physics.gpu_at_power_limit(node.scenario, 4, t0, 500)["power_watts"] == \
        pytest.approx(want["power_watts"])
    # the analytic optimum: with a GPU-hour price and an energy price, the best limit for
    # tokens per dollar is inside the range and beats both ends
    kw = dict(utilization=95, gpu_hour_usd=2.0, energy_usd_per_kwh=0.15, pue=1.3)
    best = physics.best_power_limit(pm, sv, 200, 700, **kw)
    assert best["tokens_per_dollar"] >= physics.steady_state(pm, sv, 700, **kw)["tokens_per_dollar"]
    per_joule = physics.best_power_limit(pm, sv, 200, 700, objective="tokens_per_joule", **kw)
    assert per_joule["power_limit_watts"] < best["power_limit_watts"] <= 700


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
    ("[serving]\nclock_elasticity = 5\n", 7, "out of range"),
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
