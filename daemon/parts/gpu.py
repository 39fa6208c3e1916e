"""Part "gpu": every GPU's reading (NVML brought up again first if it went away)."""
from __future__ import annotations

from typing import Tuple

from gpucostd.part import Cycle, Part


class GpuPart(Part):
    name = "gpu"

    def __init__(self, gateway, probe):
        self.gateway = gateway
        self.probe = probe

    def run(self, cycle: Cycle) -> Tuple:
        self.gateway.ensure_initialized()
        return tuple(self.probe.read() or ())
