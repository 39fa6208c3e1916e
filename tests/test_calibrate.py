"""`gpucostd calibrate`: the method (step plan, warm-up, table, recommendation), its proof on the
simulated serving node against the analytic optimum (gpucostd.sim.physics.best_power_limit),
every abort path restoring the limits, the refusals, and the one-shot command."""
from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpucostd.calibration import command as cal_mod
from gpucostd.calibration import session
from gpucostd.calibration.command import CalibrationRefused, params_from, run_simulated
from gpucostd.config import parse
from gpucostd.calibration import maths
from gpucostd.sim import physics
from gpucostd.sim.scenario import load_scenario

from conftest import gpucostd_cmd

BUILTIN = Path(cal_mod.__file__).parents[1] / "sim" / "scenarios" / "calibrate.toml"


def scenario_file(tmp_path, decode_share=0.0, extra="", name="cal.toml"):
    """builtin:calibrate (compute-bound, at the cap) with decode's share of the busy time set
    (docs/scenarios.md, "Physics")."""
    text = BUILTIN.read_text().replace("decode_share = 0.0", f"decode_share = {decode_share}")
    p = tmp_path / name
    p.write_text(text + "\n" + extra)
    return str(p)


def priced(gpu_hour=1.0, kwh=0.30, pue=1.4):
    return parse(f"[cost]\ngpu_hour_usd = {gpu_hour}\nenergy_usd_per_kwh = {kwh}\npue = {pue}\n")


# ---------------------------------------------------------------------- pure maths
def test_step_plan_from_max_down_to_min_in_whole_watts():
    assert maths.step_plan(700, 200, 6) == [700, 600, 500, 400, 300, 200]
    assert maths.step_plan(700, 200, 4) == [700, 533, 367, 200]
    assert maths.step_plan(650, 650, 5) == [650]
    with pytest.raises(ValueError, match="empty"):
        maths.step_plan(200, 700, 3)


def test_window_excludes_nothing_it_is_given_and_measures_rates():
    w = maths.Window()
    for k in range(5):      # t = 15..55 s, 100 tokens/s, 400 J/s
        t = 15.0 + 10 * k
        w.add(maths.Sample(t, t, 1000 + 100 * t, 1e6 + 400 * t, 390.0 + k, 1500.0, ("SwPowerCap",)))
    assert w.tokens_per_second() == pytest.approx(100.0)
    assert w.watts() == pytest.approx(400.0)        # the energy counter, not the sampled draw
    assert w.reasons() == ("SwPowerCap",)
    w2 = maths.Window([maths.Sample(0, 0, 0, None, 300.0, None), maths.Sample(10, 10, 50, None,
                                                                            500.0, None)])
    assert w2.watts() == pytest.approx(400.0)       # no energy counter: the mean draw
    reset = maths.Window([maths.Sample(0, 0, 900, None, 1, None), maths.Sample(1, 1, 5, None, 1,
                                                                                None)])
    assert reset.tokens_per_second() is None         # a counter reset is no rate


def _row(limit, tps, watts, price=1.0, kwh=0.3):
    w = maths.Window([maths.Sample(0, 0, 0, 0, watts, 1000),
                      maths.Sample(10, 10, tps * 10, watts * 10, watts, 1000)])
    return maths.step_row(limit, w, price, kwh, 1.0)


def test_recommendation_keeps_the_throughput_floor_and_prefers_the_lower_limit_on_ties():
    rows = [_row(700, 1000, 700, kwh=3.0), _row(600, 980, 600, kwh=3.0),
            _row(500, 940, 500, kwh=3.0), _row(400, 900, 400, kwh=3.0)]
    rec = maths.recommend(rows, 0.95)
    # 500 W and 400 W give more tokens per dollar, but below 95% of the best throughput
    assert rec["tokens_per_dollar"]["power_limit_watts"] == 600
    assert maths.recommend(rows, 0.0)["tokens_per_dollar"]["power_limit_watts"] == 400
    assert rec["tokens_per_joule"]["power_limit_watts"] == 400
    assert rows[2]["throughput_ratio"] == pytest.approx(0.94)
    tie = [_row(700, 1000, 500, kwh=0), _row(600, 1000, 500, kwh=0)]
    assert maths.recommend(tie, 0.95)["tokens_per_dollar"]["power_limit_watts"] == 600
    unpriced = [maths.step_row(700, rows[0] and maths.Window([
        maths.Sample(0, 0, 0, 0, 1, 1), maths.Sample(1, 1, 5, 5, 1, 1)]), 0.0, 0.0, 1.0)]
    r = maths.recommend(unpriced, 0.95)
    assert r["tokens_per_dollar"] is None and "gpu_hour_usd" in r["why"]
    assert r["tokens_per_joule"]["power_limit_watts"] == 700


