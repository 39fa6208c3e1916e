"""Load held: for 60 s against the real daemon on loopback, 200 concurrent HTTP /metrics
scrapers (gzip and keep-alive, like Prometheus) and 200 status-socket clients, plus slow clients
on both (trickling a request head a byte at a time, never finishing it), while the loop keeps
its cadence within 10% and RSS stays flat.

The HTTP server serves 64 connections at once (docs/reliability.md): past that a
new connection evicts the one that has waited longest for its request head (a slow client or an
idle keep-alive connection), else it gets a 503. So each scraper does what Prometheus's HTTP
client does: a request on a reused keep-alive connection that the server closed is sent again
once on a fresh connection, and a 503 is a failed scrape, retried after Retry-After. The test
asserts that every scraper and every status client is served all through the run, that
scrapes that fail stay rare, and that the slow clients are cut off.

One test, about 80 s; it runs once in the suite (marked slow: `-m "not slow"` leaves it out).
"""
from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
import zlib

import pytest

from conftest import wait_for

pytestmark = pytest.mark.slow

SCRAPERS = 200             # HTTP /metrics, gzip, keep-alive
STATUS_CLIENTS = 200       # `status` requests on the Unix socket
SLOW_HTTP = 20             # trickle an HTTP request head, a byte every 0.5 s
SLOW_STATUS = 20           # trickle a status request, a byte every 0.5 s
PAUSE = 0.1                # each client's pause between two requests
SECONDS = 60.0
WARMUP = 12.0              # seconds of load before RSS is measured (thread stacks, malloc arenas)
INTERVAL = 1.0


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.errors = []

    def add(self, what, error=None):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            if error is not None and len(self.errors) < 20:
                self.errors.append(f"{what}: {error}")

    def __getitem__(self, what):
        with self.lock:
            return self.counts.get(what, 0)

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


# a request sent on a kept-alive connection that the server has closed meanwhile (evicted to
# make room, or its 100th request): Prometheus (Go's net/http) sends it again on a new one
_CLOSED_UNDER_US = (http.client.RemoteDisconnected, http.client.BadStatusLine,
                    ConnectionResetError, BrokenPipeError)


def _exposition(r, body) -> bool:
    """A gzip-compressed exposition with the cycle counter in it."""
    if r.getheader("Content-Encoding") != "gzip":
        return False
    try:
        return b"\ngpucostd_cycles_total " in gzip.decompress(body)
    except (OSError, EOFError, zlib.error):
        return False


