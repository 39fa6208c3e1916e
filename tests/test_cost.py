"""The cost model: loss ratio, capacity and dollars lost, attribution, persistence, views.

Ground truth is computed analytically from a scenario's timeline (gpu_state_at/change_times) by
`ground_truth` below; tests/test_replay.py uses the same function for the full daemon loop.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from conftest import exposition

from gpucostd import config as cfgmod
from gpucostd.clock import VirtualClock
from gpucostd.cost.accountant import CostAccountant
from gpucostd.cost.model import cost_multiplier, loss_ratio
from gpucostd.cli import parse_duration
from gpucostd.cost.report import (CostReport, cost_breakdown, format_cost, status_lines,
                                  status_lines_from_json)
from gpucostd.views.metrics_cost import metric_families
from gpucostd.snapshot import GpuReading, GpuState, THROTTLE_REASONS

H100 = "NVIDIA H100 80GB HBM3"


# =========================================================================== ground truth
def ground_truth(scenario, duration: float, busy_pct: float = 5.0,
                 price_at=lambda index, t: 0.0, price_changes: Sequence[float] = ()
                 ) -> Dict[int, Dict[str, List[float]]]:
    """Exact {gpu: {reason: [throttled_s, capacity_lost_s, dollars]}} over [0, duration].

    The timeline is piecewise constant between change times (and cycle starts when the scenario
    repeats). Per the model: loss = 1 - sm_clock/reference while busy and throttled, split
    equally among the active throttle reasons; throttled seconds count whenever a reason is
    active; a lost GPU contributes nothing. price_at(index, t) gives the price per GPU-hour in
    force at t; price_changes are extra split points."""
    out: Dict[int, Dict[str, List[float]]] = {}
    for index in range(scenario.node.gpu_count):
        cuts = {0.0, float(duration)}
        cuts.update(t for t in scenario.change_times(index, until=duration))
        if scenario.repeat_every:
            k = 1
            while k * scenario.repeat_every < duration:
                cuts.add(k * scenario.repeat_every)
                k += 1
        cuts.update(t for t in price_changes if 0 < t < duration)
        pts = sorted(cuts)
        per: Dict[str, List[float]] = {}
        for a, b in zip(pts, pts[1:]):
            if b <= a:
                continue
            # the state at the midpoint: robust to float rounding of absolute change times
            st = scenario.gpu_state_at(index, (a + b) / 2.0)
            if st.get("lost"):
                continue
            length = b - a
            reasons = tuple(st["clock_event_reasons"])
            active = [r for r in THROTTLE_REASONS if r in reasons]
            for r in active:
                per.setdefault(r, [0.0, 0.0, 0.0])[0] += length
            busy = st["utilization"] >= busy_pct and "GpuIdle" not in reasons
            if busy and active:
                ref = reference_of(st)
                loss = max(0.0, 1.0 - st["sm_clock"] / ref)
                for r in active:
                    cap = length * loss / len(active)
                    per[r][1] += cap
                    per[r][2] += cap * price_at(index, (a + b) / 2.0) / 3600.0
        out[index] = per
    return out


def reference_of(st) -> float:
    # the scenarios used here set the application clock equal to the max clock, so both
    # readings of "reference clock" agree
    return float(st["max_sm_clock"])


def reading_from_state(index: int, st, uuid: Optional[str] = None) -> GpuReading:
    if st.get("lost"):
        return GpuReading(index=index, state=GpuState.LOST, error="lost", uuid=uuid)
    return GpuReading(
        index=index, uuid=uuid or st.get("uuid"), name=st.get("name") or H100,
        sm_clock_mhz=float(st["sm_clock"]), sm_clock_max_mhz=float(st["max_sm_clock"]),
        app_sm_clock_mhz=None, utilization_percent=float(st["utilization"]),
        clock_event_reasons=tuple(st["clock_event_reasons"]),
        violation_seconds=st.get("violation_seconds"))


def compare(got: Dict[int, Dict[str, List[float]]], truth, col: int, rel: float,
            abs_floor: float = 1e-6) -> List[Tuple[int, str, float, float, float]]:
    """Per GPU and reason: (gpu, reason, got, truth, relative error); asserts within rel."""
    rows = []
    for index in sorted(set(got) | set(truth)):
        for r in sorted(set(got.get(index, {})) | set(truth.get(index, {}))):
            g = got.get(index, {}).get(r, [0.0, 0.0, 0.0])[col]
            t = truth.get(index, {}).get(r, [0.0, 0.0, 0.0])[col]
            err = abs(g - t) / t if t > abs_floor else abs(g - t)
            rows.append((index, r, g, t, err))
            assert (abs(g - t) <= abs_floor) or err <= rel, \
                f"GPU {index} {r}: got {g:.6f}, truth {t:.6f}, error {err * 100:.3f}%"
    return rows


def totals_of(report: CostReport) -> Dict[int, Dict[str, List[float]]]:
    return {g.index: {r: [c.throttled_seconds, c.capacity_lost_seconds, c.dollars]
                      for r, c in g.reasons.items()} for g in report.gpus}


def make_config(text: str = ""):
    return cfgmod.parse(text, None)


def drive(scenario, acc: CostAccountant, clock: VirtualClock, duration: float, step: float,
          on_step=None) -> CostReport:
    """Feed the accountant readings built straight from the scenario (no simulator)."""
    n = int(round(duration / step))
    report = None
    for i in range(n + 1):
        t = i * step
        clock._t = t
        if on_step:
            on_step(t)
        gpus = [reading_from_state(k, scenario.gpu_state_at(k, t))
                for k in range(scenario.node.gpu_count)]
        report = acc.update(gpus, t)
    return report


def scenario_from_text(tmp_path: Path, text: str):
    from gpucostd.sim.scenario import load_scenario
    p = tmp_path / "cost_test.toml"
    p.write_text(text)
    return load_scenario(str(p))


# =========================================================================== the model
def reading(**kw) -> GpuReading:
    base = dict(index=0, uuid="GPU-0", name=H100, sm_clock_mhz=1980.0, sm_clock_max_mhz=1980.0,
                utilization_percent=95.0, clock_event_reasons=())
    base.update(kw)
    return GpuReading(**base)


def test_loss_ratio_follows_the_model():
    assert loss_ratio(reading(sm_clock_mhz=1584.0, clock_event_reasons=("SwPowerCap",)),
                      5.0) == pytest.approx(0.2)
    assert cost_multiplier(0.2) == pytest.approx(1.25)
    # application clock set: it is the reference
    assert loss_ratio(reading(sm_clock_mhz=1400.0, app_sm_clock_mhz=1750.0,
                              clock_event_reasons=("HwSlowdown",)), 5.0) == pytest.approx(0.2)
    # reduced clock without a throttle reason is no loss (idle, application clocks, display)
    for reasons in (("GpuIdle",), ("ApplicationsClocksSetting",), ("DisplayClockSetting",), ()):
        assert loss_ratio(reading(sm_clock_mhz=1000.0, clock_event_reasons=reasons), 5.0) == 0
    # GpuIdle together with a throttle reason: not busy, no loss
    assert loss_ratio(reading(sm_clock_mhz=1000.0,
                              clock_event_reasons=("GpuIdle", "SwPowerCap")), 5.0) == 0
    # below the busy threshold: no loss
    assert loss_ratio(reading(sm_clock_mhz=1000.0, utilization_percent=4.0,
                              clock_event_reasons=("SwPowerCap",)), 5.0) == 0
    # no usable reading: None, never 0
    assert loss_ratio(reading(state=GpuState.LOST), 5.0) is None
    assert loss_ratio(reading(sm_clock_mhz=None, clock_event_reasons=("SwPowerCap",)),
                      5.0) is None


def test_builtin_h100x8_with_counters_matches_ground_truth(tmp_path):
    from gpucostd.sim.scenario import load_scenario
    sc = load_scenario("builtin:h100x8")
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2.5\n"), str(tmp_path), clock)
    report = drive(sc, acc, clock, 3600, 1.0)
    truth = ground_truth(sc, 3600, price_at=lambda i, t: 2.5)
    got = totals_of(report)
    compare(got, truth, 0, 0.01)
    compare(got, truth, 1, 0.01)
    compare(got, truth, 2, 0.01)
    # 30 episodes of 60 s at 1410/1980 MHz
    assert got[0]["HwThermalSlowdown"][1] == pytest.approx(30 * 60 * (1 - 1410 / 1980), rel=1e-9)
    assert set(got) == set(range(8)) and all(not got[i] for i in range(1, 8))


COUNTERLESS = """
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 2
driver_version = "550.90.07"
cuda_version = "12.4"
repeat_every = 97.3