def test_row_prices_gpu_hours_and_energy():
    r = _row(500, 1000, 500, price=2.0, kwh=0.2)     # $2/h + 0.5 kW x $0.2 = $2.10/h
    assert r["dollars_per_hour"] == pytest.approx(2.1)
    assert r["tokens_per_dollar"] == pytest.approx(1000 * 3600 / 2.1, rel=1e-6)
    assert r["dollars_per_million_tokens"] == pytest.approx(2.1 / 3.6, rel=1e-4)
    assert r["tokens_per_joule"] == pytest.approx(2.0)


def test_fewer_than_two_steps_or_limits_are_refused_with_the_reason():
    # --steps 1 used to calibrate at --from alone ("700..700 W", "1 steps"), --to ignored
    for steps in (1, 0):
        with pytest.raises(ValueError, match="at least 2 limits"):
            params_from({"steps": steps, "to_watts": 200})
        with pytest.raises(ValueError, match="at least 2 limits"):
            maths.step_plan(700, 200, steps)
    with pytest.raises(ValueError, match="--to 500 must be below --from 500"):
        params_from({"from_watts": 500, "to_watts": 500})
    with pytest.raises(ValueError, match="a whole watt apart"):
        params_from({"from_watts": 500.6, "to_watts": 500.2})
    assert params_from({"steps": 2, "from_watts": 501, "to_watts": 500}).steps == 2
    assert maths.step_plan(700, 697, 6) == [700, 699, 698, 697]     # fewer: duplicates dropped


def test_params_are_checked():
    with pytest.raises(ValueError, match="--warmup"):
        params_from({"dwell_seconds": 10, "warmup_seconds": 10})
    with pytest.raises(ValueError, match="min_throughput"):
        params_from({"min_throughput": 1.5})
    with pytest.raises(ValueError, match="--gpus"):
        params_from({"gpus": "0,x"})
    assert params_from({"gpus": "1,0"}).gpus == (0, 1)


# ---------------------------------------------------------------------- the proof
@pytest.mark.parametrize("decode_share,prices", [(0.0, (0.5, 0.30, 1.5)),
                                                 (0.3, (1.0, 0.30, 1.4))])
def test_recommendation_within_one_step_of_the_analytic_optimum(tmp_path, decode_share, prices):
    spec = scenario_file(tmp_path, decode_share)
    steps = 11
    rep = run_simulated(spec, priced(*prices), params_from(
        {"steps": steps, "dwell_seconds": 20, "min_throughput": 0.0}))
    assert rep["state"] == "done", rep["reason"]
    sc = load_scenario(spec)
    kw = dict(utilization=95, gpu_hour_usd=prices[0], energy_usd_per_kwh=prices[1],
              pue=prices[2], decode_share=decode_share)
    step_w = (700 - 200) / (steps - 1)
    for group in rep["groups"]:
        assert group["steps_watts"][0] == 700 and group["steps_watts"][-1] == 200
        rec = group["recommendation"]
        for objective in ("tokens_per_dollar", "tokens_per_joule"):
            truth = physics.best_power_limit(sc.physics, sc.serving, 200, 700,
                                             objective=objective, **kw)
            got = rec[objective]["power_limit_watts"]
            assert abs(got - truth["power_limit_watts"]) <= step_w, (objective, got, truth)
        # the measured rows are the physics' steady state (two GPUs, tensor parallel), as the
        # scenario itself answers for its endpoint at those limits
        k = rep["groups"].index(group)
        for row in group["rows"]:
            limits = {i: row["power_limit_watts"] for i in group["gpus"]}
            assert row["tokens_per_second"] == pytest.approx(
                physics.endpoint_at_power_limits(sc, k, 100.0, limits), rel=2e-3)
            st = physics.steady_state(sc.physics, sc.serving, row["power_limit_watts"], **kw)
            assert row["tokens_per_second"] == pytest.approx(2 * st["tokens_per_second"],
                                                             rel=2e-3)
            assert row["power_watts"] == pytest.approx(2 * st["power_watts"], rel=2e-3)
    if decode_share == 0.0:     # an interior optimum: the analytic one is well inside the range
        assert 300 <= rec["tokens_per_dollar"]["power_limit_watts"] <= 450


