"""`gpucostd calibrate --lever clocks|profile|auto`: the SM-clock sweep keeps every safety of the
power-limit sweep (the original saved before the first write, every abort path unlocks, a
killed daemon unlocks at its next start, refused while idle), auto picks the lever that binds,
and --apply writes locked clocks as enforced config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpucostd.calibration import session
from gpucostd.calibration.command import CalibrationRefused, params_from, run_simulated
from gpucostd.calibration import maths, report

from test_calibrate import _bounded, priced, scenario_file

CLOCKS = {"lever": "clocks", "steps": 6, "dwell_seconds": 12}


def _clocks(daemon):
    return [daemon.sim.state(i)["sm_clock"] for i in range(4)]


def _run(tmp_path, inject=None, params=None, **kw):
    box = {}

    def hook(daemon, cal):
        box["daemon"], box["cal"] = daemon, cal
        if inject is not None and cal.state == "running":
            inject(daemon, cal)
    rep = run_simulated(scenario_file(tmp_path, 0.3), priced(),
                        params_from(params or CLOCKS), on_cycle=_bounded(then=hook), **kw)
    return rep, box["daemon"]


def test_clock_sweep_measures_every_step_and_unlocks_at_the_end(tmp_path):
    seen = {}

    def watch(daemon, cal):
        seen.setdefault(cal.step, (_clocks(daemon), dict(daemon.tuning.originals.items()
                                                         and {(n, s): e["value"] for n, s, e
                                                              in daemon.tuning.originals.items()})))
    rep, d = _run(tmp_path, watch)
    assert rep["state"] == "done", rep["reason"]
    for g in rep["groups"]:
        assert g["lever"] == "clocks" and len(g["rows"]) == 6
        assert g["steps"][0] == 1980 and all(s % 15 == 0 for s in g["steps"])
        assert [r["sm_clock_mhz"] for r in g["rows"]] == g["steps"]
        rec = g["recommendation"]["tokens_per_dollar"]
        assert rec["lever"] == "clocks" and rec["throughput_ratio"] >= 0.95
    # the original ("unlocked") was saved before the first step locked anything
    clocks0, saved0 = seen[0]
    assert saved0 == {("locked_sm_clocks_mhz", f"gpu:{i}"): "unlocked" for i in range(4)}
    assert clocks0 == [1980] * 4 or clocks0 == [rep["groups"][0]["steps"][0]] * 4
    assert _clocks(d) == [1980] * 4 and all(d.gateway.locked_clocks(i) is None for i in range(4))
    assert not d.tuning.originals.items() and not d.tuning.held
    assert not (Path(d.state_dir) / session.PROGRESS_FILE).exists()
    assert rep["events"][0]["message"].startswith("SM-clock calibration started")


def _unlock_behind(daemon, cal):
    if cal.step == 2:
        from gpucostd.hw import nvml
        other = nvml.NvmlGateway(library=daemon.gateway.library, clock=daemon.clock)
        assert other.ensure_initialized()
        other.reset_locked_clocks(1)


def _endpoint_gone(daemon, cal):
    if cal.step >= 1:
        def broken(k):
            raise OSError("connection refused")
        daemon.sim_serving.fetch = broken


def _daemon_stops(daemon, cal):
    if cal.step == 1:
        session.stop(daemon)


def _interrupted(daemon, cal):
    if cal.step == 2:
        cal.abort("interrupted (SIGTERM to the calibrate command)")


@pytest.mark.parametrize("inject,words", [
    (_unlock_behind, "outside the calibration"),
    (_endpoint_gone, "stopped answering"),
    (_daemon_stops, "daemon is stopping"),
    (_interrupted, "SIGTERM"),
])
def test_every_abort_unlocks_at_once(tmp_path, inject, words):
    rep, d = _run(tmp_path, inject)
    assert rep["state"] == "aborted" and words in rep["reason"], rep["reason"]
    assert rep["restore_errors"] == []
    assert _clocks(d) == [1980] * 4
    assert not d.tuning.originals.items() and not d.tuning.held
    assert not (Path(d.state_dir) / session.PROGRESS_FILE).exists()


def test_an_internal_error_aborts_and_unlocks(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    def inject(daemon, cal):
        if cal.step == 2:
            monkeypatch.setattr(maths, "step_row", boom)
    rep, d = _run(tmp_path, inject)
    assert rep["state"] == "aborted" and "RuntimeError: boom" in rep["reason"]
    assert _clocks(d) == [1980] * 4 and not d.tuning.originals.items()


def test_sigint_unlocks_before_leaving(tmp_path):
    box = {}

    def interrupt(daemon, cal):
        box["d"] = daemon
        if cal.step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_simulated(scenario_file(tmp_path, 0.3), priced(), params_from(CLOCKS),
                      on_cycle=interrupt)
    assert _clocks(box["d"]) == [1980] * 4
    assert not box["d"].tuning.originals.items()


def test_a_killed_daemon_unlocks_at_its_next_start(tmp_path):
    """The progress file a killed clock calibration left: the next start unlocks GPU 2 (by its
    UUID) before anything else."""
    from gpucostd.clock import VirtualClock
    from gpucostd.config import parse
    from gpucostd.loop import Daemon
    from gpucostd.sim.nvml import SimulatedNode
    uuid = SimulatedNode("builtin:calibrate", VirtualClock()).state(2)["uuid"]
    state = tmp_path / "state"
    state.mkdir()
    (state / session.PROGRESS_FILE).write_text(json.dumps({"version": 1, "gpus": [
        {"index": 2, "uuid": uuid, "setting": "locked_sm_clocks_mhz", "start": "unlocked",
         "saved_original": False}]}))
    cfg = parse(f'[daemon]\nstate_dir = "{state}"\nkernel_log = "none"\nlisten_address = ""\n')
    d = Daemon(cfg, clock=VirtualClock(), simulate="builtin:calibrate", journal=False)
    try:
        d.gateway.ensure_initialized()
        d.gateway.set_locked_clocks(2, 345, 1200)      # as the killed calibration left it
        d.step()
        snap = d.step()
        assert snap.gpu(2).sm_clock_mhz == snap.gpu(3).sm_clock_mhz > 1200   # as untouched
        assert not (state / session.PROGRESS_FILE).exists()
        assert "calibration_restored" in [e.code for e in d.store.query()]
    finally:
        d.shutdown(system_shutdown=True)


def test_refused_while_idle(tmp_path):
    with pytest.raises(CalibrationRefused, match="idle"):
        run_simulated("builtin:serving", priced(), params_from({"gpus": "2,3",
                                                                "lever": "clocks"}))


def test_apply_writes_locked_clocks_as_enforced_config(tmp_path):
    from gpucostd.config import tomllib
    dropin = tmp_path / "gpucostd.d" / "calibrated.toml"
    rep = run_simulated(scenario_file(tmp_path), priced(), params_from(
        {"lever": "clocks", "gpus": "0,1", "steps": 6, "dwell_seconds": 6, "apply": True}),
        dropin=str(dropin))
    assert rep["applied"], rep["notes"]
    rec = rep["groups"][0]["recommendation"]["tokens_per_dollar"]["setting"]
    entries = tomllib.loads(dropin.read_text())["tuning"]["gpu"]["override"]
    assert [e["locked_sm_clocks_mhz"] for e in entries] == [[345, rec]] * 2
    assert rep["enforced_after_apply"] == {"0": f"345..{rec} MHz", "1": f"345..{rec} MHz"}
    assert f"GPU 0 345..{rec} MHz" in report.format_report(rep)


def test_auto_chooses_the_power_limit_where_it_binds(tmp_path):
    rep, d = _run(tmp_path, params={"lever": "auto", "steps": 4, "dwell_seconds": 8})
    for g in rep["groups"]:
        assert g["lever"] == "power"
        assert g["lever_why"].startswith("the power limit binds: GPU")
    assert "lever: power: the power limit binds" in report.format_report(rep)


def test_auto_chooses_clocks_where_the_limit_does_not_bind(tmp_path):
    """builtin:decode: 317 W of 700 at the max clock, no SwPowerCap."""
    rep = run_simulated("builtin:decode", priced(), params_from({"steps": 4,
                                                                 "dwell_seconds": 8}),
                        on_cycle=_bounded())
    assert rep["state"] == "done", rep["reason"]
    for g in rep["groups"]:
        assert g["lever"] == "clocks"
        assert "the power limit does not bind" in g["lever_why"] and "no SwPowerCap" in \
            g["lever_why"]


def test_profile_lever_on_h100_is_refused_with_the_reason(tmp_path):
    with pytest.raises(CalibrationRefused) as e:
        run_simulated(scenario_file(tmp_path), priced(),
                      params_from({"lever": "profile", "gpus": "0,1"}), on_cycle=_bounded())
    assert "GPU 0 has no workload power profiles: NVML says not supported (Blackwell and " \
           "later have them); use --lever clocks or power" in str(e.value)


def test_lever_and_clock_range_are_checked():
    with pytest.raises(ValueError, match="--lever 'fast'"):
        params_from({"lever": "fast"})
    with pytest.raises(ValueError, match="--to-mhz 1500 must be below --from-mhz 1200"):
        params_from({"lever": "clocks", "from_mhz": 1200, "to_mhz": 1500})
    p = params_from({"lever": "clocks", "from_mhz": 1800, "to_mhz": 1200})
    assert p.to_json()["lever"] == "clocks" and p.to_json()["to_mhz"] == 1200


def test_clock_plan_takes_supported_clocks_evenly():
    supported = list(range(1980, 344, -15))
    assert maths.clock_plan(supported, 1980, 1185, 6) == [1980, 1815, 1665, 1500, 1350, 1185]
    assert maths.clock_plan([1980, 1965], 1980, 1000, 6) == [1980, 1965]
    assert maths.clock_plan([1980], 1980, 1000, 6) == [1980]


# ---------------------------------------------------------------------- issue 21's "done when"
def _decode_state():
    from gpucostd.sim.scenario import load_scenario
    sc = load_scenario("builtin:decode")
    st = sc.state_ref(0, 0.0)
    return sc, {"max_sm_clock": st["max_sm_clock"], "utilization": st["utilization"],
                "decode_share": st["decode_share"]}


def test_decode_power_sweep_changes_nothing_above_the_draw_and_says_so():
    from gpucostd.config import parse
    rep = run_simulated("builtin:decode", parse(""), params_from(
        {"lever": "power", "steps": 6, "dwell_seconds": 12}), on_cycle=_bounded())
    assert rep["state"] == "done", rep["reason"]
    for g in rep["groups"]:
        assert g["lever"] == "power"
        per_gpu = g["rows"][0]["power_watts"] / len(g["gpus"])
        above = [r for r in g["rows"] if r["power_limit_watts"] > per_gpu]
        assert len(above) >= 3
        for r in above:
            assert abs(r["tokens_per_second"] / above[0]["tokens_per_second"] - 1) < 0.02
            assert abs(r["power_watts"] / above[0]["power_watts"] - 1) < 0.02
        assert any("The power limit does not bind" in n for n in g["notes"]), g["notes"]
    assert "The power limit does not bind" in report.format_report(rep)


def test_decode_auto_sweeps_clocks_and_finds_a_fifth_more_tokens_per_joule():
    from gpucostd.config import parse
    from gpucostd.sim import physics
    sc, kw = _decode_state()
    rep = run_simulated("builtin:decode", parse(""), params_from(
        {"steps": 6, "dwell_seconds": 12}), on_cycle=_bounded())
    assert rep["state"] == "done", rep["reason"]
    assert rep["prices"]["energy_usd_per_kwh"] == 0.08 and rep["prices"]["pue"] == 1.3
    for g in rep["groups"]:
        assert g["lever"] == "clocks", g["lever_why"]
        # the table's activity is GPM SM activity (decode: about a third of the SMs at 95%
        # GPU-Util), not GPU-Util
        assert 0.2 < g["rows"][0]["activity"] < 0.45
        rec = g["recommendation"]
        jf = rec["tokens_per_joule_at_floor"]
        assert jf["throughput_ratio"] >= 0.95 and rec["joule_gain"] >= 0.20, rec
        steps = g["steps"]
        spacing = max(a - b for a, b in zip(steps, steps[1:]))
        grid = [c for c in range(1980, 344, -15) if steps[-1] <= c <= steps[0]]
        best_j = physics.best_locked_clock(sc.physics, sc.serving, grid, "tokens_per_joule",
                                           0.95, **kw)
        assert abs(jf["setting"] - best_j["locked_sm_clock_mhz"]) <= spacing
        prices = {"gpu_hour_usd": 2.99, "energy_usd_per_kwh": 0.08, "pue": 1.3}
        best_d = physics.best_locked_clock(sc.physics, sc.serving, grid, "tokens_per_dollar",
                                           0.95, **kw, **prices)
        assert abs(rec["tokens_per_dollar"]["setting"] - best_d["locked_sm_clock_mhz"]) <= \
            spacing


def test_prefill_auto_chooses_the_power_limit():
    from gpucostd.config import parse
    rep = run_simulated("builtin:prefill", parse(""), params_from(
        {"steps": 4, "dwell_seconds": 8}), on_cycle=_bounded())
    assert rep["state"] == "done", rep["reason"]
    assert rep["groups"] and all(g["lever"] == "power" for g in rep["groups"])
    assert all(g["lever_why"].startswith("the power limit binds") for g in rep["groups"])


def test_metrics_show_the_locked_clock_of_the_step_and_the_recommendation(tmp_path):
    from gpucostd.calibration.metrics import metric_families
    seen = {}

    def scrape(daemon, cal):
        if cal.step == 1 and daemon.latest is not None and "fams" not in seen:
            snap = daemon.latest
            info = getattr(snap, "calibration", None) or \
                (getattr(snap, "extra", None) or {}).get("calibration") or {}
            if info.get("running"):
                seen["fams"] = {f.name: f for f in metric_families(snap)}
                seen["held"] = info["progress"]["clocks"]
                seen["steps"] = cal.groups[0].steps
    rep, d = _run(tmp_path, scrape)
    step = seen["fams"]["gpucostd_calibration_step_sm_clock_hertz"]
    values = {s.labels["gpu"]: s.value for s in step.samples}
    assert values == {gpu: mhz * 1e6 for gpu, mhz in seen["held"].items()}
    assert sorted(values) == ["0", "1", "2", "3"] and values["0"] / 1e6 in seen["steps"]
    assert seen["fams"]["gpucostd_calibration_step_power_limit_watts"].samples == []
    summary = report.summary(rep)
    rec = rep["groups"][0]["recommendation"]["tokens_per_dollar"]["setting"]
    assert summary["recommended_clocks"]["0"]["mhz"] == rec and summary["recommended"] == {}


def test_profile_sweep_on_a_simulated_blackwell_restores_the_profiles(tmp_path):
    spec = scenario_file(tmp_path)
    text = Path(spec).read_text().replace('model = "NVIDIA H100 80GB HBM3"',
                                          'model = "NVIDIA B200"')
    Path(spec).write_text(text)
    box = {}
    rep = run_simulated(spec, priced(), params_from(
        {"lever": "profile", "gpus": "0,1", "steps": 2, "dwell_seconds": 6}),
        on_cycle=_bounded(then=lambda d, c: box.setdefault("d", d)))
    assert rep["state"] == "done", rep["reason"]
    g = rep["groups"][0]
    assert g["lever"] == "profile" and g["steps"] == list(maths.PROFILE_STEPS)
    assert [r["power_profile"] for r in g["rows"]] == list(maths.PROFILE_STEPS)
    d = box["d"]
    assert [d.sim.state(i).get("power_profiles") or 0 for i in (0, 1)] == [0, 0]   # none
    assert not d.tuning.originals.items()


def test_a_configured_lock_is_held_during_the_sweep_and_back_at_the_end(tmp_path):
    from gpucostd.config import parse
    cfg = parse("[cost]\ngpu_hour_usd = 1.0\n[tuning.gpu]\nlocked_sm_clocks_mhz = [345, 1500]\n")
    box = {}

    def watch(daemon, cal):
        box["d"] = daemon
        if cal.state == "running" and cal.step == 1:
            box["held"] = sorted(daemon.tuning.held)
    rep = run_simulated("builtin:decode", cfg, params_from(CLOCKS),
                        on_cycle=_bounded(then=watch))
    assert rep["state"] == "done", rep["reason"]
    g = rep["groups"][0]
    assert g["start"] == [[345, 1500], [345, 1500]]
    assert box["held"] == sorted(("locked_sm_clocks_mhz", f"gpu:{i}") for i in range(4))
    d = box["d"]
    assert [d.sim.state(i)["sm_clock"] for i in range(4)] == [1500] * 4
    assert not d.tuning.held
