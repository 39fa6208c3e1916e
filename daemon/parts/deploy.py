"""Part "deploy": the deployment guide's facts (nvidia-persistenced running, the model
directories' filesystems and free space: gpucostd.probes.deploy), read at the start, after a
reload and then every tuning verify interval but at most every DEPLOY_SECONDS: they change only
by an operator's hand, and one read walks every process and every TCP socket of the host
(about 30 ms of CPU on a node with 4,000 sockets: 0.1% of a core at a 30 s interval). The host
part's checks judge them."""
from __future__ import annotations

from typing import Any, Optional

from gpucostd.part import Cycle, Part


DEPLOY_SECONDS = 300.0


class DeployPart(Part):
    name = "deploy"

    def __init__(self, probe, checks_section, tuning_section):
        self.probe = probe                  # gpucostd.probes.deploy.DeployProbe
        self.reconfigure_sections(checks_section, tuning_section)
        self._facts: Any = None

    def reconfigure_sections(self, checks_section, tuning_section) -> None:
        self.model_dirs = tuple(checks_section.model_dirs)
        self.interval = max(float(tuning_section.verify_interval_seconds), DEPLOY_SECONDS)
        self._last: Optional[float] = None

    def reconfigure(self, config) -> None:
        self.reconfigure_sections(config.checks, config.tuning)

    def run(self, cycle: Cycle) -> Any:
        if self._last is None or cycle.monotonic - self._last >= self.interval:
            self._last = cycle.monotonic
            self._facts = self.probe.read(self.model_dirs)
        return self._facts
