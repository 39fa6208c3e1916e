"""Who may do what: state and runtime directories another user controls are refused, a root
daemon refuses (or reports) a config or hook that a non-root user can change, and the client
talks only to a socket served by root or by its own user.

Most tests need root (they chown files to another user); they skip otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, gpucostd_cmd, need_root, wait_for

NOBODY = 65534            # the user another process runs as
OTHER = 65533             # the "attacker" who prepared a directory

pytestmark = need_root("chowns files to other users")


def python_for(uid):
    """An interpreter (argv prefix) that user `uid` may run, with gpucostd importable; or skip.
    The venv's python may live under /root (a pyenv): then the system python of the same
    version runs with the venv's site-packages."""
    site_dir = next(p for p in sys.path if p.endswith("site-packages"))
    boot = ("import runpy, site, sys; site.addsitedir(%r); sys.argv[0] = 'gpucostd'; "
            "runpy.run_module('gpucostd', run_name='__main__', alter_sys=True)" % site_dir)
    want = "%d.%d" % sys.version_info[:2]
    for exe in (sys.executable, shutil.which("python" + want) or "", "/usr/bin/python3"):
        if not exe:
            continue
        try:
            r = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, user=uid, cwd="/", timeout=30)
        except OSError:
            continue
        if r.returncode == 0 and r.stdout.strip() == want:
            importable = subprocess.run(
                [exe, "-c", "import site; site.addsitedir(%r); import gpucostd.cli" % site_dir],
                capture_output=True, text=True, user=uid, cwd="/", timeout=30)
            if importable.returncode != 0:
                # an editable install points into the clone: under /root (0700) that user
                # cannot read it
                pytest.skip(f"gpucostd is not importable by uid {uid} (the clone {REPO} or "
                            f"{site_dir} is not readable to it, e.g. a clone under /root, mode "
                            f"0700): clone under a world-readable directory to run this test; "
                            f"{importable.stderr.strip().splitlines()[-1:]}")
            return [exe, "-c", boot], exe
    pytest.skip(f"no Python {want} that uid {uid} may run")


def run_daemon_once(d, timeout=30):
    """Start the daemon and expect it to refuse: its exit code and output."""
    d.start(wait=False)
    rc = d.proc.wait(timeout)
    d._logf.close()
    return rc, d.output()


# ------------------------------------------------------------------ state and socket dirs
@pytest.mark.parametrize("fault", ["other_owner", "world_writable", "symlink"])
def test_state_dir_another_user_controls_is_refused_at_start(daemon_factory, tmp_path, fault):
    state = tmp_path / "state"
    if fault == "symlink":
        real = tmp_path / "elsewhere"
        real.mkdir(mode=0o750)
        state.symlink_to(real)
    else:
        state.mkdir(mode=0o750)
        if fault == "other_owner":
            os.chown(state, OTHER, OTHER)
        else:
            os.chmod(state, 0o777)
    (state / "originals.json").write_text('{"version": 1, "originals": {}}')
    d = daemon_factory(state_dir=state)
    rc, out = run_daemon_once(d)
    assert rc == 1, out
    assert "cannot start" in out and str(state) in out and "Traceback" not in out, out
    fix = {"other_owner": "chown", "world_writable": "chmod go-w", "symlink": "symlink"}[fault]
    assert fix in out, out


def test_state_dir_is_created_private(daemon_factory, tmp_path):
    state = tmp_path / "new" / "deeper" / "state"
    d = daemon_factory(state_dir=state).start()
    for p in (state, state.parent, state.parent.parent):
        assert os.stat(p).st_mode & 0o777 == 0o750, oct(os.stat(p).st_mode)
    d.stop()


def test_socket_dir_writable_by_others_is_refused(daemon_factory, tmp_path):
    d = daemon_factory()
    sockdir = tmp_path / "run"
    sockdir.mkdir()
    os.chmod(sockdir, 0o777)
    d.socket = str(sockdir / "gpucostd.sock")
    d.base_config = d.base_config.replace(str(tmp_path / "gpucostd.sock"), d.socket)
    d.write_config()
    rc, out = run_daemon_once(d)
    assert rc == 1 and "socket directory" in out and "chmod go-w" in out, out


