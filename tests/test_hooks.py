"""Action hooks: environment, no shell, timeout, failures."""
from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from conftest import wait_for
from gpucostd import config as config_mod
from gpucostd.clock import VirtualClock
from gpucostd.health.judge import HealthJudge
from gpucostd.record.hooks import HookRunner, hook_for
from gpucostd.snapshot import Event, GpuReading, Severity

EVIL = "$(touch {marker}); rm -rf {victim} `touch {marker}` ; touch {marker} | sh"


@dataclass(frozen=True)
class Fault:
    """Stand-in with the fields of probes.kernel_log.KernelFault."""
    time: Optional[float]
    pci_bus_id: Optional[str]
    xid: int
    message: str = ""
    raw: str = ""
    process_name: Optional[str] = None
    dedupe_key: str = ""


def write_hook(tmp_path: Path, body: str = "") -> Path:
    """A hook that records its argv and environment as JSON in the file named by argv[1]."""
    script = tmp_path / "hook.py"
    script.write_text(textwrap.dedent(f"""\
        import json, os, sys
        out = sys.argv[1]
        {body}
        with open(out + ".tmp", "w") as f:
            json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, f)
        os.replace(out + ".tmp", out)
        print("hook ran for", os.environ.get("GPUCOSTD_SUBJECT"))
        """))
    return script


def hook_config(on_critical=(), on_recovered=(), timeout=10.0):
    return config_mod.parse(
        f"[hooks]\non_critical = {json.dumps(list(on_critical))}\n"
        f"on_recovered = {json.dumps(list(on_recovered))}\ntimeout_seconds = {timeout}\n")


def health_event(subject="gpu:3", to="CRIT", frm="OK", known=None, message="GPU 3 OK -> CRIT",
                 **fields):
    f = {"from": frm, "to": to, "from_known": known or frm}
    f.update(fields)
    return Event(1_700_000_000.0, subject, "health_change", Severity[to], "reset GPU", message,
                 gpu=3 if subject.startswith("gpu") else None,
                 uuid="GPU-3" if subject.startswith("gpu") else None, fields=f, id=7)


def test_which_transitions_run_hooks():
    assert hook_for(health_event(to="CRIT", frm="OK")) == "on_critical"
    assert hook_for(health_event(to="CRIT", frm="WARN")) == "on_critical"
    assert hook_for(health_event(to="OK", frm="CRIT")) == "on_recovered"
    assert hook_for(health_event(to="WARN", frm="CRIT")) == "on_recovered"
    assert hook_for(health_event(to="WARN", frm="OK")) is None
    assert hook_for(health_event(to="OK", frm="WARN")) is None
    # CRIT -> UNKNOWN -> CRIT: nothing; CRIT -> UNKNOWN -> OK: recovered
    assert hook_for(health_event(to="UNKNOWN", frm="CRIT", known="CRIT")) is None
    assert hook_for(health_event(to="CRIT", frm="UNKNOWN", known="CRIT")) is None
    assert hook_for(health_event(to="OK", frm="UNKNOWN", known="CRIT")) == "on_recovered"
    xid = Event(0.0, "gpu:1", "xid", Severity.CRIT, "reboot", "Xid 79", gpu=1, xid=79)
    assert hook_for(xid) is None


def test_hook_receives_the_event_in_its_environment(tmp_path):
    out = tmp_path / "env.json"
    argv = [sys.executable, str(write_hook(tmp_path)), str(out)]
    runner = HookRunner(hook_config(on_critical=argv), hostname="node17")
    runner.on_events([health_event(cause="xid_79", xid=79)])
    data = json.loads(wait_for(lambda: out.exists() and out.read_text(), timeout=15,
                               what="the hook's output file"))
    env = data["env"]
    assert data["argv"] == [str(write_hook(tmp_path)), str(out)]
    assert env["GPUCOSTD_HOOK"] == "on_critical"
    assert env["GPUCOSTD_SUBJECT"] == "gpu:3" and env["GPUCOSTD_GPU"] == "3"
    assert env["GPUCOSTD_UUID"] == "GPU-3" and env["GPUCOSTD_CODE"] == "health_change"
    assert env["GPUCOSTD_SEVERITY"] == "CRIT" and env["GPUCOSTD_ACTION"] == "reset GPU"
    assert env["GPUCOSTD_MESSAGE"] == "GPU 3 OK -> CRIT" and env["GPUCOSTD_XID"] == "79"
    assert env["GPUCOSTD_TIME"] == "2023-11-14T22:13:20Z"
    assert env["GPUCOSTD_HOSTNAME"] == "node17" and env["GPUCOSTD_EVENT_ID"] == "7"
    assert "NOTIFY_SOCKET" not in env
    assert runner.wait_idle(10)
    assert runner.results[-1].ok and runner.results[-1].output == ["hook ran for gpu:3"]


