"""Part "drain": drain this node through the fleet's engine (Slurm, Kubernetes) while its health
is CRIT or the tokens-per-dollar floor holds, and undrain it when that is over; only what
gpucostd drained, never an operator's drain.

Level-triggered: each cycle says what it wants (a cause, or none) from this cycle's data (the
GPU judge's node health, the floor's state); a reconcile reads the node's drain state from the
engine and acts on the difference, so a restarted daemon sees what the engine holds. The only
thing kept outside the engine is "an operator undrained our drain for cause X" (drain.json in
the state directory): no re-drain for that cause until the node recovers and faults again.

Engine calls run off the cycle on one worker thread, one reconcile at a time, each call under
[drain] timeout_seconds; the cycle never waits. What happened comes back as events on a later
cycle: drain_requested, drained, undrained, drain_refused (brake, opt-out, the operator's
drain, manual undrain, blocked), drain_failed, drain_dry_run. The part's data (DrainData) holds
the engine's last state, the refusal or failure of now (the node judge makes findings of them,
gpucostd.health.drain) and the counts of actions for the metrics.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from gpucostd.drain.backend import REASON_PREFIX, Condition, DrainError, NodeDrainState
from gpucostd.part import Cycle, Part
from gpucostd.snapshot import Event, Severity

LOG = logging.getLogger("gpucostd")
STATE_FILE = "drain.json"
RESYNC_SECONDS = 30.0         # read the engine again this often while nothing changes
REBOOT_GUARD_SECONDS = 3600.0     # a CRIT within this long of our reboot request drains
CRITICAL, INEFFICIENT = "critical", "inefficient"


@dataclass(frozen=True)
class Want:
    """What this cycle asks of the engine: a drain for `cause` (None: no drain)."""

    cause: Optional[str] = None        # "critical" | "inefficient" | None
    why: str = ""                      # the finding, in words (goes into the reason)
    reboot: bool = False               # the CRIT's recommended action is a reboot or reset
    hold: bool = False                 # cannot tell (health UNKNOWN, a part failed): no change
    conditions: Tuple[Condition, ...] = ()     # to publish where the engine has them

    @property
    def reason(self) -> str:
        return f"{REASON_PREFIX} {self.cause}: {self.why}"[:200]


@dataclass(frozen=True)
class DrainData:
    """The drain part's data for the judge and the views."""

    backend: str = "none"
    node: Optional[str] = None
    dry_run: bool = False
    state: str = "unknown"             # "free" | "ours" | "others" | "unknown"
    reason: str = ""                   # the engine's reason for the node's drain
    want: Optional[str] = None         # the cause this cycle asks a drain for
    refused: str = ""                  # kind: "brake" "opt_out" "operator" "manual_undrain"
    #                                    "blocked" ("" while nothing is refused)
    refused_message: str = ""
    failing: str = ""                  # the last engine error, while the engine fails
    failing_since: Optional[float] = None
    busy_since: Optional[float] = None     # a reconcile in flight since (wall time)
    last_action: Optional[str] = None  # "drain" "undrain" "reboot" "refuse" ... and its result
    last_result: Optional[str] = None
    last_time: Optional[float] = None
    last_message: str = ""
    actions: Mapping[Tuple[str, str], int] = field(default_factory=dict)


def node_name(configured: str) -> str:
    """The engine's name for this node: [drain] node_name, else the short hostname."""
    return configured or socket.gethostname().split(".")[0]


def make_backend(config, clock):
    """The configured back end (None for "none"), imported only when it is configured."""
    cfg = config.drain
    if cfg.backend == "slurm":
        from gpucostd.drain.slurm import SlurmBackend
        return SlurmBackend(cfg.slurm, node_name(cfg.node_name), clock)
    if cfg.backend == "kubernetes":
        from gpucostd.drain.kubernetes import KubernetesBackend
        # the DaemonSet gives the pod its node's name (KUBE_NODE_NAME from spec.nodeName): the
        # host name inside a pod need not be the node's
        name = cfg.node_name or os.environ.get("KUBE_NODE_NAME", "").strip()
        return KubernetesBackend(settings=cfg.kubernetes, node_name=node_name(name),
                                 clock=clock, read_only=cfg.dry_run)
    return None


