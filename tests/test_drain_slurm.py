"""The Slurm drain back end against a real slurmctld and slurmd (Debian's slurm-wlm and munge),
started here on loopback with their own munge key, socket, state and ports (14020-14021).

Proves what issue 24 asks on a real controller: a CRIT fault drains the node with gpucostd's
reason and recovery resumes it; an operator's drain is never resumed; the fleet brake refuses a
drain past the share; the dry run changes nothing; the opt-out feature is respected; a reboot
request leaves the node to Slurm. The cluster: this host's node (its slurmd) and five more
nodes that only the controller knows (fake1..fake5), so the brake has a fleet.

Skipped, saying why, when not root or when the packages are missing (packaging/dev-env.sh
--test installs them); CI runs as root. Every process started here is stopped, even on failure.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpucostd import config  # noqa: E402
from gpucostd.clock import VirtualClock  # noqa: E402
from gpucostd.drain.backend import DrainError  # noqa: E402
from gpucostd.drain.slurm import SlurmBackend  # noqa: E402
from gpucostd.loop import Daemon  # noqa: E402
from gpucostd.parts.drain import DrainPart  # noqa: E402
from gpucostd.snapshot import Severity  # noqa: E402

SCENARIO = str(Path(__file__).resolve().parent / "scenarios" / "drain_lost.toml")
PROGRAMS = ("munged", "slurmctld", "slurmd", "scontrol", "sinfo")
CTLD_PORT, SLURMD_PORT = 14020, 14021
HOST = socket.gethostname().split(".")[0]
FAKES = ("fake1", "fake2", "fake3", "fake4", "fake5")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmctld and munged run as root here "
                       "(SlurmUser=root); run as root (CI does)"),
    pytest.mark.skipif(any(shutil.which(p) is None for p in PROGRAMS),
                       reason="needs Debian's slurm-wlm and munge (packaging/dev-env.sh --test)"),
]


def _conf(tmp: Path, sock: Path) -> str:
    return f"""ClusterName=gpucostdtest
