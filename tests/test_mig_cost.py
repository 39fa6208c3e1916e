"""MIG judged and priced (issue 25): an endpoint serving on MIG instances, the instance's
health, its share of the GPU-hour, tokens per dollar per instance-endpoint, calibrate on a MIG
GPU. In-process, from GpuReadings that carry MigInstance tuples."""
from __future__ import annotations

import functools
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from conftest import exposition, metric_value

from gpucostd import config as cfgmod
from gpucostd.clock import VirtualClock
from gpucostd.config import ConfigError
from gpucostd.cost.accountant import CostAccountant
from gpucostd.cost.report import status_lines
from gpucostd.probes.inference import InferenceReading
from gpucostd.health.judge import HealthJudge
from gpucostd.probes.kernel_log import NvrmParser
from gpucostd.snapshot import GpuActivity, GpuReading, GpuState, MigInstance, Severity

H100 = "NVIDIA H100 80GB HBM3"
GB = 1 << 30


def cfg(text=""):
    return cfgmod.parse(text, None)


# --------------------------------------------------------------------------- config
def test_an_endpoint_serves_on_mig_instances_and_its_tokens_go_to_their_gpus():
    c = cfg('[[inference.endpoint]]\nurl = "http://127.0.0.1:8001/metrics"\n'
            'instances = ["0/1/0", "0/02/0"]\n'
            '[[inference.endpoint]]\nurl = "http://127.0.0.1:8002/metrics"\n'
            'instances = ["0/3/0"]\n'
            '[[inference.endpoint]]\nurl = "http://127.0.0.1:8003/metrics"\ngpus = [1]\n')
    a, b, whole = c.inference_endpoints
    assert a.instances == ("0/1/0", "0/2/0") and a.gpus is None and a.serving_gpus == (0,)
    assert b.instances == ("0/3/0",) and b.serving_gpus == (0,)
    assert whole.instances is None and whole.serving_gpus == (1,)
    # written back as it was given
    again = cfg(c.to_toml())
    assert [e.instances for e in again.inference_endpoints] == [a.instances, b.instances, None]


@pytest.mark.parametrize("body, line, words", [
    ('instances = ["0/1"]', 4, "is not an instance"),
    ('instances = []', 4, "non-empty list"),
    ('instances = "0/1/0"', 4, "non-empty list"),
    ('instances = ["0/1/0", "0/1/0"]', 4, "named twice"),
    ('gpus = [0]\ninstances = ["0/1/0"]', 5, "GPU 0 is named twice"),
])
def test_a_bad_instances_list_says_what_where_and_how(body, line, words):
    text = f'# mig\n[[inference.endpoint]]\nurl = "http://127.0.0.1:8001/metrics"\n{body}\n'
    with pytest.raises(ConfigError) as e:
        cfgmod.parse(text, "/etc/gpucostd/gpucostd.toml")
    msg = str(e.value)
    assert msg.startswith(f"/etc/gpucostd/gpucostd.toml:{line}: ") and words in msg
    assert "GPU/GI/CI" in msg or "drop 0 from gpus" in msg


def test_a_gpu_is_either_whole_or_sliced_across_endpoints_and_an_instance_has_one_endpoint():
    two = ('[[inference.endpoint]]\nurl = "http://127.0.0.1:8001/metrics"\n{a}\n'
           '[[inference.endpoint]]\nurl = "http://127.0.0.1:8002/metrics"\n{b}\n')
    with pytest.raises(ConfigError, match=r"GPU 0 is sliced by MIG.*instances = "):
        cfg(two.format(a='instances = ["0/1/0"]', b="gpus = [0]"))
    with pytest.raises(ConfigError, match=r"0/1/0 is on GPU 0, which .* #1 serves on whole"):
        cfg(two.format(a="gpus = [0, 1]", b='instances = ["0/1/0"]'))
    with pytest.raises(ConfigError, match=r"0/1/0 is already in \[\[inference.endpoint\]\] #1"):
        cfg(two.format(a='instances = ["0/1/0"]', b='instances = ["0/1/0"]'))
    # two endpoints on two instances of one GPU, and a whole GPU beside them: fine
    cfg(two.format(a='instances = ["0/1/0"]\ngpus = [1]', b='instances = ["0/2/0"]'))


