"""Tokens per dollar in full: energy, idle capacity, endpoints (several, tensor parallel), the
floor, and the serving diagnosis -- at the accountant, the judge, and through the real daemon."""
from __future__ import annotations

import json
import re
import os
import signal
import stat

import pytest

from conftest import wait_for
from gpucostd import config as cfgmod
from gpucostd.clock import VirtualClock
from gpucostd.cost.accountant import CostAccountant
from gpucostd.cost.efficiency import floor_step
from gpucostd.cost.report import status_lines
from gpucostd.health.efficiency import EfficiencyJudge
from gpucostd.probes.inference import InferenceReading
from gpucostd.snapshot import GpuReading

H100 = "NVIDIA H100 80GB HBM3"


def cfg(text=""):
    return cfgmod.parse(text, None)


def gpu(index=0, **kw):
    base = dict(index=index, uuid=f"GPU-{index}", name=H100, sm_clock_mhz=1980.0,
                sm_clock_max_mhz=1980.0, utilization_percent=95.0, clock_event_reasons=(),
                power_draw_watts=600.0)
    base.update(kw)
    return GpuReading(**base)


def tokens(total, t, url="http://127.0.0.1:8000/metrics", metric="vllm:generation_tokens_total",
           gpus=None, parallel="tensor", error=None, **kw):
    return InferenceReading(None if error else total, t, metric, 1, error, url=url, gpus=gpus,
                            parallel=parallel, server="vllm", **kw)


def run(acc, clock, seconds, make_gpus, make_tokens=None, step=1.0):
    rep = None
    n = int(round(seconds / step))
    t0 = clock.monotonic()
    for i in range(n + 1):
        t = t0 + i * step
        clock._t = t
        rep = acc.update(make_gpus(t), t)
        if make_tokens is not None:
            rep = acc.update_tokens(make_tokens(t), t)
    return rep


def test_energy_from_the_counter_else_the_power_integral_priced_with_pue():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\nenergy_usd_per_kwh = 0.2\npue = 1.5\n"), None, clock)
    # GPU 0 has a counter that says 500 W (while its power reading says 600: the counter wins);
    # GPU 1 has no counter: 600 W integrated
    rep = run(acc, clock, 3600, lambda t: [gpu(0, energy_joules=1e9 + 500.0 * t), gpu(1)])
    g0, g1 = [g.to_json() for g in rep.gpus]
    assert g0["energy_source"] == "counter" and g1["energy_source"] == "power"
    assert g0["energy_joules"] == pytest.approx(500 * 3600)
    assert g1["energy_joules"] == pytest.approx(600 * 3600)
    assert g0["energy_dollars"] == pytest.approx(0.5 * 1.5 * 0.2)      # 0.5 kWh x PUE x price
    eff = rep.to_json()["node"]["efficiency"]
    assert eff["energy_dollars_per_hour"] == pytest.approx(1.2 * 1.5 * 0.2)
    assert eff["cost_dollars_per_hour"] == pytest.approx(0.36)          # no GPU-hour price


def test_an_energy_counter_that_goes_back_is_not_negative_energy():
    clock = VirtualClock()
    acc = CostAccountant(cfg(), None, clock)
    rep = run(acc, clock, 10, lambda t: [gpu(0, energy_joules=(5000.0 if t < 5 else 0.0)
                                                + 600.0 * t)])
    # [4, 5] has the counter restart (driver reload): that interval uses the power draw
    assert rep.gpus[0].to_json()["energy_joules"] == pytest.approx(6000.0)


def test_idle_and_underused_capacity_priced_at_the_gpu_hour():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 3.6\n"), None, clock)
    # GPU 0 idle (0%), GPU 1 busy at 40% (below the 80% target: 60% unused), GPU 2 at 95%
    rep = run(acc, clock, 1000, lambda t: [gpu(0, utilization_percent=0.0),
                                           gpu(1, utilization_percent=40.0), gpu(2)])
    g = [x.to_json() for x in rep.gpus]
    assert g[0]["idle_seconds"] == pytest.approx(1000) and g[0]["idle_dollars"] == pytest.approx(1.0)
    assert g[1]["idle_seconds"] == 0 and g[1]["underused_seconds"] == pytest.approx(600)
    assert g[1]["underused_dollars"] == pytest.approx(0.6)
    assert g[2]["idle_seconds"] == 0 and g[2]["underused_seconds"] == 0
    eff = rep.to_json()["node"]["efficiency"]
    assert eff["idle_ratio"] == pytest.approx((1.0 + 0.6) / 3)
    assert eff["idle_dollars"] == pytest.approx(1.0)


