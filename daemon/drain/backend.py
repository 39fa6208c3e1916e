"""The contract every drain back end keeps (Slurm, Kubernetes, hooks).

A back end talks to one engine about this one node. It never decides whether to drain: the
drain part (daemon/parts/drain.py) does, from the node's health and tokens per dollar, the
ownership rules below and the fleet-wide brake. Every call may block on the engine (a
command, an API request): the part runs them off the cycle, each under `timeout`.

Ownership, as Slurm NHC and NVIDIA NVSentinel keep it:
- gpucostd's marks carry REASON_PREFIX (a Slurm reason "gpucostd: <why>", a Kubernetes
  annotation); `ours` is True only while that mark is still on the node.
- A node drained or cordoned by someone else (`drained` and not `ours`) is never undrained,
  and a drain on it only adds gpucostd's marks where the engine allows it without taking over.
- A node undrained by hand after gpucostd drained it is not drained again for the same cause.
- `opted_out`: the operator's opt-out (a Slurm node feature, a Kubernetes label): no change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

REASON_PREFIX = "gpucostd:"


class DrainError(Exception):
    """The engine refused or could not be reached; the message says which and how to fix it."""


@dataclass(frozen=True)
class NodeDrainState:
    """This node as the engine sees it now."""

    drained: bool                # drained, draining or cordoned, by anyone
    ours: bool                   # gpucostd's mark (REASON_PREFIX) is on it
    reason: str = ""             # the engine's reason or cordon note ("" when none)
    opted_out: bool = False      # the operator's opt-out is set
    blocked: str = ""            # why gpucostd must leave it alone now ("" when free), such as
    #                              a reboot pending or a state the engine reports as down


@dataclass(frozen=True)
class FleetDrains:
    """What the brake needs: gpucostd's drains in the fleet (from the engine, not from memory)."""

    ours: int                    # nodes carrying gpucostd's mark now
    recent: int                  # of those, marked within the window asked for
    nodes: int                   # nodes the engine knows in the fleet (or partition)


@dataclass(frozen=True)
class Condition:
    """A node condition to publish where the engine has them (Kubernetes: `GpucostdHealthy`,
    `GpucostdEfficient` in the node's status). Engines without conditions ignore them."""

    type: str                    # "GpucostdHealthy" | "GpucostdEfficient"
    ok: bool                     # status "True" when ok
    reason: str                  # CamelCase, such as "XidCritical" or "BelowFloor"
    message: str


class DrainBackend:
    """One engine. Subclasses implement every method; none keeps state that the engine does
    not hold, so a restarted daemon sees what the last one did."""

    name = "none"

    def state(self, timeout: float) -> NodeDrainState:
        raise NotImplementedError

    def drain(self, reason: str, timeout: float) -> None:
        """Mark the node drained with `reason` (which starts with REASON_PREFIX)."""
        raise NotImplementedError

    def undrain(self, timeout: float) -> None:
        """Remove gpucostd's drain, only if `state().ours`; never another's."""
        raise NotImplementedError

    def fleet(self, window_seconds: float, timeout: float) -> FleetDrains:
        raise NotImplementedError

    def request_reboot(self, reason: str, timeout: float) -> None:
        """Ask the engine to reboot the node when it is idle (Slurm: `scontrol reboot ASAP`).
        Engines without it raise DrainError saying so."""
        raise DrainError(f"the {self.name} back end cannot ask for a reboot")

    def report(self, conditions: Sequence[Condition], timeout: float) -> None:
        """Publish the node's conditions; a no-op where the engine has none."""
        return None

    def describe(self) -> Tuple[str, Optional[str]]:
        """(engine, node name) for status and events."""
        return self.name, None


__all__ = ["REASON_PREFIX", "DrainError", "NodeDrainState", "FleetDrains", "Condition",
           "DrainBackend"]