[gpu_defaults]
sm_clock = 1980
max_sm_clock = 1980
app_sm_clock = 1980
utilization = 90
violation_counters = {counters}

[[at]]
t = 10.37
gpu = 0
sm_clock = 1500
clock_event_reasons = ["SwPowerCap"]

[[at]]
t = 24.81
gpu = 0
sm_clock = 1980
clock_event_reasons = []

[[at]]
t = 40.2
gpu = 1
sm_clock = 1200
clock_event_reasons = ["HwThermalSlowdown"]

[[at]]
t = 52.65
gpu = 1
sm_clock = 1350
clock_event_reasons = ["HwThermalSlowdown", "SwPowerCap"]

[[at]]
t = 71.9
gpu = 1
sm_clock = 1980
clock_event_reasons = []
"""


@pytest.mark.parametrize("counters,tolerance", [("true", 0.01), ("false", 0.05)])
def test_fractional_episodes_within_accuracy_targets(tmp_path, counters, tolerance):
    """Episodes start and end between samples (1 s step). With counters: within 1%;
    sampling only: within 5% (episodes of 10 s or longer)."""
    sc = scenario_from_text(tmp_path, COUNTERLESS.format(counters=counters))
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 4\n"), str(tmp_path), clock)
    report = drive(sc, acc, clock, 1800, 1.0)
    truth = ground_truth(sc, 1800, price_at=lambda i, t: 4.0)
    got = totals_of(report)
    compare(got, truth, 1, tolerance)
    compare(got, truth, 2, tolerance)
    compare(got, truth, 0, tolerance)
    src = {g.index: g.source for g in report.gpus}
    assert src[0] == ("counters" if counters == "true" else "sampled")


def test_overlapping_reasons_split_equally():
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), None, clock)
    both = ("SwPowerCap", "HwThermalSlowdown")
    for t in range(0, 101):
        viol = {"power": float(t), "thermal": float(t)}
        rep = acc.update([reading(sm_clock_mhz=990.0, clock_event_reasons=both,
                                  violation_seconds=viol)], float(t))
    g = rep.gpus[0]
    # 100 s at 50% loss = 50 s of capacity, half to each reason; $3.6/h = $0.001/s
    assert g.reasons["SwPowerCap"].capacity_lost_seconds == pytest.approx(25.0)
    assert g.reasons["HwThermalSlowdown"].capacity_lost_seconds == pytest.approx(25.0)
    assert g.reasons["SwPowerCap"].throttled_seconds == pytest.approx(100.0)
    assert g.dollars == pytest.approx(0.05)
    # two reasons of the same counter (thermal) and one of another: a third each
    acc2 = CostAccountant(make_config(), None, clock)
    three = ("SwPowerCap", "SwThermalSlowdown", "HwThermalSlowdown")
    for t in range(0, 31):
        rep = acc2.update([reading(sm_clock_mhz=990.0, clock_event_reasons=three,
                                   violation_seconds={"power": float(t),
                                                      "thermal": float(t)})], float(t))
    caps = {r: c.capacity_lost_seconds for r, c in rep.gpus[0].reasons.items()}
    assert caps == pytest.approx({r: 5.0 for r in three})


RESET = """
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 1
driver_version = "550.90.07"
cuda_version = "12.4"