def drain_parts(daemon) -> List[Part]:
    """The loop's drain part: none for a one-shot command (it never drains the node)."""
    return [] if daemon.one_shot else [DrainPart(daemon.config, daemon.state_dir, daemon.clock)]


def want_from(cycle: Cycle, cfg) -> Want:
    """The drain this cycle asks for, from the GPU judge's node health and the floor."""
    report = cycle.data("health")
    if cfg.on_critical and (report is None or report.node_health == Severity.UNKNOWN):
        return Want(hold=True)         # never undrain a node whose health cannot be told
    if cfg.on_critical and report.node_health == Severity.CRIT:
        crit = [f for f in report.findings if f.severity == Severity.CRIT]
        why = "; ".join(f"{f.subject} {f.code}" for f in crit[:3]) or "node health CRIT"
        reboot = any(("reboot" in (f.action or "").lower() or "reset" in
                      (f.action or "").lower()) for f in crit)
        return Want(CRITICAL, why, reboot)
    if cfg.on_inefficient:
        report = getattr(cycle.data("cost"), "report", None)
        if report is None:
            return Want(hold=True)
        floor = ((getattr(report, "efficiency", None) or {}).get("floor") or {})
        if floor.get("inefficient"):
            return Want(INEFFICIENT, "tokens per dollar below [efficiency] "
                        "min_tokens_per_dollar")
    return Want()


def conditions_from(cycle: Cycle, floor_on: bool) -> Tuple[Condition, ...]:
    """The node's conditions (Kubernetes: GpucostdHealthy, GpucostdEfficient in its status):
    healthy unless the GPU judge says CRIT; efficient unless the floor holds (only while a
    floor is set). None while the health cannot be told."""
    report = cycle.data("health")
    if report is None or report.node_health == Severity.UNKNOWN:
        return ()
    crit = [f for f in report.findings if f.severity == Severity.CRIT]
    out = [Condition("GpucostdHealthy", True, "Healthy", f"node health "
                     f"{report.node_health.name}") if report.node_health != Severity.CRIT else
           Condition("GpucostdHealthy", False, "CriticalFault", "; ".join(
               f"{f.subject} {f.code} ({f.action})" for f in crit[:3])[:300] or "node CRIT")]
    cost = getattr(cycle.data("cost"), "report", None)
    if floor_on and cost is not None:
        floor = ((getattr(cost, "efficiency", None) or {}).get("floor") or {})
        out.append(Condition("GpucostdEfficient", False, "BelowFloor", "tokens per dollar "
                             "below [efficiency] min_tokens_per_dollar for window_seconds")
                   if floor.get("inefficient") else
                   Condition("GpucostdEfficient", True, "AtOrAboveFloor",
                             "tokens per dollar at or above the floor"))
    return tuple(out)


def cause_of(reason: str) -> Optional[str]:
    """The cause gpucostd wrote into a reason ("gpucostd: critical: ..." -> "critical")."""
    if not reason.startswith(REASON_PREFIX):
        return None
    head = reason[len(REASON_PREFIX):].strip().split(":", 1)[0].strip()
    return head if head in (CRITICAL, INEFFICIENT) else None