def test_default_floor_recommends_the_best_step_at_95_percent(tmp_path):
    # a mix with some decode and a cheap GPU-hour: one step down keeps 95% of the throughput
    # and is the cheapest per token (the analytic grid below says so)
    spec = scenario_file(tmp_path, 0.3)
    rep = run_simulated(spec, priced(0.18, 0.30, 1.5),
                        params_from({"steps": 6, "dwell_seconds": 12}))
    sc = load_scenario(spec)
    grid = [physics.steady_state(sc.physics, sc.serving, w, utilization=95, gpu_hour_usd=0.18,
                                 energy_usd_per_kwh=0.3, pue=1.5, decode_share=0.3)
            for w in (700, 600, 500, 400, 300, 200)]
    best = max(s["tokens_per_second"] for s in grid)
    ok = [s for s in grid if s["tokens_per_second"] >= 0.95 * best]
    want = max(ok, key=lambda s: s["tokens_per_dollar"])["power_limit_watts"]
    for g in rep["groups"]:
        r = g["recommendation"]["tokens_per_dollar"]
        assert r["power_limit_watts"] == want == 600
        assert r["throughput_ratio"] >= 0.95


def test_every_limit_is_back_and_within_range(tmp_path):
    spec = scenario_file(tmp_path, extra="[[gpu]]\nindex = 1\npower_limit = 450\n")
    seen = []

    def watch(daemon, cal):
        seen.extend(daemon.sim.state(i)["power_limit"] for i in range(4))
        watch.daemon = daemon
    rep = run_simulated(spec, priced(), params_from({"steps": 4, "dwell_seconds": 6}),
                        on_cycle=watch)
    assert rep["state"] == "done"
    assert all(200 <= w <= 700 for w in seen) and min(seen) == 200
    node = watch.daemon.sim
    assert [node.state(i)["power_limit"] for i in range(4)] == [700, 450, 700, 700]
    assert rep["groups"][0]["start_limits_watts"] == [700, 450]


# ---------------------------------------------------------------------- unequal groups
NARROW = {"2,3": "[[gpu]]\nindex = 2\npower_limit_min = 697\n"
                 "[[gpu]]\nindex = 3\npower_limit_min = 697\n",
          "0,1": "[[gpu]]\nindex = 0\npower_limit_min = 697\n"}


def _bounded(cycles=400, then=None):
    """A run_simulated hook that fails the test after `cycles` cycles (a run of these tests
    takes under 100: a calibration that never ends must not hang the suite)."""
    def hook(daemon, cal):
        hook.n += 1
        hook.daemon, hook.cal = daemon, cal
        if hook.n > cycles:
            raise AssertionError(f"the calibration did not end in {cycles} cycles "
                                 f"(state {cal.state}, step {cal.step})")
        if then is not None:
            then(daemon, cal)
    hook.n = 0
    return hook


