"""Part "host": the host's facts (kernel, IOMMU, NICs: sysfs/procfs) and the host checks made
from them and from the deploy part's facts (nvidia-persistenced, the model directories), read
again every tuning verify interval (they change rarely)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Tuple

from gpucostd.health.checks import run_checks
from gpucostd.part import Cycle, Part
from gpucostd.snapshot import CheckResult


@dataclass(frozen=True)
class HostData:
    facts: Any = None                      # gpucostd.probes.host.HostFacts
    persistenced: Optional[bool] = None
    checks: Tuple[CheckResult, ...] = ()


class ChecksConfig(NamedTuple):
    """The config sections the host checks read (gpucostd.health.checks.run_checks): [checks]
    and the NIC settings wanted ([tuning.nic.*])."""
    checks: Any
    nic_tuning: Mapping[str, Any]


class HostPart(Part):
    name = "host"

    def __init__(self, host_probe, gateway, checks_section, nic_tuning, tuning_section):
        self.host_probe = host_probe
        self.gateway = gateway
        self._sections(checks_section, nic_tuning, tuning_section)
        self._facts = None
        self._checks: Tuple[CheckResult, ...] = ()

    def _sections(self, checks_section, nic_tuning, tuning_section) -> None:
        self.config = ChecksConfig(checks_section, nic_tuning)
        self.interval = tuning_section.verify_interval_seconds
        self._last: Optional[float] = None

    def reconfigure(self, config) -> None:
        self._sections(config.checks, config.nic_tuning, config.tuning)

    def run(self, cycle: Cycle) -> HostData:
        if self._last is None or cycle.monotonic - self._last >= self.interval:
            self._last = cycle.monotonic
            self._facts = self.host_probe.facts()
            settings = getattr(cycle.data("tuning"), "settings", ())
            gw = self.gateway
            self._checks = tuple(run_checks(self.config, self._facts, cycle.data("gpu", ()),
                                            gw.driver_version, gw.cuda_version, settings,
                                            cycle.data("deploy"), gw.error) or ())
        return HostData(self._facts, getattr(cycle.data("deploy"), "persistenced", None),
                        self._checks)