SlurmctldHost={HOST}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
RebootProgram=/bin/true
NodeName={HOST} NodeHostname={HOST} NodeAddr=127.0.0.1 CPUs=1 RealMemory=1 State=UNKNOWN
NodeName=fake[1-2] NodeAddr=127.0.0.1 CPUs=1 RealMemory=1 State=UNKNOWN
NodeName=fake3 NodeAddr=127.0.0.1 CPUs=1 RealMemory=1 State=UNKNOWN Features=gpu,gpucostd_no_drain
NodeName=fake[4-5] NodeAddr=127.0.0.1 CPUs=1 RealMemory=1 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.conf = str(tmp / "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs = []

    def start(self) -> "Cluster":
        tmp = self.tmp
        for d in ("state", "spool"):
            (tmp / d).mkdir()
        os.chmod(tmp, 0o755)          # munged checks the modes of the directories it uses
        key = tmp / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = tmp / "munge.sock"
        Path(self.conf).write_text(_conf(tmp, sock))
        out = open(tmp / "daemons.log", "ab")
        self.procs.append(subprocess.Popen(
            ["munged", "-F", "-f", "--key-file", str(key), "--socket", str(sock),
             "--pid-file", str(tmp / "munged.pid"), "--log-file", str(tmp / "munged.log"),
             "--seed-file", str(tmp / "munged.seed")], stdout=out, stderr=out))
        self._wait(lambda: sock.exists(), "munged's socket")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-i", "-f", self.conf],
                                           env=self.env, stdout=out, stderr=out))
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", self.conf], env=self.env,
                                           stdout=out, stderr=out))
        self._wait(lambda: self.state(HOST).startswith("idle"), f"node {HOST} idle")
        return self

    def _wait(self, cond, what: str, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while not cond():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "".join((self.tmp / n).read_text(errors="replace")[-1500:]
                               for n in ("daemons.log", "slurmctld.log", "slurmd.log")
                               if (self.tmp / n).exists())
                raise AssertionError(f"{what}: not within {seconds} s (exited: {dead})\n{logs}")
            time.sleep(0.1)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def run(self, *argv: str) -> str:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=20)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def node(self, name: str):
        """(complete state, reason) as sinfo shows them."""
        out = self.run("sinfo", "-h", "-N", "-n", name, "-O", "StateComplete:0|,Reason:0")
        state, _bar, reason = out.splitlines()[0].partition("|")
        return state.strip(), reason.strip()

    def state(self, name: str) -> str:
        try:
            return self.node(name)[0]
        except (AssertionError, IndexError):
            return ""

    def drain(self, name: str, reason: str) -> None:
        self.run("scontrol", "update", f"NodeName={name}", "State=DRAIN", f"Reason={reason}")

    def resume(self, *names: str) -> None:
        """Best effort: every node back in service (a reboot request cancelled first)."""
        for name in names:
            state = self.state(name)
            for argv in ((["scontrol", "cancel_reboot", name] if "reboot" in state else []),
                         (["scontrol", "update", f"NodeName={name}", "State=RESUME"]
                          if "drain" in state or "down" in state else [])):
                if argv:
                    subprocess.run(argv, env=self.env, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _config(state_dir: Path, cluster: Cluster, node: str, extra: str = ""):
    return config.parse(f'[daemon]\nstate_dir = "{state_dir}"\nkernel_log = "none"\n'
                        f'[drain]\nbackend = "slurm"\nnode_name = "{node}"\n{extra}'
                        f'[drain.slurm]\nconf = "{cluster.conf}"\n')


class Node:
    """A daemon on the simulated node whose GPU falls off the bus at once (CRIT) and answers
    again at t = 10 s, with the drain part pointed at `node` in the real cluster."""

    def __init__(self, tmp: Path, cluster: Cluster, node: str, extra: str = ""):
        cfg = _config(tmp / "state", cluster, node, extra)
        self.daemon = Daemon(cfg, clock=VirtualClock(), simulate=SCENARIO, journal=False)
        self.part = next(p for p in self.daemon.parts if p.name == "drain")
        self.part.resync_seconds = 0        # read the engine every cycle: see it change
        self.daemon.start()

    def step(self, seconds: float = 1.0):
        snap = self.daemon.step()
        assert self.part.wait_idle(30), "the drain worker did not finish"
        self.daemon.clock.advance(seconds)
        return snap

    def until(self, t: float):
        """Cycles until the simulated time t; then one more, so the last result is read."""
        while self.daemon.clock.time() - self.daemon.started_at < t:
            self.step()
        return self.step()

    def close(self):
        self.part.close()
        self.daemon.shutdown(system_shutdown=True)


@pytest.fixture
def node_factory(tmp_path, cluster):
    made = []

    def make(node: str, extra: str = "") -> Node:
        n = Node(tmp_path / f"n{len(made)}", cluster, node, extra)
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()
    cluster.resume(HOST, *FAKES)


def drained(cluster: Cluster, name: str):
    """(drained, reason): the state may be idle or unknown (a node with no slurmd of its own)."""
    state, reason = cluster.node(name)
    return "drain" in state.split("+"), reason


def recent(n: Node, code: str):
    return [e for e in n.daemon.recorder.recent if e.code == code]


def test_a_crit_fault_drains_with_gpucostds_reason_and_recovery_resumes(cluster, node_factory):
    n = node_factory(HOST)
    snap = n.step()
    assert snap.node_health == Severity.CRIT
    snap = n.step()
    state, reason = cluster.node(HOST)
    assert "drain" in state.split("+")
    assert reason == "gpucostd: critical: gpu:0 gpu_lost"
    assert snap.part("drain").data.state == "ours"
    assert [e.message for e in recent(n, "drained")] == [
        "slurm: drained with reason 'gpucostd: critical: gpu:0 gpu_lost'"]
    snap = n.until(11)                  # the GPU answers again at t = 10 s
    assert snap.node_health != Severity.CRIT
    assert "drain" not in cluster.state(HOST)
    assert len(recent(n, "undrained")) == 1


def test_an_operators_drain_is_never_resumed_nor_taken_over(cluster, node_factory):
    cluster.drain("fake1", "bad DIMM, ticket 4711")
    n = node_factory("fake1")
    for _ in range(2):
        snap = n.step()
    assert drained(cluster, "fake1") == (True, "bad DIMM, ticket 4711")
    refused = recent(n, "drain_refused")
    assert len(refused) == 1 and "already drained by someone else" in refused[0].message
    assert any(f.code == "drain_refused" and f.severity == Severity.OK for f in snap.findings)
    snap = n.until(11)                  # recovered: still never resumed
    assert drained(cluster, "fake1") == (True, "bad DIMM, ticket 4711")
    assert recent(n, "undrained") == []


def test_the_fleet_brake_refuses_a_drain_past_the_share(cluster, node_factory):
    for name in ("fake4", "fake5", HOST):      # three of six nodes drained by gpucostd now
        cluster.drain(name, "gpucostd: critical: gpu:3 xid_79")
    n = node_factory("fake2")
    for _ in range(2):
        snap = n.step()
    assert "drain" not in cluster.state("fake2")
    finding = [f for f in snap.findings if f.code == "drain_refused"]
    assert finding and finding[0].severity == Severity.WARN
    assert "fleet brake: gpucostd drained 3 of 6 nodes" in finding[0].message
    from gpucostd.views.metrics import render
    assert 'gpucostd_drain_refused{kind="brake"} 1.0' in render(snap).decode()
    cluster.resume("fake5")                    # two of six: one more is within the share
    n.step()
    n.step()
    assert cluster.node("fake2")[1].startswith("gpucostd: critical:")


def test_the_dry_run_changes_nothing(cluster, node_factory):
    before = drained(cluster, HOST)
    n = node_factory(HOST, extra="dry_run = true\n")
    for _ in range(3):
        snap = n.step()
    assert drained(cluster, HOST) == before == (False, "none")
    dry = recent(n, "drain_dry_run")
    assert len(dry) == 1 and dry[0].message.startswith(
        "dry run: would drain the node ('gpucostd: critical: gpu:0 gpu_lost')")
    assert snap.part("drain").data.state == "free"


def test_the_opt_out_feature_is_respected(cluster, node_factory):
    n = node_factory("fake3")
    for _ in range(2):
        snap = n.step()
    assert "drain" not in cluster.state("fake3")
    refused = recent(n, "drain_refused")
    assert len(refused) == 1
    assert "opts out of gpucostd's drains (Slurm feature gpucostd_no_drain)" in \
        refused[0].message


def test_a_manual_undrain_is_honoured_until_the_node_recovers(cluster, node_factory):
    n = node_factory("fake1")
    n.step()
    n.step()
    assert cluster.node("fake1")[1].startswith("gpucostd: critical:")
    cluster.resume("fake1")                    # the operator puts the node back
    for _ in range(2):
        n.step()
    assert "drain" not in cluster.state("fake1")
    assert "undrained by hand" in recent(n, "drain_refused")[-1].message
    # the mark survives a restart of the daemon
    assert DrainPart(n.daemon.config, n.daemon.state_dir, n.daemon.clock)._manual == "critical"


def test_a_reboot_request_leaves_the_node_to_slurm(cluster, node_factory):
    n = node_factory("fake2", extra="reboot = true\n")
    n.step()
    snap = n.step()
    state, reason = cluster.node("fake2")
    assert "reboot" in state, state         # reboot requested or issued, by gpucostd
    assert reason.startswith("gpucostd: critical: gpu:0 gpu_lost")
    snap = n.until(11)                      # recovered: Slurm resumes it after the reboot
    assert recent(n, "undrained") == []
    assert snap.part("drain").data.state == "ours"


def test_errors_say_how_to_fix_them(cluster, tmp_path):
    cfg = _config(tmp_path, cluster, "nosuchnode")
    with pytest.raises(DrainError, match="set \\[drain\\] node_name"):
        SlurmBackend(cfg.drain.slurm, "nosuchnode").state(10)
    bad = config.parse(f'[drain.slurm]\nscontrol = "{tmp_path}/missing"\nconf = '
                       f'"{cluster.conf}"\n')
    with pytest.raises(DrainError, match="not found: install Slurm's client commands"):
        SlurmBackend(bad.drain.slurm, HOST).drain("gpucostd: test", 10)
