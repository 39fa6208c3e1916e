"""The parts of a cycle (gpucostd.part): a concern added in its own files runs in the loop,
shows in the metrics and is judged, without an edit to the loop; a part that raises costs that
part alone, as one part_failed finding naming it and gpucostd_part_last_success 0."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpucostd import config  # noqa: E402
from gpucostd.clock import VirtualClock  # noqa: E402
from gpucostd.loop import Daemon  # noqa: E402
from gpucostd.part import Cycle, Part  # noqa: E402
from gpucostd.snapshot import Finding, Severity  # noqa: E402
from gpucostd.views import metrics  # noqa: E402


@pytest.fixture
def daemon(tmp_path):
    cfg = config.parse(f'[daemon]\nstate_dir = "{tmp_path}/state"\nkernel_log = "none"\n')
    d = Daemon(cfg, clock=VirtualClock(), simulate="builtin:h100x8", journal=False)
    d.start()
    yield d
    d.shutdown(system_shutdown=True)


@dataclass(frozen=True)
class FanReading:            # the typed data of the new part
    rpm: int


class FanPart(Part):
    """A new concern: read after the GPUs (it sees their readings), judged by its own rule."""
    name = "fans"

    def __init__(self):
        self.rpm = 9000

    def run(self, cycle: Cycle) -> FanReading:
        assert cycle.data("gpu"), "the GPU part ran before it"
        return FanReading(self.rpm)


def fans_too_slow(inputs):
    fans = inputs.data("fans")
    if fans is None or fans.rpm >= 1000:
        return []
    return [Finding("node", "fans_slow", Severity.WARN, "check the chassis fans",
                    f"fans at {fans.rpm} rpm", since=inputs.now)]


def scrape(snap) -> str:
    return metrics.render(snap).decode()


def test_a_new_part_runs_is_judged_and_measured_without_an_edit_to_the_loop(daemon):
    fans = FanPart()
    daemon.add_part(fans, before="health")
    daemon.node_judge.add_rule(fans_too_slow)
    snap = daemon.step()
    assert snap.part("fans").ok and snap.part("fans").data == FanReading(9000)
    assert [r.name for r in snap.parts].index("fans") < [r.name for r in snap.parts].index(
        "health")
    assert not [f for f in snap.findings if f.code == "fans_slow"]
    text = scrape(snap)
    assert 'gpucostd_part_last_success{part="fans"} 1.0' in text
    assert 'gpucostd_part_duration_seconds{part="fans"}' in text
    fans.rpm = 200
    daemon.clock.advance(1)
    snap = daemon.step()
    slow = [f for f in snap.findings if f.code == "fans_slow"]
    assert [f.message for f in slow] == ["fans at 200 rpm"]
    assert snap.node_health == Severity.WARN


def test_every_part_of_the_cycle_is_a_metric(daemon):
    snap = daemon.step()
    names = [r.name for r in snap.parts]
    assert names == ["gpu", "kernel_log", "state_dir", "tuning", "deploy", "host", "health",
                     "inference", "cost", "drain"]
    assert all(r.ok and r.seconds >= 0 for r in snap.parts)
    text = scrape(snap)
    for name in names:
        assert f'gpucostd_part_last_success{{part="{name}"}} 1.0' in text


class Broken(Part):
    name = "broken"

    def run(self, cycle):
        raise RuntimeError("boom")


def test_a_failing_part_is_one_finding_naming_it_and_the_cycle_goes_on(daemon):
    daemon.add_part(Broken(), before="kernel_log")
    for _ in range(2):
        daemon.clock.advance(1)
        snap = daemon.step()
    failed = [f for f in snap.findings if f.code == "part_failed"]
    assert [(f.severity, f.message) for f in failed] == [
        (Severity.WARN, "part broken failed: RuntimeError: boom")]
    assert snap.node_health == Severity.WARN
    assert snap.part("broken").ok is False and snap.part("broken").error == \
        "RuntimeError: boom"
    assert len(snap.gpus) == 8 and snap.cost is not None       # the parts after it ran
    assert 'gpucostd_part_last_success{part="broken"} 0.0' in scrape(snap)


def test_a_reading_that_raises_fails_its_part_alone(daemon, monkeypatch):
    def bad_read():
        raise ValueError("a reading NVML never gives")
    monkeypatch.setattr(daemon.gpu_probe, "read", bad_read)
    snap = daemon.step()
    assert [f.message for f in snap.findings if f.code == "part_failed"] == [
        "part gpu failed: ValueError: a reading NVML never gives"]
    assert snap.gpus == () and snap.part("cost").ok and snap.part("host").ok
    monkeypatch.undo()
    daemon.clock.advance(1)
    snap = daemon.step()
    assert not [f for f in snap.findings if f.code == "part_failed"] and len(snap.gpus) == 8


def test_the_config_is_immutable_and_a_simulated_price_is_a_new_config(tmp_path):
    cfg = config.parse("")
    with pytest.raises(AttributeError, match="immutable"):
        cfg.price_note = "x"
    with pytest.raises(AttributeError, match="immutable"):
        cfg.daemon.interval_seconds = 5
    priced = cfg.priced({"gpu_hour_usd": 2.0}, "illustrative")
    assert priced is not cfg and priced.price_note == "illustrative"
    assert priced.cost.gpu_hour_usd == 2.0 and cfg.cost.gpu_hour_usd == 0
    assert cfg.price_note is None and priced.updated(daemon={}).price_note == "illustrative"


def test_a_node_rule_that_raises_is_one_finding_and_the_cycle_goes_on(daemon):
    def broken_rule(inputs):
        raise KeyError("nothing")
    daemon.node_judge.add_rule(broken_rule)
    snap = daemon.step()
    assert [f.message for f in snap.findings if f.code == "part_failed"] == [
        "node rule broken_rule failed: KeyError: 'nothing'"]
    assert len(snap.gpus) == 8 and snap.node_health == Severity.WARN


def test_deployment_facts_are_read_at_start_after_a_reload_and_at_most_every_5_minutes():
    """They change only by an operator's hand and one read walks every process and TCP socket
    (docs/performance.md): not every tuning verify interval."""
    from gpucostd.parts.deploy import DEPLOY_SECONDS, DeployPart
    reads = []

    class Probe:
        def read(self, dirs):
            reads.append(dirs)
            return len(reads)

    cfg = config.parse('[tuning]\nverify_interval_seconds = 30\n[checks]\nmodel_dirs = ["/m"]\n')
    part = DeployPart(Probe(), cfg.checks, cfg.tuning)
    seen = [part.run(Cycle(n, 0.0, t)) for n, t in enumerate((0.0, 30.0, 299.0))]
    assert seen == [1, 1, 1] and DEPLOY_SECONDS == 300
    assert part.run(Cycle(4, 0.0, 300.0)) == 2
    part.reconfigure(cfg)                       # SIGHUP: look again at once
    assert part.run(Cycle(5, 0.0, 301.0)) == 3 and reads[-1] == ("/m",)