@pytest.mark.parametrize("narrow", ["2,3", "0,1"])
def test_groups_with_fewer_limits_end_early_and_every_group_is_measured_fully(tmp_path, narrow):
    # a narrow range rounds to 4 whole-watt limits, the other group has 6: each group steps
    # through its own plan; the narrow one ends, restored, while the other goes on
    wide = "0,1" if narrow == "2,3" else "2,3"
    nar_gpus = [int(x) for x in narrow.split(",")]
    wide_gpus = [int(x) for x in wide.split(",")]
    seen = []

    def watch(daemon, cal):
        if cal.state != "running":
            return
        node = daemon.sim
        progress_file = Path(daemon.state_dir) / session.PROGRESS_FILE
        seen.append((cal.step, {i: node.state(i)["power_limit"] for i in range(4)},
                     cal.progress()["limits"], set(daemon.tuning.held),
                     [g["index"] for g in json.loads(progress_file.read_text())["gpus"]]))
    hook = _bounded(then=watch)
    rep = run_simulated(scenario_file(tmp_path, extra=NARROW[narrow]), priced(),
                        params_from({"steps": 6, "dwell_seconds": 12}), on_cycle=hook)
    assert rep["state"] == "done", rep["reason"]
    by = {",".join(map(str, g["gpus"])): g for g in rep["groups"]}
    assert by[narrow]["steps_watts"] == [700, 699, 698, 697]
    assert by[wide]["steps_watts"] == [700, 600, 500, 400, 300, 200]
    for g in rep["groups"]:            # every group measured at every limit of its own plan
        assert [r["power_limit_watts"] for r in g["rows"]] == g["steps_watts"]
        assert all(r["tokens_per_second"] for r in g["rows"])
        assert g["recommendation"]["tokens_per_dollar"] is not None
    assert all(g["restored"] for g in rep["groups"])
    assert any(narrow.replace(",", ", ") in n and "only 4 distinct" in n for n in rep["notes"])
    # steps 5-6: the narrow group is back at 700 W, no longer held nor in the progress file
    late = [s for s in seen if s[0] >= 4]
    assert late and {s[0] for s in late} == {4, 5}
    for step, limits, shown, held, in_file in late:
        want = [700, 600, 500, 400, 300, 200][step]
        assert [limits[i] for i in nar_gpus] == [700, 700]
        assert [limits[i] for i in wide_gpus] == [want, want]
        assert sorted(shown) == [str(i) for i in wide_gpus]
        assert held == {("power_limit_watts", f"gpu:{i}") for i in wide_gpus}
        assert in_file == wide_gpus
    assert all(200 <= w <= 700 for s in seen for w in s[1].values())
    assert all(s[1][i] >= 697 for s in seen for i in nar_gpus)
    node = hook.daemon.sim
    assert [node.state(i)["power_limit"] for i in range(4)] == [700] * 4
    assert not hook.daemon.tuning.originals.items()
    assert [e["code"] for e in rep["events"]] == ["calibration_started", "calibration_finished"]


def test_a_group_with_one_limit_is_skipped_with_all_and_refused_by_name(tmp_path):
    # GPU 3 cannot be stepped (min = max): its group's range holds one whole watt
    spec = scenario_file(tmp_path, extra="[[gpu]]\nindex = 3\npower_limit_min = 700\n")
    hook = _bounded()
    rep = run_simulated(spec, priced(), params_from({"steps": 6, "dwell_seconds": 12}),
                        on_cycle=hook)
    assert rep["state"] == "done", rep["reason"]
    assert [g["gpus"] for g in rep["groups"]] == [[0, 1]]
    assert len(rep["groups"][0]["rows"]) == 6
    assert any("skipped GPU 2, 3" in n and "cannot be stepped" in n and "one whole-watt" in n
               and "GPU 3 700..700 W" in n for n in rep["notes"]), rep["notes"]
    assert [hook.daemon.sim.state(i)["power_limit"] for i in range(4)] == [700] * 4
    with pytest.raises(CalibrationRefused, match="GPUs 2, 3 cannot be stepped"):
        run_simulated(spec, priced(), params_from({"gpus": "2,3"}), on_cycle=_bounded())
    # the whole node so: nothing to calibrate
    every = scenario_file(tmp_path, name="all.toml", extra="".join(
        f"[[gpu]]\nindex = {i}\npower_limit_min = 700\n" for i in range(4)))
    with pytest.raises(CalibrationRefused, match="nothing to calibrate.*cannot be stepped"):
        run_simulated(every, priced(), params_from({}), on_cycle=_bounded())
    # --to within a whole watt of the top: one limit left, refused (not one step at --from)
    with pytest.raises(CalibrationRefused, match="only one whole-watt limit"):
        run_simulated(scenario_file(tmp_path, name="c.toml"), priced(),
                      params_from({"to_watts": 699.5}), on_cycle=_bounded())


