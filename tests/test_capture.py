"""`gpucostd capture` turns a node's readings into a scenario that reproduces them."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

from gpucostd.clock import VirtualClock
from gpucostd.hw.nvml import NvmlGateway
from gpucostd.probes.gpu import GpuProbe
from gpucostd.sim.scenario import load_scenario
from gpucostd.sim.nvml import SimulatedNode

FAULTY = """
[node]
model = "NVIDIA A100-SXM4-80GB"
gpu_count = 2
driver_version = "535.104.05"
cuda_version = "12.2"

[[gpu]]
index = 0
temperature = 71
power_limit = 350
power_limit_max = 400
power_limit_default = 400
ecc_volatile_uncorrected = 2
remapped_rows_pending = true
clock_event_reasons = ["SwPowerCap"]
sm_clock = 1275
max_sm_clock = 1410
utilization = 80
violation_counters = false
unsupported = ["memory_temperature", "retired_pages"]

[[gpu]]
index = 1
pcie_link_gen = 3
"""


def read(spec):
    clock = VirtualClock()
    node = SimulatedNode(load_scenario(spec), clock)
    gw = NvmlGateway(library=node.library, clock=clock)
    assert gw.ensure_initialized(), gw.error
    try:
        return GpuProbe(gw).read(), gw
    finally:
        gw.shutdown()


def test_capture_round_trips_every_reading(tmp_path):
    src = tmp_path / "faulty.toml"
    src.write_text(FAULTY)
    out = tmp_path / "captured.toml"
    r = subprocess.run([sys.executable, "-m", "gpucostd", "capture", "--simulate", str(src),
                        "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    original, _ = read(str(src))
    again, gw = read(str(out))
    assert gw.driver_version == "535.104.05" and gw.cuda_version == "12.2"
    for a, b in zip(original, again):
        diff = {f.name: (getattr(a, f.name), getattr(b, f.name))
                for f in dataclasses.fields(a)
                if f.name != "violation_seconds" and getattr(a, f.name) != getattr(b, f.name)}
        assert diff == {}, f"GPU {a.index} differs after capture: {diff}"
    assert original[0].violation_seconds is None and again[0].violation_seconds is None
    assert again[0].memory_temperature_celsius is None      # unsupported stays unsupported
    assert again[0].remapped_rows_pending is True
    assert again[0].clock_event_reasons == ("SwPowerCap",)


def test_capture_without_gpus_says_why(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\n')
    import ctypes
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        import pytest
        pytest.skip("this host has the NVIDIA driver")
    except OSError:
        pass
    r = subprocess.run([sys.executable, "-m", "gpucostd", "capture", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert "no GPUs to capture" in r.stderr and "libnvidia-ml.so.1" in r.stderr