class DrainPart(Part):
    name = "drain"

    def __init__(self, config, state_dir: str, clock, backend_factory: Callable = make_backend):
        self.clock = clock
        self.state_dir = state_dir
        self.resync_seconds = RESYNC_SECONDS   # read the engine again this often, unchanged
        self._factory = backend_factory
        self._lock = threading.Lock()
        self._jobs: "queue.Queue[Optional[Tuple[Any, Any, Want]]]" = queue.Queue()
        self._events: List[Event] = []
        self._thread: Optional[threading.Thread] = None
        self._busy_since: Optional[float] = None
        self._last_sync = float("-inf")
        self._last_want: Optional[Want] = None
        self._data = DrainData()
        self._actions: Dict[Tuple[str, str], int] = {}
        self._said: Optional[Tuple[str, ...]] = None     # the last refusal/failure told
        self._seen_ours: Optional[str] = None     # cause of our drain this process last saw
        self._file: Dict[str, Any] = {}          # drain.json
        self._manual = self._load_manual()
        self._configure(config)

    # ------------------------------------------------------------------ config
    def _configure(self, config) -> None:
        self.cfg, self._config = config.drain, config
        self._settings = config.as_dict()["drain"]
        self.backend = None
        self._last_want = None             # reconcile at once with the new settings
        with self._lock:
            self._data = DrainData(backend=self.cfg.backend, dry_run=self.cfg.dry_run,
                                   actions=dict(self._actions))
        self._build()

    def _build(self) -> None:
        """The back end from the settings; one that cannot start (its module missing, no
        service-account token yet) is a drain_failing finding, tried again every resync."""
        failed = None
        try:
            self.backend = self._factory(self._config, self.clock)
        except ImportError as e:
            failed = f"the {self.cfg.backend} back end is not installed ({e})"
        except (DrainError, OSError, ValueError) as e:
            failed = f"the {self.cfg.backend} back end cannot start: {e}"
        if failed is not None:
            self._last_sync = self.clock.monotonic()      # the next try: one resync later
        with self._lock:
            if failed is not None:
                self._data = _replace(self._data, failing=failed,
                                      failing_since=self._data.failing_since or
                                      self.clock.time())
            elif self.backend is not None:
                engine, node = self.backend.describe()
                self._data = _replace(self._data, backend=engine, node=node, failing="",
                                      failing_since=None)

    def reconfigure(self, config) -> None:
        """A reload: a new back end only when [drain] changed (the next cycle reconciles)."""
        if config.as_dict()["drain"] != self._settings:
            self._configure(config)
        self._config = config             # (the floor's settings: the conditions)

    # ------------------------------------------------------------------ the cycle
    def run(self, cycle: Cycle) -> DrainData:
        with self._lock:
            cycle.events.extend(self._events)
            self._events = []
        mono = cycle.monotonic
        if self.backend is None and self.cfg.backend != "none" and \
                mono - self._last_sync >= self.resync_seconds:
            self._last_sync = mono
            self._build()
        if self.backend is None:
            with self._lock:
                return self._data
        want = want_from(cycle, self.cfg)
        floor_on = getattr(getattr(self._config, "efficiency", None), "min_tokens_per_dollar",
                           0) > 0
        want = replace(want, conditions=conditions_from(cycle, floor_on))
        with self._lock:
            busy = self._busy_since is not None
        if not busy and (want != self._last_want or mono - self._last_sync >= self.resync_seconds):
            self._last_want, self._last_sync = want, mono
            self._submit(want)
        with self._lock:
            self._data = _replace(self._data, want=want.cause, busy_since=self._busy_since,
                                  actions=dict(self._actions))
            return self._data

    def _submit(self, want: Want) -> None:
        with self._lock:
            self._busy_since = self.clock.time()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="gpucostd-drain",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((self.backend, self.cfg, want))

    def close(self, timeout: float = 1.0) -> None:
        """Stop the worker (the loop's shutdown, tests); a call in flight ends at its
        deadline."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once no reconcile is in flight (tests and one-shot commands)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._busy_since is None:
                    return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)

    # ------------------------------------------------------------------ the worker
    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            backend, cfg, want = job
            try:
                self._reconcile(backend, cfg, want)
            except DrainError as e:
                self._failed(backend, want, str(e))
            except Exception as e:  # noqa: BLE001 - a back end's bug: a failure, not a crash
                LOG.exception("drain back end %s failed", getattr(backend, "name", "?"))
                self._failed(backend, want, f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._busy_since = None

    def _reconcile(self, backend, cfg, want: Want) -> None:
        self._reconcile_drain(backend, cfg, want)
        if want.conditions and not cfg.dry_run:     # a dry run changes nothing, these neither
            backend.report(want.conditions, cfg.timeout_seconds)

    def _reconcile_drain(self, backend, cfg, want: Want) -> None:
        t = cfg.timeout_seconds
        st = backend.state(t)
        self._saw(st)
        if want.hold or (st.opted_out and st.ours):     # cannot tell; or the operator's
            self._settled()                             # opt-out: no change at all
            return
        if self._manual is not None and want.cause != self._manual:
            self._set_manual(None)          # recovered (or another cause): the mark is spent
        if want.cause is None:
            if st.ours and not st.blocked:
                self._act(backend, cfg, "undrain", want, st)
            else:
                self._settled()
            self._seen_ours = None if not st.ours else self._seen_ours
            return
        if st.ours:
            self._seen_ours = cause_of(st.reason) or want.cause
            self._settled()
            return
        if self._seen_ours == want.cause and not st.drained:
            self._seen_ours = None
            self._set_manual(want.cause)
        if self._manual == want.cause:
            return self._refuse("manual_undrain", want, "the node was undrained by hand after "
                                f"gpucostd drained it for {want.cause}; no drain again until it "
                                f"recovers and faults again", Severity.OK)
        if st.opted_out:
            return self._refuse("opt_out", want, "the node opts out of gpucostd's drains "
                                f"({self._opt_out_name(cfg)})", Severity.OK)
        if st.blocked:
            return self._refuse("blocked", want, f"the engine's state leaves gpucostd out: "
                                f"{st.blocked}", Severity.WARN)
        if st.drained:
            return self._refuse("operator", want, f"already drained by someone else "
                                f"(reason {st.reason or 'none'!r}); their drain is kept",
                                Severity.OK)
        share = cfg.brake_share if want.cause == CRITICAL else cfg.inefficient_brake_share
        fleet = backend.fleet(cfg.brake_window_seconds, t)
        if fleet.recent >= 1 and (fleet.recent + 1) > share * max(fleet.nodes, 1):
            return self._refuse("brake", want, f"fleet brake: gpucostd drained {fleet.recent} "
                                f"of {fleet.nodes} nodes in the last "
                                f"{cfg.brake_window_seconds:g} s; one more would pass the "
                                f"share {share:g}", Severity.WARN)
        reboot = want.reboot and cfg.reboot and backend.name == "slurm" and not self._rebooted()
        self._act(backend, cfg, "reboot" if reboot else "drain", want, st)

    @staticmethod
    def _opt_out_name(cfg) -> str:
        if cfg.backend == "slurm":
            return f"Slurm feature {cfg.slurm.opt_out_feature}"
        return f"label {cfg.kubernetes.opt_out_label}"

    def _act(self, backend, cfg, action: str, want: Want, st: NodeDrainState) -> None:
        reason = want.reason
        what = {"drain": f"drain the node ({reason!r})",
                "reboot": f"ask for a reboot when idle, then resume ({reason!r})",
                "undrain": f"undrain the node (gpucostd's drain {st.reason!r}; "
                           f"the cause is over)"}[action]
        if cfg.dry_run:
            self._emit("drain_dry_run", Severity.OK, "none (dry run: [drain] dry_run = true)",
                       f"dry run: would {what}", action, "dry_run", key=("dry", action))
            return
        if action != "undrain":
            self._emit("drain_requested", Severity.OK, "none", f"asking {backend.name} to "
                       f"{what}", action, "requested", key=None)
        t = cfg.timeout_seconds
        if action == "drain":
            backend.drain(reason, t)
        elif action == "reboot":
            backend.request_reboot(reason, t)
        else:
            backend.undrain(t)
        self._saw(backend.state(t))
        if action == "undrain":
            self._seen_ours = None
            self._emit("undrained", Severity.OK, "none", f"{backend.name}: undrained the node; "
                       f"gpucostd's drain {st.reason!r} is over", action, "ok", key=None)
        else:
            self._seen_ours = want.cause
            if action == "reboot":
                self._save(reboot_time=self.clock.time())
            self._emit("drained", Severity.WARN, "see the finding that caused it",
                       f"{backend.name}: {'reboot requested' if action == 'reboot' else 'drained'}"
                       f" with reason {reason!r}", action, "ok", key=None)
        self._clear_failing()

    def _refuse(self, kind: str, want: Want, message: str, severity: Severity) -> None:
        self._emit("drain_refused", severity, _REFUSE_ACTION[kind], message, "drain",
                   "refused", key=("refused", kind, want.cause or ""), kind=kind)
        with self._lock:
            self._data = _replace(self._data, refused=kind, refused_message=message)
        self._clear_failing()

    def _settled(self) -> None:
        with self._lock:
            self._data = _replace(self._data, refused="", refused_message="")
        self._said = None
        self._clear_failing()

    def _failed(self, backend, want: Want, message: str) -> None:
        action = "undrain" if want.cause is None else "drain"
        now = self.clock.time()
        self._emit("drain_failed", Severity.WARN, "see the message: it says how to fix it",
                   f"{getattr(backend, 'name', 'drain')}: {message}", action, "failed",
                   key=("failed", message))
        with self._lock:
            self._data = _replace(self._data, failing=message,
                                  failing_since=self._data.failing_since or now)

    def _clear_failing(self) -> None:
        with self._lock:
            if self._data.failing:
                self._data = _replace(self._data, failing="", failing_since=None)

    def _saw(self, st: NodeDrainState) -> None:
        label = "ours" if st.ours else "others" if st.drained else "free"
        with self._lock:
            self._data = _replace(self._data, state=label, reason=st.reason)

    def _emit(self, code: str, severity: Severity, action: str, message: str, what: str,
              result: str, key: Optional[Tuple[str, ...]], kind: str = "") -> None:
        """An event and the action's count; one with a key is said once while it holds."""
        if key is not None and key == self._said:
            return
        self._said = key
        now = self.clock.time()
        engine, node = self._data.backend, self._data.node
        event = Event(now, "node", code, severity, action, message,
                      fields={"BACKEND": engine, "NODE": node or "", "DRAIN_ACTION": what,
                              "RESULT": result, **({"REFUSED": kind} if kind else {})})
        (LOG.warning if severity >= Severity.WARN else LOG.info)("drain: %s", message)
        with self._lock:
            self._events.append(event)
            self._actions[(what, result)] = self._actions.get((what, result), 0) + 1
            self._data = _replace(self._data, last_action=what, last_result=result,
                                  last_time=now, last_message=message)

    # ------------------------------------------------------------------ drain.json
    def _path(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)

    def _load_manual(self) -> Optional[str]:
        from gpucostd.statefile import UnreadableFile, read_json
        try:
            data = read_json(self._path())
        except FileNotFoundError:
            data = {}
        except (UnreadableFile, OSError, ValueError) as e:
            LOG.warning("drain: %s cannot be read (%s); a manual undrain is no longer "
                        "remembered", self._path(), e)
            data = {}
        self._file = data if isinstance(data, dict) else {}
        cause = self._file.get("manual_undrain")
        return cause if cause in (CRITICAL, INEFFICIENT) else None

    def _rebooted(self) -> bool:
        """A reboot was asked within REBOOT_GUARD_SECONDS: a CRIT that outlived it drains
        instead (no reboot loop)."""
        at = self._file.get("reboot_time")
        return isinstance(at, (int, float)) and 0 <= self.clock.time() - at < \
            REBOOT_GUARD_SECONDS

    def _set_manual(self, cause: Optional[str]) -> None:
        if cause != self._manual:
            self._manual = cause
            self._save(manual_undrain=cause)

    def _save(self, **changes: Any) -> None:
        import json
        from gpucostd.statefile import write_atomic
        self._file = dict(self._file, **changes)
        try:
            write_atomic(self._path(), json.dumps(self._file, sort_keys=True) + "\n")
        except OSError as e:
            LOG.warning("drain: cannot save %s (%s); kept in memory", self._path(), e)


_REFUSE_ACTION = {
    "brake": "find why many nodes fault at once (a shared cause: power, cooling, a driver "
             "roll-out); the brake lets drains through again when the window passes",
    "opt_out": "none (the operator's opt-out); remove it to let gpucostd drain the node",
    "operator": "none (the operator's drain is kept; gpucostd never resumes it)",
    "manual_undrain": "none (the operator's undrain is honoured until the node recovers)",
    "blocked": "none until the engine's state changes (a reboot or a down node)",
}


def _replace(data: DrainData, **changes: Any) -> DrainData:
    return replace(data, **changes)


__all__ = ["DrainPart", "DrainData", "Want", "drain_parts", "make_backend", "node_name",
           "want_from", "conditions_from", "cause_of"]