def test_tokens_per_dollar_includes_energy_and_tokens_per_joule():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 2.0\nenergy_usd_per_kwh = 0.1\n"), None,
                         clock)
    rep = run(acc, clock, 120, lambda t: [gpu(0), gpu(1)], lambda t: [tokens(3000.0 * t, t)])
    tk = rep.tokens
    per_hour = 2 * 2.0 + 1.2 * 0.1
    assert tk.tokens_per_second == pytest.approx(3000)
    assert tk.tokens_per_dollar == pytest.approx(3000 * 3600 / per_hour)
    assert tk.cost_per_million_tokens == pytest.approx(per_hour / (3000 * 3600) * 1e6)
    assert tk.tokens_per_joule == pytest.approx(3000 / 1200)
    assert tk.tokens_total == pytest.approx(3000 * 120)
    lines = status_lines(rep)
    assert any(line.startswith("  Tokens: 3.00k/s, ") and "per million" in line and "idle 0%"
               in line for line in lines), lines
    assert all(len(line) <= 100 for line in lines)


def test_the_floor_state_survives_a_restart_and_an_unreadable_file_starts_fresh(tmp_path, caplog,
                                                                                monkeypatch):
    # 1000 tokens/s on one GPU at $3.60/h: 1M tokens per dollar
    def daemon_life(floor, seconds, start):
        clock = VirtualClock()
        clock._t = start
        acc = CostAccountant(cfg(f"[cost]\ngpu_hour_usd = 3.6\n[efficiency]\n"
                                 f"min_tokens_per_dollar = {floor}\nwindow_seconds = 10\n"),
                             str(tmp_path), clock)
        seen = []

        def tok(t):
            return [tokens(1000.0 * t, t)]

        def gpus(t):
            if acc.floor_transition:
                seen.append(acc.floor_transition)
            return [gpu(0)]
        run(acc, clock, seconds, gpus, tok)
        if acc.floor_transition:
            seen.append(acc.floor_transition)
        return acc, seen
    path = tmp_path / "floor.json"
    acc, seen = daemon_life(2e6, 30, 0.0)         # below the floor: drained
    assert seen == ["inefficient"]
    saved = json.loads(path.read_text())
    assert saved["inefficient"] is True and saved["since"] == pytest.approx(
        acc.clock.time() - 20, abs=2)
    # restarted: still drained (no second on_inefficient), and once back at or above the floor
    # for the window, "efficient" (the undrain hook) exactly once
    acc, seen = daemon_life(2e6, 30, 1000.0)
    assert acc.floor["inefficient"] is True and seen == []
    acc, seen = daemon_life(1e5, 30, 2000.0)
    assert seen == ["efficient"]
    assert json.loads(path.read_text())["inefficient"] is False
    acc, seen = daemon_life(1e5, 30, 3000.0)      # nothing left to undo
    assert seen == [] and acc.floor["inefficient"] is False
    # a state file that cannot be written: one warning, retried every cycle until it is
    import gpucostd.cost.accountant as accmod

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")
    real = accmod.save_floor
    monkeypatch.setattr(accmod, "save_floor", full)
    caplog.clear()
    acc, seen = daemon_life(2e6, 30, 4000.0)
    assert seen == ["inefficient"] and acc._floor_saved is False
    assert caplog.text.count("cannot save the floor's state") == 1
    monkeypatch.setattr(accmod, "save_floor", real)
    acc.update_tokens([tokens(1000.0 * 31, 31.0)], 4031.0)
    assert acc._floor_saved is True and json.loads(path.read_text())["inefficient"] is True
    # unreadable files: a clear log line, a fresh start, the old file kept aside
    for bad in ("{not json", '{"version": 1, "inefficient": "yes"}', '[1]',
                '{"version": 9, "inefficient": true}'):
        path.write_text(bad)
        caplog.clear()
        acc = CostAccountant(cfg(), str(tmp_path), VirtualClock())
        assert acc.floor["inefficient"] is False
        assert "unreadable floor state" in caplog.text and "starting fresh" in caplog.text
        assert any("unreadable floor state" in n for n in acc._notes)
        kept = re.search(r"the old file is kept as (\S+)$", caplog.text.strip()).group(1)
        assert open(kept).read() == bad and not path.exists()      # no earlier one overwritten
    assert (tmp_path / "floor.json.bad").read_text() == "{not json"