def test_a_profile_price_is_a_table_of_globs_checked_like_the_model_prices():
    c = cfg('[cost.mig_profile_hour_usd]\n"1g.*" = 0.45\n"7g.80gb" = 3.0\n')
    assert (c.price_for_mig("1g.10gb"), c.price_for_mig("7g.80gb"), c.price_for_mig("3g.40gb")) \
        == (0.45, 3.0, None)
    assert cfg(c.to_toml()).mig_prices == c.mig_prices
    with pytest.raises(ConfigError, match=r":2: .*cost.mig_profile_hour_usd.'1g.\*'"):
        cfgmod.parse('[cost.mig_profile_hour_usd]\n"1g.*" = -1\n', "/etc/gpucostd/gpucostd.toml")
    with pytest.raises(ConfigError, match="table of MIG profile glob = price"):
        cfg('[cost]\nmig_profile_hour_usd = 1\n')


# --------------------------------------------------------------------------- readings
def inst(gpu, gi, ci=0, profile="1g.10gb", **kw):
    slices = int(profile.split("g.", 1)[0])
    return MigInstance(gpu, gi, ci, profile, slices, 7, uuid=f"MIG-{gpu}{gi}{ci}-0000",
                       memory_total_bytes=10 * GB * slices, **kw)


def seven(gpu=0, **kw):
    """An H100 as 7 x 1g.10gb (GPU instance ids 7..13, as nvidia-smi creates them)."""
    return tuple(inst(gpu, gi, **kw) for gi in range(7, 14))


def mig_gpu(index=0, mig=(), **kw):
    base = dict(index=index, uuid=f"GPU-{index}", name=H100,
                pci_bus_id=f"00000000:{index + 1:02X}:00.0", temperature_celsius=50.0,
                clock_event_reasons=(), utilization_percent=50.0, sm_clock_mhz=1980.0,
                sm_clock_max_mhz=1980.0, power_draw_watts=300.0,
                mig_mode=bool(mig), mig_mode_pending=bool(mig), mig=tuple(mig))
    base.update(kw)
    return GpuReading(**base)


# --------------------------------------------------------------------------- health
@pytest.fixture
def judge(tmp_path):
    boot = tmp_path / "boot_id"
    boot.write_text("11111111-2222-3333-4444-555555555555\n")
    clock = VirtualClock()
    j = HealthJudge(cfg(), clock, str(tmp_path / "state"), boot_id_path=str(boot))
    j.test_clock = clock
    return j


def step(judge, gpus, lines=(), dt=1.0):
    judge.test_clock.advance(dt)
    faults = [f for line in lines for f in NvrmParser().feed(line)]
    return judge.judge(gpus, faults, judge.test_clock.time())


def test_a_mig_xid_lands_on_its_instance_and_its_gpu(judge):
    layout = seven(0)[:4] + (inst(0, 1, 2, "3g.40gb"),)
    gpus = [mig_gpu(0, layout), mig_gpu(1)]
    step(judge, gpus)
    # the driver's own MIG form (tests/fixtures/kernel/nvrm-real.txt): GPU-I and GPU-CI
    rep = step(judge, gpus, ["NVRM: Xid (PCI:0000:01:00 GPU-I:01 GPU-CI:02): 13, pid=2291, "
                             "name=python3, Graphics SM Warp Exception"])
    (ev,) = [e for e in rep.events if e.code == "xid"]
    assert ev.gpu == 0 and ev.subject == "gpu:0"
    assert ev.fields["mig_instance"] == "0/1/2" and ev.fields["mig_profile"] == "3g.40gb"
    assert ev.fields["mig_uuid"] == "MIG-012-0000"
    assert "MIG instance 0/1/2 3g.40gb" in ev.message
    (f,) = [f for f in rep.findings if f.code == "xid_13"]
    assert f.subject == "gpu:0" and "0/1/2 3g.40gb" in f.message
    assert rep.gpu_health[0] != Severity.OK and rep.gpu_health[1] == Severity.OK
    assert rep.extra["mig_health"]["0/1/2"] == f.severity.name
    assert rep.extra["mig_health"]["0/7/0"] == "OK"
    # a line with the GPU instance only names the one compute instance it holds
    rep = step(judge, gpus, ["NVRM: Xid (PCI:0000:01:00 GPU-I:08): 94, pid=7194, Contained: "
                             "CE User Channel (0x9). RST: No, D-RST: No"])
    (ev,) = [e for e in rep.events if e.code == "xid"]
    assert ev.fields["mig_instance"] == "0/8/0" and ev.fields["mig_profile"] == "1g.10gb"
    # the same Xid on two instances: the finding names both
    rep = step(judge, gpus, ["NVRM: Xid (PCI:0000:01:00 GPU-I:09 GPU-CI:00): 13, pid=1, "
                             "name=python3, Graphics SM Warp Exception"])
    (f,) = [f for f in rep.findings if f.code == "xid_13"]
    assert "MIG instances 0/1/2, 0/9/0" in f.message
    assert rep.extra["mig_health"]["0/9/0"] == rep.extra["mig_health"]["0/1/2"] != "OK"


