"""MIG judged and priced (issue 25): an endpoint serving on MIG instances, the instance's
health, its share of the GPU-hour, tokens per dollar per instance-endpoint, calibrate on a MIG
GPU. In-process, from GpuReadings that carry MigInstance tuples."""
from __future__ import annotations

import pytest

from gpucostd import config as cfgmod
from gpucostd.clock import VirtualClock
from gpucostd.config import ConfigError
from gpucostd.health.judge import HealthJudge
from gpucostd.probes.kernel_log import NvrmParser
from gpucostd.snapshot import GpuReading, GpuState, MigInstance, Severity

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