def test_a_failing_endpoint_does_not_leave_its_last_tokens_per_second_as_current():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 2.0\n"), None, clock)
    run(acc, clock, 30, lambda t: [gpu(0)], lambda t: [tokens(1000.0 * t, t)])
    assert acc._last_report.tokens.tokens_per_second == pytest.approx(1000)
    rep = run(acc, clock, 5, lambda t: [gpu(0)],
              lambda t: [tokens(None, t, error="connection refused")])
    assert rep.tokens.tokens_per_second is None and rep.tokens.tokens_per_dollar is None
    assert rep.tokens.endpoints[0]["up"] is False
    assert "no reading" in " ".join(status_lines(rep))


def test_switching_endpoints_does_not_count_the_new_counters_value_as_tokens():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 2.0\n"), None, clock)
    run(acc, clock, 30, lambda t: [gpu(0)], lambda t: [tokens(1000.0 * t, t)])
    counted = acc._last_report.tokens.tokens_total
    # after a reload the same URL serves another counter (another metric), at 5e9 already
    rep = run(acc, clock, 10, lambda t: [gpu(0)],
              lambda t: [tokens(5e9 + 1000.0 * t, t, metric="sglang:generation_tokens_total")])
    assert rep.tokens.tokens_per_second == pytest.approx(1000)
    assert rep.tokens.tokens_total == pytest.approx(counted + 1000 * 10)
    # another URL likewise
    rep = run(acc, clock, 10, lambda t: [gpu(0)],
              lambda t: [tokens(7e9 + 1000.0 * t, t, url="http://10.0.0.2:8000/metrics")])
    assert rep.tokens.tokens_per_second == pytest.approx(1000)
    assert rep.tokens.tokens_total == pytest.approx(counted + 1000 * 20)


def test_several_endpoints_and_the_tensor_parallel_slowest_gpu_rule():
    throttled = dict(sm_clock_mhz=1584.0, clock_event_reasons=("SwPowerCap",))   # 20% loss

    def gpus(t):
        return [gpu(0, **throttled), gpu(1), gpu(2, **throttled), gpu(3)]

    def eps(t):
        return [tokens(4000.0 * t, t, url="http://a/metrics", gpus=(0, 1), parallel="tensor"),
                tokens(4000.0 * t, t, url="http://b/metrics", gpus=(2, 3), parallel="data")]
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 2.0\n"), None, clock)
    rep = run(acc, clock, 100, gpus, eps)
    assert rep.tokens.tokens_per_second == pytest.approx(8000)
    assert [e["tokens_per_second"] for e in rep.tokens.endpoints] == pytest.approx([4000, 4000])
    # over 100 s: the tensor group runs at its slowest GPU: 4000/s x 0.2/0.8 lost;
    # the data-parallel pair loses only GPU 2's half: 2000/s x 0.2/0.8
    assert rep.tokens.tokens_lost_total == pytest.approx(100 * (4000 + 2000) * 0.25, rel=0.02)
    assert [g.extra["tokens_per_second"] for g in rep.gpus] == pytest.approx([2000] * 4)


def test_floor_state_machine_needs_the_whole_window_both_ways():
    st = {}
    seq = [(0, 50), (5, 50), (9, None), (10, 50), (20, 50), (25, 50), (26, 200), (30, 200),
           (36, 200)]
    got = [(t, floor_step(st, v, 100.0, 10.0, t)) for t, v in seq]
    # unknown at 9 breaks the streak: below again from 10, for the window at 20
    assert [t for t, x in got if x == "inefficient"] == [20]
    assert [t for t, x in got if x == "efficient"] == [36]
    assert floor_step({}, 50, 0.0, 10.0, 0) is None        # 0 = off


