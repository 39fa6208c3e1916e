"""Hostile inference endpoints through the real daemon process (issue 16, item 2).

The probe-level tests (test_inference_servers.py, test_inference.py) show that one scrape has
one deadline. These run `gpucostd run --simulate` with [inference] pointed at a local endpoint
that never gives a reading (one that trickles its headers a byte at a time, one that redirects
to itself for ever) and check what an operator sees: the loop keeps its cadence, /healthz
answers 200, status names the endpoint as failing, SIGTERM stops the daemon at once, and no
exchange outlives the effective deadline, min([inference] timeout_seconds, interval / 2).
"""
from __future__ import annotations

import select
import signal
import socket
import threading
import time
import urllib.parse

import pytest

from conftest import http_get, metric_value, wait_for

INTERVAL = 1.0
CYCLES = 8                 # cycles timed for the cadence
CADENCE_TOLERANCE = 0.10  # judged on the daemon's own cycle times, not on when we polled
# The bounds below are set by the failures they tell apart, not by how fast this machine is
# today (a loaded machine delays the daemon's close and this process's notice of it alike):
# - a scrape's deadline is judged on the median of its scrapes, within MEDIAN_SLACK of the one
#   it must be: the wrong ones (timeout_seconds uncapped, half the interval when timeout_seconds
#   is smaller) sit at least 0.3 s away;
# - no scrape may outlive its deadline by more than LATE: a fresh deadline per read never ends
#   at all (the trickle sends a byte every 50 ms), a fresh one per hop is the hop count;
# - SIGTERM to exit under STOP_SECONDS (docs/reliability.md says under a second; the unit
#   allows TimeoutStopSec=30): a stop that waited for an uncapped read could take up to
#   timeout_seconds (5 s). Kept as it was: no miss of it seen under load.
MEDIAN_SLACK = 0.15
LATE = 1.0
STOP_SECONDS = 3.0
HEALTHZ_MEDIAN = 0.25      # /healthz latency, median of every poll (a /healthz that waited
                           # for the loop's hostile read would take its 0.5 s deadline)


