"""The drain's findings (node judge rule; the part is gpucostd.parts.drain): while a drain the
node's health asks for is refused, while the engine fails, while a call hangs.

- ``drain_refused`` WARN for the fleet brake and a state that leaves gpucostd out (a reboot
  pending, a down node), OK for the operator's own choices (an opt-out, their drain kept, a
  manual undrain honoured): they are said, not alarmed;
- ``drain_failing`` WARN: the engine's last call failed (its message says how to fix it);
- ``drain_stuck`` WARN: a reconcile has been in flight for more than STUCK_CALLS calls' time.
"""
from __future__ import annotations

from typing import Any, List

from gpucostd.snapshot import Finding, Severity

STUCK_CALLS = 4          # a reconcile is at most state + fleet + act + state calls
WARN_KINDS = ("brake", "blocked")


def drain_findings(inputs: Any) -> List[Finding]:
    data = inputs.data("drain")
    if data is None or data.backend == "none":
        return []
    out: List[Finding] = []
    where = f"{data.backend}" + (f" node {data.node}" if data.node else "")
    if data.refused and data.want:
        sev = Severity.WARN if data.refused in WARN_KINDS else Severity.OK
        out.append(Finding("node", "drain_refused", sev,
                           "docs/runbooks.md, drain refused" if sev == Severity.WARN else
                           "none (the operator's choice)",
                           f"{where}: a drain for {data.want} is refused: "
                           f"{data.refused_message}"[:300], since=data.last_time))
    if data.failing:
        out.append(Finding("node", "drain_failing", Severity.WARN,
                           "docs/runbooks.md, drain failing: fix what the message says",
                           f"{where}: {data.failing}"[:300], since=data.failing_since))
    timeout = inputs.config.drain.timeout_seconds
    if data.busy_since is not None and inputs.now - data.busy_since > STUCK_CALLS * timeout:
        out.append(Finding("node", "drain_stuck", Severity.WARN,
                           "report a bug with the daemon's log: a back end call outlived its "
                           "deadline", f"{where}: an engine call has been running for "
                           f"{inputs.now - data.busy_since:.0f} s", since=data.busy_since))
    return out
