"""Reliability round 3 (issue 26) through the real daemon process: a burst of wake-ups, hook trust
through interpreters, implausible inference numbers, large event requests, wall-clock steps,
out-of-range integers, the textfile directory swapped for a symlink, and the smaller hostile
inputs.

docs/reliability.md lists each fault with the test here that holds it.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

from conftest import (DaemonProcess, builtin_throttled_from, http_get, metric_value,
                      wait_for)


def ask(daemon, **message):
    from gpucostd.views.statusapi import request
    return request(daemon.socket, message)


def cycles(daemon):
    return ask(daemon, cmd="status")["status"]["daemon"]["cycle"]


class NotifyListener:
    """A NOTIFY_SOCKET the test listens on, as systemd would: the times WATCHDOG=1 arrived."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.pings = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if b"WATCHDOG=1" in data.split(b"\n"):
                self.pings.append(time.monotonic())

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class EnvDaemon(DaemonProcess):
    """The daemon with extra environment: systemd's $NOTIFY_SOCKET (and WATCHDOG_USEC), or the
    tests' wall-clock offset file."""

    def __init__(self, tmp, notify_socket=None, watchdog_usec=None, env=None, **kw):
        super().__init__(tmp, **kw)
        self.notify_socket = notify_socket
        self.watchdog_usec = watchdog_usec
        self.env = env or {}

    def start(self, wait=True):
        import subprocess
        from conftest import gpucostd_cmd
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        for name in ("JOURNAL_STREAM", "WATCHDOG_PID", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            env.pop(name, None)
        if self.notify_socket:
            env["NOTIFY_SOCKET"] = self.notify_socket
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            gpucostd_cmd() + ["run", "--config", str(self.config), "--simulate", self.scenario],
            stdout=self._logf, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self


# ------------------------------------------------------------------ 1. a burst of wake-ups
def test_forty_sighups_in_two_seconds_leave_cycles_healthz_and_watchdog_on_schedule(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    d = EnvDaemon(tmp_path, listener.path, interval=1.0)
    try:
        d.start()
        wait_for(lambda: len(listener.pings) >= 2, 15, what="two watchdog pings")
        for _ in range(40):                     # 40 SIGHUPs in 2 s
            d.signal(signal.SIGHUP)
            time.sleep(0.05)
        burst_end = time.monotonic()
        first = cycles(d)
        worst_health = 200
        while time.monotonic() < burst_end + 8:   # 8 intervals after the burst
            code, _ = http_get(d.url + "/healthz", timeout=2)
            worst_health = max(worst_health, code)
            time.sleep(0.25)
        assert d.proc.poll() is None, d.output()
        assert worst_health == 200, "healthz went 503 after the SIGHUP burst"
        assert cycles(d) - first >= 4, "cycles stopped after the SIGHUP burst"
        pings = [t for t in listener.pings if t >= burst_end - 2]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert pings and max(gaps) < 3.0, gaps   # about one interval apart, never 3 missed
    finally:
        d.stop()
        listener.close()


def test_watchdog_is_fed_within_half_watchdogsec_when_the_interval_is_longer(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    # interval 30 s, WatchdogSec=4 s: without feeding while it waits, systemd would kill it
    d = EnvDaemon(tmp_path, listener.path, watchdog_usec=4_000_000, interval=30.0)
    try:
        d.start()
        start = time.monotonic()
        wait_for(lambda: len([t for t in listener.pings if t > start]) >= 3, 15,
                 what="three watchdog pings within 15 s on a 30 s interval")
        pings = [t for t in listener.pings if t > start]
        assert max(b - a for a, b in zip(pings, pings[1:])) < 4.0
    finally:
        d.stop()
        listener.close()


# ------------------------------------------------------------------ 6. out-of-range integers
def events_of(daemon, code):
    return [e for e in ask(daemon, cmd="events", limit=1000)["events"] if e["code"] == code]


def test_every_number_key_of_the_schema_has_both_bounds():
    from gpucostd.config_schema import GPU_TUNING_KEYS, SCHEMA
    keys = [(f"{s}.{k}", key) for s, ks in SCHEMA.items() for k, key in ks.items()]
    keys += [(f"tuning.gpu.{k}", key) for k, key in GPU_TUNING_KEYS.items()]
    unbounded = [n for n, key in keys if key.type in ("int", "float")
                 and (key.min is None or key.max is None)]
    assert not unbounded, unbounded


def test_a_64_bit_overflowing_max_count_is_refused_by_config_check_and_reload(daemon_factory):
    import subprocess
    from conftest import gpucostd_cmd
    d = daemon_factory()
    d.write_config("[events]\nmax_count = 9223372036854775808\n")
    r = subprocess.run(gpucostd_cmd() + ["config", "check", str(d.config)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2, r
    assert "events.max_count" in r.stderr and "allowed 100..100000000" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = d.cli("events")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    d.write_config("")
    d.start()
    d.write_config("[events]\nmax_count = 9223372036854775808\n")
    d.signal(signal.SIGHUP)
    rejected = wait_for(lambda: events_of(d, "config_rejected"), 15, what="config_rejected")
    assert "allowed 100..100000000" in rejected[0]["message"], rejected
    assert d.stop() == 0
    d.start(wait=False)     # a start with the file: exit 2 with the same line, no traceback
    assert d.proc.wait(30) == 2
    assert "allowed 100..100000000" in d.output() and "Traceback" not in d.output()


# ------------------------------------------------------------------ 4. large events requests
def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def store_events(state_dir, n):
    """n events in the daemon's event database, written straight into SQLite (fast)."""
    import json
    import sqlite3
    from gpucostd.record.events import EventStore
    EventStore(str(state_dir)).close()           # the schema
    now = time.time()
    db = sqlite3.connect(os.path.join(str(state_dir), "events.sqlite"))
    fields = json.dumps({"line": "NVRM: Xid (PCI:0000:18:00): 13, " + "x" * 300})
    db.executemany(
        "INSERT INTO events(time, subject, code, severity, action, message, gpu, uuid, xid, "
        "fields) VALUES (?, 'gpu0', 'xid', 1, 'none', ?, 0, 'GPU-0', 13, ?)",
        ((now - 3600 + i * 0.01, f"stored event {i} " + "m" * 200, fields) for i in range(n)))
    db.commit()
    db.close()


def test_four_concurrent_requests_for_100000_events_keep_the_loop_and_memory_bounded(
        daemon_factory):
    d = daemon_factory(interval=0.5)
    d.state_dir.mkdir(mode=0o750)
    store_events(d.state_dir, 100_000)
    d.start()
    wait_for(lambda: cycles(d) >= 5, 15, what="5 cycles")
    rss0 = rss_mib(d.proc.pid)
    replies, errors = [], []

    def big():
        try:
            replies.append(ask(d, cmd="events", limit=100_000))
        except Exception as e:  # noqa: BLE001 - counted below
            errors.append(e)
    for _ in range(3):                          # 3 rounds of 4 at once
        c0, t0 = cycles(d), time.monotonic()
        threads = [threading.Thread(target=big) for _ in range(4)]
        for t in threads:
            t.start()
        health = []
        while any(t.is_alive() for t in threads):
            health.append(http_get(d.url + "/healthz", timeout=3)[0])
            time.sleep(0.1)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        assert set(health) <= {200}, health
        assert cycles(d) - c0 >= max(1, int(elapsed / 0.5 / 2)), "the loop stalled"
    # one large answer is built at a time; a request that waited 1.5 s for its turn is told
    # "busy" (the documented refusal: on a CPU-starved host, e.g. the niced Debian 13 run, it
    # happens); anything else is a failure, and at least three of the twelve are answered
    assert all("busy answering other events requests" in str(e) for e in errors), errors
    assert len(replies) + len(errors) == 12 and len(replies) >= 3, (len(replies), errors)
    for r in replies:
        assert len(r["events"]) == 5000 and r["more"] is True, (len(r["events"]), r.get("note"))
        assert any(e["message"].startswith("stored event 99999 ") for e in r["events"])
    grown = rss_mib(d.proc.pid) - rss0
    assert grown < 60, f"RSS grew {grown:.0f} MiB"
    r = d.cli("events", "--limit", "100000")
    assert r.returncode == 0 and "at most 5000 events per request" in r.stderr, r.stderr


# ------------------------------------------------------------------ 11. smaller hostile inputs
def test_replay_with_an_absurd_duration_and_step_is_a_clear_error_exit_2():
    import subprocess
    from conftest import gpucostd_cmd
    for duration in ("1" + "0" * 44, "1" + "0" * 300):
        r = subprocess.run(gpucostd_cmd() + ["replay", "builtin:h100x8", "--duration", duration,
                                             "--step", "1e-6"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "use a larger --step" in r.stderr and "at most 50000000 cycles" in r.stderr


def test_calibrate_with_params_not_an_object_on_the_socket_is_a_clear_error(daemon_factory):
    d = daemon_factory().start()
    from gpucostd.views.statusapi import request
    from gpucostd.views.statusclient import StatusClientError
    for params in ([1], "x", 5):
        try:
            request(d.socket, {"cmd": "calibrate", "action": "start", "params": params})
        except StatusClientError as e:
            error = str(e)
        else:
            error = "accepted"
        # a non-root test run is refused before the params are read: the same clear line
        assert "must be an object" in error or "needs root" in error, error
    assert d.proc.poll() is None
    assert "Traceback" not in d.output() and "AttributeError" not in d.output(), d.output()


# ------------------------------------------------------------------ 2. hook trust
NOBODY = 65534


def test_a_script_run_by_an_interpreter_is_held_to_the_same_trust_as_a_program(
        daemon_factory, tmp_path):
    import subprocess
    from conftest import REPO, gpucostd_cmd
    if os.geteuid() != 0:
        import pytest
        pytest.skip("needs root: the daemon's hook trust applies to a root daemon")
    marker = tmp_path / "ran"
    script = tmp_path / "drain.sh"
    script.write_text(f"touch {marker}\n")
    os.chmod(script, 0o644)
    os.chown(script, NOBODY, NOBODY)                 # a script nobody may rewrite
    d = daemon_factory(scenario=str(REPO / "tests" / "scenarios" / "faults.toml"))
    d.write_config(f'[hooks]\non_critical = ["/bin/sh", "{script}"]\n'
                   f'on_inefficient = ["/usr/bin/env", "python3", "{script}"]\n')
    r = subprocess.run(gpucostd_cmd() + ["config", "check", str(d.config)],
                       capture_output=True, text=True, timeout=30)
    for hook in ("on_critical", "on_inefficient"):
        assert f"warning: hooks.{hook}: {script} belongs to" in r.stderr, r.stderr
    d.start()
    wait_for(lambda: f"hook on_critical (node) failed: refused to run /bin/sh {script}"
             in d.output(), 20, what="the hook refused")
    findings = ask(d, cmd="status")["status"]["node"]["findings"]
    assert [f for f in findings if f["code"] == "config_insecure"], findings
    assert not marker.exists()
    d.stop()
    os.chown(script, 0, 0)                         # the same hook, trusted: it runs
    (d.state_dir / "health.json").unlink(missing_ok=True)
    d.start()
    wait_for(marker.exists, 20, what="the trusted hook to run")


# ------------------------------------------------------------------ 3. inference plausibility
class FakeServer:
    """A vLLM-like /metrics on loopback whose token counter the test sets (self.value)."""

    def __init__(self, value="0", size=0):
        import http.server
        outer = self
        self.value = value
        self.padding = b""

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = (f"# TYPE vllm:generation_tokens_total counter\n"
                        f"vllm:generation_tokens_total {outer.value}\n").encode() + outer.padding
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def inference_finding(d):
    findings = ask(d, cmd="status")["status"]["node"]["findings"]
    return [f for f in findings if f["code"] == "inference_unreachable"]


def tokens_total(d):
    return metric_value(d.metrics(), "gpucostd_node_tokens_total")


def test_absurd_token_counts_are_refused_said_and_never_saved_or_frozen(daemon_factory):
    import json
    srv = FakeServer("1000")
    try:
        d = daemon_factory(interval=0.2, extra_config=(
            f'[cost]\ngpu_hour_usd = 2.0\n[inference]\nmetrics_url = "{srv.url}"\n'))
        d.start()
        for v in range(2000, 6000, 1000):            # an honest server
            srv.value = str(v)
            wait_for(lambda: (tokens_total(d) or 0) >= v - 1000, 10, what=f"tokens {v}")
        srv.value = "1.7e308"                          # a poser serving an absurd counter
        found = wait_for(lambda: inference_finding(d), 10, what="the implausible reading said")
        assert srv.url in found[0]["message"] and "plausible" in found[0]["message"], found
        text = d.metrics()
        assert metric_value(text, "gpucostd_inference_endpoint_up", endpoint="0") == 0
        tpd = metric_value(text, "gpucostd_node_tokens_per_dollar")
        assert tpd is None or tpd < 1e12, tpd
        assert tokens_total(d) < 1e18
        srv.value = "0"                                 # then a jump no GPU can make
        srv.value = str(10 ** 15)
        wait_for(lambda: "grew by" in (inference_finding(d) or [{}])[0].get("message", ""), 10,
                 what="the implausible jump said")
        assert tokens_total(d) < 1e7
        assert d.stop() == 0
        cost = json.loads((d.state_dir / "cost.json").read_text())
        assert cost["efficiency"]["tokens_total"] < 1e7, cost["efficiency"]["tokens_total"]
        # a total saved absurd by an older version does not freeze the total after a restart
        cost["efficiency"]["tokens_total"] = 1.7e308
        (d.state_dir / "cost.json").write_text(json.dumps(cost))
        srv.value = "7000"
        d.start()
        wait_for(lambda: metric_value(d.metrics(), "gpucostd_inference_endpoint_up",
                                      endpoint="0") == 1, 10, what="the endpoint read")
        first = tokens_total(d)
        assert first < 1e18
        srv.value = "9000"
        wait_for(lambda: tokens_total(d) >= first + 2000, 10, what="the total to grow again")
        assert "beyond any plausible count" in d.output()
    finally:
        srv.close()


def test_expect_owner_refuses_a_loopback_server_run_by_another_user(daemon_factory):
    srv = FakeServer("1000")                  # served by this test's user
    try:
        me = os.getuid()
        other = 65534 if me != 65534 else 0
        d = daemon_factory(interval=0.2, extra_config=(
            f'[inference]\nmetrics_url = "{srv.url}"\nexpect_owner = "{other}"\n'))
        d.start()
        found = wait_for(lambda: inference_finding(d), 10, what="the owner refused")
        assert f"belongs to uid {me}" in found[0]["message"], found
        assert f"not uid {other}" in found[0]["message"], found
        d.stop()
        d.write_config(f'[inference]\nmetrics_url = "{srv.url}"\nexpect_owner = "{me}"\n')
        d.start()
        wait_for(lambda: metric_value(d.metrics(), "gpucostd_inference_endpoint_up",
                                      endpoint="0") == 1, 10, what="the right owner read")
    finally:
        srv.close()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_8_mib_inference_exposition_is_refused_unparsed(daemon_factory):
    srv = FakeServer("1000")
    line = b'vllm:request_success_total{model_name="m",finished_reason="%d"} 1\n'
    lines, size, i = [], 0, 0
    while size < 8 * 1024 * 1024 - 4096:         # just under the old 8 MiB cap
        lines.append(line % i)
        size += len(lines[-1])
        i += 1
    srv.padding = b"".join(lines[:-1])
    try:
        d = daemon_factory(interval=1.0, extra_config=(
            f'[inference]\nmetrics_url = "{srv.url}"\n'))
        d.start()
        found = wait_for(lambda: inference_finding(d), 10, what="the oversized page said")
        assert "more than 1 MiB" in found[0]["message"], found
        rss0, cpu0, t0 = rss_mib(d.proc.pid), cpu_seconds(d.proc.pid), time.monotonic()
        c0 = cycles(d)
        wait_for(lambda: cycles(d) >= c0 + 10, 30, what="10 cycles")
        share = (cpu_seconds(d.proc.pid) - cpu0) / (time.monotonic() - t0)
        assert share < 0.10, f"{share:.0%} of a core"      # 22% before the cap, 2% after
        assert rss_mib(d.proc.pid) - rss0 < 20
    finally:
        srv.close()


# ------------------------------------------------------------------ 11. textfile dir swapped
def test_a_textfile_directory_swapped_for_a_symlink_is_never_written_or_deleted_through(
        daemon_factory, tmp_path):
    parent = tmp_path / "prometheus"            # Debian: /var/lib/prometheus, owned by prometheus
    collector = parent / "node-exporter"
    collector.mkdir(parents=True)
    elsewhere = tmp_path / "etc"                 # stands for /etc
    elsewhere.mkdir()
    decoy = elsewhere / "gpucostd.prom"
    decoy.write_text("not gpucostd's\n")
    path = collector / "gpucostd.prom"
    d = daemon_factory(extra_config=f'[export]\ntextfile_path = "{path}"\n').start()
    wait_for(path.exists, 10, what="the textfile")
    # the owner of the parent swaps the directory for a symlink
    collector.rename(parent / "node-exporter.old")
    collector.symlink_to(elsewhere)
    wait_for(lambda: "is a symbolic link or not a directory" in d.output(), 15,
             what="the refusal said")
    assert decoy.read_text() == "not gpucostd's\n"
    assert d.stop() == 0
    assert decoy.read_text() == "not gpucostd's\n"            # not deleted at stop either
    assert sorted(os.listdir(elsewhere)) == ["gpucostd.prom"]  # no temporary file left there


# ------------------------------------------------------------------ 11. silent status clients
def test_200_silent_reconnecting_clients_do_not_make_gpucostd_status_fail(daemon_factory):
    d = daemon_factory().start()
    stop = threading.Event()

    def silent():
        while not stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(d.socket)
                s.recv(1)                 # says nothing; waits until the daemon lets go
            except OSError:
                pass
            finally:
                s.close()
    threads = [threading.Thread(target=silent, daemon=True) for _ in range(200)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)                   # let them fill the slots and the listen queue
        codes = []
        for _ in range(10):
            t0 = time.monotonic()
            r = d.cli("status", timeout=30)
            codes.append((r.returncode, round(time.monotonic() - t0, 1), r.stderr.strip()[-80:]))
        assert all(c in (0, 1, 2) for c, _, _ in codes), codes
        # the CLI waits 5 s for an answer: well within it, however many silent clients queue
        assert max(t for _, t, _ in codes) < 3.0, codes
        assert d.proc.poll() is None
    finally:
        stop.set()
        for t in threads:
            t.join(10)



# ------------------------------------------------------------------ 5. wall-clock steps
def status_doc(d):
    return ask(d, cmd="status")["status"]


def test_a_wall_clock_step_keeps_history_uptime_and_the_last_hour_consistent(tmp_path):
    """The daemon's wall clock is stepped through GPUCOSTD_TEST_WALL_OFFSET_FILE (never the
    host's): an hour back, then 40 days forward and a restart."""
    offset = tmp_path / "wall-offset"
    offset.write_text("0")
    soon = tmp_path / "throttle-soon.toml"         # GPU 0 throttled from t = 1 s, not 20 s
    soon.write_text(builtin_throttled_from(1.0))
    d = EnvDaemon(tmp_path, env={"GPUCOSTD_TEST_WALL_OFFSET_FILE": str(offset)}, interval=0.2,
                  scenario=str(soon))
    try:
        d.start()
        wait_for(lambda: (status_doc(d)["cost"]["node"]["last_hour"]["dollars"] or 0) > 0, 30,
                 what="some throttling dollars in the last hour")
        first_events = ask(d, cmd="events", limit=1000)["events"]
        assert first_events
        offset.write_text("-3600")                    # the clock set back one hour
        c = cycles(d)
        wait_for(lambda: cycles(d) >= c + 10, 15, what="10 cycles on the stepped clock")
        doc = status_doc(d)
        assert 0 <= doc["daemon"]["uptime_seconds"] < 600, doc["daemon"]
        hour = doc["cost"]["node"]["last_hour"]["dollars"]
        since_1h = ask(d, cmd="cost", since_seconds=3600)["cost"]["node"]["dollars"]
        assert hour > 0 and since_1h > 0, (hour, since_1h)
        assert abs(hour - since_1h) <= 0.25 * max(hour, since_1h), (hour, since_1h)
        offset.write_text(str(40 * 86400 - 3600))    # then 40 days forward from the start
        c = cycles(d)
        wait_for(lambda: cycles(d) >= c + 10, 15, what="10 cycles on the stepped clock")
        assert d.stop() == 0
        d.start()                                      # a restart after the jump
        events = ask(d, cmd="events", limit=100_000)["events"]
        kept = {(e["time"], e["code"]) for e in events}
        assert {(e["time"], e["code"]) for e in first_events} <= kept, "history was erased"
        day = ask(d, cmd="cost", since_seconds=86400)["cost"]["node"]["dollars"]
        assert day >= since_1h * 0.9, (day, since_1h)  # the 24 h cost history is kept too
    finally:
        d.stop()
