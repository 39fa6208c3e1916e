"""The node judge: the node-level findings of a cycle and the node's health, made from what the
cycle's parts returned (gpucostd.part). The loop runs the parts and hands their results here;
it judges nothing itself.

Rules, each a method over a ``NodeInputs`` (a new part's rule is a function given to
``NodeJudge(rules=...)`` or ``add_rule``: same signature, returns findings):
- ``part_failed`` (WARN): a part raised; one finding per part, naming it;
- ``inference_unreachable`` (WARN): an endpoint gave no reading or an error (since when);
- the serving diagnosis and the tokens-per-dollar floor (gpucostd.health.efficiency; the
  floor's transition is an event that runs the hooks);
- ``kernel_log_lines_lost`` (WARN, for LOSS_FINDING_SECONDS after the last loss);
- ``state_dir_unusable`` (WARN), ``config_insecure`` (WARN), ``originals_unreadable`` (WARN);
- ``prices_illustrative`` (OK): a simulated node priced at its scenario's illustrative prices;
- ``drain_refused``, ``drain_failing``, ``drain_stuck``: the drain part's (gpucostd.health.drain).
The node's health is the worst of the GPU judge's node health and the node findings; UNKNOWN
while no GPU is read and NVML is not available.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.config import PRICES_FIX
from gpucostd.snapshot import Event, Finding, Severity, worst

LOG = logging.getLogger("gpucostd")
LOSS_FINDING_SECONDS = 600.0
PART_ACTION = "report a bug with the daemon's log (the part's error is logged once)"
ORIGINALS_ACTION = ("fix or move aside originals.json, then `systemctl reload gpucostd` "
                    "(docs/tuning.md, saved originals unreadable)")


@dataclass
class NodeInputs:
    """One cycle as the node judge sees it. ``results`` maps a part's name to its
    gpucostd.part.PartResult; ``data(name)`` is what the part returned (None if it failed)."""

    now: float
    results: Mapping[str, Any]
    config: Any
    started_at: float
    nvml_available: bool = True
    endpoints: Sequence[str] = ()           # the inference endpoints' URLs, in reading order
    events: List[Event] = field(default_factory=list)   # events a rule reports (hooks run)

    def data(self, name: str, default: Any = None) -> Any:
        r = self.results.get(name)
        return r.data if r is not None and r.ok and r.data is not None else default


@dataclass(frozen=True)
class NodeVerdict:
    findings: Tuple[Finding, ...]           # the GPU judge's and the node's
    gpu_health: Dict[int, Severity]
    node_health: Severity


Rule = Callable[[NodeInputs], Sequence[Finding]]


class NodeJudge:
    """Keeps what the node rules remember across cycles (since when an endpoint is down, the
    serving diagnosis' windows)."""

    def __init__(self, rules: Sequence[Rule] = ()):
        from gpucostd.health.drain import drain_findings
        from gpucostd.health.efficiency import EfficiencyJudge
        self._down_since: Dict[str, float] = {}
        self._failed: Dict[str, str] = {}          # rule -> its last error (logged once)
        self._efficiency = EfficiencyJudge()
        self.rules: List[Rule] = [self.inference_unreachable, self.efficiency,
                                  self.kernel_log_lines_lost, self.state_dir_unusable,
                                  self.config_insecure, self.originals_unreadable,
                                  self.prices_illustrative, drain_findings] + list(rules)

    def add_rule(self, rule: Rule) -> None:
        self.rules.append(rule)

    def judge(self, inputs: NodeInputs) -> NodeVerdict:
        report = inputs.data("health")          # gpucostd.health.judge.HealthReport
        gpus = inputs.data("gpu", ())
        findings: List[Finding] = list(report.findings) if report is not None else []
        failed: Dict[str, str] = {}
        for rule in self.rules:
            name = getattr(rule, "__name__", "rule")
            try:
                findings.extend(rule(inputs) or ())
            except Exception as e:  # noqa: BLE001 - a rule's bug is one finding, not a crash
                failed[name] = f"{type(e).__name__}: {e}"
                if self._failed.get(name) != failed[name]:
                    LOG.exception("node rule %s failed (the daemon goes on)", name)
        self._failed = failed
        findings.extend(self.part_failed(inputs))
        findings.extend(Finding("node", "part_failed", Severity.WARN, PART_ACTION,
                                f"node rule {name} failed: {msg}"[:200], since=inputs.now)
                        for name, msg in failed.items())
        gpu_health = dict(report.gpu_health) if report is not None else {
            g.index: Severity.UNKNOWN for g in gpus}
        node_health = report.node_health if report is not None else Severity.UNKNOWN
        node = [f.severity for f in findings if f.subject == "node"]
        if node:
            node_health = worst([node_health] + node)
        if not gpus and not inputs.nvml_available:
            node_health = worst([node_health, Severity.UNKNOWN])
        return NodeVerdict(tuple(findings), gpu_health, node_health)

    # ------------------------------------------------------------------ the rules
    @staticmethod
    def part_failed(inputs: NodeInputs) -> List[Finding]:
        return [Finding("node", "part_failed", Severity.WARN, PART_ACTION,
                        f"part {r.name} failed: {r.error}"[:200], since=inputs.now)
                for r in inputs.results.values() if not r.ok]

    def inference_unreachable(self, inputs: NodeInputs) -> List[Finding]:
        readings = inputs.data("inference", ())
        out, down = [], {}
        for k, url in enumerate(inputs.endpoints):
            r = readings[k] if k < len(readings) else None
            error = getattr(r, "error", None)
            if r is None or error:
                since = down[url] = self._down_since.get(url, inputs.now)
                where = ("[inference] metrics_url" if inputs.config.inference.metrics_url
                         else "the [[inference.endpoint]] url")
                out.append(Finding("node", "inference_unreachable", Severity.WARN,
                                   f"check {where} and the inference server",
                                   f"inference metrics at {url}: {error or 'no reading'}",
                                   since=since))
        self._down_since = down
        return out

    def efficiency(self, inputs: NodeInputs) -> List[Finding]:
        """The floor's events (which run the on_inefficient / on_efficient hooks) and the
        serving diagnosis (gpucostd.health.efficiency)."""
        from gpucostd.health.efficiency import floor_event
        cost = inputs.data("cost")
        report = getattr(cost, "report", None)
        transition = getattr(cost, "floor_transition", None)
        if transition is not None and report is not None:
            inputs.events.append(floor_event(transition, report, inputs.config, inputs.now))
        return self._efficiency.judge(inputs.data("gpu", ()), report,
                                      inputs.data("inference", ()), inputs.config, inputs.now)

    @staticmethod
    def kernel_log_lines_lost(inputs: NodeInputs) -> List[Finding]:
        """Kernel-log records the kernel overwrote before they were read: a WARN finding for
        LOSS_FINDING_SECONDS after the last loss (Xid lines may have been among them)."""
        status = getattr(inputs.data("kernel_log"), "status", None)
        lost = getattr(status, "lines_lost", 0)
        last = getattr(status, "last_loss_time", None)
        if not lost or last is None or inputs.now - last > LOSS_FINDING_SECONDS:
            return []
        return [Finding("node", "kernel_log_lines_lost", Severity.WARN,
                        "check `dmesg` / `journalctl -k` for NVRM Xid lines; find what floods "
                        "the kernel log (or raise log_buf_len)",
                        f"{lost} kernel log records were overwritten before gpucostd read them "
                        f"(a flood); Xid faults among them are missed", since=last)]

    @staticmethod
    def state_dir_unusable(inputs: NodeInputs) -> List[Finding]:
        status = inputs.data("state_dir")
        if status is None or status.problem is None:
            return []
        return [Finding("node", "state_dir_unusable", Severity.WARN,
                        "free space on / make writable daemon.state_dir; events are kept in "
                        "memory meanwhile", status.problem, since=status.since)]

    @staticmethod
    def config_insecure(inputs: NodeInputs) -> List[Finding]:
        return [Finding("node", "config_insecure", Severity.WARN,
                        "make the file writable by root only (see the message)", w[:300],
                        since=inputs.started_at)
                for w in inputs.config.warnings]

    @staticmethod
    def originals_unreadable(inputs: NodeInputs) -> List[Finding]:
        tuning = inputs.data("tuning")
        problem: Optional[str] = getattr(tuning, "originals_problem", None)
        if problem is None:
            return []
        return [Finding("node", "originals_unreadable", Severity.WARN, ORIGINALS_ACTION,
                        problem, since=tuning.originals_since)]

    @staticmethod
    def prices_illustrative(inputs: NodeInputs) -> List[Finding]:
        note = inputs.config.price_note
        if not note:
            return []
        return [Finding("node", "prices_illustrative", Severity.OK, PRICES_FIX, note,
                        since=inputs.started_at)]