def test_a_mig_mode_change_pending_a_reset_is_a_finding_with_its_action(judge):
    rep = step(judge, [mig_gpu(0, mig_mode=False, mig_mode_pending=True), mig_gpu(1)])
    (f,) = [f for f in rep.findings if f.code == "mig_mode_pending"]
    assert f.subject == "gpu:0" and f.severity == Severity.WARN
    assert "disabled and becomes enabled at the next GPU reset" in f.message
    assert "reset the GPU when it is idle" in f.action and "nvidia-smi -r -i 0" in f.action
    rep = step(judge, [mig_gpu(0, seven(0)), mig_gpu(1)])           # reset: in effect
    assert not [f for f in rep.findings if f.code == "mig_mode_pending"]


def test_instances_that_disappear_or_appear_between_cycles_are_events(judge):
    first = step(judge, [mig_gpu(0, seven(0))])
    assert not [e for e in first.events if e.code.startswith("mig_instance")]   # first sight
    rep = step(judge, [mig_gpu(0, seven(0)[:5] + (inst(0, 1, 0, "2g.20gb"),))])
    gone = [e for e in rep.events if e.code == "mig_instance_gone"]
    new = [e for e in rep.events if e.code == "mig_instance_new"]
    assert [e.fields["mig_instance"] for e in gone] == ["0/12/0", "0/13/0"]
    assert gone[0].severity == Severity.WARN and "gone from the layout" in gone[0].message
    assert "nvidia-smi mig -lgi" in gone[0].action
    assert [(e.fields["mig_instance"], e.fields["mig_profile"]) for e in new] == [
        ("0/1/0", "2g.20gb")]
    # a lost GPU says nothing about its layout; its return with the same layout is no event
    layout = seven(0)[:5] + (inst(0, 1, 0, "2g.20gb"),)
    rep = step(judge, [mig_gpu(0, (), state=GpuState.LOST)])
    assert not [e for e in rep.events if e.code.startswith("mig_instance")]
    rep = step(judge, [mig_gpu(0, layout)])
    assert not [e for e in rep.events if e.code.startswith("mig_instance")]
    # a cycle whose MIG mode and layout were not read (mig_mode None) is no layout either
    rep = step(judge, [mig_gpu(0, (), mig_mode=None, mig_mode_pending=None)])
    rep = step(judge, [mig_gpu(0, layout)])
    assert not [e for e in rep.events if e.code.startswith("mig_instance")]


# --------------------------------------------------------------------------- cost
def run(acc, clock, seconds, make_gpus, make_tokens=None, step=1.0):
    rep = None
    t0 = clock.monotonic()
    for i in range(int(round(seconds / step)) + 1):
        t = clock._t = t0 + i * step
        rep = acc.update(make_gpus(t), t)
        if make_tokens is not None:
            rep = acc.update_tokens(make_tokens(t), t)
    return rep


def tokens(total, t, url, instances=None, gpus=None):
    return InferenceReading(total, t, "vllm:generation_tokens_total", 1, None, url=url,
                            gpus=gpus, server="vllm", instances=instances)


def busy(sm):
    return GpuActivity(sm=sm, seconds=1.0)


def by_key(rep):
    return {d["key"]: d for d in rep.to_json()["mig"]}


