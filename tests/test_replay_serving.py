"""Replay of the serving scenario against its analytic truth: tokens, energy and idle dollars
within 1% (issue 12), and the same figures in `gpucostd replay`'s output."""
from __future__ import annotations

import pytest

from gpucostd.config import parse
from gpucostd.replay import format_replay, run_replay
from gpucostd.sim import physics
from gpucostd.sim.scenario import load_scenario

pytestmark = pytest.mark.slow

PRICE, KWH, PUE = 2.5, 0.15, 1.3
CFG = f"[cost]\ngpu_hour_usd = {PRICE}\nenergy_usd_per_kwh = {KWH}\npue = {PUE}\n"


def truth(sc, duration, busy=5.0, target=80.0):
    """Exact integrals over the scenario's piecewise-constant states. Busy is GPU-Util; the
    work of a busy GPU is its SM activity (the simulated H100s have GPM: docs/cost.md)."""
    n = sc.node.gpu_count
    tokens = sum(sc.endpoint_tokens_at(k, duration) for k in range(len(sc.serving.endpoints)))
    energy = sum(sc.energy_joules_at(i, duration) - sc.energy_joules_at(i, 0.0)
                 for i in range(n))
    idle = under = 0.0
    for i in range(n):
        cuts = [0.0] + sc.boundaries(i, 0.0, duration) + [duration]
        for a, b in zip(cuts, cuts[1:]):
            st = sc.state_ref(i, (a + b) / 2)
            work = 100 * physics.state_activity(st, sc.physics)["sm"]
            if st["utilization"] < busy:
                idle += b - a
            elif work < target:
                under += (b - a) * (1 - work / 100)
    return {"tokens": tokens, "energy_joules": energy,
            "energy_dollars": energy / 3.6e6 * KWH * PUE,
            "idle_dollars": idle * PRICE / 3600, "underused_dollars": under * PRICE / 3600}


@pytest.mark.parametrize("step", [1.0, 5.0])
def test_replay_of_the_serving_scenario_within_1_percent_of_the_truth(step):
    duration = 1200.0
    result = run_replay("builtin:serving", parse(CFG), duration=duration, step=step)
    eff = result["node"]["efficiency"]
    want = truth(load_scenario("builtin:serving"), duration)
    for key, value in want.items():
        assert eff[key] == pytest.approx(value, rel=0.01), key
    assert eff["idle_dollars"] > 0 and eff["underused_dollars"] > 0     # both levers show
    assert eff["tokens_per_dollar"] == pytest.approx(
        want["tokens"] / (4 * PRICE * duration / 3600 + want["energy_dollars"]), rel=0.01)
    text = format_replay(result)
    assert "Tokens: " in text and "per million" in text and "Energy: " in text, text
    assert all(len(line) <= 100 for line in text.splitlines())