def test_recovered_hook_runs_on_leaving_crit(tmp_path):
    out = tmp_path / "rec.json"
    argv = [sys.executable, str(write_hook(tmp_path)), str(out)]
    runner = HookRunner(hook_config(on_recovered=argv))
    runner.on_events([health_event(to="WARN", frm="OK")])     # not leaving CRIT
    assert runner.wait_idle(10) and not out.exists() and runner.results == []
    runner.on_events([health_event(to="OK", frm="CRIT", message="GPU 3 CRIT -> OK")])
    data = json.loads(wait_for(lambda: out.exists() and out.read_text(), timeout=15,
                               what="the recovered hook's output"))
    assert data["env"]["GPUCOSTD_HOOK"] == "on_recovered"
    assert data["env"]["GPUCOSTD_SEVERITY"] == "OK"


def _fault_with_evil_process(marker: Path, victim: Path):
    evil = EVIL.format(marker=marker, victim=victim)
    line = (f"NVRM: Xid (PCI:0000:1b:00): 79, pid=4242, name={evil}, "
            f"GPU has fallen off the bus.")
    try:
        from gpucostd.probes.kernel_log import NvrmParser
    except ImportError:
        return Fault(1_700_000_001.0, "0000:1b:00.0", 79, "GPU has fallen off the bus.",
                     raw=line, process_name=evil, dedupe_key="fed:1"), evil
    faults = NvrmParser().feed(line, time=1_700_000_001.0)
    assert len(faults) == 1 and faults[0].xid == 79
    return faults[0], evil


def test_shell_metacharacters_in_a_kernel_line_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    out = tmp_path / "env.json"
    script = write_hook(tmp_path)
    argv = [sys.executable, str(script), str(out)]
    cfg = hook_config(on_critical=argv)
    boot = tmp_path / "boot_id"
    boot.write_text("b1\n")
    clock = VirtualClock()
    judge = HealthJudge(cfg, clock, str(tmp_path / "state"), boot_id_path=str(boot))
    reading = GpuReading(index=0, uuid="GPU-0", pci_bus_id="00000000:1B:00.0")
    judge.judge([reading], [], clock.time())
    fault, evil = _fault_with_evil_process(marker, victim)
    clock.advance(1)
    report = judge.judge([reading], [fault], clock.time())
    assert report.gpu_health[0] == Severity.CRIT
    runner = HookRunner(cfg)
    runner.on_events(report.events)
    assert runner.wait_idle(20)
    data = json.loads(wait_for(lambda: out.exists() and out.read_text(), timeout=5,
                               what="the hook's output file"))
    assert data["argv"] == [str(script), str(out)]              # exactly as configured
    envs = [data["env"]]
    assert envs[0]["GPUCOSTD_PROCESS"] == evil                  # delivered as data...
    assert not marker.exists()                                  # ...and nothing ran
    assert (victim / "keep").exists()
    assert all(r.argv == tuple(argv) for r in runner.results)
    assert {r.subject for r in runner.results} == {"gpu:0", "node"}