def test_soak_scrapers_status_clients_and_slow_clients_keep_cadence_and_memory(daemon_factory):
    from gpucostd.views.statusapi import StatusClientError, request
    d = daemon_factory(interval=INTERVAL).start()
    pid = d.proc.pid
    stop = threading.Event()
    tally = Tally()
    served = [0] * SCRAPERS               # 200s per scraper
    answered = [0] * STATUS_CLIENTS       # answers per status client

    def scraper(i):
        conn, reused = None, False
        while not stop.is_set():
            for attempt in (0, 1):
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
                    reused = False
                try:
                    conn.request("GET", "/metrics", headers={
                        "Accept-Encoding": "gzip", "User-Agent": "Prometheus/soak",
                        "Accept": "text/plain;version=0.0.4"})
                    r = conn.getresponse()
                    body = r.read()
                except _CLOSED_UNDER_US as e:
                    conn.close()
                    conn = None
                    if reused and attempt == 0:
                        tally.add("http resent")
                        continue
                    tally.add("http failed", repr(e))
                    break
                except (OSError, http.client.HTTPException) as e:
                    conn.close()           # e.g. a body cut short: Prometheus fails the scrape
                    conn = None
                    tally.add("http failed", repr(e))
                    break
                if r.status == 200 and _exposition(r, body):
                    served[i] += 1
                    reused = True
                elif r.status == 503:
                    tally.add("http 503")
                    stop.wait(float(r.getheader("Retry-After") or 1))
                else:
                    tally.add("http failed", f"{r.status} {r.getheader('Content-Encoding')} "
                                             f"{body[:60]!r}")
                if r.will_close:
                    conn.close()
                    conn = None
                break
            stop.wait(PAUSE)
        if conn is not None:
            conn.close()

    def status_client(i):
        while not stop.is_set():
            try:
                ok = request(d.socket, {"cmd": "status"}, timeout=30)["ok"]
            except StatusClientError as e:
                tally.add("status refused", str(e))
                stop.wait(0.2)
                continue
            answered[i] += ok
            stop.wait(PAUSE)

    def trickler(family, address, first):
        while not stop.is_set():
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.settimeout(5)
                s.connect(address)
                s.sendall(first)
                while not stop.is_set():
                    s.sendall(b"X")          # a byte now and then, never a whole request
                    if stop.wait(0.5):
                        break
            except OSError:
                # cut off at the server's deadline, or evicted to make room: reconnect
                tally.add(f"slow {'HTTP' if family == socket.AF_INET else 'status'} cut off")
            finally:
                s.close()

    def cycle():
        return wait_for(lambda: request(d.socket, {"cmd": "status"}, timeout=30)["status"][
            "daemon"]["cycle"], 30, interval=0.01, what="the cycle count")

    threads = [threading.Thread(target=scraper, args=(i,), daemon=True)
               for i in range(SCRAPERS)]
    threads += [threading.Thread(target=status_client, args=(i,), daemon=True)
                for i in range(STATUS_CLIENTS)]
    threads += [threading.Thread(target=trickler, args=(
        socket.AF_INET, ("127.0.0.1", d.port), b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
        daemon=True) for _ in range(SLOW_HTTP)]
    threads += [threading.Thread(target=trickler, args=(socket.AF_UNIX, d.socket, b"{"),
                                 daemon=True) for _ in range(SLOW_STATUS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(served) and all(answered), 60,
                 what="every scraper and every status client served once")
        stop.wait(WARMUP)
        rss0 = rss_bytes(pid)
        c0 = cycle()
        t0 = time.monotonic()
        start_served, start_answered, start = list(served), list(answered), tally.snapshot()
        rss = [rss0]                          # every 5 s
        while time.monotonic() - t0 < SECONDS:
            stop.wait(5)
            rss.append(rss_bytes(pid))
            assert d.proc.poll() is None, d.output()
        c1 = cycle()
        elapsed = time.monotonic() - t0
        rss1 = rss_bytes(pid)
        end_served, end_answered, end = list(served), list(answered), tally.snapshot()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    during = {k: end.get(k, 0) - start.get(k, 0) for k in end}
    scrapes = sum(end_served) - sum(start_served)
    answers = sum(end_answered) - sum(start_answered)
    idle_scrapers = sum(1 for a, b in zip(start_served, end_served) if b == a)
    idle_clients = sum(1 for a, b in zip(start_answered, end_answered) if b == a)
    cadence = (c1 - c0) / (elapsed / INTERVAL)
    print(f"\nsoak: {c1 - c0} cycles in {elapsed:.1f} s (cadence {cadence:.3f}); "
          f"{scrapes} scrapes ({scrapes / elapsed:.0f}/s), {answers} status answers "
          f"({answers / elapsed:.0f}/s); {during}; RSS {rss0 / 2**20:.1f} -> "
          f"{rss1 / 2**20:.1f} MiB (every 5 s: {' '.join(f'{r / 2**20:.1f}' for r in rss)}); "
          f"errors {tally.errors[:5]}")
    assert abs(cadence - 1) <= 0.10, f"{c1 - c0} cycles in {elapsed:.1f} s"
    assert rss1 <= rss0 * 1.10 + 8 * 2**20, (rss0, rss1)
    # nobody starved: every scraper and every status client was served during the 60 s
    assert idle_scrapers == 0 and idle_clients == 0, (idle_scrapers, idle_clients)
    assert scrapes > SCRAPERS * 10 and answers > STATUS_CLIENTS * 10, (scrapes, answers)
    failed = during.get("http failed", 0) + during.get("http 503", 0)
    assert failed <= scrapes * 0.01, (during, tally.errors[:5])
    assert during.get("status refused", 0) <= answers * 0.01, tally.errors[:5]
    # the slow clients never finished a request: the server cut them off (or evicted them)
    assert during.get("slow HTTP cut off", 0) >= SLOW_HTTP, during
    assert during.get("slow status cut off", 0) >= SLOW_STATUS, during