def test_an_idle_1g_slice_costs_exactly_a_seventh_of_its_gpus_idle_cost():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\n"), None, clock)
    # GPU 0: 7 x 1g.10gb, idle (GPU-Util 0, no per-instance GPM); GPU 1: whole and idle
    rep = run(acc, clock, 600, lambda t: [mig_gpu(0, seven(0), utilization_percent=0.0),
                                          mig_gpu(1, utilization_percent=0.0)])
    g0, g1 = [g.to_json() for g in rep.gpus]
    assert g0["idle_dollars"] == pytest.approx(7.0 * 600 / 3600) == g1["idle_dollars"]
    slices = by_key(rep)
    assert len(slices) == 7
    for d in slices.values():
        assert d["price_per_hour"] == pytest.approx(1.0) and d["price_basis"] == "share"
        assert d["idle_dollars"] == pytest.approx(g0["idle_dollars"] / 7, abs=1e-6)
        assert d["idle_seconds"] == pytest.approx(600) and d["idle_now"] is True
    # exactly, before the JSON's rounding
    gpu_idle = acc.eff.gpus["GPU-0"].totals["idle_dollars"]
    for b in acc.eff.mig.instances.values():
        assert b.totals["idle_dollars"] == pytest.approx(gpu_idle / 7, rel=1e-12)
    # per-instance GPM: one slice idle, six at work; the idle one still costs 1/7 of the
    # GPU's idle cost, the GPU's idle capacity is that slice, and the GPU's GPU-Util (which
    # says a kernel ran somewhere) does not hide it
    layout = (inst(0, 7, activity=busy(0.0)),) + seven(0, activity=busy(0.9))[1:]
    rep = run(acc, clock, 600, lambda t: [mig_gpu(0, layout, utilization_percent=100.0),
                                          mig_gpu(1, utilization_percent=0.0)])
    g0 = rep.to_json()["gpus"][0]
    d = by_key(rep)
    assert d["0/7/0"]["idle_basis"] == "instance_activity" and d["0/7/0"]["idle_now"]
    usd = functools.partial(pytest.approx, abs=2e-6)          # the JSON's rounding
    assert d["0/7/0"]["idle_dollars"] == usd(2 * 600 / 3600)        # 1/7 of 7 $/h, twice
    assert d["0/8/0"]["idle_dollars"] == usd(1.0 * 600 / 3600)      # no more idle
    assert g0["idle_dollars"] == usd(7.0 * 600 / 3600 + 1.0 * 600 / 3600)


def test_slices_in_no_instance_are_the_gpus_idle_capacity_and_a_profile_price_overrides():
    clock = VirtualClock()
    acc = CostAccountant(cfg('[cost]\ngpu_hour_usd = 7.0\n[cost.mig_profile_hour_usd]\n'
                             '"4g.*" = 3.5\n'), None, clock)
    layout = (inst(0, 1, 0, "3g.40gb", activity=busy(0.95)),
              inst(0, 2, 0, "4g.40gb", activity=busy(0.95)))
    rep = run(acc, clock, 100, lambda t: [mig_gpu(0, layout)])
    d = by_key(rep)
    assert d["0/1/0"]["price_per_hour"] == pytest.approx(3.0) and d["0/1/0"]["share"] == \
        pytest.approx(3 / 7)
    assert (d["0/2/0"]["price_per_hour"], d["0/2/0"]["price_basis"]) == (3.5, "profile")
    assert d["0/1/0"]["idle_dollars"] == 0 == d["0/2/0"]["underused_dollars"]
    assert rep.to_json()["gpus"][0]["idle_dollars"] == 0
    # a cycle without the layout read keeps the instances' books
    run(acc, clock, 1, lambda t: [mig_gpu(0, (), mig_mode=None, mig_mode_pending=None)])
    assert set(acc.eff.mig.instances) == {"0/1/0", "0/2/0"}
    # a 2g slice deleted: its slices are idle capacity of the GPU, no instance's
    rep = run(acc, clock, 100, lambda t: [mig_gpu(0, layout[:1])])
    assert set(by_key(rep)) == {"0/1/0"}
    assert rep.to_json()["gpus"][0]["idle_dollars"] == pytest.approx(7.0 * 4 / 7 * 100 / 3600)


