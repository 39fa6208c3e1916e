"""Reliability faults through the real daemon process: a reload with any bad file, corrupt saved
originals, lost kernel-log records, a broken state dir, and the smaller hostile inputs.

docs/reliability.md lists each fault with the test here that holds it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import gpucostd_cmd, wait_for


def ask(daemon, **message):
    """One request on the daemon's socket (not through the CLI: the CLI reads the config, which
    some tests here break on purpose)."""
    from gpucostd.views.statusapi import request
    return request(daemon.socket, message)


def events_of(daemon, code):
    return [e for e in ask(daemon, cmd="events", limit=1000)["events"] if e["code"] == code]


def status(daemon):
    return ask(daemon, cmd="status")["status"]


def cycles(daemon):
    return status(daemon)["daemon"]["cycle"]


def config_check(path):
    return subprocess.run(gpucostd_cmd() + ["config", "check", str(path)], capture_output=True,
                          text=True, timeout=30)


# ------------------------------------------------------------------ 1. reload with a bad file
def deep_nesting(levels=600):
    return "[hooks]\non_critical = " + "[" * levels + "]" * levels + "\n"


BAD_FILES = {
    "deep": lambda p: p.write_text(deep_nesting()),
    "fifo": lambda p: (p.unlink(), os.mkfifo(p)),
    "huge": lambda p: os.truncate(p, 200 * 1024 * 1024),     # sparse: refused unread
    "directory": lambda p: (p.unlink(), p.mkdir()),
    "binary": lambda p: p.write_bytes(b"\xff\xfe\x00\x01"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_config_check_refuses_bad_file_with_one_line(tmp_path, kind):
    path = tmp_path / "bad.toml"
    path.write_text("")
    BAD_FILES[kind](path)
    r = subprocess.run(gpucostd_cmd() + ["config", "check", str(path)], capture_output=True,
                       text=True, timeout=20)      # a FIFO must not block: the timeout fails it
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert str(path) in r.stderr
    if kind == "huge":      # refused by its size, before reading 200 MB into memory
        assert "at most" in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["deep", "fifo", "huge"])
def test_reload_with_bad_file_is_refused_and_the_daemon_goes_on(daemon_factory, kind):
    d = daemon_factory().start()
    good = d.config.read_text()
    BAD_FILES[kind](d.config)
    d.signal(signal.SIGHUP)
    rejected = wait_for(lambda: events_of(d, "config_rejected"), 15,
                        what="config_rejected event")
    assert d.proc.poll() is None, d.output()
    if kind == "huge":
        assert "at most" in rejected[0]["message"], rejected
    before = cycles(d)
    wait_for(lambda: cycles(d) > before + 2, 10, what="cycles after the refused reload")
    assert "Traceback" not in d.output()
    # the running config stayed: a good file reloads again
    if d.config.is_dir():
        d.config.rmdir()
    else:
        d.config.unlink()
    d.config.write_text(good)
    d.signal(signal.SIGHUP)
    wait_for(lambda: events_of(d, "config_reloaded"), 15, what="config_reloaded event")


# ------------------------------------------------------------------ 3. corrupt saved originals
SCENARIOS = os.path.join(os.path.dirname(__file__), "scenarios")
PREAPPLIED = os.path.join(SCENARIOS, "tuning_preapplied.toml")   # 4 GPUs left at 500 W
TORN = b'{\n  "originals": {\n    "gpu:0": {\n      "power_limit_watts": {\n        "value": 7'


def power_limits(daemon):
    return [g["power_limit_watts"] for g in status(daemon)["gpus"]]


def test_truncated_originals_refuse_tuning_until_an_operator_decides(daemon_factory, tmp_path):
    """A crash mid-tuning left the GPUs at 500 W and a torn originals.json: the tuned values must
    not become the new originals. Nothing is tuned, the file is kept, it is said everywhere;
    once the operator removes the file and reloads, tuning resumes."""
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    (state / "originals.json").write_bytes(TORN)
    cfg = "[tuning]\nverify_interval_seconds = 0.5\n[tuning.gpu]\npower_limit_watts = 450\n"
    d = daemon_factory(scenario=PREAPPLIED, extra_config=cfg, state_dir=state).start()
    found = wait_for(lambda: [f for f in status(d)["node"]["findings"]
                              if f["code"] == "originals_unreadable"], 10,
                     what="originals_unreadable finding")
    assert "originals.json" in found[0]["message"] and found[0]["action"]
    assert events_of(d, "originals_unreadable")
    before = cycles(d)
    wait_for(lambda: cycles(d) > before + 3, 10, what="a few more cycles")
    assert power_limits(d) == [500.0] * 4, "tuned while the originals were unreadable"
    assert (state / "originals.json").read_bytes() == TORN
    assert sorted(os.listdir(state)).count("originals.json") == 1
    assert not [n for n in os.listdir(state) if n.startswith("originals.json.")]
    assert "saved originals unreadable" in d.output()

    # the operator decided (set the GPUs by hand, moved the file away) and reloads
    os.replace(state / "originals.json", state / "originals.json.bad")
    d.signal(signal.SIGHUP)
    wait_for(lambda: power_limits(d) == [450.0] * 4, 15, what="tuning resumed at 450 W")
    assert events_of(d, "originals_recovered")
    saved = json.loads((state / "originals.json").read_text())["originals"]
    assert {s: v["power_limit_watts"]["value"] for s, v in saved.items()} == {
        f"gpu:{i}": 500 for i in range(4)}
    assert (state / "originals.json.bad").read_bytes() == TORN


def test_stop_with_corrupt_originals_restores_nothing_and_keeps_the_file(daemon_factory,
                                                                          tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    (state / "originals.json").write_bytes(TORN)
    d = daemon_factory(scenario=PREAPPLIED, state_dir=state,
                       extra_config="[tuning.gpu]\npower_limit_watts = 450\n").start()
    wait_for(lambda: events_of(d, "originals_unreadable"), 10, what="originals_unreadable")
    assert d.stop() == 0
    assert (state / "originals.json").read_bytes() == TORN
    assert "nothing was restored" in d.output()


# ------------------------------------------------------------------ 4. the status socket
def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_forty_concurrent_status_requests_all_succeed(daemon_factory):
    import threading
    from gpucostd.views.statusapi import StatusClientError, request
    d = daemon_factory().start()
    barrier = threading.Barrier(40)
    errors, done = [], []

    def one():
        barrier.wait()
        try:
            done.append(request(d.socket, {"cmd": "status"}, timeout=20)["ok"])
        except StatusClientError as e:
            errors.append(str(e))
    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(done) == 40, errors[:3]


def test_a_client_trickling_its_request_is_cut_off_at_the_deadline(daemon_factory):
    import socket
    import time
    d = daemon_factory().start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket)
    s.settimeout(0.5)
    t0 = time.monotonic()
    reply = b""
    try:
        while time.monotonic() - t0 < 15:
            try:
                s.sendall(b" ")            # a byte every half second, never a newline
            except OSError:
                break
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:        # reset: the server closed with our bytes unread
                break
            if not chunk:
                break
            reply += chunk
    finally:
        s.close()
    assert time.monotonic() - t0 < 8, "a trickling client held its connection past 8 s"
    assert b"not complete within" in reply or reply == b"", reply


def test_many_silent_clients_are_bounded_and_the_socket_still_answers(daemon_factory):
    import socket
    from gpucostd.views.statusapi import request
    d = daemon_factory().start()
    base = open_fds(d.proc.pid)
    silent = []
    try:
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(d.socket)
            except BlockingIOError:
                pass
            silent.append(s)
        wait_for(lambda: open_fds(d.proc.pid) >= base + 60, 10, what="slots taken")
        assert open_fds(d.proc.pid) <= base + 64 + 8, (base, open_fds(d.proc.pid))
        assert request(d.socket, {"cmd": "status"}, timeout=20)["ok"]
    finally:
        for s in silent:
            s.close()


def test_out_of_file_descriptors_the_accept_loop_does_not_spin(daemon_factory):
    import resource
    import socket
    import time
    from gpucostd.views.statusapi import request
    d = daemon_factory()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))     # inherited by the daemon
    try:
        d.start(wait=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    d.wait_ready()
    pid = d.proc.pid
    assert open_fds(pid) < 30, open_fds(pid)     # so 64 connection slots exceed the limit
    held = []
    try:
        def connect_one():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            held.append(s)
            try:
                s.connect(d.socket)
                return True
            except BlockingIOError:     # the listen queue is full for now
                return False
        # more connections than the descriptors left: accept() gets EMFILE
        for _ in range(80):
            wait_for(connect_one, 5, interval=0.01, what="a connection queued")
        wait_for(lambda: "cannot accept connections" in d.output() or
                 open_fds(pid) >= 47, 10, what="the daemon out of descriptors")
        c0, t0 = cpu_seconds(pid), time.monotonic()
        wait_for(lambda: time.monotonic() - t0 >= 3, 5, what="3 s of measuring")
        share = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        assert share < 0.5, f"the daemon used {share:.0%} of a core while out of descriptors"
        assert "cannot accept connections" in d.output()
    finally:
        for s in held:
            s.close()
    assert request(d.socket, {"cmd": "status"}, timeout=20)["ok"]
    assert d.proc.poll() is None


@pytest.mark.parametrize("payload,needle", [
    (b'{"cmd": "events", "limit": Infinity}\n', "malformed request"),
    (b'{"cmd": "events", "limit": NaN}\n', "malformed request"),
    (b'{"cmd": "events", "since": 1e999}\n', "malformed request"),
    (b'{"cmd": "events", "limit": ' + b"9" * 400 + b'}\n', "malformed request"),
    (b'{"cmd": "cost", "since_seconds": ' + b"9" * 400 + b'.0}\n', "malformed request"),
    (b'{"cmd": "status", "x": ' + b"[" * 30000 + b"]" * 30000 + b'}\n', "nested too deeply"),
])
def test_socket_requests_with_odd_numbers_or_deep_nesting_get_a_clear_error(daemon_factory,
                                                                           payload, needle):
    import socket
    d = daemon_factory().start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(d.socket)
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    assert reply["ok"] is False and needle in reply["error"], reply
    assert "Traceback" not in d.output()
    assert ask(d, cmd="status")["ok"]


# ------------------------------------------------------------------ 6. losses are not silent
def test_kmsg_sequence_gaps_are_counted_as_lost_lines(tmp_path):
    from gpucostd.probes.kernel_log import KernelLogWatcher
    records = tmp_path / "kmsg"
    lines = [f"6,{seq},{seq * 1000},-;line {seq}" for seq in (1, 2, 3, 10, 11, 40)]
    records.write_text("\n".join(lines) + "\n")
    w = KernelLogWatcher("kmsg", None, kmsg_path=str(records))
    w.start()
    try:
        wait_for(lambda: w.lines_read >= 6, 10, what="records read")
        assert w.lines_lost == 6 + 28 and w.last_loss_time is not None
    finally:
        w.stop()


def test_kernel_log_flood_loss_is_a_metric_a_status_field_and_a_finding(daemon_factory,
                                                                       writable_kmsg):
    import ctypes
    import uuid
    from conftest import metric_value
    ring = ctypes.CDLL(None).klogctl(10, None, 0)       # SYSLOG_ACTION_SIZE_BUFFER
    if ring <= 0 or ring > 8 << 20:
        pytest.skip(f"kernel log buffer size {ring}: cannot flood it quickly")
    d = daemon_factory(kernel_log="kmsg").start()
    assert status(d)["daemon"]["kernel_log"] == "kmsg", status(d)["daemon"]
    token = uuid.uuid4().hex
    line = f"<6>gpucostd-test flood {token} " + "x" * 80 + "\n"
    d.signal(signal.SIGSTOP)            # the reader falls behind: the ring wraps past it
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY)
        try:
            for _ in range(3 * ring // len(line)):
                os.write(fd, line.encode())
        finally:
            os.close(fd)
    finally:
        d.signal(signal.SIGCONT)
    lost = wait_for(lambda: metric_value(d.metrics(), "gpucostd_kernel_log_lines_lost_total"),
                    15, what="lost lines counted")
    assert lost > 0
    doc = status(d)
    assert doc["daemon"]["kernel_log_lines_lost"] > 0
    assert [f for f in doc["node"]["findings"] if f["code"] == "kernel_log_lines_lost"]
    assert "overwritten before gpucostd read them" in d.output()


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs as the state directory (root: mount)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a small tmpfs as the state directory")
    path = tmp_path / "state"
    path.mkdir(mode=0o750)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0750", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def state_metric(d):
    from conftest import metric_value
    text = d.metrics()
    return (metric_value(text, "gpucostd_state_dir_usable"),
            metric_value(text, "gpucostd_events_pending"))


def finding(d, code):
    return [f for f in status(d)["node"]["findings"] if f["code"] == code]


def fill(path):
    filler = path / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:
        pass
    assert filler.exists(), sorted((p.name, p.stat().st_size) for p in path.iterdir())
    return filler


def test_full_then_read_only_state_dir_is_a_finding_and_a_metric_and_recovers(daemon_factory,
                                                                            small_fs):
    d = daemon_factory(state_dir=small_fs).start()
    assert state_metric(d) == (1.0, 0.0)
    filler = fill(small_fs)
    wait_for(lambda: finding(d, "state_dir_unusable"), 10, what="state_dir_unusable finding")
    assert "full" in finding(d, "state_dir_unusable")[0]["message"]
    assert state_metric(d)[0] == 0.0
    d.signal(signal.SIGHUP)          # an event while the disk is full: kept, not lost
    wait_for(lambda: events_of(d, "config_reloaded"), 10, what="reload event (in memory)")
    wait_for(lambda: state_metric(d)[1] > 0, 10, what="events held in memory")
    filler.unlink()                  # space returns
    wait_for(lambda: not finding(d, "state_dir_unusable"), 10, what="recovery")
    wait_for(lambda: state_metric(d) == (1.0, 0.0), 10, what="metric back to usable")
    assert events_of(d, "state_dir_recovered")

    assert d.stop() == 0
    from gpucostd.record.events import EventStore
    with EventStore(str(small_fs)) as store:
        codes = [e.code for e in store.query()]
    assert "config_reloaded" in codes and "state_dir_unusable" in codes, codes


def test_read_only_state_dir_is_a_finding_and_recovers_when_writable(daemon_factory, small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        d = daemon_factory(state_dir=small_fs).start()
        wait_for(lambda: finding(d, "state_dir_unusable"), 10, what="read-only finding")
        assert "read-only" in finding(d, "state_dir_unusable")[0]["message"]
        assert state_metric(d)[0] == 0.0
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    wait_for(lambda: not finding(d, "state_dir_unusable"), 10, what="recovery from read-only")
    wait_for(lambda: state_metric(d) == (1.0, 0.0), 10, what="kept events written")
    assert d.stop() == 0
    from gpucostd.record.events import EventStore
    with EventStore(str(small_fs)) as store:
        codes = [e.code for e in store.query()]
    assert "startup" in codes and "state_dir_unusable" in codes, codes


def test_vanished_state_dir_is_recreated_and_events_reach_the_new_one(daemon_factory, tmp_path):
    import shutil
    state = tmp_path / "state"
    d = daemon_factory(state_dir=state).start()
    shutil.rmtree(state)
    wait_for(lambda: events_of(d, "state_dir_recreated"), 10, what="state_dir_recreated")
    assert state.is_dir() and os.stat(state).st_mode & 0o777 == 0o750
    d.signal(signal.SIGHUP)
    wait_for(lambda: events_of(d, "config_reloaded"), 10, what="reload event")
    assert d.stop() == 0
    from gpucostd.record.events import EventStore
    with EventStore(str(state)) as store:
        codes = [e.code for e in store.query()]
    assert "state_dir_recreated" in codes and "config_reloaded" in codes, codes


def test_wal_is_checkpointed_and_bounded(tmp_path):
    from gpucostd.record.events import WAL_LIMIT_BYTES, EventStore
    from gpucostd.snapshot import Event, Severity
    store = EventStore(str(tmp_path), max_count=100, prune_every=50)
    try:
        for i in range(3000):
            store.append(Event(1.7e9 + i, "node", "test", Severity.OK, "none", "x" * 2000))
        wal = tmp_path / "events.sqlite-wal"
        assert not wal.exists() or wal.stat().st_size <= WAL_LIMIT_BYTES, wal.stat().st_size
        store.prune()
        assert not wal.exists() or wal.stat().st_size == 0
    finally:
        store.close()


def test_stop_on_a_full_state_dir_gives_one_restored_event_per_setting(daemon_factory,
                                                                      small_fs):
    drift = os.path.join(SCENARIOS, "tuning_drift.toml")        # 4 GPUs at 700 W
    d = daemon_factory(scenario=drift, state_dir=small_fs,
                       extra_config="[tuning.gpu]\npower_limit_watts = 450\n").start()
    wait_for(lambda: power_limits(d) == [450.0] * 4, 10, what="tuned to 450 W")
    fill(small_fs)
    wait_for(lambda: finding(d, "state_dir_unusable"), 10, what="full")
    assert d.stop() == 0
    out = d.output()
    restored = [line for line in out.splitlines() if "restored 450 -> 700" in line]
    failed = [line for line in out.splitlines() if "not restored" in line]
    assert len(restored) == 4 and not failed, out[-3000:]


# ------------------------------------------------------------------ 7. smaller hostile inputs
ESCAPE_SCENARIO = r'''
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 1
driver_version = "550.90.07"
cuda_version = "12.4"

[[gpu]]
index = 0
pci_bus_id = "00000000:18:00.0"

[[at]]
t = 0.3
kernel_log = "NVRM: Xid (PCI:0000:18:00): 13, pid=4242, name=\u001b]0;owned\u0007\u001b[2J\u001b[31mevil\u009b1m, Graphics SM Warp Exception"
'''


def test_terminal_escapes_from_kernel_text_never_reach_status_or_the_log(daemon_factory,
                                                                         tmp_path):
    scenario = tmp_path / "escape.toml"
    scenario.write_text(ESCAPE_SCENARIO)
    d = daemon_factory(scenario=str(scenario)).start()
    ev = wait_for(lambda: [e for e in ask(d, cmd="events")["events"] if e.get("xid") == 13],
                  10, what="the Xid 13 event")
    assert "evil" in json.dumps(ev)
    raw = json.dumps(status(d), ensure_ascii=False) + json.dumps(ev, ensure_ascii=False)
    assert "\x1b" not in raw and "\x07" not in raw and "\x9b" not in raw
    r = subprocess.run(gpucostd_cmd() + ["status", "--socket", d.socket, "--events", "20"],
                       capture_output=True, text=True, timeout=30)
    assert "Xid 13" in r.stdout and "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
    r = subprocess.run(gpucostd_cmd() + ["status", "--socket", d.socket, "--json"],
                       capture_output=True, text=True, timeout=30)
    assert "evil" in r.stdout and "\x1b" not in r.stdout and "\\u001b" not in r.stdout
    d.stop()
    assert "Xid" in d.output() and "\x1b" not in d.output()


MALFORMED_DOCS = [
    {}, [], "text", None, 42, {"node": None}, {"node": {"health": "OK"}},
    {"host": "h", "node": {"health": "OK", "gpu_count": 1, "findings": "x"}, "daemon": {},
     "gpus": [{"index": "zero"}]},
    {"host": "h", "node": {"health": "CRIT", "gpu_count": 1}, "daemon": {"uptime_seconds": "x"},
     "gpus": None, "events": [{"time": "yesterday"}]},
    {"host": "h", "node": {"health": "OK", "gpu_count": 0}, "daemon": {}, "gpus": [],
     "cost": {"weird": True}},
]


@pytest.mark.parametrize("doc", MALFORMED_DOCS, ids=range(len(MALFORMED_DOCS)))
def test_status_renderer_never_crashes_on_a_malformed_document(doc):
    from gpucostd.views import statusview
    text = statusview.render_status(doc, colour=True)
    assert text.endswith("\n") and all(len(line) <= 100 for line in text.splitlines())
    assert statusview.exit_code(doc) in (0, 1, 2, 3)


def test_status_cli_with_a_malformed_document_from_the_socket_exits_3_not_a_traceback(
        tmp_path):
    import socket
    import threading
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def serve():
        c, _ = srv.accept()
        c.recv(65536)
        c.sendall(b'{"ok": true, "status": {"node": {"health": 7}, "gpus": "many"}}\n')
        c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = subprocess.run(gpucostd_cmd() + ["status", "--socket", path], capture_output=True,
                       text=True, timeout=30)
    srv.close()
    assert r.returncode == 3 and "Traceback" not in r.stderr, r
    assert "--json" in r.stdout


def test_scenario_with_a_huge_number_is_a_clear_error_exit_2(tmp_path):
    from gpucostd.sim.scenario import ScenarioError, parse_scenario
    path = tmp_path / "huge.toml"
    path.write_text("[node]\ngpu_count = 1\n[gpu_defaults]\npower_limit = 1e308\n"
                    "[[at]]\nt = 1e308\ngpu = 0\ntemperature = 1e308\n")
    r = subprocess.run(gpucostd_cmd() + ["replay", str(path), "--duration", "5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(ScenarioError):
        parse_scenario("[node]\ngpu_count = 1\n[[at]]\nt = " + "9" * 400 + "\n", "x.toml")


@pytest.mark.parametrize("value", ["a\nb", "tab\there", "del\x7f", "quote\"back\\slash",
                                   "\x1b[31m", "ünïcode"])
def test_config_show_prints_toml_that_config_check_accepts(tmp_path, value):
    path = tmp_path / "c.toml"      # JSON string escapes are TOML basic-string escapes
    path.write_text(f"[cost]\ncurrency = {json.dumps(value)}\n"
                    f"[cost.model_hour_usd]\n{json.dumps('H100 ' + value)} = 3.5\n")
    shown = subprocess.run(gpucostd_cmd() + ["config", "show", "--config", str(path)],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    again = tmp_path / "shown.toml"
    again.write_text(shown.stdout)
    r = config_check(again)
    assert r.returncode == 0 and r.stdout == "ok\n", (r.stderr, shown.stdout)
    from gpucostd.config import load
    assert load(str(again)).cost.currency == value
