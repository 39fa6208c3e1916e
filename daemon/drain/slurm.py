"""The Slurm back end: this node's drain through `sinfo` and `scontrol`, as Slurm NHC does it.

- state: `sinfo -h -N -n NODE -O NodeList:0|,StateComplete:0|,Features:0|,Reason:0`. The
  complete state ("idle+drain", "mixed+drain", "down+drain+reboot_issued") names every flag,
  where `%t` abbreviates; the reason comes last, so a "|" in an operator's reason cannot shift
  a field. `Features` holds the opt-out feature.
- drain: `scontrol update NodeName=NODE State=DRAIN Reason=<gpucostd: why>`;
- undrain: `scontrol update NodeName=NODE State=RESUME`, only while the reason is still ours;
- reboot: `scontrol reboot ASAP nextstate=RESUME reason=<gpucostd: why> NODE`;
- the brake's fleet: every node's complete state, reason time (`Timestamp`) and reason.
Commands run as argv lists (never a shell), each under the caller's timeout (a hung scontrol
is killed), with SLURM_CONF set when [drain.slurm] conf names a slurm.conf. It keeps no state.
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Tuple

from gpucostd.drain.backend import (REASON_PREFIX, DrainBackend, DrainError, FleetDrains,
                                    NodeDrainState)

STATE_FORMAT = "NodeList:0|,StateComplete:0|,Features:0|,Reason:0"
FLEET_FORMAT = "NodeList:0|,StateComplete:0|,Timestamp:0|,Reason:0"
DRAIN_FLAGS = frozenset({"drain", "drained", "draining", "fail", "failing"})
REBOOT_FLAGS = frozenset({"reboot", "reboot_requested", "reboot_issued"})
SUFFIXES = "*~#!%$@^-"          # sinfo's marks after a state (not responding, powered off...)
MAX_REASON = 200
MAX_OUTPUT = 4 << 20            # a fleet of 10 000 nodes is well under this


def _flags(state: str) -> Tuple[str, frozenset]:
    """("idle", {"idle", "drain"}) from "idle+drain" (base state and every flag, lower case)."""
    parts = [p.strip().rstrip(SUFFIXES).lower() for p in state.split("+") if p.strip()]
    return (parts[0] if parts else ""), frozenset(parts)


def _reason(text: str) -> str:
    text = text.strip()
    return "" if text in ("none", "(null)") else text


def clean_reason(reason: str) -> str:
    """A reason Slurm stores as it is: one line, printable, at most MAX_REASON characters."""
    # scontrol takes quotes in a value as its own (a '"' would be dropped)
    text = "".join(c if c.isprintable() else " " for c in reason).replace('"', "'").strip()
    return text[:MAX_REASON]


def _fix(stderr: str, program: str) -> str:
    """What to do about an scontrol/sinfo failure, from its words."""
    low = stderr.lower()
    if "munge" in low or "credential" in low or "authentication" in low or "zero bytes" in low:
        return ("check that munged runs on this node and that its key (/etc/munge/munge.key) is "
                "the controller's")
    if "unable to contact" in low or "connection refused" in low or "timed out" in low or \
            "communication" in low:
        return ("check that slurmctld runs and that [drain.slurm] conf (SLURM_CONF) names this "
                "cluster's slurm.conf")
    if "invalid node name" in low:
        return "set [drain] node_name to this node's NodeName in slurm.conf"
    if "permission" in low or "access denied" in low or "not authorized" in low:
        return "run gpucostd as root or as a Slurm operator (SlurmUser, or AdminLevel=Operator)"
    if "rebootprogram" in low:
        return "set RebootProgram in slurm.conf, or [drain] reboot = false"
    return f"run the same {program} command by hand to see why"


class SlurmBackend(DrainBackend):
    name = "slurm"

    def __init__(self, settings, node_name: str, clock=None):
        self.scontrol = settings.scontrol
        self.sinfo = settings.sinfo
        self.conf = settings.conf
        self.opt_out = settings.opt_out_feature
        self.node = node_name

    # ------------------------------------------------------------------ commands
    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        if self.conf:
            env["SLURM_CONF"] = self.conf
        return env

    def _run(self, argv: List[str], timeout: float) -> str:
        program = argv[0]
        if self.conf and not os.path.isfile(self.conf):
            raise DrainError(f"[drain.slurm] conf = {self.conf!r} is not a file: point it at "
                             f"the cluster's slurm.conf (or leave it empty for Slurm's own)")
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, env=self._env(), check=False)
        except FileNotFoundError:
            key = "sinfo" if program == self.sinfo else "scontrol"
            raise DrainError(f"{program} not found: install Slurm's client commands "
                             f"(Debian: slurm-client) or set [drain.slurm] {key} to its "
                             f"path") from None
        except PermissionError:
            raise DrainError(f"{program} cannot be run (permission denied): fix its mode or "
                             f"[drain.slurm] path") from None
        except subprocess.TimeoutExpired:
            raise DrainError(f"`{' '.join(argv[:3])} ...` took longer than {timeout:g} s and "
                             f"was killed: check that slurmctld answers (`scontrol ping`), or "
                             f"raise [drain] timeout_seconds") from None
        except OSError as e:
            raise DrainError(f"{program} cannot be run: {e.strerror or e}") from None
        out = done.stdout[:MAX_OUTPUT].decode("utf-8", "replace")
        if done.returncode != 0:
            err = (done.stderr.decode("utf-8", "replace").strip() or out.strip() or
                   f"exit status {done.returncode}")
            err = " ".join(err.split())[:300]
            raise DrainError(f"`{' '.join(argv[:3])} ...` failed: {err}; "
                             f"{_fix(err, os.path.basename(program))}")
        return out

    # ------------------------------------------------------------------ the contract
    def state(self, timeout: float) -> NodeDrainState:
        out = self._run([self.sinfo, "-h", "-N", "-n", self.node, "-O", STATE_FORMAT], timeout)
        for line in out.splitlines():
            fields = line.split("|", 3)
            if len(fields) == 4 and fields[0].strip() == self.node:
                return self._node_state(fields[1], fields[2], fields[3])
        raise DrainError(f"Slurm does not know a node named {self.node!r}: set [drain] "
                         f"node_name to this node's NodeName in slurm.conf (`sinfo -N` lists "
                         f"them)")

    def _node_state(self, state: str, features: str, reason_text: str) -> NodeDrainState:
        base, flags = _flags(state)
        reason = _reason(reason_text)
        drained = bool(flags & DRAIN_FLAGS)
        ours = reason.startswith(REASON_PREFIX) and bool(drained or flags & REBOOT_FLAGS or
                                                        "down" in flags)
        opted = bool(self.opt_out) and self.opt_out in [f.strip() for f in
                                                        features.split(",")]
        blocked = ""
        if flags & REBOOT_FLAGS:
            blocked = f"a reboot is pending ({state.strip()})"
        elif "down" in flags and not ours:
            blocked = f"the node is down ({state.strip()})"
        elif drained and not reason:
            blocked = "drained with no reason"
        elif not base:
            blocked = f"Slurm gave no state for the node ({state.strip()!r})"
        return NodeDrainState(drained=drained or ours, ours=ours, reason=reason,
                              opted_out=opted, blocked=blocked)

    def drain(self, reason: str, timeout: float) -> None:
        self._run([self.scontrol, "update", f"NodeName={self.node}", "State=DRAIN",
                   f"Reason={clean_reason(reason)}"], timeout)

    def undrain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        now = self.state(timeout)
        if not now.ours:
            return              # not ours (any more): never another's drain
        self._run([self.scontrol, "update", f"NodeName={self.node}", "State=RESUME"],
                  max(0.5, deadline - time.monotonic()))

    def request_reboot(self, reason: str, timeout: float) -> None:
        self._run([self.scontrol, "reboot", "ASAP", "nextstate=RESUME",
                   f"reason={clean_reason(reason)}", self.node], timeout)

    def fleet(self, window_seconds: float, timeout: float) -> FleetDrains:
        out = self._run([self.sinfo, "-h", "-N", "-O", FLEET_FORMAT], timeout)
        # sinfo's reason times are the controller's wall clock: compared with this host's
        # real one (never a virtual clock's)
        return fleet_from(out, time.time(), window_seconds)

    def describe(self) -> Tuple[str, Optional[str]]:
        return self.name, self.node


def _stamp(text: str) -> Optional[float]:
    """sinfo's reason time ("2026-12-08T02:04:19", local time) as epoch seconds."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def fleet_from(out: str, now: float, window_seconds: float) -> FleetDrains:
    """FleetDrains from `sinfo -h -N -O FLEET_FORMAT` (a node in two partitions counts once)."""
    seen: Dict[str, Tuple[bool, bool]] = {}
    for line in out.splitlines():
        fields: Sequence[str] = line.split("|", 3)
        if len(fields) != 4 or not fields[0].strip():
            continue
        name = fields[0].strip()
        _base, flags = _flags(fields[1])
        reason = _reason(fields[3])
        ours = reason.startswith(REASON_PREFIX) and bool(flags & (DRAIN_FLAGS | REBOOT_FLAGS))
        at = _stamp(fields[2])
        seen[name] = (ours, ours and at is not None and now - at <= window_seconds)
    return FleetDrains(ours=sum(o for o, _r in seen.values()),
                       recent=sum(r for _o, r in seen.values()), nodes=len(seen))


__all__ = ["SlurmBackend", "fleet_from", "clean_reason"]