class HostileEndpoint:
    """A /metrics endpoint on loopback that never gives a reading.

    `trickle`: answers the status line, then one header byte every 50 ms for as long as the
    client stays. `redirect-loop`: waits `hop_delay`, then redirects back to itself, for ever;
    the Location carries a chain id and hop number so the hops of one scrape can be grouped.
    Every exchange is recorded as (chain, hop, accepted, ended), `ended` being when the client
    closed the connection (monotonic, this process)."""

    def __init__(self, mode: str, hop_delay: float = 0.3, byte_every: float = 0.05):
        assert mode in ("trickle", "redirect-loop")
        self.mode, self.hop_delay, self.byte_every = mode, hop_delay, byte_every
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"
        self.exchanges = []            # (chain, hop, accepted, ended)
        self.open = 0                  # exchanges in progress
        self._chains = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self._stop.set()
        self.sock.close()

    def _accept(self):
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.1)
                if ready:
                    conn, _ = self.sock.accept()
                    accepted = time.monotonic()    # here, not in the thread: it may start late
                    threading.Thread(target=self._serve, args=(conn, accepted),
                                     daemon=True).start()
            except (OSError, ValueError):
                return

    def _peer_closed(self, conn, wait: float) -> bool:
        """Wait up to `wait` s; True as soon as the client closes (or resets) the connection."""
        ready, _, _ = select.select([conn], [], [], wait)
        if not ready:
            return False
        try:
            return conn.recv(4096) == b""
        except OSError:
            return True

    def _serve(self, conn, accepted):
        with self._lock:
            self.open += 1
        chain = hop = None
        try:
            conn.settimeout(2.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
            with self._lock:
                if "chain" in query:
                    chain, hop = int(query["chain"][0]), int(query["hop"][0])
                else:
                    self._chains += 1
                    chain, hop = self._chains, 0
            if self.mode == "trickle":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                end = accepted + 30.0              # a bound for the test, not for the daemon
                while time.monotonic() < end and not self._stop.is_set():
                    conn.sendall(b"X")             # one byte of a header line that never ends
                    if self._peer_closed(conn, self.byte_every):
                        break
            else:
                if self._peer_closed(conn, self.hop_delay):
                    return
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /metrics?chain=%d&hop=%d\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n" % (chain, hop + 1))
                self._peer_closed(conn, 2.0)
        except (OSError, IndexError, ValueError, KeyError):
            pass
        finally:
            ended = time.monotonic()
            conn.close()
            with self._lock:
                self.open -= 1
                if chain is not None:
                    self.exchanges.append((chain, hop, accepted, ended))

    def scrapes(self):
        """{chain: (first accept, last close, hops)} of every finished scrape (the newest
        may still be in progress, between two hops: it is left out)."""
        with self._lock:
            rows = list(self.exchanges)
        out = {}
        for chain, hop, accepted, ended in rows:
            a, e, n = out.get(chain, (accepted, ended, 0))
            out[chain] = (min(a, accepted), max(e, ended), n + 1)
        out.pop(max(out, default=None), None)
        return out


@pytest.fixture
def hostile():
    made = []

    def make(mode, **kw):
        h = HostileEndpoint(mode, **kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def _cycle_and_time(d):
    """(cycles_total, wall time of that cycle's snapshot) from one scrape: the daemon's own
    clock, so the cadence does not depend on when this process got to poll."""
    code, body = http_get(d.url + "/metrics", timeout=2)
    assert code == 200, body
    return (metric_value(body, "gpucostd_cycles_total"),
            metric_value(body, "gpucostd_snapshot_timestamp_seconds"))


def _cycles(d):
    return _cycle_and_time(d)[0]


def _healthz(d, took):
    """/healthz answers 200 (the loop never stalls); its latency goes to `took`."""
    t0 = time.monotonic()
    code, body = http_get(d.url + "/healthz", timeout=2)
    took.append(time.monotonic() - t0)
    assert code == 200, (code, body)


def _next_cycle(d, after, timeout, healthz):
    """(cycle, its snapshot's wall time) when the counter is first seen above `after`;
    /healthz is asked on every poll meanwhile (latencies to `healthz`)."""
    def seen():
        _healthz(d, healthz)
        c, at = _cycle_and_time(d)
        return (c, at) if c > after else None
    return wait_for(seen, timeout, interval=0.02, what=f"cycle > {after}")


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _failing_finding(d, url):
    rc, doc = d.status_json()
    for f in doc["node"]["findings"]:
        if f["code"] == "inference_unreachable" and url in f["message"]:
            return rc, f
    return None


def _stop_time(d):
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.proc.wait(STOP_SECONDS + 10)
    return rc, time.monotonic() - t0


@pytest.mark.parametrize("mode", ["trickle", "redirect-loop"])
def test_a_hostile_inference_endpoint_never_stalls_the_daemon(daemon_factory, hostile, mode):
    # timeout_seconds = 5 is the largest allowed; the daemon uses at most half the interval
    h = hostile(mode, hop_delay=0.3)         # 4 hops of 0.3 s would be 1.2 s > the interval
    d = daemon_factory(interval=INTERVAL, extra_config=(
        f'\n[inference]\nmetrics_url = "{h.url}"\ntimeout_seconds = 5\n')).start()
    cap = 0.5 * INTERVAL
    rc, finding = wait_for(lambda: _failing_finding(d, h.url), 15,
                           what="an inference_unreachable finding naming the endpoint")
    assert rc == 1 and finding["severity"] == "WARN", (rc, finding)
    assert f"did not answer within {cap:g} s" in finding["message"], finding
    assert metric_value(d.metrics(), "gpucostd_inference_endpoint_up", endpoint="0") == 0

    # the cadence: CYCLES cycles take CYCLES intervals (the daemon's own snapshot times)
    healthz = []
    c0, t0 = _next_cycle(d, _cycles(d), 5 * INTERVAL, healthz)
    c1, t1 = _next_cycle(d, c0 + CYCLES - 1, CYCLES * INTERVAL * (1 + CADENCE_TOLERANCE) + 5,
                         healthz)
    cadence = (c1 - c0) * INTERVAL / (t1 - t0)
    scrapes = h.scrapes()
    spans = sorted(e - a for a, e, _n in scrapes.values())
    print(f"{mode}: {c1 - c0:.0f} cycles in {t1 - t0:.2f} s (cadence {cadence:.3f}); "
          f"{len(spans)} scrapes, {spans[0]:.3f}..{spans[-1]:.3f} s each, hops "
          f"{sorted({n for _a, _e, n in scrapes.values()})}; /healthz median "
          f"{_median(healthz):.3f} s of {len(healthz)}")
    assert abs(cadence - 1) <= CADENCE_TOLERANCE, (c1 - c0, t1 - t0)
    assert _median(healthz) < HEALTHZ_MEDIAN, sorted(healthz)
    # every scrape (all its hops) ends at the one deadline, not a fresh one per read or hop
    assert len(spans) >= CYCLES - 1, scrapes
    assert spans[-1] <= cap + LATE, spans
    # and the deadline is the capped one, neither less nor more (the median: on a loaded
    # machine a scrape can be accepted late, when the client has already spent part of its
    # deadline connecting, or closed late)
    assert abs(_median(spans) - cap) <= MEDIAN_SLACK, spans
    if mode == "redirect-loop":
        assert max(n for _a, _e, n in scrapes.values()) == 2, scrapes

    # SIGTERM in the middle of a hostile exchange: out at once, cleanly
    wait_for(lambda: h.open, 5, interval=0.01, what="an exchange in progress")
    rc, took = _stop_time(d)
    print(f"{mode}: stopped in {took:.2f} s (exit {rc})")
    assert rc == 0 and took < STOP_SECONDS, (rc, took, d.output()[-2000:])


@pytest.mark.parametrize("interval,timeout_seconds,used", [
    (0.6, 5.0, 0.3),     # capped at half the interval
    (1.0, 0.2, 0.2),     # below the cap: used as configured
])
def test_inference_deadline_is_timeout_seconds_capped_at_half_the_interval(
        daemon_factory, hostile, interval, timeout_seconds, used):
    # two endpoints (read in parallel, each under its own deadline)
    trickle, loop = hostile("trickle"), hostile("redirect-loop", hop_delay=used * 0.6)
    d = daemon_factory(interval=interval, extra_config=(
        f"\n[inference]\ntimeout_seconds = {timeout_seconds}\n"
        f'[[inference.endpoint]]\nurl = "{trickle.url}"\ngpus = [0, 1, 2, 3]\n'
        f'[[inference.endpoint]]\nurl = "{loop.url}"\ngpus = [4, 5, 6, 7]\n')).start()
    for h in (trickle, loop):
        rc, finding = wait_for(lambda: _failing_finding(d, h.url), 15,
                               what=f"an inference_unreachable finding for {h.mode}")
        assert f"did not answer within {used:g} s" in finding["message"], finding
        wait_for(lambda: len(h.scrapes()) >= 3, 10 * interval + 5, what="three scrapes")
        spans = sorted(e - a for a, e, _n in h.scrapes().values())
        print(f"{h.mode}: interval {interval:g}, timeout_seconds {timeout_seconds:g}: "
              f"scrapes {spans[0]:.3f}..{spans[-1]:.3f} s")
        assert abs(_median(spans) - used) <= MEDIAN_SLACK and spans[-1] <= used + LATE, spans
    body = d.metrics()
    assert metric_value(body, "gpucostd_inference_endpoint_up", endpoint="0") == 0
    assert metric_value(body, "gpucostd_inference_endpoint_up", endpoint="1") == 0
    before = _cycles(d)
    _next_cycle(d, before + 2, 4 * interval + 5, [])
