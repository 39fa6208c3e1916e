"""Load held: 200 concurrent status-socket clients plus slow (trickling) clients for 60 s against
the real daemon on loopback, while the loop keeps its cadence within 10% and RSS stays flat.

One test, about 75 s; it runs once in the suite (marked slow: `-m "not slow"` leaves it out).
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import wait_for

pytestmark = pytest.mark.slow

CLIENTS = 200
SLOW_CLIENTS = 20
SECONDS = 60.0
INTERVAL = 1.0


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_soak_many_and_slow_status_clients_keep_cadence_and_memory(daemon_factory):
    from gpucostd.views.statusapi import StatusClientError, request
    d = daemon_factory(interval=INTERVAL).start()
    pid = d.proc.pid
    stop = threading.Event()
    answered, refused = [0], []
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            try:
                ok = request(d.socket, {"cmd": "status"}, timeout=30)["ok"]
            except StatusClientError as e:
                with lock:
                    refused.append(str(e))
                time.sleep(0.2)
                continue
            with lock:
                answered[0] += ok
            stop.wait(0.05)

    def slow_client():
        while not stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(5)
                s.connect(d.socket)
                while not stop.is_set():
                    s.sendall(b" ")           # a byte now and then, never a whole request
                    if stop.wait(0.5):
                        break
            except OSError:
                pass                          # cut off at the server's deadline: reconnect
            finally:
                s.close()

    def cycle():
        return wait_for(lambda: request(d.socket, {"cmd": "status"}, timeout=30)["status"][
            "daemon"]["cycle"], 30, interval=0.01, what="the cycle count")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    threads += [threading.Thread(target=slow_client, daemon=True) for _ in range(SLOW_CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: answered[0] >= CLIENTS, 30, what="every client answered once")
        time.sleep(5)                         # warm: caches, thread stacks, allocator arenas
        rss0 = rss_bytes(pid)
        c0 = cycle()
        t0 = time.monotonic()
        rss_peak = rss0
        while time.monotonic() - t0 < SECONDS:
            stop.wait(5)
            rss_peak = max(rss_peak, rss_bytes(pid))
            assert d.proc.poll() is None, d.output()
        c1 = cycle()
        elapsed = time.monotonic() - t0
        rss1 = rss_bytes(pid)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    expected = elapsed / INTERVAL
    cadence = (c1 - c0) / expected
    print(f"soak: {answered[0]} answers, {len(refused)} refused, {c1 - c0} cycles in "
          f"{elapsed:.1f} s (cadence {cadence:.3f}), RSS {rss0 / 2**20:.1f} -> "
          f"{rss1 / 2**20:.1f} MiB (peak {rss_peak / 2**20:.1f})")
    assert abs(cadence - 1) <= 0.10, f"{c1 - c0} cycles in {elapsed:.1f} s"
    assert rss1 <= rss0 * 1.10 + 8 * 2**20, (rss0, rss1)
    assert answered[0] > CLIENTS * 10
    assert len(refused) <= answered[0] * 0.01, refused[:5]
