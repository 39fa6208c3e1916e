"""The drain part's policy in process (gpucostd.parts.drain), against an engine held in memory
that keeps the contract (gpucostd.drain.backend): the cycle never waits on the engine, a failing
engine is an event and a finding, the [drain] config and its subtables, the Slurm back end's
parsing of real sinfo lines. The real engine is tests/test_drain_slurm.py.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpucostd import config  # noqa: E402
from gpucostd.clock import VirtualClock  # noqa: E402
from gpucostd.config import ConfigError  # noqa: E402
from gpucostd.drain.backend import (DrainBackend, DrainError, FleetDrains,  # noqa: E402
                                    NodeDrainState)
from gpucostd.drain.slurm import SlurmBackend, fleet_from  # noqa: E402
from gpucostd.loop import Daemon  # noqa: E402
from gpucostd.parts.drain import DrainPart, cause_of, make_backend  # noqa: E402
from gpucostd.snapshot import Severity  # noqa: E402

SCENARIO = str(Path(__file__).resolve().parent / "scenarios" / "drain_lost.toml")


class Engine(DrainBackend):
    """One node in memory, as an engine holds it."""

    name = "memory"

    def __init__(self):
        self.reason = ""            # "" = not drained
        self.opted_out = False
        self.fleet_recent, self.fleet_nodes = 0, 10
        self.calls = []
        self.error = None
        self.gate = None            # a threading.Event a call waits on (a hung engine)

    def _call(self, what):
        self.calls.append(what)
        if self.gate is not None:
            self.gate.wait(30)
        if self.error:
            raise DrainError(self.error)

    def state(self, timeout):
        self._call("state")
        return NodeDrainState(drained=bool(self.reason),
                              ours=self.reason.startswith("gpucostd:"), reason=self.reason,
                              opted_out=self.opted_out)

    def drain(self, reason, timeout):
        self._call("drain")
        self.reason = reason

    def undrain(self, timeout):
        self._call("undrain")
        if self.reason.startswith("gpucostd:"):
            self.reason = ""

    def fleet(self, window_seconds, timeout):
        self._call("fleet")
        return FleetDrains(self.fleet_recent, self.fleet_recent, self.fleet_nodes)

    def report(self, conditions, timeout):
        self._call("report")
        self.conditions = {c.type: c for c in conditions}

    def describe(self):
        return self.name, "node1"


class Node:
    def __init__(self, tmp_path, engine, extra=""):
        cfg = config.parse(f'[daemon]\nstate_dir = "{tmp_path}/state"\nkernel_log = "none"\n'
                           f'[drain]\nbackend = "slurm"\n{extra}')
        self.engine = engine
        self.daemon = d = Daemon(cfg, clock=VirtualClock(), simulate=SCENARIO, journal=False)
        d.parts = [p for p in d.parts if p.name != "drain"]
        self.part = DrainPart(cfg, d.state_dir, d.clock, backend_factory=lambda c, k: engine)
        self.part.resync_seconds = 0
        d.add_part(self.part)
        d.start()

    def step(self, wait=True):
        snap = self.daemon.step()
        if wait:
            assert self.part.wait_idle(10)
        self.daemon.clock.advance(1)
        return snap

    def codes(self):
        return [e.code for e in self.daemon.recorder.recent if e.code.startswith("drain") or
                e.code in ("drained", "undrained")]

    def close(self):
        if self.engine.gate is not None:
            self.engine.gate.set()
        self.part.close()
        self.daemon.shutdown(system_shutdown=True)


@pytest.fixture
def node(tmp_path):
    made = []

    def make(engine=None, extra=""):
        n = Node(tmp_path / str(len(made)), engine or Engine(), extra)
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()


def test_crit_drains_once_with_the_prefix_and_recovery_undrains(node):
    n = node()
    for _ in range(3):
        snap = n.step()
    assert n.engine.reason == "gpucostd: critical: gpu:0 gpu_lost"
    assert n.engine.calls.count("drain") == 1
    healthy = n.engine.conditions["GpucostdHealthy"]
    assert (healthy.ok, healthy.reason) == (False, "CriticalFault")
    assert healthy.message.startswith("gpu:0 gpu_lost (")
    assert "GpucostdEfficient" not in n.engine.conditions     # no floor set
    from gpucostd.views import metrics, statusview
    n.step()
    snap = n.step()
    text = statusview.render_status(statusview.snapshot_json(snap))
    assert "Drain (memory node node1): drained by gpucostd (gpucostd: critical: gpu:0 " \
           "gpu_lost); last drain ok" in text
    assert 'gpucostd_drain_state{state="ours"} 1.0' in metrics.render(snap).decode()
    assert snap.part("drain").data.state == "ours"
    for _ in range(10):
        snap = n.step()
    assert n.engine.reason == "" and n.engine.calls.count("undrain") == 1
    assert n.engine.conditions["GpucostdHealthy"].ok
    assert n.codes() == ["drain_requested", "drained", "undrained"]
    text = snap.part("drain").data
    assert text.actions == {("drain", "requested"): 1, ("drain", "ok"): 1, ("undrain", "ok"): 1}


def test_an_operators_drain_is_kept_and_said_once(node):
    engine = Engine()
    engine.reason = "bad DIMM"
    n = node(engine)
    for _ in range(13):
        snap = n.step()
    assert engine.reason == "bad DIMM" and "drain" not in engine.calls
    assert "undrain" not in engine.calls
    assert n.codes() == ["drain_refused"]


def test_a_manual_undrain_is_honoured_until_recovery_and_survives_a_restart(node, tmp_path):
    n = node()
    for _ in range(3):
        n.step()
    n.engine.reason = ""                 # the operator resumes the node
    for _ in range(3):
        n.step()
    assert n.engine.calls.count("drain") == 1
    assert n.codes()[-1] == "drain_refused"
    assert DrainPart(n.daemon.config, n.daemon.state_dir, n.daemon.clock,
                     backend_factory=lambda c, k: Engine())._manual == "critical"
    for _ in range(8):                   # recovered at t = 10 s: the mark is spent
        n.step()
    assert n.part._manual is None


def test_opt_out_and_brake_refuse_with_findings(node):
    engine = Engine()
    engine.opted_out = True
    n = node(engine)
    for _ in range(3):
        snap = n.step()
    f = [f for f in snap.findings if f.code == "drain_refused"]
    assert f and f[0].severity == Severity.OK and "opts out" in f[0].message
    engine2 = Engine()
    engine2.fleet_recent, engine2.fleet_nodes = 5, 10
    m = node(engine2)
    for _ in range(3):
        snap = m.step()
    f = [f for f in snap.findings if f.code == "drain_refused"]
    assert f and f[0].severity == Severity.WARN and "fleet brake" in f[0].message
    assert "drain" not in engine2.calls


def test_the_first_drain_in_the_window_is_never_braked(node):
    engine = Engine()
    engine.fleet_recent, engine.fleet_nodes = 0, 1        # a fleet of one node
    n = node(engine)
    for _ in range(3):
        n.step()
    assert engine.reason.startswith("gpucostd: critical")


def test_dry_run_records_and_changes_nothing(node):
    n = node(extra="dry_run = true\n")
    for _ in range(14):
        n.step()
    assert n.engine.reason == "" and "drain" not in n.engine.calls
    assert "report" not in n.engine.calls
    assert n.codes() == ["drain_dry_run"]


def test_the_cycle_never_waits_on_a_hung_engine(node):
    engine = Engine()
    engine.gate = threading.Event()      # every engine call blocks until the gate opens
    n = node(engine)
    for _ in range(3):
        snap = n.step(wait=False)        # returns while the engine call is held
    assert snap.part("drain").data.busy_since is not None
    deadline = time.monotonic() + 10     # the worker thread enters the call on its own time
    while engine.calls != ["state"] and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    for _ in range(3):
        snap = n.step(wait=False)        # still held: no second call queued behind it
    assert engine.calls == ["state"] and snap.part("drain").data.busy_since is not None
    engine.gate.set()
    assert n.part.wait_idle(10)


def test_a_failing_engine_is_an_event_and_a_finding_not_a_crash(node):
    engine = Engine()
    engine.error = "`scontrol update ...` failed: Unable to contact slurm controller"
    n = node(engine)
    for _ in range(4):
        snap = n.step()
    f = [f for f in snap.findings if f.code == "drain_failing"]
    assert f and f[0].severity == Severity.WARN and "Unable to contact" in f[0].message
    assert n.codes() == ["drain_failed"]           # once while the same error holds
    engine.error = None
    for _ in range(2):
        snap = n.step()
    assert not [f for f in snap.findings if f.code == "drain_failing"]
    assert engine.reason.startswith("gpucostd: critical")


def test_drain_config_and_its_subtables(tmp_path):
    cfg = config.parse('[drain]\nbackend = "kubernetes"\nbrake_share = 0.25\n'
                       '[drain.slurm]\nopt_out_feature = "keep"\n'
                       '[drain.kubernetes]\nevict = true\neviction_grace_seconds = 5\n')
    assert cfg.drain.backend == "kubernetes" and cfg.drain.brake_share == 0.25
    assert cfg.drain.slurm.opt_out_feature == "keep" and cfg.drain.slurm.scontrol == "scontrol"
    k = cfg.drain.kubernetes
    assert (k.evict, k.eviction_grace_seconds, k.taint_key) == (True, 5, "gpucostd.io/unhealthy")
    again = config.parse(cfg.to_toml())
    assert again.as_dict()["drain"] == cfg.as_dict()["drain"]
    with pytest.raises(ConfigError, match=r"x.toml:3: unknown key drain.slurm.sinfoo"):
        config.parse('[drain]\n[drain.slurm]\nsinfoo = "x"\n', "x.toml")
    with pytest.raises(ConfigError, match=r"drain.backend = 'lsf' is not allowed"):
        config.parse('[drain]\nbackend = "lsf"\n')
    assert make_backend(config.parse(""), VirtualClock()) is None


def test_replay_and_one_shot_commands_never_drain(tmp_path):
    from gpucostd.replay import replay_config
    cfg = config.parse('[drain]\nbackend = "slurm"\nnode_name = "n1"\n')
    assert replay_config(cfg, str(tmp_path)).drain.backend == "none"
    one = Daemon(config.parse(f'[daemon]\nstate_dir = "{tmp_path}/s"\nkernel_log = "none"\n'
                              f'[drain]\nbackend = "slurm"\n'), clock=VirtualClock(),
                 simulate=SCENARIO, journal=False, one_shot=True)
    assert "drain" not in [p.name for p in one.parts]
    one.shutdown(system_shutdown=True)


def test_the_kubernetes_back_end_is_built_from_its_settings(monkeypatch):
    cfg = config.parse('[drain]\nbackend = "kubernetes"\nnode_name = "gpu-node-7"\n')
    backend = make_backend(cfg, VirtualClock())
    assert type(backend).__name__ == "KubernetesBackend"
    assert backend.describe()[1] == "gpu-node-7" and backend.read_only is False
    # in a pod, the node's name comes from the DaemonSet's KUBE_NODE_NAME, not the host name
    monkeypatch.setenv("KUBE_NODE_NAME", "gpu-node-8")
    cfg = config.parse('[drain]\nbackend = "kubernetes"\ndry_run = true\n')
    backend = make_backend(cfg, VirtualClock())
    assert backend.describe()[1] == "gpu-node-8" and backend.read_only is True


# sinfo -h -N -O NodeList:0|,StateComplete:0|,Timestamp:0|,Reason:0 on slurm-wlm 22.05.8
SINFO_FLEET = """fake1|idle+drain|2026-12-08T02:04:19|gpucostd: test
fake2|idle|Unknown|none
fake3|idle|Unknown|none
vm|down+drain+reboot_issued|2026-12-08T02:04:21|gpucostd: reboot : reboot issued
fake1|idle+drain|2026-12-08T02:04:19|gpucostd: test
op1|mixed+drain|2026-12-08T01:00:00|maintenance | ticket 12
"""


def test_fleet_counts_ours_once_per_node_within_the_window():
    import time
    now = time.mktime(time.strptime("2026-12-08T02:05:00", "%Y-%m-%dT%H:%M:%S"))
    assert fleet_from(SINFO_FLEET, now, 300) == FleetDrains(ours=2, recent=2, nodes=5)
    assert fleet_from(SINFO_FLEET, now + 3600, 300) == FleetDrains(ours=2, recent=0, nodes=5)


@pytest.mark.parametrize("state,reason,want", [
    ("idle", "none", (False, False, "")),
    ("idle+drain", "gpucostd: critical: x", (True, True, "")),
    ("mixed+drain", "maintenance | ticket 12", (True, False, "")),
    ("idle+drain", "none", (True, False, "drained with no reason")),
    ("down+drain+reboot_issued", "gpucostd: critical: x : reboot issued",
     (True, True, "a reboot is pending (down+drain+reboot_issued)")),
    ("down*", "Not responding", (False, False, "the node is down (down*)")),
    ("idle+not_responding", "none", (False, False, "")),
])
def test_slurm_states_from_real_sinfo_lines(state, reason, want):
    cfg = config.parse('[drain.slurm]\nopt_out_feature = "no_drain"\n')
    b = SlurmBackend(cfg.drain.slurm, "n1")
    st = b._node_state(state, "gpu,no_drain", reason)
    assert (st.drained, st.ours, st.blocked) == want and st.opted_out
    assert cause_of("gpucostd: critical: gpu:0 gpu_lost") == "critical"
    assert cause_of("bad DIMM") is None


class _Cycle:
    def __init__(self, **data):
        self._data = data

    def data(self, name, default=None):
        return self._data.get(name, default)


def test_a_node_whose_health_cannot_be_told_is_neither_drained_nor_undrained(node):
    from gpucostd.health.judge import HealthReport
    from gpucostd.parts.drain import Want, want_from
    cfg = config.parse("").drain
    unknown = HealthReport({}, Severity.UNKNOWN, ())
    assert want_from(_Cycle(health=unknown), cfg) == Want(hold=True)
    assert want_from(_Cycle(), cfg) == Want(hold=True)          # the health part failed
    engine = Engine()
    engine.reason = "gpucostd: critical: gpu:0 gpu_lost"
    n = node(engine)
    n.part._reconcile(engine, n.part.cfg, Want(hold=True))
    assert engine.reason.startswith("gpucostd:") and "undrain" not in engine.calls


def test_a_reboot_is_asked_once_then_a_crit_that_outlives_it_drains(node):
    from gpucostd.parts.drain import Want

    class Rebooting(Engine):
        name = "slurm"

        def request_reboot(self, reason, timeout):
            self._call("reboot")
            self.reason = reason

    engine = Rebooting()
    n = node(engine, extra="reboot = true\n")
    want = Want("critical", "gpu:0 xid_79", reboot=True)
    n.part._reconcile(engine, n.part.cfg, want)
    assert engine.calls[-1] == "state" and "reboot" in engine.calls
    engine.reason = ""                       # the node came back from its reboot, still CRIT
    again = DrainPart(n.daemon.config, n.daemon.state_dir, n.daemon.clock,
                      backend_factory=lambda c, k: engine)   # a new daemon after the boot
    again._reconcile(engine, again.cfg, want)
    assert engine.calls.count("reboot") == 1 and engine.calls.count("drain") == 1


def test_a_back_end_that_cannot_start_is_a_finding_and_is_tried_again(node, tmp_path):
    engine = Engine()
    tries = []

    def factory(cfg, clock):
        tries.append(1)
        if len(tries) == 1:
            raise DrainError("no service-account token yet")
        return engine
    cfg = config.parse(f'[daemon]\nstate_dir = "{tmp_path}/s"\nkernel_log = "none"\n'
                       f'[drain]\nbackend = "kubernetes"\n')
    d = Daemon(cfg, clock=VirtualClock(), simulate=SCENARIO, journal=False)
    d.parts = [p for p in d.parts if p.name != "drain"]
    part = DrainPart(cfg, d.state_dir, d.clock, backend_factory=factory)
    d.add_part(part)
    try:
        snap = d.step()
        f = [f for f in snap.findings if f.code == "drain_failing"]
        assert f and "cannot start: no service-account token yet" in f[0].message
        d.clock.advance(31)
        d.step()
        assert part.wait_idle(10)
        d.clock.advance(1)
        snap = d.step()
        assert not [f for f in snap.findings if f.code == "drain_failing"]
        assert len(tries) == 2 and engine.calls[0] == "state"
    finally:
        part.close()
        d.shutdown(system_shutdown=True)


def test_a_reload_turns_the_drain_on(tmp_path):
    base = f'[daemon]\nstate_dir = "{tmp_path}/s"\nkernel_log = "none"\n'
    d = Daemon(config.parse(base), clock=VirtualClock(), simulate=SCENARIO, journal=False)
    try:
        part = next(p for p in d.parts if p.name == "drain")
        assert d.step().part("drain").data.backend == "none"
        part.reconfigure(config.parse(base + '[drain]\nbackend = "slurm"\nnode_name = "n9"\n'
                                      '[drain.slurm]\nsinfo = "/nonexistent/sinfo"\n'))
        assert part.backend is not None and part.backend.describe() == ("slurm", "n9")
        d.step()
        assert part.wait_idle(10)
        snap = d.step()
        f = [f for f in snap.findings if f.code == "drain_failing"]
        assert f and "/nonexistent/sinfo not found" in f[0].message
    finally:
        d.shutdown(system_shutdown=True)


def test_the_floor_drains_with_its_own_smaller_brake(node):
    from types import SimpleNamespace
    from gpucostd.health.judge import HealthReport
    from gpucostd.parts.drain import Want, conditions_from, want_from
    ok = HealthReport({0: Severity.OK}, Severity.OK, ())
    cost = SimpleNamespace(report=SimpleNamespace(efficiency={"floor": {"inefficient": True}}))
    cycle = _Cycle(health=ok, cost=cost)
    assert want_from(cycle, config.parse("").drain) == Want()          # off by default
    cfg = config.parse("[drain]\non_inefficient = true\n").drain
    want = want_from(cycle, cfg)
    assert want.cause == "inefficient" and want.reason.startswith("gpucostd: inefficient: ")
    assert [(c.type, c.ok, c.reason) for c in conditions_from(cycle, True)] == [
        ("GpucostdHealthy", True, "Healthy"), ("GpucostdEfficient", False, "BelowFloor")]
    engine = Engine()
    engine.fleet_recent, engine.fleet_nodes = 1, 10       # 2 of 10 would pass 0.1
    n = node(engine, extra="on_inefficient = true\n")
    n.part._reconcile(engine, n.part.cfg, want)
    assert "drain" not in engine.calls and n.part._data.refused == "brake"
    n.part._reconcile(engine, n.part.cfg, Want("critical", "gpu:0 xid_79"))   # 2/10 <= 0.5
    assert engine.reason == "gpucostd: critical: gpu:0 xid_79"