def test_serving_diagnosis_rules():
    judge = EfficiencyJudge(hold_seconds=0)
    c = cfg()
    low = [gpu(0, utilization_percent=30.0), gpu(1, utilization_percent=35.0)]

    def codes(gpus, readings, t=0.0, cost=None):
        return {f.code: f for f in judge.judge(gpus, cost, readings, c, t)}
    f = codes(low, [tokens(1, 0, gpus=(0, 1), requests_waiting=12.0)])
    assert "serving_bottleneck_before_gpu" in f and "tokenization" in \
        f["serving_bottleneck_before_gpu"].action
    f = codes(low, [tokens(1, 0, gpus=(0, 1), requests_waiting=0.0)])
    assert set(f) == {"serving_over_provisioned"} and f["serving_over_provisioned"].severity == 0
    f = codes([gpu(0)], [tokens(1, 0, kv_cache_usage=0.97)])
    assert "serving_memory_bound" in f and "quantize" in f["serving_memory_bound"].action
    codes([gpu(0)], [tokens(1, 1, preemptions_total=5.0)], 1)
    f = codes([gpu(0)], [tokens(1, 2, preemptions_total=9.0)], 2)
    assert "preempted" in f["serving_memory_bound"].message

    class Cost:
        def __init__(self, rate):
            self.tokens = type("T", (), {"tokens_per_second": rate})()
            self.efficiency = {}
    judge2 = EfficiencyJudge(hold_seconds=0)
    for t, rate in ((0, 10000), (60, 10000), (120, 7000)):
        out = {x.code for x in judge2.judge([gpu(0)], Cost(rate), [], c, t)}
    assert "tokens_falling_not_hardware" in out
    # the same fall with the clock down is a hardware matter: not this finding
    judge3 = EfficiencyJudge(hold_seconds=0)
    judge3.judge([gpu(0)], Cost(10000), [], c, 0)
    out = {x.code for x in judge3.judge([gpu(0, sm_clock_mhz=1400.0)], Cost(7000), [], c, 60)}
    assert "tokens_falling_not_hardware" not in out


def test_diagnosis_waits_its_hold_so_one_odd_scrape_says_nothing():
    judge = EfficiencyJudge(hold_seconds=30)
    c = cfg()
    r = [tokens(1, 0, gpus=(0,), requests_waiting=5.0)]
    low = [gpu(0, utilization_percent=20.0)]
    assert judge.judge(low, None, r, c, 0.0) == []
    assert judge.judge(low, None, r, c, 29.0) == []
    assert [f.code for f in judge.judge(low, None, r, c, 30.0)] == [
        "serving_bottleneck_before_gpu"]


HOOK = """#!/bin/sh
env | grep '^GPUCOSTD_' | sort > "$0.$GPUCOSTD_HOOK.tmp" && mv "$0.$GPUCOSTD_HOOK.tmp" "$0.$GPUCOSTD_HOOK.env"
"""


def test_the_floor_drains_through_the_real_daemon(daemon_factory, tmp_path):
    hook = tmp_path / "drain"
    hook.write_text(HOOK)
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    d = daemon_factory(extra_config=(
        f'[hooks]\non_inefficient = ["{hook}"]\non_efficient = ["{hook}"]\n'
        "[cost]\ngpu_hour_usd = 2.5\nenergy_usd_per_kwh = 0.15\npue = 1.3\n"
        "[efficiency]\nmin_tokens_per_dollar = 1e12\nwindow_seconds = 1\n")).start()
    env_file = tmp_path / "drain.on_inefficient.env"
    wait_for(env_file.exists, 30, what="the on_inefficient hook")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert env["GPUCOSTD_CODE"] == "node_inefficient"
    assert float(env["GPUCOSTD_MIN_TOKENS_PER_DOLLAR"]) == 1e12
    assert 1e6 < float(env["GPUCOSTD_TOKENS_PER_DOLLAR"]) < 1e12
    rc, st = d.status_json()
    codes = {f["code"]: f for f in st["node"]["findings"]}
    assert codes["tokens_per_dollar_below_floor"]["severity"] == "WARN" and rc >= 1
    eff = st["cost"]["node"]["efficiency"]
    assert eff["inefficient"] is True and eff["tokens_per_dollar"] > 0
    assert any(e["code"] == "node_inefficient" for e in st["events"])
    text = d.cli("status").stdout
    assert "floor 1000G BELOW" in text or "floor" in text and "BELOW" in text, text
    metrics = d.metrics()
    assert "gpucostd_node_below_floor 1.0" in metrics
    assert not (tmp_path / "drain.on_efficient.env").exists()


COUNT_HOOK = """#!/bin/sh
echo "$GPUCOSTD_HOOK" >> "$0.log"
"""