# ---------------------------------------------------------------------- aborts
def _abort_run(tmp_path, inject=None, extra="", params=None, **kw):
    spec = scenario_file(tmp_path, extra=extra)
    box = {}

    def hook(daemon, cal):
        box["daemon"], box["cal"] = daemon, cal
        if inject is not None and cal.state == "running":
            inject(daemon, cal)
    rep = run_simulated(spec, priced(), params_from(params or {"steps": 6, "dwell_seconds": 12}),
                        on_cycle=hook, **kw)
    node = box["daemon"].sim
    limits = [node.state(i)["power_limit"] for i in range(4)]
    return rep, limits, box


def _at(t, **fields):
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    return f"[[at]]\nt = {t}\ngpu = 0\n{body}\n"


@pytest.mark.parametrize("extra,words", [
    (_at(30, temperature=87), "health is WARN"),                           # near slowdown
    (_at(30, clock_event_reasons=["BoardLimit"]), "BoardLimit"),          # foreign throttle
    (_at(30, utilization=30), "hard floor"),                               # throughput
])
def test_abort_conditions_from_the_node_restore_at_once(tmp_path, extra, words):
    rep, limits, box = _abort_run(tmp_path, extra=extra)
    assert rep["state"] == "aborted" and words in rep["reason"], rep["reason"]
    assert limits == [700, 700, 700, 700]
    assert rep["restore_errors"] == []
    d = box["daemon"]
    assert not d.tuning.originals.items()               # the saved originals are forgotten
    assert not (Path(d.state_dir) / session.PROGRESS_FILE).exists()
    assert [e["code"] for e in rep["events"]] == ["calibration_started", "calibration_aborted"]


def test_abort_when_the_endpoint_stops_answering(tmp_path):
    def fail(daemon, cal):
        if cal.step >= 1:
            def broken(k):
                raise OSError("connection refused")
            daemon.sim_serving.fetch = broken
    rep, limits, _ = _abort_run(tmp_path, fail)
    assert rep["state"] == "aborted" and "stopped answering" in rep["reason"]
    assert limits == [700] * 4


def test_abort_when_the_limit_changes_behind_its_back(tmp_path):
    def meddle(daemon, cal):
        if cal.step == 2:
            daemon.gateway.set_power_limit(3, 650.0)
    rep, limits, _ = _abort_run(tmp_path, meddle)
    assert rep["state"] == "aborted" and "outside the calibration" in rep["reason"]
    assert limits == [700] * 4


def test_abort_on_sigint_restores_before_leaving(tmp_path):
    def interrupt(daemon, cal):
        if cal.step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _abort_run(tmp_path, interrupt)
    # the daemon of the run is gone; its simulated node kept the state
    box = {}

    def keep(daemon, cal):
        box["d"] = daemon
        if cal.step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_simulated(scenario_file(tmp_path, name="b.toml"), priced(),
                      params_from({"steps": 6, "dwell_seconds": 12}), on_cycle=keep)
    assert [box["d"].sim.state(i)["power_limit"] for i in range(4)] == [700] * 4
    assert not box["d"].tuning.originals.items()


def test_abort_when_the_command_stops_asking(tmp_path):
    rep, limits, _ = _abort_run(tmp_path, client_timeout=20.0)
    assert rep["state"] == "aborted" and "stopped asking" in rep["reason"]
    assert limits == [700] * 4


def test_abort_when_the_daemon_stops(tmp_path):
    def stop_daemon(daemon, cal):
        if cal.step == 1:
            session.stop(daemon)
    rep, limits, _ = _abort_run(tmp_path, stop_daemon)
    assert rep["state"] == "aborted" and "daemon is stopping" in rep["reason"]
    assert limits == [700] * 4