def test_a_mig_gpu_without_gpu_util_is_busy_by_its_instances_so_its_throttling_is_priced():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\n"), None, clock)
    capped = dict(utilization_percent=None, sm_clock_mhz=1584.0,
                  clock_event_reasons=("SwPowerCap",))                  # 20% below 1980 MHz
    rep = run(acc, clock, 100, lambda t: [mig_gpu(0, seven(0, activity=busy(0.5)), **capped),
                                          mig_gpu(1, seven(1, activity=busy(0.0)), **capped)])
    g0, g1 = rep.gpus
    assert (g0.busy, g1.busy) == (True, False)
    assert g0.loss_ratio == pytest.approx(0.2) and g1.loss_ratio == 0
    assert g0.capacity_lost_seconds == pytest.approx(20.0)


def test_energy_is_shared_by_instance_activity_else_by_share_and_said_to_be_an_estimate():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\nenergy_usd_per_kwh = 0.1\n"), None, clock)
    layout = (inst(0, 1, 0, "3g.40gb", activity=busy(0.8)),
              inst(0, 2, 0, "4g.40gb", activity=busy(0.3)))
    rep = run(acc, clock, 600, lambda t: [mig_gpu(0, layout, power_draw_watts=360.0)])
    d = by_key(rep)
    w3, w4 = 3 / 7 * 0.8, 4 / 7 * 0.3
    assert d["0/1/0"]["energy_basis"] == "activity"
    assert d["0/1/0"]["energy_joules"] == pytest.approx(360 * 600 * w3 / (w3 + w4))
    assert d["0/2/0"]["power_watts_estimate"] == pytest.approx(360 * w4 / (w3 + w4))
    assert d["0/1/0"]["energy_joules"] + d["0/2/0"]["energy_joules"] == pytest.approx(
        rep.to_json()["gpus"][0]["energy_joules"])
    # no per-instance activity: by share
    acc = CostAccountant(cfg(), None, clock)
    rep = run(acc, clock, 100, lambda t: [mig_gpu(0, (inst(0, 1, 0, "3g.40gb"),),
                                                  power_draw_watts=700.0)])
    d = by_key(rep)["0/1/0"]
    assert d["energy_basis"] == "share" and d["power_watts_estimate"] == pytest.approx(300.0)


def test_an_instance_endpoint_is_priced_at_its_instances_not_the_whole_board():
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\nenergy_usd_per_kwh = 0.0\n"), None,
                         clock)
    layout = seven(0, activity=busy(0.9))

    def eps(t):
        return [tokens(700.0 * t, t, "http://a/metrics", ("0/7/0",), (0,)),
                tokens(1400.0 * t, t, "http://b/metrics", ("0/8/0", "0/9/0"), (0,)),
                tokens(5000.0 * t, t, "http://c/metrics", None, (1,))]
    rep = run(acc, clock, 120, lambda t: [mig_gpu(0, layout), mig_gpu(1)], eps)
    a, b, c = rep.tokens.endpoints
    assert a["instances"] == ["0/7/0"] and a["cost_dollars_per_hour"] == pytest.approx(1.0)
    assert a["tokens_per_dollar"] == pytest.approx(700 * 3600 / 1.0)
    assert b["cost_dollars_per_hour"] == pytest.approx(2.0)
    assert b["tokens_per_dollar"] == pytest.approx(1400 * 3600 / 2.0)
    assert "instances" not in c            # a whole-GPU endpoint: the node's figures
    d = by_key(rep)
    assert d["0/7/0"]["endpoint"] == "http://a/metrics"
    assert d["0/7/0"]["tokens_per_second"] == pytest.approx(700)
    assert d["0/7/0"]["tokens_per_dollar"] == pytest.approx(700 * 3600)
    assert d["0/8/0"]["tokens_per_second"] == pytest.approx(700)    # split by share
    assert d["0/10/0"]["endpoint"] is None and d["0/10/0"]["tokens_per_dollar"] is None
    # the GPU's tokens are the sum of its instance endpoints'
    assert rep.gpus[0].extra["tokens_per_second"] == pytest.approx(2100)
    lines = status_lines(rep)
    assert any(line.startswith("  MIG 0/7/0 1g.10gb: $1.00/h (1/7 of the GPU); 700 tok/s")
               for line in lines), lines
    assert all(len(line) <= 100 for line in lines)


