#!/usr/bin/env python3
"""The benchmark command: speed and memory targets, measured on the simulated 8 x H100 node.

    .venv/bin/python tests/bench.py [--cycles 600] [--json]

Prints one line per figure with its target and exits 1 if a target is missed. Targets (2-core
machine): one full daemon cycle (probe, health, cost, events, metrics render, status JSON) under
50 ms CPU; a /metrics scrape under 50 ms at the 99th percentile while wrk hammers it; RSS growth
under 8 MiB over the measured cycles; replay (1 s steps, the real pynvml over the simulated
library) at least 150 simulated seconds per wall second, so a day replays in under 10 minutes;
kernel-log parser at least 100 000 unrelated lines per second.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_cycle(cycles: int, tmp: str) -> dict:
    from gpucostd import config
    from gpucostd.views import metrics
    from gpucostd.views import statusview
    from gpucostd.loop import Daemon
    cfg = config.parse(f'[daemon]\nstate_dir = "{tmp}/state"\nkernel_log = "none"\n'
                       f'socket_path = "{tmp}/s.sock"\n[cost]\ngpu_hour_usd = 4.0\n'
                       '[tuning.gpu]\npower_limit_watts = 600\n[tuning]\n'
                       'verify_interval_seconds = 0.1\n')
    d = Daemon(cfg, simulate="builtin:h100x8", journal=False)
    d.start()
    parts = {"probe": 0.0, "step": 0.0, "render": 0.0}
    for _ in range(50):          # warm up: imports, first apply, caches
        snap = d.step()
        metrics.render(snap)
        statusview.snapshot_json(snap)
    rss0 = rss_mib()
    t_cpu = time.process_time()
    for _ in range(cycles):
        t0 = time.process_time()
        d.gpu_probe.read()
        t1 = time.process_time()
        snap = d.step()
        t2 = time.process_time()
        metrics.render(snap)
        statusview.snapshot_json(snap)
        t3 = time.process_time()
        parts["probe"] += t1 - t0
        parts["step"] += t2 - t1
        parts["render"] += t3 - t2
    total = time.process_time() - t_cpu
    rss1 = rss_mib()
    d.shutdown()
    per = {k: v / cycles * 1000 for k, v in parts.items()}
    return {"cycle_cpu_ms": (parts["step"] + parts["render"]) / cycles * 1000,
            "probe_cpu_ms": per["probe"], "render_cpu_ms": per["render"],
            "rss_mib": rss1, "rss_growth_mib": rss1 - rss0, "cycles": cycles,
            "total_cpu_s": total}


def bench_scrape(tmp: str) -> dict:
    from conftest import DaemonProcess, http_get
    d = DaemonProcess(Path(tmp), extra_config="[cost]\ngpu_hour_usd = 4.0\n", interval=1.0)
    d.start()
    try:
        lat = []
        for _ in range(200):
            t0 = time.perf_counter()
            code, _ = http_get(d.url + "/metrics")
            lat.append(time.perf_counter() - t0)
            assert code == 200
        out = {"scrape_p50_ms": sorted(lat)[100] * 1000, "scrape_p99_ms": sorted(lat)[197] * 1000}
        if shutil.which("wrk"):
            r = subprocess.run(["wrk", "-t1", "-c2", "-d5s", "--latency", d.url + "/metrics"],
                               capture_output=True, text=True, timeout=60)
            m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
            p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", r.stdout)
            if m:
                out["wrk_requests_per_second"] = float(m.group(1))
            if p99:
                scale = {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
                out["wrk_p99_ms"] = float(p99.group(1)) * scale
            # the loop kept cycling under load
            code, body = http_get(d.url + "/healthz")
            out["healthz_under_load"] = code
        return out
    finally:
        d.stop()


def bench_replay() -> dict:
    from gpucostd import config
    from gpucostd.replay import run_replay
    cfg = config.parse("[cost]\ngpu_hour_usd = 4.0\n")
    t0 = time.perf_counter()
    run_replay("builtin:h100x8", cfg, duration=6 * 3600, step=1.0)
    wall = time.perf_counter() - t0
    return {"replay_sim_seconds_per_wall_second": 6 * 3600 / wall}


def bench_parser() -> dict:
    from gpucostd.probes.kernel_log import NvrmParser
    p = NvrmParser()
    lines = [f"[{i}.000] usb 1-1: new high-speed USB device number {i} using xhci_hcd"
             for i in range(200_000)]
    t0 = time.perf_counter()
    for line in lines:
        p.feed(line)
    return {"parser_unrelated_lines_per_second": len(lines) / (time.perf_counter() - t0)}


TARGETS = {  # figure: (comparison, bound)
    "cycle_cpu_ms": ("<", 50.0),
    "scrape_p99_ms": ("<", 50.0),
    "wrk_p99_ms": ("<", 50.0),
    "rss_growth_mib": ("<", 8.0),
    "replay_sim_seconds_per_wall_second": (">", 150.0),
    "parser_unrelated_lines_per_second": (">", 100_000.0),
    "healthz_under_load": ("==", 200),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=600)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results.update(bench_cycle(args.cycles, tmp))
    with tempfile.TemporaryDirectory() as tmp:
        results.update(bench_scrape(tmp))
    results.update(bench_replay())
    results.update(bench_parser())
    failed = []
    for name, value in results.items():
        target = TARGETS.get(name)
        ok = True
        if target:
            op, bound = target
            ok = {"<": value < bound, ">": value > bound, "==": value == bound}[op]
            if not ok:
                failed.append(name)
        if not args.json:
            t = f"  (target {target[0]} {target[1]:g})" if target else ""
            print(f"{'FAIL' if not ok else 'ok  '} {name:<38} {value:>12.2f}{t}")
    if args.json:
        print(json.dumps({"results": results, "failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