def test_an_error_inside_the_calibration_cycle_aborts_and_restores(tmp_path, monkeypatch):
    # the loop's error guard swallows what a part of the cycle raises: a calibration that
    # failed there every cycle used to stay "running" for ever, at a lowered limit
    def boom(*a, **k):
        raise RuntimeError("boom")

    def inject(daemon, cal):
        if cal.step == 2:
            monkeypatch.setattr(maths, "step_row", boom)
    hook = _bounded(then=inject)
    rep = run_simulated(scenario_file(tmp_path), priced(),
                        params_from({"steps": 6, "dwell_seconds": 12}), on_cycle=hook)
    assert rep["state"] == "aborted", rep["reason"]
    assert "internal error in the calibration (RuntimeError: boom)" in rep["reason"]
    d = hook.daemon
    assert [d.sim.state(i)["power_limit"] for i in range(4)] == [700] * 4
    assert rep["restore_errors"] == [] and not d.tuning.originals.items()
    assert not d.tuning.held
    assert not (Path(d.state_dir) / session.PROGRESS_FILE).exists()
    assert [e["code"] for e in rep["events"]] == ["calibration_started", "calibration_aborted"]
    assert "limits restored" in rep["events"][-1]["message"]
    assert [len(g["rows"]) for g in rep["groups"]] == [2, 2]    # steps 1-2 kept


def test_an_error_even_while_restoring_still_ends_the_calibration(tmp_path, monkeypatch):
    def inject(daemon, cal):
        if cal.step == 1:
            def broken(*a, **k):
                raise RuntimeError("restore broken")
            monkeypatch.setattr(maths, "step_row", broken)
            monkeypatch.setattr(daemon.tuning.power, "restore", broken)
    rep = run_simulated(scenario_file(tmp_path), priced(),
                        params_from({"steps": 6, "dwell_seconds": 12}),
                        on_cycle=_bounded(then=inject))
    assert rep["state"] == "failed" and "internal error" in rep["reason"]
    assert "restoring failed" in rep["reason"] and rep["restore_errors"]
    assert rep["events"][-1]["code"] == "calibration_aborted"
    assert "NOT restored" in rep["events"][-1]["message"]


# ---------------------------------------------------------------------- refusals
def test_refuses_idle_gpus_and_gpus_without_a_token_source(tmp_path):
    with pytest.raises(CalibrationRefused, match="idle"):
        run_simulated("builtin:serving", priced(), params_from({"gpus": "2,3"}))
    bare = BUILTIN.read_text().split("\n[serving]")[0]
    p = tmp_path / "bare.toml"
    p.write_text(bare)
    with pytest.raises(CalibrationRefused, match="no token source"):
        run_simulated(str(p), priced(), params_from({}))
    with pytest.raises(CalibrationRefused, match="together"):
        run_simulated("builtin:calibrate", priced(), params_from({"gpus": "0"}))
    with pytest.raises(CalibrationRefused, match="allowed 200..700"):
        run_simulated("builtin:calibrate", priced(), params_from({"from_watts": 800}))
    with pytest.raises(CalibrationRefused, match="HwThermalSlowdown"):
        run_simulated(scenario_file(tmp_path, extra=_at(0, clock_event_reasons=[
            "HwThermalSlowdown"], temperature=70)), priced(), params_from({"gpus": "0,1"}))


def test_skips_what_cannot_be_calibrated_with_all(tmp_path):
    rep = run_simulated("builtin:serving", priced(), params_from({"steps": 2,
                                                                   "dwell_seconds": 6}))
    assert [g["gpus"] for g in rep["groups"]] == [[0, 1]]
    assert any("skipped GPU 2, 3" in n and "idle" in n for n in rep["notes"])