def _nobody_env(home: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    return env


def test_non_root_default_dir_under_tmp_prepared_by_another_user_is_refused(tmp_path):
    """A user daemon without $XDG_RUNTIME_DIR / $XDG_STATE_HOME puts socket and state under
    /tmp/gpucostd-UID: a directory another user made there first must be refused."""
    base = Path(f"/tmp/gpucostd-{NOBODY}")
    if base.exists() or base.is_symlink():
        pytest.skip(f"{base} exists on this host; not touching it")
    work = Path(f"/tmp/gpucostd-test-{os.getpid()}")
    work.mkdir(mode=0o755)
    try:
        cfg = work / "gpucostd.toml"
        cfg.write_text(f'[daemon]\nlisten_address = "127.0.0.1:{free_port()}"\n'
                       f'kernel_log = "none"\ninterval_seconds = 0.2\n')
        base.mkdir()
        os.chown(base, OTHER, OTHER)
        os.chmod(base, 0o777)
        cmd, _ = python_for(NOBODY)
        r = subprocess.run(cmd + ["run", "--config", str(cfg), "--simulate"],
                           capture_output=True, text=True, timeout=60, user=NOBODY,
                           cwd="/", env=_nobody_env(work))
        assert r.returncode == 1, r.stderr
        assert str(base) in r.stderr and "cannot start" in r.stderr, r.stderr
        assert not (base / "state").exists()

        # without that directory the daemon makes its own, private one, and runs
        shutil.rmtree(base)
        p = subprocess.Popen(cmd + ["run", "--config", str(cfg), "--simulate"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, user=NOBODY,
                             cwd="/", env=_nobody_env(work))
        try:
            sock = base / "gpucostd" / "gpucostd.sock"
            wait_for(lambda: sock.exists() or p.poll() is not None, 30, what="user socket")
            assert p.poll() is None, p.stderr.read().decode()
            for made in (base, base / "state", base / "gpucostd"):
                st = os.stat(made)
                assert st.st_uid == NOBODY and st.st_mode & 0o022 == 0, (made, oct(st.st_mode))
        finally:
            p.terminate()
            p.wait(20)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ config and hooks
def test_config_another_user_can_change_is_refused_by_a_root_daemon(daemon_factory):
    d = daemon_factory()
    os.chown(d.config, NOBODY, -1)
    r = subprocess.run(gpucostd_cmd() + ["config", "check", str(d.config)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "refused" in r.stderr and "chown root" in r.stderr, r.stderr
    rc, out = run_daemon_once(d)
    assert rc == 2 and "refused" in out, out


def test_a_dropin_another_user_can_change_is_refused_at_start_and_on_reload(daemon_factory):
    d = daemon_factory().start()
    dropins = d.config.parent / "gpucostd.d"
    dropins.mkdir()
    evil = dropins / "50-evil.toml"
    evil.write_text('[hooks]\non_critical = ["/tmp/evil"]\n')
    os.chown(evil, NOBODY, NOBODY)
    d.signal(__import__("signal").SIGHUP)
    from gpucostd.views.statusapi import request
    rejected = wait_for(lambda: [e for e in request(d.socket, {"cmd": "events"})["events"]
                                 if e["code"] == "config_rejected"], 15, what="config_rejected")
    assert "50-evil.toml" in rejected[0]["message"] and "refused" in rejected[0]["message"]
    assert d.stop() == 0
    rc, out = run_daemon_once(d)
    assert rc == 2 and "50-evil.toml" in out and "refused" in out, out


def test_config_writable_by_a_group_is_a_warning_and_a_finding(daemon_factory):
    d = daemon_factory()
    os.chown(d.config, 0, NOBODY)       # gid 65534: nogroup
    os.chmod(d.config, 0o664)
    r = subprocess.run(gpucostd_cmd() + ["config", "check", str(d.config)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "ok\n", r
    assert "warning:" in r.stderr and "chmod g-w" in r.stderr, r.stderr
    d.start()
    from gpucostd.views.statusapi import request
    findings = request(d.socket, {"cmd": "status"})["status"]["node"]["findings"]
    assert [f for f in findings if f["code"] == "config_insecure"], findings


def test_a_root_daemon_refuses_a_hook_program_others_can_change(tmp_path):
    from gpucostd import config as config_mod
    from gpucostd.record.hooks import HookRunner
    from gpucostd.snapshot import Event, Severity
    marker = tmp_path / "ran"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    os.chmod(hook, 0o777)
    path = tmp_path / "c.toml"
    path.write_text(f'[hooks]\non_critical = ["{hook}"]\n')
    cfg = config_mod.load(str(path))
    assert any("hooks.on_critical" in w and "chmod o-w" in w for w in cfg.warnings), cfg.warnings
    ev = Event(1.7e9, "node", "health_change", Severity.CRIT, "x", "x",
               fields={"from": "OK", "to": "CRIT", "from_known": "OK"})
    res = HookRunner(cfg).run("on_critical", [str(hook)], ev, 10)
    assert not res.ok and "refused to run" in res.error and not marker.exists(), res
    os.chmod(hook, 0o755)
    res = HookRunner(cfg).run("on_critical", [str(hook)], ev, 10)
    assert res.ok and marker.exists(), res


# ------------------------------------------------------------------ the client
FAKE_SERVER = textwrap.dedent("""\
    import json, os, socket, sys
    path, log = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        with open(log, "ab") as f:
            f.write(data)
        ok = {"ok": True, "status": {"schema": 1, "node": {"health": "OK"}, "gpus": []},
              "events": []}
        try:
            c.sendall(json.dumps(ok).encode() + b"\\n")
        except OSError:
            pass
        c.close()
    """)


@pytest.fixture
def fake_socket(tmp_path):
    """A status socket served by another user (the attacker's fake daemon)."""
    room = Path(f"/tmp/gpucostd-test-fake-{os.getpid()}")     # reachable by that user
    room.mkdir(mode=0o755)
    os.chown(room, NOBODY, NOBODY)
    script = room / "fake.py"
    script.write_text(FAKE_SERVER)
    path, log = room / "gpucostd.sock", room / "received"
    _, exe = python_for(NOBODY)
    p = subprocess.Popen([exe, str(script), str(path), str(log)], user=NOBODY,
                         stdout=subprocess.PIPE, cwd="/")
    try:
        assert p.stdout.readline().strip() == b"listening"
        yield path, log
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(room, ignore_errors=True)


def test_client_refuses_a_socket_served_by_another_user(fake_socket, tmp_path):
    path, log = fake_socket
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nsocket_path = "{path}"\n')
    r = subprocess.run(gpucostd_cmd() + ["status", "--socket", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 3 and "neither root nor you" in r.stdout, r
    r = subprocess.run(gpucostd_cmd() + ["ack", "0", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 3 and "nothing was sent" in r.stderr, r
    time.sleep(0)    # the fake server logs whatever it got before answering
    assert not log.exists() or log.read_bytes() == b"", log.read_bytes()