def test_instance_totals_survive_a_restart_and_a_bad_saved_table_starts_fresh(tmp_path):
    clock = VirtualClock()
    state = str(tmp_path)
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\n"), state, clock,
                         save_every_seconds=0.0)
    run(acc, clock, 60, lambda t: [mig_gpu(0, seven(0), utilization_percent=0.0)])
    acc.flush()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\n"), state, clock)
    rep = run(acc, clock, 60, lambda t: [mig_gpu(0, seven(0), utilization_percent=0.0)])
    assert by_key(rep)["0/7/0"]["idle_dollars"] == pytest.approx(120 / 3600, rel=0.02)
    # a hand-edited table that is not totals: the file is set aside, the totals start from 0
    import json
    path = tmp_path / "cost.json"
    data = json.loads(path.read_text())
    data["efficiency"]["mig"]["0/7/0"]["idle_dollars"] = "lots"
    path.write_text(json.dumps(data))
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\n"), state, clock)
    assert acc.eff.mig.instances == {} and acc.eff.gpus == {}
    assert list(tmp_path.glob("cost.json.bad*"))
    rep = run(acc, clock, 60, lambda t: [mig_gpu(0, seven(0), utilization_percent=0.0)])
    assert by_key(rep)["0/7/0"]["idle_dollars"] == pytest.approx(60 / 3600, rel=0.02)
    from gpucostd.cost.mig import _fraction
    assert [_fraction(x) for x in (round(1 / 7, 6), round(4 / 7, 6), 0.5, 0.3)] == [
        "1/7", "4/7", "1/2", "30%"]


# --------------------------------------------------------------------------- metrics
def test_every_instance_has_its_cost_and_tokens_per_dollar_in_the_scrape():
    from gpucostd.views import metrics_cost
    from gpucostd.views.metrics_mig_cost import SERIES_PER_INSTANCE
    clock = VirtualClock()
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\nenergy_usd_per_kwh = 0.0\n"), None,
                         clock)
    layout = (inst(0, 7, activity=busy(0.0)),) + seven(0, activity=busy(0.9))[1:]
    eps = [(f"http://127.0.0.1:{14300 + i}/metrics", m.key) for i, m in enumerate(layout)
           if m.gi_id != 7]

    def readings(t):
        return [tokens(700.0 * t, t, url, (key,), (0,)) for url, key in eps]
    rep = run(acc, clock, 60, lambda t: [mig_gpu(0, layout), mig_gpu(1)], readings)
    text = exposition(metrics_cost.metric_families(SimpleNamespace(cost=rep)))
    lab = dict(gpu="0", uuid="GPU-0", compute_instance="0", profile="1g.10gb")
    for m in layout:
        assert metric_value(text, "gpucostd_gpu_instance_cost_dollars_per_hour",
                            gpu_instance=str(m.gi_id), **lab) == pytest.approx(1.0)
    assert metric_value(text, "gpucostd_gpu_instance_idle_cost_dollars_total", gpu_instance="7",
                        kind="idle", **lab) == pytest.approx(60 / 3600, abs=1e-6)
    assert metric_value(text, "gpucostd_gpu_instance_tokens_per_dollar", gpu_instance="8",
                        **lab) == pytest.approx(700 * 3600)
    assert metric_value(text, "gpucostd_gpu_instance_tokens_per_dollar", gpu_instance="7",
                        **lab) is None                                   # no endpoint on it
    assert metric_value(text, "gpucostd_inference_endpoint_tokens_per_dollar",
                        endpoint="0") == pytest.approx(700 * 3600)
    inst_series = [ln for ln in text.splitlines() if ln.startswith("gpucostd_gpu_instance_")]
    assert len(inst_series) <= SERIES_PER_INSTANCE * len(layout)
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r
    # no MIG on the node: no instance family at all
    acc = CostAccountant(cfg("[cost]\ngpu_hour_usd = 7.0\n"), None, clock)
    rep = run(acc, clock, 5, lambda t: [mig_gpu(0), mig_gpu(1)])
    assert "gpucostd_gpu_instance_" not in exposition(
        metrics_cost.metric_families(SimpleNamespace(cost=rep)))