def test_timeout_kills_a_hanging_hook(tmp_path, caplog):
    pidfile = tmp_path / "pid"
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""\
        import os, time
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        print("hanging", flush=True)
        time.sleep(120)
        """))
    runner = HookRunner(hook_config(on_critical=[sys.executable, str(script)], timeout=0.5))
    with caplog.at_level(logging.INFO, logger="gpucostd"):
        runner.on_events([health_event()])
        assert runner.wait_idle(15)
    res = runner.results[-1]
    assert res.timed_out and not res.ok and "killed after 0.5 s" in res.error
    assert res.output == ["hanging"]
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "hook on_critical (gpu:3): hanging" in caplog.text
    assert "killed after 0.5 s" in caplog.text


def test_missing_or_failing_program_is_a_logged_error(tmp_path, caplog):
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nprint('no scontrol here')\nsys.exit(3)\n")
    failures = []
    runner = HookRunner(hook_config(on_critical=[str(tmp_path / "does-not-exist")],
                                    on_recovered=[sys.executable, str(failing)]),
                        on_failure=failures.append)
    with caplog.at_level(logging.INFO, logger="gpucostd"):
        runner.on_events([health_event(), health_event(to="OK", frm="CRIT")])
        assert runner.wait_idle(15)
    missing, failed = runner.results
    assert "cannot run" in missing.error and "No such file" in missing.error
    assert failed.returncode == 3 and failed.error == "exited with status 3"
    assert failed.output == ["no scontrol here"]
    assert [e.code for e in failures] == ["hook_failed", "hook_failed"]
    assert "cannot run" in caplog.text and "exited with status 3" in caplog.text
    # the runner still works afterwards
    runner.on_events([health_event(to="OK", frm="CRIT")])
    assert runner.wait_idle(15) and len(runner.results) == 3


def test_no_hooks_configured_runs_nothing():
    runner = HookRunner(hook_config())
    runner.on_events([health_event(), health_event(to="OK", frm="CRIT")])
    assert runner.wait_idle(1) and runner.results == []
    runner.stop()


def test_output_flood_without_newlines_is_read_in_bounded_pieces(tmp_path):
    import tracemalloc
    script = tmp_path / "flood.py"
    script.write_text(textwrap.dedent("""\
        import sys
        out = sys.stdout.buffer
        for _ in range(64):
            out.write(b"x" * (1 << 20))     # 64 MiB on one line
        out.write(b"\\nsecond line\\n")
        for i in range(500):
            out.write(b"line %d\\n" % i)
        """))
    runner = HookRunner(hook_config(on_critical=[sys.executable, str(script)], timeout=60))
    tracemalloc.start()
    try:
        runner.on_events([health_event()])
        assert runner.wait_idle(60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    res = runner.results[-1]
    assert res.ok, res.error
    assert res.output[0] == "x" * 1000                  # the long line, cut, counted once
    assert res.output[1] == "second line"
    assert len(res.output) == 200
    assert peak < 16 << 20, f"reading the hook's output peaked at {peak >> 20} MiB"


def test_a_process_escaping_the_hook_group_does_not_block_later_hooks(tmp_path):
    pidfile = tmp_path / "escaped.pid"
    script = tmp_path / "escape.py"
    script.write_text(textwrap.dedent(f"""\
        import subprocess, sys
        # a child in its own session keeps our stdout pipe open after we exit
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
        open({str(pidfile)!r}, "w").write(str(p.pid))
        print("started", p.pid, flush=True)
        """))
    runner = HookRunner(hook_config(on_critical=[sys.executable, str(script)],
                                    on_recovered=[sys.executable, "-c", "print('recovered')"]))
    try:
        runner.on_events([health_event(), health_event(to="OK", frm="CRIT")])
        assert runner.wait_idle(20), "the hook thread is stuck on the escaped process's pipe"
        first, second = runner.results
        assert first.ok and first.output[0].startswith("started")
        assert second.ok and second.output == ["recovered"]
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), 9)
            except ProcessLookupError:
                pass


def test_leftovers_of_a_hook_are_reaped_when_the_daemon_is_their_reaper(tmp_path):
    # PID 1 of a container (or a child subreaper) inherits what a hook leaves behind: it must
    # not collect zombies. Run in a child process made a subreaper, to keep this one clean.
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_CHILD_SUBREAPER is Linux only")
    leftover = tmp_path / "leftover.pid"
    hook = tmp_path / "bg.sh"
    hook.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {leftover}\nexit 0\n")
    hook.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""\
        import ctypes, json, sys
        sys.path[:0] = {sys.path!r}
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(36, 1, 0, 0, 0) == 0          # PR_SET_CHILD_SUBREAPER
        from gpucostd import config
        from gpucostd.record.hooks import HookRunner
        from gpucostd.snapshot import Event, Severity
        cfg = config.parse('[hooks]\\non_critical = ["{hook}"]\\n')
        ev = Event(1.7e9, "node", "health_change", Severity.CRIT, "reset GPU", "x",
                   fields={{"from": "OK", "to": "CRIT", "from_known": "OK"}})
        res = HookRunner(cfg).run("on_critical", ["{hook}"], ev, 10)
        pid = int(open("{leftover}").read())
        try:
            state = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        print(json.dumps({{"ok": res.ok, "state": state}}))
        """))
    import subprocess
    out = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"ok": True, "state": "gone"}, got


# ------------------------------------------------------------------ stop and leftovers
def _pipes_open():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                n += 1
        except OSError:
            pass
    return n


def test_a_hook_still_running_at_stop_is_killed(tmp_path):
    pidfile = tmp_path / "hook.pid"
    script = tmp_path / "slow.sh"
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    script.chmod(0o755)
    runner = HookRunner(hook_config(on_critical=[str(script)], timeout=600))
    runner.on_events([health_event()])
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, what="hook started")
    pid = int(pidfile.read_text())
    runner.stop(timeout=0.5)

    def gone():
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"
    wait_for(gone, 10, what="the running hook killed at stop")


def test_a_background_child_of_a_hook_leaks_no_thread_and_no_pipe(tmp_path):
    import threading
    pids = tmp_path / "pids"
    script = tmp_path / "bg.py"
    script.write_text(textwrap.dedent(f"""\
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
        open({str(pids)!r}, "a").write(str(p.pid) + "\\n")
        print("started", flush=True)
        """))
    runner = HookRunner(hook_config(on_critical=[sys.executable, str(script)]))
    before = _pipes_open()
    try:
        for _ in range(3):
            res = runner.run("on_critical", [sys.executable, str(script)], health_event(), 20)
            assert res.ok and res.output == ["started"], res
        wait_for(lambda: not [t for t in threading.enumerate()
                              if t.name == "gpucostd-hook-output"], 10,
                 what="no hook output reader left")
        assert _pipes_open() <= before, (before, _pipes_open())
    finally:
        for line in pids.read_text().split() if pids.exists() else []:
            try:
                os.kill(int(line), 9)
            except ProcessLookupError:
                pass