def test_a_drain_survives_a_restart_and_the_undrain_hook_runs_once(daemon_factory, tmp_path):
    hook = tmp_path / "drain"
    hook.write_text(COUNT_HOOK)
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    ran = tmp_path / "drain.log"

    def config(floor):
        return (f'[hooks]\non_inefficient = ["{hook}"]\non_efficient = ["{hook}"]\n'
                "[cost]\ngpu_hour_usd = 2.5\n"
                f"[efficiency]\nmin_tokens_per_dollar = {floor}\nwindow_seconds = 1\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    (state / "floor.json").write_text("{torn")     # unreadable: a clear line, a fresh start
    d = daemon_factory(extra_config=config(1e12)).start()
    wait_for(lambda: ran.exists() and ran.read_text() == "on_inefficient\n", 30,
             what="the on_inefficient hook")
    assert "unreadable floor state" in d.output() and (state / "floor.json.bad").exists()
    saved = wait_for(lambda: json.loads((state / "floor.json").read_text()), 10,
                     what="floor.json")
    assert saved["inefficient"] is True and saved["since"] > 0
    assert d.stop() == 0
    # the node was drained (and rebooted); the daemon starts again, and the node is healthy:
    # back above the floor for the window, the undrain hook runs, once
    d.write_config(config(1))
    d.start()
    wait_for(lambda: "on_efficient" in ran.read_text(), 30, what="the on_efficient hook")
    assert "drained this node" in d.output()
    _rc, st = d.status_json()
    assert any(e["code"] == "node_efficient" for e in st["events"])
    cycle = st["daemon"]["cycle"]
    wait_for(lambda: d.status_json()[1]["daemon"]["cycle"] >= cycle + 10, 30,
             what="ten more cycles")
    assert ran.read_text() == "on_inefficient\non_efficient\n"
    assert json.loads((state / "floor.json").read_text())["inefficient"] is False
    assert d.status_json()[1]["cost"]["node"]["efficiency"]["inefficient"] is False


def test_gpucostd_cost_shows_energy_and_idle_live_from_state_and_over_a_window(tmp_path):
    from gpucostd.cost.accountant import breakdown, breakdown_from_state
    from gpucostd.cost.report import format_cost
    c = cfg(f'[daemon]\nstate_dir = "{tmp_path}"\n[cost]\ngpu_hour_usd = 3.6\n'
            "energy_usd_per_kwh = 0.2\n")
    clock = VirtualClock()
    acc = CostAccountant(c, str(tmp_path), clock)
    # idle for 300 s, then busy at 50% (under the 80% target) for 300 s, 300 W throughout
    run(acc, clock, 600, lambda t: [gpu(0, utilization_percent=0.0 if t < 300 else 50.0,
                                        power_draw_watts=300.0)])
    live = breakdown(acc, None)
    g = live["gpus"][0]
    assert g["index"] == 0
    assert g["idle_seconds"] == pytest.approx(300.0, abs=1) and g["idle_dollars"] == \
        pytest.approx(0.3, rel=0.01)
    assert g["underused_seconds"] == pytest.approx(150.0, abs=1)
    assert g["energy_joules"] == pytest.approx(300 * 600)
    assert live["node"]["energy_dollars"] == pytest.approx(0.05 * 0.2)
    acc.flush()
    saved = breakdown_from_state(c, None, now=clock.time())
    assert saved["gpus"][0]["idle_dollars"] == pytest.approx(g["idle_dollars"])
    recent = breakdown_from_state(c, 120, now=clock.time())      # the minute history
    assert recent["gpus"][0]["idle_seconds"] == 0
    assert 0 < recent["gpus"][0]["underused_seconds"] < 150
    text = format_cost(live)
    assert "Energy and idle capacity since accounting began" in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_simulated_demo_shows_tokens_per_dollar_energy_and_idle_cost(daemon_factory):
    d = daemon_factory(interval=0.5,
                       extra_config="[cost]\ngpu_hour_usd = 2.5\nenergy_usd_per_kwh = 0.15\n"
                                    "pue = 1.3\n").start()

    def ready():
        _rc, st = d.status_json()
        tk = (st.get("cost") or {}).get("node", {}).get("tokens") or {}
        up = [e.get("up") for e in tk.get("endpoints") or ()]
        return st if tk.get("tokens_per_dollar") and up == [True, True] else None
    st = wait_for(ready, 30, what="tokens per dollar in status --json")
    tk = st["cost"]["node"]["tokens"]
    assert [e["server"] for e in tk["endpoints"]] == ["vllm", "vllm"]
    assert all(e["url"].startswith("http://127.0.0.1:") for e in tk["endpoints"])
    # 2 x 4 GPUs x 2000 x 0.95 tokens/s, less while GPU 0 is hot; the rate is the rise between
    # two scrapes over the daemon's own stamps, 0.5 s apart: on a loaded machine a stamp can
    # trail its counter by tens of ms (seen: +1.2%), so the ceiling allows 5%
    assert 13000 < tk["tokens_per_second"] <= 15200 * 1.05
    text = d.cli("status").stdout
    assert "Tokens: " in text and " per $" in text and "per million" in text and "idle " in text
    assert "Energy: " in text
    m = d.metrics()
    for family in ("gpucostd_node_tokens_per_dollar", "gpucostd_gpu_energy_joules_total",
                   "gpucostd_gpu_idle_cost_dollars_total", "gpucostd_node_tokens_per_joule",
                   "gpucostd_inference_endpoint_up"):
        assert family in m, family
    # the config's prices win over the scenario's illustrative ones
    assert st["cost"]["node"]["efficiency"]["gpu_dollars_per_hour"] == pytest.approx(8 * 2.5)
    assert "prices_illustrative" not in {f["code"] for f in st["node"]["findings"]}
    assert "illustrative" not in d.output() + text


def test_plain_simulated_demo_is_priced_at_the_scenarios_illustrative_prices(daemon_factory):
    """A newcomer's `gpucostd run --simulate` with no price in the config: tokens per dollar,
    $ per million tokens and idle dollars at builtin:h100x8's [prices], said to be
    illustrative in status, the log and the cost notes; a reload keeps them."""
    from gpucostd.sim.scenario import load_scenario
    prices = load_scenario("builtin:h100x8").prices
    d = daemon_factory(interval=0.5).start()

    def ready():
        _rc, st = d.status_json()
        tk = (st.get("cost") or {}).get("node", {}).get("tokens") or {}
        return st if tk.get("tokens_per_dollar") and tk.get("cost_per_million_tokens") else None
    st = wait_for(ready, 30, what="tokens per dollar in status --json")
    cost = st["cost"]
    eff = cost["node"]["efficiency"]
    assert cost["priced"] is True and cost["currency"] == "USD"
    assert eff["gpu_dollars_per_hour"] == pytest.approx(8 * prices.gpu_hour_usd)
    assert eff["energy_dollars_per_hour"] > 0 and eff["energy_dollars"] is not None
    assert eff["idle_dollars"] is not None and eff["underused_dollars"] is not None
    tk = cost["node"]["tokens"]
    per_hour = eff["cost_dollars_per_hour"]
    assert tk["tokens_per_dollar"] == pytest.approx(tk["tokens_per_second"] * 3600 / per_hour,
                                                    rel=0.05)
    found = {f["code"]: f for f in st["node"]["findings"]}
    note = found["prices_illustrative"]
    assert note["severity"] == "OK" and "illustrative" in note["message"]
    assert "builtin:h100x8" in note["message"] and "gpu_hour_usd" in note["action"]
    assert any("illustrative" in n for n in cost["notes"])
    assert any(e["code"] == "prices_illustrative" and e["severity"] == "OK"
               for e in st["events"])
    text = d.cli("status").stdout
    assert " per $" in text and "per million" in text and "idle capacity $" in text, text
    assert "Prices are illustrative" in text, text          # the recent events
    assert "  prices: illustrative (the scenario's); set [cost] gpu_hour_usd, " \
        "energy_usd_per_kwh for yours\n" in text, text       # the cost lines, whole
    assert "simulated node: prices are illustrative, not yours: $2.99 per GPU-hour" in \
        d.output() and "from the scenario builtin:h100x8 ([prices])" in d.output()
    m = d.metrics()
    for family in ("gpucostd_node_tokens_per_dollar",
                   "gpucostd_node_cost_per_million_tokens_dollars",
                   "gpucostd_gpu_idle_cost_dollars_total",
                   "gpucostd_gpu_energy_cost_dollars_total"):
        assert family + " " in m or family + "{" in m, family
    # a reload (still no price) keeps the illustrative prices and says so
    d.signal(signal.SIGHUP)

    def reloaded():
        _rc, st = d.status_json()
        return st if any(e["code"] == "config_reloaded" for e in st["events"]) else None
    st = wait_for(reloaded, 30, what="the reload")
    assert "prices_illustrative" in {f["code"] for f in st["node"]["findings"]}
    assert st["cost"]["node"]["efficiency"]["gpu_dollars_per_hour"] == pytest.approx(
        8 * prices.gpu_hour_usd)


def test_the_systemd_status_line_says_when_the_prices_are_illustrative():
    from types import SimpleNamespace as NS
    from gpucostd.loop import summary_line

    def snap(notes):
        tk = NS(tokens_per_second=15000.0, tokens_per_dollar=2.2e6)
        return NS(nvml_available=True, gpus=(), gpu_health={}, cost=NS(
            node_throttle_dollars_per_hour=0.0, priced=True, tokens=tk, notes=notes))
    assert summary_line(snap(("Prices are illustrative, from the scenario x",))).endswith(
        "15000 tokens/s (2,200,000 per $ at illustrative prices)")
    assert summary_line(snap(())).endswith("15000 tokens/s (2,200,000 per $)")


def test_illustrative_prices_only_for_a_running_simulated_node_without_a_price(tmp_path):
    from gpucostd.loop import Daemon
    from gpucostd.sim.scenario import ScenarioError, load_scenario, parse_scenario
    from gpucostd.sim.sections import with_scenario_prices
    prices = load_scenario("builtin:h100x8").prices
    assert prices.gpu_hour_usd > 0 and prices.energy_usd_per_kwh > 0 and prices.pue >= 1
    assert load_scenario("builtin:serving").prices == prices
    for own in ("[cost]\ngpu_hour_usd = 1.5\n", "[cost]\nenergy_usd_per_kwh = 0.2\n",
                '[cost.model_hour_usd]\n"NVIDIA H100*" = 2.0\n'):
        c = cfg(own)
        got = with_scenario_prices(c, prices, "builtin:h100x8")
        assert (got, got.price_note) == (c, None), own
    c = with_scenario_prices(cfg('[cost]\npue = 1.1\ncurrency = "EUR"\n'), prices, "x")
    note = c.price_note
    assert c.cost.pue == 1.1 and c.cost.currency == "USD" and "PUE 1.1" in note
    c = cfg()
    got = with_scenario_prices(c, None, "x")
    assert (got, got.price_note) == (c, None)
    # replay and calibrate (a virtual clock) and one-shot commands keep the config's prices
    for clock, one_shot in ((VirtualClock(), False), (VirtualClock(), True), (None, True)):
        state = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        dmn = Daemon(cfg(), clock=clock, simulate="builtin:h100x8", one_shot=one_shot,
                     state_dir=str(state))
        try:
            assert dmn.config.cost.gpu_hour_usd == 0
            assert getattr(dmn.config, "price_note", None) is None
        finally:
            dmn.shutdown(system_shutdown=True)
    # the scenario key is checked like every other
    for text, why in (("[prices]\ngpu_hour_usd = -1\n", "out of range"),
                      ("[prices]\nfree = true\n", "unknown key"),
                      ("[prices]\npue = 1.2\n", "set gpu_hour_usd or energy_usd_per_kwh")):
        with pytest.raises(ScenarioError, match=why):
            parse_scenario("[node]\ngpu_count = 1\n" + text, "x.toml")


def test_serving_diagnosis_through_the_daemon_on_builtin_serving(daemon_factory):
    d = daemon_factory(scenario="builtin:serving",
                       extra_config="[efficiency]\nwindow_seconds = 1\n").start()

    def found():
        _rc, st = d.status_json()
        codes = {f["code"] for f in st["node"]["findings"]}
        return codes if {"serving_memory_bound", "serving_bottleneck_before_gpu"} <= codes \
            else None
    codes = wait_for(found, 30, what="serving findings")
    assert "inference_unreachable" not in codes


def test_scrape_deadline_is_at_most_half_the_interval(tmp_path):
    from gpucostd.loop import Daemon
    c = cfg(f'[daemon]\ninterval_seconds = 0.2\nstate_dir = "{tmp_path}"\n'
            '[inference]\nmetrics_url = "http://127.0.0.1:9/metrics"\ntimeout_seconds = 2\n')
    daemon = Daemon(c, clock=VirtualClock(), one_shot=True, state_dir=str(tmp_path))
    try:
        assert [p.timeout for p in daemon.inference] == [0.1]
    finally:
        daemon.shutdown(system_shutdown=True)