# --------------------------------------------------------------------------- calibrate
def test_calibrate_on_a_mig_gpu_sums_the_throughput_of_every_instance_endpoint():
    from gpucostd.calibration import maths
    from gpucostd.snapshot import NodeSnapshot
    power = dict(power_limit_watts=700.0, power_limit_min_watts=200.0,
                 power_limit_max_watts=700.0, energy_joules=0.0)
    layout = seven(0, activity=busy(0.6))
    # MIG hides GPU-Util on the sliced GPU: its instances' activity says it is busy
    gpus = (mig_gpu(0, layout, utilization_percent=None, **power),
            mig_gpu(1, utilization_percent=90.0, **power))
    urls = [f"http://127.0.0.1:{14310 + i}/metrics" for i in range(7)]

    def readings(t, rates=(100, 200, 300, 400, 500, 600, 700)):
        return tuple([tokens(r * t, t, u, (m.key,), (0,)) for r, u, m in zip(rates, urls, layout)]
                     + [tokens(5000 * t, t, "http://127.0.0.1:14320/metrics", None, (1,))])

    def snap(t, rs):
        return NodeSnapshot(t, t, 1, "node", 0.0, True, None, "580", "13.0", gpus, inference=rs)
    groups, notes = maths.plan(snap(10.0, readings(10.0)), maths.Params(lever="power"), cfg())
    assert notes == []
    mig, whole = groups
    assert (mig.gpus, mig.url, mig.urls) == ((0,), urls[0], tuple(urls))
    assert (whole.gpus, whole.urls) == ((1,), ("http://127.0.0.1:14320/metrics",))
    assert maths.activity_of(gpus[0]) == pytest.approx(0.6)
    w = maths.Window()
    for t in (10.0, 20.0, 30.0):
        by_url = {r.url: r for r in readings(t)}
        r = maths.group_reading(mig.url, mig.urls, by_url)
        w.add(maths.sample_of(snap(t, readings(t)), mig, r))
    assert w.tokens_per_second() == pytest.approx(2800.0)       # 100 + 200 + ... + 700
    # one instance's server stops answering: the group has no reading, and says which
    by_url = {r.url: r for r in readings(40.0)}
    by_url[urls[3]] = InferenceReading(None, 40.0, "", 0, "connection refused", url=urls[3])
    from gpucostd.calibration.mig import down_url
    assert not maths.group_reading(mig.url, mig.urls, by_url).ok
    assert down_url(mig.url, mig.urls, by_url) == urls[3]
    # a GPU whose instances all idle is idle to calibrate
    idle = (mig_gpu(0, seven(0, activity=busy(0.0)), utilization_percent=None, **power),)
    gpus = idle
    with pytest.raises(maths.CalibrationRefused, match="GPU 0 is idle"):
        maths.plan(snap(10.0, readings(10.0)[:7]), maths.Params(lever="power"), cfg())


def test_simulated_calibration_of_a_sliced_gpu_measures_its_instances_not_the_whole_board():
    """With a power limit set, each simulated instance-endpoint still generates its share of
    its GPU (the setters' physics once gave every instance the whole GPU's rate: GPU 0's seven
    1g slices then summed to 7x the board)."""
    from gpucostd.calibration.command import params_from, run_simulated
    from gpucostd.sim.scenario import load_scenario
    rep = run_simulated("builtin:h100x8_mig", cfg("[cost]\ngpu_hour_usd = 3.5\n"),
                        params_from({"gpus": "0", "lever": "power", "steps": 2,
                                     "dwell_seconds": 6}))
    assert rep["state"] == "done", rep
    first = rep["groups"][0]["rows"][0]          # the GPUs' maximum: the scenario's own rate
    sc = load_scenario("builtin:h100x8_mig")
    own = sum(sc.endpoint_rate_at(k, 60.0) for k, ep in enumerate(sc.serving.endpoints)
              if ep.instances and all(i.startswith("0/") for i in ep.instances))
    assert own > 0
    assert first["tokens_per_second"] == pytest.approx(own, rel=0.05)
    # the report names the group's first endpoint and how many more (one per instance)
    from gpucostd.calibration.report import format_report
    assert "(sim://endpoint/0/metrics and 6 more: MIG)" in format_report(rep)