[gpu_defaults]
sm_clock = 1980
max_sm_clock = 1980
app_sm_clock = 1980
utilization = 95

[[at]]
t = 50
gpu = 0
sm_clock = 1500
clock_event_reasons = ["SwPowerCap"]

[[at]]
t = 200
gpu = 0
reset = true

[[at]]
t = 400
gpu = 0
sm_clock = 1980
clock_event_reasons = []

[[at]]
t = 500
gpu = 0
lost = true

[[at]]
t = 530
gpu = 0
lost = false
reset = true
sm_clock = 1600
clock_event_reasons = ["HwThermalSlowdown"]

[[at]]
t = 700
gpu = 0
sm_clock = 1980
clock_event_reasons = []
"""


def test_gpu_reset_counters_drop_no_negative_no_double(tmp_path):
    sc = scenario_from_text(tmp_path, RESET)
    assert sc.gpu_state_at(0, 200.0)["violation_seconds"]["power"] == 0.0
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2\n"), str(tmp_path), clock)
    seen = []

    def watch(t):
        if acc._last_report is not None:
            seen.append(acc._last_report.gpus[0].capacity_lost_seconds)
    report = drive(sc, acc, clock, 900, 1.0, on_step=watch)
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:])), "totals went down"
    truth = ground_truth(sc, 900, price_at=lambda i, t: 2.0)
    compare(totals_of(report), truth, 1, 0.01)
    compare(totals_of(report), truth, 2, 0.01)


def test_price_change_on_reload_keeps_old_price_for_earlier_cost(tmp_path):
    from gpucostd.sim.scenario import load_scenario
    sc = load_scenario("builtin:h100x8")
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2\n"), str(tmp_path), clock)

    def maybe_reload(t):
        if t == 1000:
            acc.reconfigure(make_config('[cost]\ngpu_hour_usd = 2\n'
                                        '[cost.model_hour_usd]\n"NVIDIA H100*" = 8\n'))
    report = drive(sc, acc, clock, 2400, 1.0, on_step=maybe_reload)
    truth = ground_truth(sc, 2400, price_at=lambda i, t: 2.0 if t < 1000 else 8.0,
                         price_changes=[1000.0])
    compare(totals_of(report), truth, 2, 0.01)
    everything_new = ground_truth(sc, 2400, price_at=lambda i, t: 8.0)
    assert report.gpus[0].dollars < 0.9 * sum(v[2] for v in everything_new[0].values())
    assert report.node_dollars_per_hour == pytest.approx(64.0)


def test_totals_persist_across_restart(tmp_path):
    clock = VirtualClock()
    cfg = make_config("[cost]\ngpu_hour_usd = 3.6\n")
    acc = CostAccountant(cfg, str(tmp_path), clock)
    for t in range(0, 61):
        clock._t = t
        rep = acc.update([reading(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                                  violation_seconds={"power": float(t)})], float(t))
    acc.flush()
    before = rep.gpus[0].reasons["SwPowerCap"]
    assert before.capacity_lost_seconds == pytest.approx(30.0)
    data = json.loads((tmp_path / "cost.json").read_text())
    assert data["version"] == 1 and "GPU-0" in data["gpus"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    # restart: a new accountant on the same state dir continues (counters are not reset)
    acc2 = CostAccountant(cfg, str(tmp_path), clock)
    clock._t = 100.0
    rep2 = acc2.update([reading(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                                violation_seconds={"power": 100.0})], 100.0)
    assert rep2.gpus[0].reasons["SwPowerCap"].capacity_lost_seconds == pytest.approx(30.0)
    assert rep2.gpus[0].last_hour.capacity_lost_seconds == pytest.approx(30.0)
    for t in range(101, 111):
        clock._t = t
        rep2 = acc2.update([reading(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                                    violation_seconds={"power": float(t)})], float(t))
    assert rep2.gpus[0].reasons["SwPowerCap"].capacity_lost_seconds == pytest.approx(35.0)
    assert rep2.gpus[0].dollars == pytest.approx(0.035)
    fams = {f.name: f for f in metric_families(_Snap(rep2))}
    cap = fams["gpucostd_gpu_throttle_capacity_lost_seconds"]
    assert [s.value for s in cap.samples if s.name.endswith("_total")] == [pytest.approx(35.0)]


def test_corrupt_state_file_starts_fresh_and_keeps_the_old_one(tmp_path):
    (tmp_path / "cost.json").write_text("{not json")
    acc = CostAccountant(make_config(), str(tmp_path), VirtualClock())
    rep = acc.update([reading()], 0.0)
    assert (tmp_path / "cost.json.bad").exists()
    assert any("unreadable cost state" in n for n in rep.notes)


class _Snap:
    def __init__(self, cost):
        self.cost = cost


def _hour_of_throttling(price: str = "3.6", gpus: int = 8):
    clock = VirtualClock()
    acc = CostAccountant(make_config(f"[cost]\ngpu_hour_usd = {price}\n"), None, clock)
    rep = None
    for t in range(0, 3601, 5):
        clock._t = float(t)
        th = 600 <= t < 1800
        rs = [reading(index=i, uuid=f"GPU-{i}", sm_clock_mhz=1485.0 if (th and i == 3) else 1980.0,
                      clock_event_reasons=("HwThermalSlowdown",) if (th and i == 3) else (),
                      violation_seconds={"thermal": float(min(max(t - 600, 0), 1200)) if i == 3
                                         else 0.0, "power": 0.0})
              for i in range(gpus)]
        rep = acc.update(rs, float(t))
    return acc, rep


def test_metric_families_names_labels_and_price_gating():
    _acc, rep = _hour_of_throttling()
    fams = {f.name: f for f in metric_families(_Snap(rep))}
    for name in ("gpucostd_gpu_throughput_loss_ratio", "gpucostd_gpu_effective_cost_multiplier",
                 "gpucostd_gpu_throttle_capacity_lost_seconds", "gpucostd_gpu_throttled_seconds",
                 "gpucostd_gpu_throttle_cost_dollars", "gpucostd_node_cost_dollars_per_hour",
                 "gpucostd_node_throttle_cost_dollars_per_hour", "gpucostd_cost_info"):
        assert name in fams, name
    usd = [s for s in fams["gpucostd_gpu_throttle_cost_dollars"].samples
           if s.name == "gpucostd_gpu_throttle_cost_dollars_total"]
    assert [(s.labels["gpu"], s.labels["reason"]) for s in usd] == [("3", "HwThermalSlowdown")]
    # 1200 s at 25% loss = 300 s of capacity at $3.6/h = $0.30
    assert usd[0].value == pytest.approx(0.30)
    assert fams["gpucostd_node_cost_dollars_per_hour"].samples[0].value == pytest.approx(28.8)
    _acc, free = _hour_of_throttling(price="0")
    names = {f.name for f in metric_families(_Snap(free))}
    assert "gpucostd_gpu_throttle_cost_dollars" not in names
    assert "gpucostd_gpu_throttle_capacity_lost_seconds" in names
    # exposition renders (and does not need a currency label on every series)

    text = exposition(metric_families(_Snap(rep)))
    assert 'gpucostd_gpu_throttle_cost_dollars_total{gpu="3",reason="HwThermalSlowdown"' in text


def test_status_lines_fit_and_explain():
    _acc, rep = _hour_of_throttling()
    lines = status_lines(rep)
    assert all(len(line) <= 100 for line in lines), lines
    text = "\n".join(lines)
    assert "GPU 3" in text and "HwThermalSlowdown" in text and "$0.300" in text
    assert "latency rather than throughput" in text
    # the CLI renders from the JSON alone
    assert status_lines_from_json(json.loads(json.dumps(rep.to_json()))) == lines
    _acc, free = _hour_of_throttling(price="0")
    text = "\n".join(status_lines(free))
    assert "no price set" in text and "GPU-min" in text and "$" not in text


def test_to_json_has_stable_keys():
    _acc, rep = _hour_of_throttling()
    data = rep.to_json()
    assert set(data) == {"schema", "time", "currency", "priced", "totals_since", "node", "gpus",
                         "mig", "notes"}
    assert data["mig"] == []                    # no MIG instance (tests/test_mig_cost.py)
    assert set(data["node"]) == {"cost_dollars_per_hour", "throttle_dollars_per_hour",
                                 "loss_ratio", "capacity_lost_seconds", "dollars", "reasons",
                                 "last_hour", "last_24h", "tokens", "efficiency"}
    assert set(data["node"]["efficiency"]) >= {
        "cost_dollars_per_hour", "energy_dollars_per_hour", "tokens_per_dollar",
        "tokens_per_joule", "idle_ratio", "idle_basis", "energy_joules", "idle_dollars",
        "underused_dollars"}
    g = data["gpus"][3]
    assert set(g) == {"index", "uuid", "name", "price_per_hour", "busy", "loss_ratio",
                      "effective_cost_multiplier", "active_reasons", "source",
                      "capacity_lost_seconds", "dollars", "reasons", "last_hour", "last_24h",
                      "energy_joules", "energy_dollars", "energy_source", "paid_seconds",
                      "idle_seconds", "idle_dollars", "underused_seconds", "underused_dollars",
                      "idle_ratio", "idle_basis"}
    assert g["reasons"]["HwThermalSlowdown"]["dollars"] == pytest.approx(0.30)
    assert data["node"]["last_hour"]["top_reason"] == "HwThermalSlowdown"
    json.dumps(rep.to_json(history=True))


def test_cost_breakdown_since_and_text():
    acc, rep = _hour_of_throttling()
    all_time = cost_breakdown(rep)
    assert all_time["node"]["dollars"] == pytest.approx(0.30)
    # the throttling ended at 1800 s; the last 15 minutes hold none of it
    recent = cost_breakdown(rep, parse_duration("15m"))
    assert recent["node"]["dollars"] == pytest.approx(0.0)
    half = cost_breakdown(rep.to_json(history=True), 3600 - 1200)   # from 1200 s on
    assert half["node"]["dollars"] == pytest.approx(0.15, rel=0.05)
    # the persisted file works too (CLI without a daemon)
    assert cost_breakdown(acc.state(), None)["node"]["dollars"] == pytest.approx(0.30)
    text = format_cost(all_time)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "HwThermalSlowdown" in text and "$0.300" in text and "latency" in text
    assert format_cost(rep.to_json(history=True), 86400).startswith(
        "Throttling cost over the last 1d")
    # the CLI's --since parser (the one parser of durations)
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        parse_duration("yesterday")
    assert parse_duration("24h") == 86400


def test_last_hour_and_day_windows_roll(tmp_path):
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), str(tmp_path), clock)
    for t in range(0, 121):
        clock._t = float(t)
        rep = acc.update([reading(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                                  violation_seconds={"power": float(t)})], float(t))
    assert rep.last_hour.dollars == pytest.approx(0.06)
    clock._t = 2 * 3600.0          # two hours later, nothing throttled since
    rep = acc.update([reading(violation_seconds={"power": 120.0})], 2 * 3600.0)
    assert rep.last_hour.dollars == 0.0
    assert rep.last_24h.dollars == pytest.approx(0.06)
    assert rep.gpus[0].last_24h.top_reason == "SwPowerCap"
    clock._t = 26 * 3600.0
    rep = acc.update([reading(violation_seconds={"power": 120.0})], 26 * 3600.0)
    assert rep.last_24h.dollars == 0.0 and rep.dollars == pytest.approx(0.06)


def test_tokens_per_second_dollar_and_lost():
    from gpucostd.probes.inference import InferenceReading
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2\n"), None, clock)
    rep = None
    for t in range(0, 301):
        clock._t = float(t)
        # 1 GPU, 20% loss the whole time; the server makes 1000 tokens/s as measured
        acc.update([reading(sm_clock_mhz=1584.0, clock_event_reasons=("SwPowerCap",),
                            violation_seconds={"power": float(t)})], float(t))
        rep = acc.update_tokens(InferenceReading(1000.0 * t, float(t)), float(t))
    tk = rep.tokens
    assert tk.tokens_per_second == pytest.approx(1000.0)
    assert tk.tokens_per_dollar == pytest.approx(1000.0 * 3600 / 2)
    assert tk.cost_per_million_tokens == pytest.approx(2 / 3.6)
    # lost = 1000 x 0.2/0.8 per second over 300 s
    assert tk.tokens_lost_total == pytest.approx(250.0 * 300, rel=1e-6)
    data = rep.to_json()["node"]["tokens"]
    assert data["tokens_per_second"] == pytest.approx(1000.0)
    names = {f.name for f in metric_families(_Snap(rep))}
    assert {"gpucostd_node_tokens_per_second", "gpucostd_node_tokens_per_dollar",
            "gpucostd_node_cost_per_million_tokens_dollars",
            "gpucostd_node_tokens_lost"} <= names
    # an error reading changes nothing and does not raise
    before = tk.tokens_lost_total
    acc.update_tokens(InferenceReading(None, 301.0, error="unreachable"), 301.0)
    assert rep.tokens.tokens_lost_total == before


def test_measured_tokens_fit_against_clock():
    from gpucostd.probes.inference import InferenceReading
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2\n"), None, clock)
    total = 0.0
    rep = None
    for t in range(0, 600):
        clock._t = float(t)
        throttled = (t // 30) % 2 == 1
        sm = 1485.0 if throttled else 1980.0
        acc.update([reading(sm_clock_mhz=sm,
                            clock_event_reasons=("SwPowerCap",) if throttled else ())], float(t))
        total += 2000.0 * sm / 1980.0          # tokens/s proportional to the clock
        rep = acc.update_tokens(InferenceReading(total, float(t)), float(t))
    m = rep.tokens.measured
    assert m["usable"] and m["r2"] > 0.9
    assert m["points"] >= 30
    # the truth: 2000 tokens/s at full clock, 1500 at 1485 MHz; throttled half the time
    # after the fit became usable, so measured lost ~= 500/s x throttled seconds since then
    assert m["slope_tokens_per_second"] == pytest.approx(2000.0, rel=0.02)
    assert rep.tokens.measured_tokens_lost_total > 0
    modelled = rep.tokens.tokens_lost_total
    assert rep.tokens.measured_tokens_lost_total <= modelled * 1.05


def test_breakdown_for_the_daemon_and_from_the_state_file(tmp_path):
    from gpucostd.cost.accountant import breakdown, breakdown_from_state
    clock = VirtualClock()
    cfg = make_config(f'[daemon]\nstate_dir = "{tmp_path}"\n[cost]\ngpu_hour_usd = 3.6\n')
    acc = CostAccountant(cfg, str(tmp_path), clock)
    assert breakdown(acc, 3600)["gpus"] == []
    assert breakdown_from_state(cfg) is None
    for t in range(0, 101):
        clock._t = float(t)
        acc.update([reading(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                            violation_seconds={"power": float(t)})], float(t))
    live = breakdown(acc, 86400)
    assert live["node"]["dollars"] == pytest.approx(0.05)
    acc.flush()
    saved = breakdown_from_state(cfg, 86400, now=clock.time())
    assert saved["node"] == live["node"]
    # a day later nothing falls in the last 24 h; the all-time totals remain
    assert breakdown_from_state(cfg, 86400, now=clock.time() + 2 * 86400)["node"]["dollars"] == 0
    assert breakdown_from_state(cfg, None)["node"]["dollars"] == pytest.approx(0.05)
    assert "SwPowerCap" in format_cost(saved)


def test_default_application_clock_below_boost_is_not_the_reference():
    """NVML reports the default application clock (1755 on an H100) even when none was set;
    a GPU seen boosting above it is not capped by it, so the max clock is the reference."""
    acc = CostAccountant(make_config(), None, VirtualClock())
    acc.update([reading(app_sm_clock_mhz=1755.0, sm_clock_mhz=1980.0)], 0.0)
    rep = acc.update([reading(app_sm_clock_mhz=1755.0, sm_clock_mhz=1485.0,
                              clock_event_reasons=("SwPowerCap",))], 1.0)
    assert rep.gpus[0].loss_ratio == pytest.approx(0.25)
    # a GPU that never ran above its application clock: that clock is the reference
    acc2 = CostAccountant(make_config(), None, VirtualClock())
    rep = acc2.update([reading(app_sm_clock_mhz=1650.0, sm_clock_mhz=1320.0,
                               clock_event_reasons=("SwPowerCap",))], 0.0)
    assert rep.gpus[0].loss_ratio == pytest.approx(0.2)


def test_incremental_windows_equal_a_full_recount():
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2\n"), None, clock)
    counters = {0: 0.0, 1: 0.0}
    checked = 0
    for step, t in enumerate(range(0, 4 * 3600, 7)):
        clock._t = float(t)
        rs = []
        for i in (0, 1):
            on = (t // (300 + 170 * i)) % 3 == 0
            if on:
                counters[i] += 7.0
            rs.append(reading(index=i, uuid=f"GPU-{i}", sm_clock_mhz=1500.0 if on else 1980.0,
                              clock_event_reasons=("SwPowerCap",) if on else (),
                              violation_seconds={"power": counters[i]}))
        acc.update(rs, float(t))
        if step % 97 == 0:
            bucket, inc = acc._window_cache
            acc._window_cache = None
            full = acc._windows(bucket)
            for w in ("hour", "day"):
                for key in set(inc[w]) | set(full[w]):
                    for r in set(inc[w].get(key, {})) | set(full[w].get(key, {})):
                        a = inc[w].get(key, {}).get(r, [0.0] * 3)
                        b = full[w].get(key, {}).get(r, [0.0] * 3)
                        assert a == pytest.approx(b, abs=1e-6), (w, key, r, t)
            checked += 1
    assert checked > 10


def test_periodic_save_refreshes_totals_and_keeps_history(tmp_path):
    clock = VirtualClock()
    cfg = make_config("[cost]\ngpu_hour_usd = 3.6\n")
    acc = CostAccountant(cfg, str(tmp_path), clock)
    for t in range(0, 61):
        clock._t = float(t)
        acc.update([reading(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                            violation_seconds={"power": float(t)})], float(t))
    acc.flush()
    for t in range(61, 121):
        clock._t = float(t)
        acc.update([reading(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                            violation_seconds={"power": float(t)})], float(t))
    acc.flush(history=False)          # what the 5-second save does between history saves
    again = CostAccountant(cfg, str(tmp_path), clock)
    assert again._tracks["GPU-0"].totals["SwPowerCap"][1] == pytest.approx(60.0)
    assert sum(v["GPU-0"]["SwPowerCap"][1] for v in again._history.values()) == \
        pytest.approx(30.0)


# =========================================================================== edge cases
def _throttled(t: float, **kw) -> GpuReading:
    base = dict(sm_clock_mhz=990.0, clock_event_reasons=("SwPowerCap",),
                violation_seconds={"power": float(t)})
    base.update(kw)
    return reading(**base)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0])
def test_non_finite_or_negative_counter_is_ignored_not_poisoning(bad):
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), None, clock)
    for t in range(0, 11):
        clock._t = float(t)
        counters = {"power": bad if t in (4, 5) else float(t)}
        rep = acc.update([_throttled(t, violation_seconds=counters)], float(t))
    c = rep.gpus[0].reasons["SwPowerCap"]
    import math
    assert math.isfinite(c.capacity_lost_seconds) and math.isfinite(c.dollars)
    # 10 s throttled at 50%: the odd samples fall back to sampling, nothing is lost
    assert c.throttled_seconds == pytest.approx(10.0)
    assert c.capacity_lost_seconds == pytest.approx(5.0)
    assert all(len(line) <= 100 for line in status_lines(rep))


def test_vanished_gpu_stops_counting_modelled_tokens_lost():
    from gpucostd.probes.inference import InferenceReading
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2\n"), None, clock)
    for t in range(0, 11):
        clock._t = float(t)
        gpus = [reading(index=0, uuid="GPU-0"), _throttled(t, index=1, uuid="GPU-1")]
        acc.update(gpus, float(t))
        acc.update_tokens(InferenceReading(1000.0 * t, float(t)), float(t))
    lost = acc._last_report.tokens.tokens_lost_total
    assert lost > 0
    for t in range(11, 21):          # GPU 1 fell off the bus: no more readings for it
        clock._t = float(t)
        acc.update([reading(index=0, uuid="GPU-0")], float(t))
        rep = acc.update_tokens(InferenceReading(1000.0 * t, float(t)), float(t))
    assert rep.tokens.tokens_lost_total == pytest.approx(lost)


def test_non_finite_token_counter_is_ignored():
    from gpucostd.probes.inference import InferenceReading
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 2\n"), None, clock)
    for t in range(0, 5):
        clock._t = float(t)
        acc.update([_throttled(t)], float(t))
        total = float("nan") if t == 3 else 1000.0 * t
        rep = acc.update_tokens(InferenceReading(total, float(t)), float(t))
        if t == 3:
            # a reading that is not a count is no reading: no tokens/s now (the last one is
            # not current), nothing counted
            assert rep.tokens.tokens_total == 2000.0
            assert rep.tokens.tokens_per_second is None
    tk = rep.tokens
    assert tk.tokens_per_second == pytest.approx(1000.0) and tk.tokens_total == 4000.0
    assert all(len(line) <= 100 for line in status_lines(rep))


@pytest.mark.parametrize("reasons", [
    {"SwPowerCap": [1.0, 2.0]},                     # too short
    {"SwPowerCap": [1.0, 2.0, "x"]},                # not a number
    {"SwPowerCap": [1.0, 2.0, float("inf")]},       # not finite (json writes Infinity)
])
def test_malformed_totals_in_state_are_corrupt_not_a_crash_later(tmp_path, reasons):
    state = {"version": 1, "gpus": {"GPU-0": {"index": 0, "uuid": "GPU-0", "reasons": reasons}}}
    (tmp_path / "cost.json").write_text(json.dumps(state))
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), str(tmp_path), clock)
    for t in range(0, 3):
        clock._t = float(t)
        rep = acc.update([_throttled(t)], float(t))
    assert rep.gpus[0].reasons["SwPowerCap"].capacity_lost_seconds == pytest.approx(1.0)
    assert (tmp_path / "cost.json.bad").exists()
    assert any("unreadable cost state" in n and "cost.json.bad" in n for n in rep.notes)


def test_malformed_history_in_state_is_corrupt_not_a_crash_later(tmp_path):
    state = {"version": 1, "gpus": {},
             "history": {"buckets": {"0": {"GPU-0": {"SwPowerCap": [1.0]}}}}}
    (tmp_path / "cost.json").write_text(json.dumps(state))
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), str(tmp_path), clock)
    for t in (0.0, 61.0, 122.0):      # the windows add completed buckets
        clock._t = t
        rep = acc.update([_throttled(t)], t)
    assert (tmp_path / "cost.json.bad").exists() and rep.gpus[0].last_hour.dollars > 0


def test_lost_gpu_after_restart_stays_the_gpu_last_seen_at_its_index(tmp_path):
    clock = VirtualClock()
    cfg = make_config("[cost]\ngpu_hour_usd = 3.6\n")
    acc = CostAccountant(cfg, str(tmp_path), clock)
    for t in range(0, 11):
        clock._t = float(t)
        acc.update([_throttled(t)], float(t))
    acc.flush()
    acc2 = CostAccountant(cfg, str(tmp_path), clock)
    clock._t = 20.0
    rep = acc2.update([GpuReading(index=0, state=GpuState.LOST, error="lost")], 20.0)
    assert rep.gpus[0].uuid == "GPU-0"
    assert rep.gpus[0].reasons["SwPowerCap"].capacity_lost_seconds == pytest.approx(5.0)
    acc2.flush()
    assert list(json.loads((tmp_path / "cost.json").read_text())["gpus"]) == ["GPU-0"]


def test_price_change_while_gpu_unreadable_is_split_at_the_reload():
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), None, clock)
    clock._t = 0.0
    acc.update([_throttled(0)], 0.0)
    clock._t = 1.0
    acc.update([GpuReading(index=0, uuid="GPU-0", state=GpuState.UNRESPONSIVE,
                           error="timeout")], 1.0)
    clock._t = 1.5                        # reload while the GPU gives no reading
    acc.reconfigure(make_config("[cost]\ngpu_hour_usd = 36\n"))
    clock._t = 2.0
    acc.update([GpuReading(index=0, uuid="GPU-0", state=GpuState.UNRESPONSIVE,
                           error="timeout")], 2.0)
    clock._t = 2.5                        # and a second reload before the next sample
    acc.reconfigure(make_config("[cost]\ngpu_hour_usd = 72\n"))
    clock._t = 3.0
    rep = acc.update([_throttled(3)], 3.0)
    # 3 s at 50% loss = 1.5 GPU-s: 1.5 s at 3.6, 1 s at 36, 0.5 s at 72 per hour
    assert rep.gpus[0].capacity_lost_seconds == pytest.approx(1.5)
    assert rep.gpus[0].dollars == pytest.approx(0.5 * (1.5 * 3.6 + 1.0 * 36 + 0.5 * 72) / 3600)


def test_gpu_line_keeps_its_top_reason_within_100_columns():
    data = {"currency": "EUR", "priced": False, "node": {
        "loss_ratio": 0.2, "last_hour": {"capacity_lost_seconds": 900.0},
        "last_24h": {"capacity_lost_seconds": 9000.0, "top_reason": "HwPowerBrakeSlowdown"}},
        "gpus": [{"index": 15, "loss_ratio": 0.288, "effective_cost_multiplier": 1.4045,
                  "last_hour": {"capacity_lost_seconds": 740.0, "dollars": 0.0},
                  "last_24h": {"capacity_lost_seconds": 4440.0, "dollars": 0.0,
                               "top_reason": "HwPowerBrakeSlowdown"}}]}
    lines = status_lines_from_json(data)
    gpu = [line for line in lines if "GPU 15" in line][0]
    assert len(gpu) <= 100 and gpu.endswith("top HwPowerBrakeSlowdown") and "x1.40" in gpu


def test_tokens_line_with_large_numbers_keeps_the_measured_figure():
    data = {"currency": "EUR", "priced": True, "node": {
        "cost_dollars_per_hour": 20.0, "throttle_dollars_per_hour": 0.3,
        "last_hour": {"dollars": 0.3}, "last_24h": {"dollars": 7.0, "top_reason": None},
        "tokens": {"tokens_per_second": 123456.0, "cost_per_million_tokens": 12.34,
                   "tokens_lost_total": 123456789012.0,
                   "measured": {"usable": True, "tokens_lost_per_second": 12345.0,
                                "r2": 0.95}}}, "gpus": []}
    lines = status_lines_from_json(data)
    assert all(len(line) <= 100 for line in lines), lines
    text = "\n".join(lines)
    assert "123456789012 lost" in text and "measured 12345/s now (R2 0.95)" in text


@pytest.mark.parametrize("since", [float("nan"), float("inf"), -60.0, 0.0])
def test_breakdown_refuses_a_window_that_is_not_a_positive_number(since):
    _acc, rep = _hour_of_throttling()
    with pytest.raises(ValueError, match="must be a positive number of seconds"):
        cost_breakdown(rep, since)


def test_renumbered_gpus_with_a_lost_one_are_not_counted_twice():
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), None, clock)
    for t in range(0, 11):
        clock._t = float(t)
        rep = acc.update([_throttled(t, index=0, uuid="GPU-A"),
                          reading(index=1, uuid="GPU-B")], float(t))
    dollars = rep.dollars
    # after a re-enumeration GPU-A is index 1 and whatever is at index 0 gives no identity
    clock._t = 11.0
    rep = acc.update([GpuReading(index=0, state=GpuState.LOST, error="lost"),
                      _throttled(11, index=1, uuid="GPU-A")], 11.0)
    uuids = [g.uuid for g in rep.gpus]
    assert uuids.count("GPU-A") == 1, uuids
    assert rep.dollars == pytest.approx(dollars + 0.5 / 3600 * 3.6)
    assert rep.to_json()["node"]["dollars"] == pytest.approx(rep.dollars, abs=1e-6)


def test_a_second_corrupt_state_file_does_not_replace_the_first_bad_one(tmp_path):
    (tmp_path / "cost.json.bad").write_text("first")
    (tmp_path / "cost.json").write_text("second")
    rep = CostAccountant(make_config(), str(tmp_path), VirtualClock()).update([reading()], 0.0)
    assert (tmp_path / "cost.json.bad").read_text() == "first"
    assert (tmp_path / "cost.json.bad.1").read_text() == "second"
    assert any("kept as" in n and "cost.json.bad.1" in n for n in rep.notes)


def test_corrupt_state_that_cannot_be_moved_aside_is_never_overwritten(tmp_path, monkeypatch):
    (tmp_path / "cost.json").write_text("{not json")
    real_replace = os.replace

    def no_move(src, dst):
        if str(src).endswith("cost.json"):
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", no_move)
    clock = VirtualClock()
    acc = CostAccountant(make_config("[cost]\ngpu_hour_usd = 3.6\n"), str(tmp_path), clock)
    for t in range(0, 3):
        clock._t = float(t)
        rep = acc.update([_throttled(t)], float(t))
    acc.flush()
    assert (tmp_path / "cost.json").read_text() == "{not json"
    assert any("could not be moved aside" in n for n in rep.notes)
    assert rep.gpus[0].capacity_lost_seconds == pytest.approx(1.0)


def test_history_in_a_report_json_is_a_copy_not_the_live_history():
    # the status socket renders `gpucostd cost` in its own thread while the loop adds cost
    acc, rep = _hour_of_throttling()
    data = rep.to_json(history=True)
    before = json.dumps(data, sort_keys=True)
    acc._history.setdefault(max(acc._history) + 1, {})["GPU-3"] = {"SwPowerCap": [1.0] * 3}
    for per_gpu in acc._history.values():
        for per_reason in per_gpu.values():
            for v in per_reason.values():
                v[1] += 100.0
    assert json.dumps(data, sort_keys=True) == before
