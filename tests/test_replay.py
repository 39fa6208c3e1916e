"""`gpucostd replay`: the daemon's own loop (probe -> NVML gateway -> simulated NVML -> cost) on a
virtual clock, checked against the scenario's analytic ground truth.

Targets (issue 5): with violation counters, within 1% of the ground truth; sampling only at a
1 s step, within 5% for episodes of 10 s or longer.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpucostd.config import parse
from gpucostd.replay import format_replay, run_replay
from gpucostd.sim.scenario import load_scenario

_spec = importlib.util.spec_from_file_location(
    "_cost_ground_truth", Path(__file__).resolve().parent / "test_cost.py")
_gt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gt)
ground_truth, compare = _gt.ground_truth, _gt.compare

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "daemon" / "sim" / "scenarios"

pytestmark = pytest.mark.slow


def replay_totals(result):
    return {g["index"]: {r: [c["throttled_seconds"], c["capacity_lost_seconds"], c["dollars"]]
                         for r, c in g["reasons"].items()} for g in result["gpus"]}


def check(result, truth, tolerance_by_gpu):
    got = replay_totals(result)
    rows = []
    for index, tol in tolerance_by_gpu.items():
        g = {index: got.get(index, {})}
        t = {index: truth.get(index, {})}
        for col in (0, 1, 2):
            rows += compare(g, t, col, tol)
    return rows


def test_builtin_h100x8_with_counters_within_1_percent():
    cfg = parse("[cost]\ngpu_hour_usd = 2.5\n")
    result = run_replay("builtin:h100x8", cfg, duration=600, step=1.0)
    truth = ground_truth(load_scenario("builtin:h100x8"), 600, price_at=lambda i, t: 2.5)
    check(result, truth, {i: 0.01 for i in range(8)})
    g0 = result["gpus"][0]
    assert g0["source"] == "counters"
    # five 60 s episodes at 1410 of 1980 MHz, $2.5/h
    assert g0["reasons"]["HwThermalSlowdown"]["capacity_lost_seconds"] == pytest.approx(
        300 * (1 - 1410 / 1980), rel=0.01)
    assert result["node"]["top_reason"] == "HwThermalSlowdown"
    # GPU 0 goes WARN/CRIT and back in each of the five cycles: every change is kept
    changes = [e for e in result["events"]["list"]
               if e["code"] == "health_change" and e["subject"] == "gpu:0"]
    assert len(changes) >= 10 and changes[0]["t"] == 20.0


def test_builtin_h100x8_sampling_only_within_5_percent(tmp_path):
    text = (BUILTIN_DIR / "h100x8.toml").read_text().replace(
        "[gpu_defaults]\n", "[gpu_defaults]\nviolation_counters = false\n", 1)
    path = tmp_path / "h100x8_nocounters.toml"
    path.write_text(text)
    cfg = parse("[cost]\ngpu_hour_usd = 2.5\n")
    result = run_replay(str(path), cfg, duration=600, step=1.0)
    assert result["gpus"][0]["source"] == "sampled"
    truth = ground_truth(load_scenario(str(path)), 600, price_at=lambda i, t: 2.5)
    check(result, truth, {i: 0.05 for i in range(8)})


def test_overlapping_reasons_fractional_episodes_and_no_counters():
    cfg = parse("[cost]\ngpu_hour_usd = 3\n")
    duration = 700.0
    result = run_replay("builtin:cost_overlap", cfg, duration=duration, step=1.0)
    truth = ground_truth(load_scenario("builtin:cost_overlap"), duration,
                         price_at=lambda i, t: 3.0)
    # GPUs 0, 1 and 3 have counters (1%); GPU 2 is sampled only (5%)
    check(result, truth, {0: 0.01, 1: 0.01, 2: 0.05, 3: 0.01})
    g = {x["index"]: x for x in result["gpus"]}
    assert g[2]["source"] == "sampled" and g[0]["source"] == "counters"
    # both reasons of GPU 0 carry part of the overlap; GPU 1's two thermal reasons split equally
    r1 = g[1]["reasons"]
    assert r1["SwThermalSlowdown"]["capacity_lost_seconds"] == pytest.approx(
        r1["HwThermalSlowdown"]["capacity_lost_seconds"], rel=1e-6)
    # the under-loaded / idle GPU was throttled but lost no capacity
    assert g[3]["throttled_seconds"] > 0 and g[3]["capacity_lost_seconds"] == 0
    assert g[3]["dollars"] == 0


def test_gpu_reset_and_lost_no_negative_or_doubled_cost():
    cfg = parse("[cost]\ngpu_hour_usd = 2\n")
    seen = []

    def watch(daemon, snap):
        seen.append(tuple(g.capacity_lost_seconds for g in snap.cost.gpus))

    result = run_replay("builtin:cost_reset", cfg, step=1.0, on_cycle=watch)
    assert result["duration_seconds"] == 600
    for a, b in zip(seen, seen[1:]):
        assert all(y >= x - 1e-9 for x, y in zip(a, b)), "a total went down"
    truth = ground_truth(load_scenario("builtin:cost_reset"), 600, price_at=lambda i, t: 2.0)
    check(result, truth, {0: 0.01, 1: 0.01})
    assert result["events"]["count"] > 1


def test_price_change_on_reload_applies_from_the_reload_on(tmp_path):
    old = tmp_path / "old.toml"
    new = tmp_path / "new.toml"
    old.write_text("[cost]\ngpu_hour_usd = 2\n")
    new.write_text('[cost]\ngpu_hour_usd = 2\n[cost.model_hour_usd]\n"NVIDIA H100*" = 8\n')

    def reload_at_300(daemon, snap):
        if abs(daemon.clock.monotonic() - 300.0) < 1e-9:
            assert daemon.reload(str(new))

    from gpucostd.config import load
    result = run_replay("builtin:h100x8", load(str(old)), duration=600, step=1.0,
                        on_cycle=reload_at_300)
    sc = load_scenario("builtin:h100x8")
    truth = ground_truth(sc, 600, price_at=lambda i, t: 2.0 if t < 300 else 8.0,
                         price_changes=[300.0])
    check(result, truth, {0: 0.01})
    all_new = ground_truth(sc, 600, price_at=lambda i, t: 8.0)
    assert result["gpus"][0]["dollars"] < 0.8 * all_new[0]["HwThermalSlowdown"][2]
    assert result["gpus"][0]["price_per_hour"] == 8.0


def test_replay_is_deterministic_and_fits_100_columns():
    cfg = parse("[cost]\ngpu_hour_usd = 2.5\n")
    a = run_replay("builtin:cost_overlap", cfg, duration=240, step=2.0)
    b = run_replay("builtin:cost_overlap", cfg, duration=240, step=2.0)
    if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
        # say where they part (twice seen under load, not reproduced: this names the cause)
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)}
        events = [(x, y) for x, y in zip(a["events"]["list"], b["events"]["list"]) if x != y]
        raise AssertionError(f"two replays differ in {sorted(diff)}; first differing events "
                             f"{events[:3]}; counts {len(a['events']['list'])} / "
                             f"{len(b['events']['list'])}")
    text = format_replay(a)
    assert text == format_replay(b)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "SwPowerCap" in text and "latency rather than throughput" in text
    assert a["cycles"] == 121 and a["step_seconds"] == 2.0


def test_summary_line_wraps_and_keeps_the_30_day_figure():
    """A long node summary (large figures, a long currency) is wrapped at 100 columns, never
    cut: the per-day and per-30-days figures stay readable."""
    cfg = parse('[cost]\ngpu_hour_usd = 2.5\ncurrency = "USD"\n')
    result = run_replay("builtin:cost_overlap", cfg, duration=60, step=2.0)
    node = result["node"]
    node.update(capacity_lost_seconds=123456789.5, capacity_lost_fraction=0.123456,
                dollars=123456.78, dollars_per_day=9876543.21, dollars_per_30_days=296296296.3)
    text = format_replay(result)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "…" not in text
    joined = " ".join(text.split())
    assert "/day," in joined and "/30 days" in joined
    assert "296,296,296" in joined or "296296296" in joined, text


def test_bad_arguments_are_errors_in_words():
    from gpucostd.sim.scenario import ScenarioError
    with pytest.raises(ScenarioError):
        run_replay("builtin:no_such_scenario", duration=10)
    with pytest.raises(ValueError, match="step"):
        run_replay("builtin:h100x8", duration=10, step=0)


def test_cli_replay_json(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cost]\ngpu_hour_usd = 2.5\n")
    out = subprocess.run([sys.executable, "-m", "gpucostd", "replay", "builtin:h100x8",
                          "--config", str(cfg), "--duration", "130", "--json"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0 and "replay" in out.stderr and "invalid choice" in out.stderr:
        pytest.skip("the CLI has no replay command yet")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["gpus"][0]["reasons"]["HwThermalSlowdown"]["throttled_seconds"] == \
        pytest.approx(60.0)
    text = subprocess.run([sys.executable, "-m", "gpucostd", "replay", "builtin:h100x8",
                           "--config", str(cfg), "--duration", "130"],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "HwThermalSlowdown" in text.stdout


def _accuracy_table() -> None:   # pragma: no cover - a report, not a test
    """`python tests/test_replay.py`: replay vs ground truth per scenario, GPU and reason."""
    cases = [
        ("builtin:h100x8", "[cost]\ngpu_hour_usd = 2.5\n", 3600.0, None),
        ("h100x8, counters NOT_SUPPORTED", "[cost]\ngpu_hour_usd = 2.5\n", 3600.0, "nocounters"),
        ("builtin:cost_overlap", "[cost]\ngpu_hour_usd = 3\n", 3600.0, None),
        ("builtin:cost_reset", "[cost]\ngpu_hour_usd = 2\n", 600.0, None),
    ]
    import tempfile
    for name, cfg_text, duration, variant in cases:
        spec = name
        if variant == "nocounters":
            tmp = Path(tempfile.mkdtemp()) / "h100x8_nocounters.toml"
            tmp.write_text((BUILTIN_DIR / "h100x8.toml").read_text().replace(
                "[gpu_defaults]\n", "[gpu_defaults]\nviolation_counters = false\n", 1))
            spec = str(tmp)
        cfg = parse(cfg_text)
        p = cfg.cost.gpu_hour_usd
        result = run_replay(spec, cfg, duration=duration, step=1.0)
        truth = ground_truth(load_scenario(spec), duration, price_at=lambda i, t, p=p: p)
        got = replay_totals(result)
        print(f"{name}: {duration:g} s, step 1 s")
        print(f"  {'GPU':>3} {'reason':<20} {'src':<8} {'cap. lost s':>12} {'truth':>12} "
              f"{'err':>8} {'dollars':>10} {'truth':>10} {'err':>8}")
        srcs = {g['index']: g['source'] for g in result['gpus']}
        for index in sorted(truth):
            for r in sorted(set(truth[index]) | set(got.get(index, {}))):
                g = got.get(index, {}).get(r, [0, 0, 0])
                t = truth[index].get(r, [0, 0, 0])
                e1 = abs(g[1] - t[1]) / t[1] * 100 if t[1] else 0.0
                e2 = abs(g[2] - t[2]) / t[2] * 100 if t[2] else 0.0
                print(f"  {index:>3} {r:<20} {srcs[index]:<8} {g[1]:>12.3f} {t[1]:>12.3f} "
                      f"{e1:>7.3f}% {g[2]:>10.5f} {t[2]:>10.5f} {e2:>7.3f}%")



def test_replay_config_is_private_and_keeps_every_event(tmp_path):
    from gpucostd.replay import replay_config
    cfg = parse('[hooks]\non_critical = ["/usr/local/bin/drain"]\n[cost]\ngpu_hour_usd = 2\n'
                '[cost.model_hour_usd]\n"NVIDIA A100*" = 1\n')
    r = replay_config(cfg, str(tmp_path))
    assert r.daemon.state_dir == str(tmp_path) and r.hooks.on_critical == []
    assert r.daemon.kernel_log == "none"
    # a long replay raises many events; the store keeps them all (it prunes by the replay's
    # own virtual clock, so virtual dates are never "old")
    assert r.events.max_count >= 10_000_000
    assert r.cost.gpu_hour_usd == 2 and r.price_for_model("NVIDIA A100-SXM4-80GB") == 1


if __name__ == "__main__":   # pragma: no cover
    _accuracy_table()