# ---------------------------------------------------------------------- the command
def test_simulate_command_prints_the_table_and_the_recommendation(tmp_path):
    dropin = tmp_path / "d" / "calibrated.toml"
    r = subprocess.run(gpucostd_cmd() + ["calibrate", "--simulate", "--steps", "6", "--apply",
                                         "--dropin", str(dropin)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # the analytic answer on builtin:calibrate (compute-bound, at the cap) at the scenario's
    # illustrative [prices], the demo's: the 95% floor keeps the top step; the most tokens
    # per joule is the lowest
    sc = load_scenario("builtin:calibrate")
    assert (sc.prices.gpu_hour_usd, sc.prices.energy_usd_per_kwh, sc.prices.pue) == \
        (2.99, 0.08, 1.3)
    grid = [physics.steady_state(sc.physics, sc.serving, w, utilization=95, gpu_hour_usd=2.99,
                                 energy_usd_per_kwh=0.08, pue=1.3)
            for w in (700, 600, 500, 400, 300, 200)]
    top = max(s["tokens_per_second"] for s in grid)
    want = int(max((s for s in grid if s["tokens_per_second"] >= 0.95 * top),
                   key=lambda s: s["tokens_per_dollar"])["power_limit_watts"])
    joule = int(max(grid, key=lambda s: s["tokens_per_joule"])["power_limit_watts"])
    assert (want, joule) == (700, 200)
    assert "LIMIT W" in out and "tokens/s" in out and "% best" in out and "$/M tok" in out
    assert f"Recommended: {want} W" in out and f"Most tokens per joule: {joule} W" in out
    assert f"the simulated daemon then enforces: GPU 0 {want} W" in out
    assert all(len(line) <= 100 for line in out.splitlines())
    assert f"power_limit_watts = {want}" in dropin.read_text()
    assert r.stderr == ""           # no progress in a pipe
    assert "$2.99 per GPU-hour, $0.08 per kWh, PUE 1.3, from the scenario builtin:calibrate" \
        in " ".join(out.split())
    j = subprocess.run(gpucostd_cmd() + ["calibrate", "--simulate", "--steps", "2", "--json"],
                       capture_output=True, text=True, timeout=120)
    rep = json.loads(j.stdout)
    assert rep["state"] == "done" and rep["groups"][0]["rows"][0]["power_limit_watts"] == 700


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_simulate_command_aborts_restores_and_reports(tmp_path, sig):
    # stderr on a terminal, so the command shows its progress: the signal comes at step 3
    master, slave = os.openpty()
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        p = subprocess.Popen(gpucostd_cmd() + ["calibrate", "--simulate", "--steps", "100",
                                               "--dwell", "3600", "--json"],
                             stdin=subprocess.DEVNULL, stdout=f, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"step 3/100" not in seen:
            assert time.monotonic() < deadline and p.poll() is None, seen[-300:]
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:        # EIO: the command closed its terminal
                    break
        p.send_signal(sig)
        deadline = time.monotonic() + 60
        while p.poll() is None:        # drain the terminal while it ends
            assert time.monotonic() < deadline, "the command did not end after the signal"
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    pass
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        os.close(master)
    assert p.returncode == cal_mod.EXIT_ABORTED, seen[-500:]
    rep = json.loads(out.read_text())
    name = signal.Signals(sig).name
    assert rep["state"] == "aborted"
    assert rep["reason"] == f"interrupted ({name} to the calibrate command)"
    assert rep["restore_errors"] == [] and all(g["restored"] for g in rep["groups"])
    assert all(2 <= len(g["rows"]) < 100 for g in rep["groups"])
    ev = rep["events"][-1]
    assert ev["code"] == "calibration_aborted" and "limits restored" in ev["message"]
    assert b"Traceback" not in seen


def test_command_needs_root_unless_simulated(monkeypatch, capsys):
    from gpucostd import cli
    monkeypatch.setattr(cal_mod.os, "geteuid", lambda: 1000)
    assert cli.main(["calibrate", "--steps", "2"]) == 4
    assert "needs root" in capsys.readouterr().err


def test_refusal_exit_code(capsys):
    from gpucostd import cli
    assert cli.main(["calibrate", "--simulate", "builtin:serving", "--gpus", "2,3"]) == 5
    assert "idle" in capsys.readouterr().err


# ---------------------------------------------------------------------- crash recovery
def _daemon(tmp_path, progress):
    from gpucostd.clock import VirtualClock
    from gpucostd.loop import Daemon
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / session.PROGRESS_FILE).write_text(json.dumps(progress))
    cfg = parse(f'[daemon]\nstate_dir = "{state}"\nkernel_log = "none"\nlisten_address = ""\n')
    return Daemon(cfg, clock=VirtualClock(), simulate="builtin:calibrate", journal=False), state


def test_recovery_at_start_puts_back_the_saved_limits_of_the_same_gpus_only(tmp_path):
    d, state = _daemon(tmp_path, {"version": 1, "gpus": [
        {"index": 0, "uuid": "GPU-not-this-node", "start_watts": 650, "saved_original": True}]})
    try:
        d.gateway.ensure_initialized()
        d.gateway.set_power_limit(0, 300.0)
        snap = d.step()
        assert snap.gpu(0).power_limit_watts == 300          # another node's GPU: left alone
        assert (state / session.PROGRESS_FILE).exists()       # tried again at the next start
        assert [e.code for e in d.store.query()][-1] == "calibration_restore_failed"
        uuid = snap.gpu(1).uuid
    finally:
        d.shutdown(system_shutdown=True)
    d, state = _daemon(tmp_path, {"version": 1, "gpus": [
        {"index": 1, "uuid": uuid, "start_watts": 650, "saved_original": False}]})
    try:
        d.step()
        assert d.step().gpu(1).power_limit_watts == 650
        assert not (state / session.PROGRESS_FILE).exists()
        assert "calibration_restored" in [e.code for e in d.store.query()]
    finally:
        d.shutdown(system_shutdown=True)


def test_an_abort_before_the_first_step_writes_nothing(tmp_path):
    writes = []

    def early(daemon, cal):
        if cal.state == "pending":
            real = daemon.gateway.set_power_limit
            daemon.gateway.set_power_limit = lambda i, w: (writes.append((i, w)), real(i, w))
            cal.abort("interrupted (SIGINT to the calibrate command)")
    rep = run_simulated(scenario_file(tmp_path), priced(), params_from({}), on_cycle=early)
    assert rep["state"] == "aborted" and "SIGINT" in rep["reason"]
    assert writes == [] and rep["events"] == []


def test_apply_keeps_what_an_earlier_calibration_applied_to_other_gpus(tmp_path):
    from gpucostd.config import tomllib
    dropin = tmp_path / "gpucostd.d" / "calibrated.toml"
    spec = scenario_file(tmp_path, 0.3)       # one step down is the cheapest per token here
    first = run_simulated(spec, priced(0.18, 0.30, 1.5), params_from(
        {"gpus": "0,1", "steps": 6, "dwell_seconds": 6, "apply": True}), dropin=str(dropin))
    assert first["applied"] and first["enforced_after_apply"] == {"0": 600.0, "1": 600.0}
    second = run_simulated(spec, priced(gpu_hour=100.0), params_from(
        {"gpus": "2,3", "steps": 6, "dwell_seconds": 6, "apply": True}), dropin=str(dropin))
    assert second["enforced_after_apply"] == {"2": 700.0, "3": 700.0}
    entries = tomllib.loads(dropin.read_text())["tuning"]["gpu"]["override"]
    watts = sorted(e["power_limit_watts"] for e in entries)
    assert watts == [600, 600, 700, 700]        # GPUs 0-1 from the first, 2-3 from the second
    third = run_simulated(spec, priced(gpu_hour=100.0), params_from(
        {"gpus": "0,1", "steps": 6, "dwell_seconds": 6, "apply": True}), dropin=str(dropin))
    assert third["applied"]
    entries = tomllib.loads(dropin.read_text())["tuning"]["gpu"]["override"]
    assert sorted(e["power_limit_watts"] for e in entries) == [700] * 4     # replaced, not added


def test_calibration_uses_only_the_public_faces_of_the_daemon_and_the_tuners():
    """calibration/ holds, sets and restores through TuningManager's public interface (hold,
    release, save_original, set, restore_held, forget_original) and drives the Daemon through
    its public methods: no tuner, originals store or private attribute reached into."""
    import re
    room = Path(session.__file__).parent
    found = []
    for path in sorted(room.glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btuning\.(held|power|persistence|originals|_)|\bdaemon\._|"
                         r"\bd\._", line):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert found == []
