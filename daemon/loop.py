"""The daemon loop: probe, judge, price, record, publish — one immutable snapshot per cycle.

Nothing but this loop calls a probe or a tuner (the CLI's one-shot commands build a Daemon and call
step() once). Each part runs behind `_guard`, so one part's unexpected failure is logged and the
cycle goes on: the daemon never dies of a bad reading, a bad kernel line or a bad endpoint.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time as _time
from typing import Callable, Dict, List, Optional, Tuple

from gpucostd import __version__
from gpucostd.clock import RealClock
from gpucostd.config import Config
from gpucostd.snapshot import Event, Finding, GpuState, NodeSnapshot, Severity, worst

LOG = logging.getLogger("gpucostd")
RECENT_EVENTS = 20
LOSS_FINDING_SECONDS = 600.0
STATE_RESET_ACTION = ("none needed: the daemon started that file fresh; the old one is kept "
                      "beside it as .bad for a look (delete it when done)")
ORIGINALS_ACTION = ("fix or move aside originals.json, then `systemctl reload gpucostd` "
                    "(docs/tuning.md, saved originals unreadable)")


class Daemon:
    """One node's daemon. `step()` runs one cycle; `run()` loops until stop()."""

    def __init__(self, config: Config, clock=None, simulate: Optional[str] = None,
                 kernel_log: Optional[str] = None, notifier=None, one_shot: bool = False,
                 state_dir: Optional[str] = None, journal: bool = True):
        from gpucostd.cost.accountant import CostAccountant
        from gpucostd.record.events import EventStore
        from gpucostd.health.judge import HealthJudge
        from gpucostd.record.hooks import HookRunner
        from gpucostd.hw.nvml import NvmlGateway
        from gpucostd.probes.gpu import GpuProbe
        from gpucostd.probes.host import HostProbe
        from gpucostd.tuners.manager import TuningManager

        self.config = config
        self.clock = clock or RealClock()
        self.notifier = notifier
        self.one_shot = one_shot
        self.simulate = simulate
        self.hostname = socket.gethostname()
        self.started_at = self.clock.time()
        self.started_mono = self.clock.monotonic()     # uptime: a clock step must not move it
        self.cycle = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()      # step() vs ack() from the status API thread
        self._reload_requested = threading.Event()
        self._latest: Optional[NodeSnapshot] = None
        self._publishers: List[Callable[[NodeSnapshot], None]] = []
        self._part_errors: Dict[str, str] = {}
        state_dir = state_dir or config.daemon.state_dir
        self.state_dir = state_dir
        # refused (UnsafePathError, an OSError) when another user could read or replace the
        # events and the saved originals
        from gpucostd.statefile import ensure_private_dir
        ensure_private_dir(state_dir, 0o750, "state directory")

        self.sim = None
        library = None
        if simulate is not None:
            from gpucostd.sim.scenario import load_scenario
            from gpucostd.sim.nvml import SimulatedNode
            self.sim = SimulatedNode(load_scenario(simulate), self.clock)
            library = self.sim.library
            self.config = config = self._sim_prices(config)
        self.gateway = NvmlGateway(timeout_seconds=config.daemon.nvml_timeout_seconds,
                                   retry_seconds=config.daemon.nvml_retry_seconds,
                                   library=library, clock=self.clock)
        self.gpu_probe = GpuProbe(self.gateway)
        self.host_probe = HostProbe(config.daemon.host_root)
        from gpucostd.probes.deploy import DeployProbe
        self.deploy_probe = DeployProbe(config.daemon.host_root)
        self._deploy = None
        self.journal = journal      # False in replay: simulated events stay out of the journal
        self.store = EventStore(state_dir, config.events.max_age_days, config.events.max_count,
                                clock=self.clock)
        self.judge = HealthJudge(config, self.clock, state_dir, save_on_judge=False)
        self.hooks = HookRunner(config)
        self.cost = CostAccountant(config, state_dir, self.clock)
        self.tuning = TuningManager(config, self.gateway, state_dir, self.clock,
                                    host_root=config.daemon.host_root)
        self.watcher = None
        self._sim_parser = None      # one-shot commands parse the scenario's kernel lines here
        source = kernel_log or config.daemon.kernel_log
        if self.clock.virtual or (self.sim is not None and source == "auto"):
            # replay, and a simulated node unless the config names a real log: only the
            # scenario's own kernel lines (the host's Xids are not the simulated GPUs')
            source = "none"
        if not one_shot:
            from gpucostd.probes.kernel_log import KernelLogWatcher
            self.watcher = KernelLogWatcher(source, state_dir, clock=self.clock,
                                            on_fault=self.clock.wake)
        elif self.sim is not None:
            from gpucostd.probes.kernel_log import NvrmParser
            self._sim_parser = NvrmParser()
        self.inference: List = []             # one InferenceProbe per endpoint
        self.sim_serving = None               # the scenario's simulated inference servers
        self._inference_down_since: Dict[str, float] = {}
        self._configure_inference()
        self._xid_totals: Dict[Tuple[Optional[int], int], int] = dict(self.store.xid_totals())
        # NVSwitch SXids per (switch bus id, SXid): the node's stored sxid events
        self._sxid_totals: Dict[Tuple[str, int], int] = {}
        for e in self.store.query(subject="node"):
            self._count_sxid(e)
        self._recent: List[Event] = list(self.store.recent(RECENT_EVENTS))
        self._settings: tuple = ()
        self._checks: tuple = ()
        self._host_facts = None
        self._applied = False
        self._last_checks = None
        self._originals_reported: Optional[str] = None
        self._lines_lost_logged = 0
        from gpucostd.statefile import dir_identity
        self._state_identity = dir_identity(state_dir)
        self._state_reported: Optional[str] = None
        self._state_dir_was_bad = False
        self._state_since: Optional[float] = None
        self._originals_since: Optional[float] = None
        from gpucostd.calibration.session import LastCalibration
        self.calibration = None     # gpucostd.calibration.session.Calibration, the running/last
        self.calibration_last = LastCalibration(state_dir)    # the last report, before one runs
        self._calibration_recover = os.path.exists(os.path.join(state_dir,
                                                                "calibration-progress.json"))

    # ------------------------------------------------------------------ helpers
    def _configure_inference(self) -> None:
        """One probe per configured endpoint; with --simulate and no endpoint configured, the
        scenario's simulated servers ([serving]): HTTP on loopback on a real clock, read
        in-process on a virtual one (replay)."""
        from gpucostd.probes.inference import InferenceProbe
        endpoints = list(self.config.inference_endpoints)
        fetchers: Dict[str, Callable[[], str]] = {}
        if not endpoints and self.sim is not None and self.sim.scenario.serving is not None:
            from gpucostd.config import InferenceEndpoint
            from gpucostd.sim.serving import SimulatedServing
            if self.sim_serving is None:
                self.sim_serving = SimulatedServing(self.sim)
                if not self.clock.virtual and not self.one_shot:
                    self.sim_serving.start()     # one-shot commands read it in-process
            srv = self.sim_serving
            for k, ep in enumerate(srv.endpoints):
                url = srv.urls[k] if srv.urls else f"sim://endpoint/{k}/metrics"
                if not srv.urls:
                    fetchers[url] = (lambda k=k: srv.fetch(k))
                endpoints.append(InferenceEndpoint(url, tuple(ep.gpus), "auto", ep.parallel))
        # one deadline per scrape, at most half the interval (the watchdog and the cycle wait)
        timeout = min(float(self.config.inference.timeout_seconds),
                      0.5 * float(self.config.daemon.interval_seconds))
        from gpucostd.config import owner_uid
        owner = owner_uid(self.config.inference.expect_owner)
        self.inference = [InferenceProbe(e.url, e.tokens_metric, timeout,
                                         clock=self.clock.monotonic, fetch=fetchers.get(e.url),
                                         gpus=e.gpus, parallel=e.parallel, expect_owner=owner,
                                         gpu_count=self._gpu_count) for e in endpoints]

    def _gpu_count(self) -> int:
        return len(self._latest.gpus) if self._latest is not None else 0

    def _sim_prices(self, config: Config) -> Config:
        """`gpucostd run --simulate` with no price in the config: the scenario's illustrative
        [prices], said in the log and (finding prices_illustrative, cost notes) in status."""
        if self.sim is None or self.clock.virtual or self.one_shot:
            return config
        from gpucostd.sim.sections import with_scenario_prices
        config, note = with_scenario_prices(config, self.sim.scenario.prices, self.simulate)
        if note:
            LOG.warning("simulated node: %s", note)
        return config

    def _read_inference(self) -> list:
        """Every endpoint's reading; on a real clock in parallel (each under its deadline)."""
        probes = self.inference
        if len(probes) <= 1 or self.clock.virtual:
            return [p.read() for p in probes]
        out: list = [None] * len(probes)

        def one(i):
            out[i] = probes[i].read()
        threads = [threading.Thread(target=one, args=(i,), daemon=True,
                                    name="gpucostd-inference") for i in range(len(probes))]
        for t in threads:
            t.start()
        end = _time.monotonic() + max(p.timeout for p in probes) + 0.5
        for t in threads:
            t.join(max(0.0, end - _time.monotonic()))
        return out

    def _guard(self, part: str, fn, default=None):
        """Run one part of the cycle; an unexpected exception is logged once per distinct
        message and the cycle goes on with `default`."""
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - the loop must survive any part
            msg = f"{type(e).__name__}: {e}"
            if self._part_errors.get(part) != msg:
                LOG.exception("internal error in %s (the daemon goes on): %s", part, msg)
            self._part_errors[part] = msg
            return default
        self._part_errors.pop(part, None)
        return result

    def add_publisher(self, fn: Callable[[NodeSnapshot], None]) -> None:
        self._publishers.append(fn)

    @property
    def latest(self) -> Optional[NodeSnapshot]:
        return self._latest

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for warning in getattr(self.config, "warnings", ()):
            LOG.warning("%s", warning)
        if self.watcher is not None:
            self.watcher.start()
        from gpucostd.record.journal import startup_event
        events = [startup_event(__version__, self.clock.time(), config_path=self.config.path,
                                simulate=self.simulate)]
        note = getattr(self.config, "price_note", None)
        if note:        # in `gpucostd status` (recent events) and `gpucostd events`
            from gpucostd.cost.report import PRICES_FIX
            events.append(Event(self.clock.time(), "node", "prices_illustrative", Severity.OK,
                                PRICES_FIX, note[0].upper() + note[1:]))
        self._record(events)

    def record(self, events: List[Event]) -> None:
        """Store, journal and hand events to the hooks (a command that drives the loop)."""
        with self._lock:
            self._record(list(events))

    def retune(self, config: Config) -> None:
        """A config whose tuning changed, taken at once (no reload event): the tuners plan with
        it and the next cycle applies it (`gpucostd calibrate --simulate --apply`)."""
        with self._lock:
            self.config = config
            self.tuning.reconfigure(config)
            self._applied = False
            self._reload_requested.clear()

    def request_reload(self) -> None:
        self._reload_requested.set()
        self.clock.wake()

    def stop(self) -> None:
        self._stop.set()
        self.clock.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Loop until stop(). The first complete snapshot sends READY=1.

        The schedule (docs/reliability.md, "The cycle schedule"): regular cycles keep their
        times (start + k x interval); a wake-up (a kernel-log fault, SIGHUP, calibration) runs
        one early cycle for all the wakes that came in, never sooner than EARLY_GAP seconds (or
        the last cycle's own length, if longer) after the last cycle ended, and never moves the
        regular schedule. The watchdog is fed after every cycle and while the loop waits."""
        from gpucostd.clock import EARLY_GAP, wait_for_cycle
        interval = self.config.daemon.interval_seconds
        next_at = self.clock.monotonic()
        while not self._stop.is_set():
            began = self.clock.monotonic()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
                interval = self.config.daemon.interval_seconds
            snap = self.step()
            if self.notifier is not None:
                if snap.cycle == 1:
                    self.notifier.ready(summary_line(snap))
                else:
                    self.notifier.status(summary_line(snap))
                self.notifier.watchdog()
            now = self.clock.monotonic()
            if now >= next_at:         # the regular cycle (an early one that ran into it counts)
                next_at += interval
                if next_at < now:      # a slow cycle: do not try to catch up in a burst
                    next_at = now
            wait_for_cycle(self.clock, next_at, now + max(EARLY_GAP, now - began),
                           self._stop, self.notifier)

    def shutdown(self, system_shutdown: Optional[bool] = None) -> None:
        """Restore tuned settings (unless the system is shutting down), flush, close."""
        if self.notifier is not None:
            self.notifier.stopping()
        if self.calibration is not None:      # a calibration's limits back, whatever comes
            from gpucostd.calibration.session import stop
            with self._lock:
                self._record(self._guard("calibration stop", lambda: stop(self), []) or [])
        if self.config.tuning.restore_on_stop and not self.one_shot:
            if system_shutdown is None:
                from gpucostd.tuners.manager import shutdown_in_progress
                system_shutdown = self._guard("shutdown check", shutdown_in_progress, False)
            if system_shutdown:
                LOG.info("system shutdown in progress: tuned settings are left as they are")
            else:
                gpus = self._latest.gpus if self._latest is not None else None
                changes = self._guard("restore", lambda: self.tuning.restore(gpus), []) or []
                self._record(_change_events(self.clock.time(), changes, "setting_restored",
                                            gpus))
        if self.watcher is not None:
            self._guard("kernel log stop", self.watcher.stop)
        if self.sim_serving is not None:
            self._guard("simulated serving stop", self.sim_serving.stop)
        self._guard("cost flush", self.cost.flush)
        self._guard("hooks stop", self.hooks.stop)
        self._guard("event store close", self.store.close)
        self._guard("nvml shutdown", self.gateway.shutdown)

    def reload(self, path: Optional[str] = None) -> bool:
        """SIGHUP: load the config again; an invalid one is refused and the running one stays."""
        from gpucostd.config import ConfigError, load
        if self.notifier is not None:
            self.notifier.reloading()
        path = path or self.config.path      # None: the default path (missing = defaults)
        try:
            new = load(path)
        except Exception as e:  # noqa: BLE001 - ConfigError, or a bug: never a crash loop
            if not isinstance(e, ConfigError):
                LOG.exception("reload: unexpected error loading %s", path)
                e = ConfigError(f"cannot be used ({type(e).__name__}: {str(e)[:120]})", path)
            LOG.error("reload refused, the running config stays: %s", e)
            self._record([Event(self.clock.time(), "node", "config_rejected", Severity.WARN,
                                "fix the config file and reload again", f"reload refused: {e}")])
            if self.notifier is not None:
                self.notifier.ready(summary_line(self._latest) if self._latest else "running")
            return False
        fixed = ("listen_address", "socket_path", "state_dir", "web_config_file")
        changed = [k for k in fixed if getattr(new.daemon, k) != getattr(self.config.daemon, k)]
        if changed:
            LOG.warning("reload: %s take effect only after a restart", ", ".join(
                f"daemon.{k}" for k in changed))
        self.config = new = self._sim_prices(new)
        from gpucostd.record import logs
        logs.set_level(new.daemon.log_level)
        self._guard("reconfigure cost", lambda: self.cost.reconfigure(new))
        self._guard("reconfigure health", lambda: self.judge.reconfigure(new))
        self._guard("reconfigure hooks", lambda: self.hooks.reconfigure(new))
        self._guard("reconfigure tuning", lambda: self.tuning.reconfigure(new))
        self._configure_inference()
        self._applied = False          # apply the new desired state at the next cycle
        self._record([Event(self.clock.time(), "node", "config_reloaded", Severity.OK, "none",
                            f"config reloaded from {new.path or 'defaults'}")])
        if self.notifier is not None:
            self.notifier.ready(summary_line(self._latest) if self._latest else "running")
        return True

    # ------------------------------------------------------------------ one cycle
    def step(self) -> NodeSnapshot:
        with self._lock:
            return self._step()

    def _step(self) -> NodeSnapshot:
        now = self.clock.time()
        mono = self.clock.monotonic()
        self.cycle += 1
        self._guard("nvml init", self.gateway.ensure_initialized)
        gpus = self._guard("gpu probe", self.gpu_probe.read, ()) or ()
        gpus = tuple(gpus)

        faults = []
        if self.sim is not None:
            lines = self._guard("simulator", self.sim.drain_kernel_lines, []) or []
            if lines and self.watcher is not None:
                self.watcher.feed_lines(lines)
            elif lines:
                for line in lines:
                    faults.extend(self._sim_parser.feed(line))
        if self.watcher is not None:
            faults.extend(self._guard("kernel log", self.watcher.poll, []) or [])
        if faults:
            # a fault re-read after a crash between storing it and saving the kernel-log
            # position is already recorded: do not judge it twice
            faults = [f for f in faults if not (f.dedupe_key and self._guard(
                "event store", lambda: self.store.seen(f.dedupe_key), False))]

        events: List[Event] = []
        state_problem = None
        if not self.one_shot:
            state_problem = self._guard("state dir", lambda: self._check_state_dir(now, events))
        originals_problem = None
        if not self.one_shot:
            originals_problem = self._guard("originals", lambda: self.tuning.originals_problem)
            events.extend(self._originals_events(now, originals_problem))
        from gpucostd.statefile import take_notices      # state files set aside (moved, kept)
        events.extend(Event(now, "node", "state_file_reset", Severity.WARN, STATE_RESET_ACTION,
                            msg) for msg in take_notices())
        if self._calibration_recover and gpus and not self.one_shot and not originals_problem:
            # a calibration the daemon did not end (killed): its limits back first
            from gpucostd.calibration.session import recover_interrupted
            self._calibration_recover = False
            events.extend(self._guard("calibration recovery",
                                      lambda: recover_interrupted(self, gpus), []) or [])
        # tuning: apply once at start (and after reload), then verify every verify interval;
        # never while the saved originals are unreadable (tuning would lose them for good)
        if not self.one_shot and (gpus or self.config.nic_tuning):
            # with GPU settings configured, the first apply waits for a readable GPU (NVML not
            # up yet, or every GPU lost at start: apply later, not never)
            gpu_tuning = any(v is not None for v in self.config.gpu_tuning.values()) or bool(
                self.config.gpu_overrides)
            if not self._applied and originals_problem is None and (
                    not gpu_tuning or any(g.state == GpuState.OK for g in gpus)):
                changes = self._guard("apply", lambda: self.tuning.apply(gpus), None)
                if changes is not None:
                    self._applied = True
                    events.extend(_change_events(now, changes, "setting_applied", gpus))
            verified = self._guard("verify", lambda: self.tuning.verify(gpus, mono), None)
            if verified is not None:
                settings, drift_events = verified
                self._settings = tuple(settings)
                events.extend(drift_events)
        refresh_checks = self._last_checks is None or (
            mono - self._last_checks >= self.config.tuning.verify_interval_seconds)
        if refresh_checks:
            self._last_checks = mono
            self._host_facts = self._guard("host probe", self.host_probe.facts,
                                           self._host_facts)
            self._deploy = self._guard("deploy probe", lambda: self.deploy_probe.read(
                self.config.checks.model_dirs), self._deploy)
            from gpucostd.health.checks import run_checks
            self._checks = tuple(self._guard("checks", lambda: run_checks(
                self.config, self._host_facts, gpus, self.gateway.driver_version,
                self.gateway.cuda_version, self._settings, self._deploy,
                self.gateway.error), self._checks) or ())

        report = self._guard("health", lambda: self.judge.judge(gpus, faults, now), None)
        if report is not None:
            events.extend(report.events)
        readings = []
        if self.inference:
            readings = self._guard("inference", self._read_inference, []) or []
        cost = self._guard("cost", lambda: self.cost.update(gpus, mono), None)
        if self.inference:
            # stamped with the time of the scrape, not of the cycle start: a slow cycle
            # must not skew tokens per second
            stamp = max((r.time for r in readings if r is not None), default=mono)
            cost = self._guard("tokens", lambda: self.cost.update_tokens(
                readings, stamp), cost) or cost
        findings: List[Finding] = list(report.findings) if report is not None else []
        down = {}
        for probe, r in zip(self.inference, readings or [None] * len(self.inference)):
            error = getattr(r, "error", None)
            if r is None or error:
                since = down[probe.url] = self._inference_down_since.get(probe.url, now)
                where = ("[inference] metrics_url" if self.config.inference.metrics_url
                         else "the [[inference.endpoint]] url")
                findings.append(Finding(
                    "node", "inference_unreachable", Severity.WARN,
                    f"check {where} and the inference server",
                    f"inference metrics at {probe.url}: {error or 'no reading'}", since=since))
        self._inference_down_since = down
        findings.extend(self._guard("efficiency", lambda: self._efficiency(
            gpus, cost, readings, now, events), []) or [])
        findings.extend(self._loss_findings(now))
        if state_problem is not None:
            findings.append(Finding("node", "state_dir_unusable", Severity.WARN,
                                    "free space on / make writable daemon.state_dir; events "
                                    "are kept in memory meanwhile", state_problem,
                                    since=self._state_since))
        for warning in getattr(self.config, "warnings", ()):
            findings.append(Finding("node", "config_insecure", Severity.WARN,
                                    "make the file writable by root only (see the message)",
                                    warning[:300], since=self.started_at))
        if originals_problem is not None:
            findings.append(Finding("node", "originals_unreadable", Severity.WARN,
                                    ORIGINALS_ACTION, originals_problem,
                                    since=self._originals_since))
        for part, msg in self._part_errors.items():
            findings.append(Finding("node", f"internal_{part.replace(' ', '_')}", Severity.WARN,
                                    "report a bug with the daemon's log",
                                    f"{part} failed: {msg}"[:200], since=now))

        self._record(events)
        # only now that the events are stored: the judge's "already reported" state and the
        # kernel-log position
        self._guard("health commit", self.judge.commit)
        if self.watcher is not None:
            self._guard("kernel log commit", self.watcher.commit)

        gpu_health = dict(report.gpu_health) if report is not None else {
            g.index: Severity.UNKNOWN for g in gpus}
        node_health = report.node_health if report is not None else Severity.UNKNOWN
        if any(f.subject == "node" for f in findings):
            node_health = worst([node_health] + [f.severity for f in findings
                                                 if f.subject == "node"])
        if not gpus and not self.gateway.available:
            node_health = worst([node_health, Severity.UNKNOWN])
        snap = NodeSnapshot(
            time=now, monotonic=mono, cycle=self.cycle, hostname=self.hostname,
            started_at=self.started_at, started_monotonic=self.started_mono,
            nvml_available=bool(self.gateway.available), nvml_error=self.gateway.error,
            driver_version=self.gateway.driver_version, cuda_version=self.gateway.cuda_version,
            gpus=gpus, gpu_health=gpu_health, node_health=node_health,
            findings=tuple(findings), recent_events=tuple(self._recent),
            settings=self._settings, checks=self._checks, cost=cost,
            counters={"xid_totals": dict(self._xid_totals),
                      "sxid_totals": dict(self._sxid_totals),
                      "drift": dict(self.tuning.drift_counts)},
            extra={"host": self._host_facts, "inference": readings,
                   "persistenced": getattr(self._deploy, "persistenced", None),
                   "nic_rings": getattr(self.tuning, "nic_rings", {}),
                   "simulated": self.simulate, "config_path": self.config.path,
                   "kernel_log": getattr(self.watcher, "source_in_use", "none"),
                   "kernel_log_error": getattr(self.watcher, "error", None),
                   "kernel_log_lines_lost": int(getattr(self.watcher, "lines_lost", 0) or 0),
                   "state_dir_usable": state_problem is None,
                   "events_pending": self._guard("event store", lambda: self.store.pending, 0) or 0,
                   "gpu_inventory": (report.extra or {}).get("gpu_inventory")
                   if report is not None else None,
                   "version": __version__, "pid": os.getpid(),
                   "calibration": self._guard("calibration info", self._calibration_info)},
        )
        self._latest = snap
        if self.calibration is not None:
            from gpucostd.calibration.session import cycle
            self._record(self._guard("calibration", lambda: cycle(self, snap), []) or [])
        for publish in self._publishers:
            self._guard("publish", lambda: publish(snap))
        return snap

    def _check_state_dir(self, now: float, events: List[Event]) -> Optional[str]:
        """Is the state directory usable (there, ours, writable, not full)? Recreates one that
        vanished, points the event store at it again, writes kept events once it works and
        cuts the WAL back when the disk is full. Returns the problem, or None."""
        from gpucostd.statefile import dir_identity, ensure_private_dir, state_dir_problem
        problem = state_dir_problem(self.state_dir, self._state_identity)
        if problem is not None and problem[0] in ("vanished", "replaced"):
            try:
                if problem[0] == "vanished":
                    ensure_private_dir(self.state_dir, 0o750, "state directory")
                else:
                    from gpucostd.statefile import check_private_dir
                    check_private_dir(self.state_dir, what="state directory")
            except OSError as e:
                LOG.debug("state dir: %s", e)
            else:
                self._state_identity = dir_identity(self.state_dir)
                self.store.reopen()
                self.tuning.originals.reload()
                LOG.warning("%s; made it again (events, saved originals and cost totals "
                            "are written there from now on)", problem[1])
                events.append(Event(now, "node", "state_dir_recreated", Severity.WARN,
                                    "find what removed daemon.state_dir", problem[1]))
                problem = state_dir_problem(self.state_dir, self._state_identity)
        if problem is not None and problem[0] == "full" and self._state_reported is None:
            self.store.checkpoint()
        pending = self.store.retry(reopen_now=problem is None and self._state_dir_was_bad)
        self._state_dir_was_bad = problem is not None
        message = problem[1] if problem is not None else None
        if message is None and pending:
            why = self.store.error or "the event database cannot be written"
            message = f"{pending} events held in memory: {why}"
        if (message is None) != (self._state_reported is None):
            if message is not None:
                self._state_since = now
                LOG.error("%s", message)
                events.append(Event(now, "node", "state_dir_unusable", Severity.WARN,
                                    "free space on / make writable daemon.state_dir", message))
            else:
                LOG.warning("state directory %s usable again", self.state_dir)
                events.append(Event(now, "node", "state_dir_recovered", Severity.OK, "none",
                                    f"state directory {self.state_dir} usable again"))
        self._state_reported = message
        return message

    def _loss_findings(self, now: float) -> List[Finding]:
        """Kernel-log records the kernel overwrote before they were read: a WARN finding for
        LOSS_FINDING_SECONDS after the last loss (Xid lines may have been among them)."""
        lost = int(getattr(self.watcher, "lines_lost", 0) or 0)
        if lost > self._lines_lost_logged:
            LOG.warning("kernel log: %d records overwritten before gpucostd read them (%d in "
                        "all); Xid faults among them are missed", lost - self._lines_lost_logged,
                        lost)
            self._lines_lost_logged = lost
        last = getattr(self.watcher, "last_loss_time", None)
        if not lost or last is None or now - last > LOSS_FINDING_SECONDS:
            return []
        return [Finding("node", "kernel_log_lines_lost", Severity.WARN,
                        "check `dmesg` / `journalctl -k` for NVRM Xid lines; find what floods "
                        "the kernel log (or raise log_buf_len)",
                        f"{lost} kernel log records were overwritten before gpucostd read them "
                        f"(a flood); Xid faults among them are missed", since=last)]

    def _originals_events(self, now: float, problem: Optional[str]) -> List[Event]:
        """One event (and one log line) when the saved originals become unreadable, one when
        they are usable again."""
        if problem == self._originals_reported:
            return []
        was, self._originals_reported = self._originals_reported, problem
        if problem is not None:
            self._originals_since = now
            LOG.error("%s", problem)
            return [Event(now, "node", "originals_unreadable", Severity.WARN, ORIGINALS_ACTION,
                          problem)]
        self._originals_since = None
        msg = "saved originals readable again; tuning resumes"
        LOG.warning("%s (was: %s)", msg, was)
        return [Event(now, "node", "originals_recovered", Severity.OK, "none", msg)]

    def _efficiency(self, gpus, cost, readings, now: float, events: List[Event]
                    ) -> List[Finding]:
        """The floor's events (which run the on_inefficient / on_efficient hooks) and the
        serving diagnosis (gpucostd.health.efficiency)."""
        from gpucostd.health.efficiency import EfficiencyJudge, floor_event
        transition = getattr(self.cost, "floor_transition", None)
        if transition is not None and cost is not None:
            events.append(floor_event(transition, cost, self.config, now))
        if not hasattr(self, "_eff_judge"):
            self._eff_judge = EfficiencyJudge()
        out = self._eff_judge.judge(gpus, cost, readings, self.config, now)
        note = getattr(self.config, "price_note", None)
        if note:        # a simulated node priced at its scenario's illustrative prices
            from gpucostd.cost.report import PRICES_FIX
            out.append(Finding("node", "prices_illustrative", Severity.OK, PRICES_FIX, note,
                               since=self.started_at))
        return out

    def _calibration_info(self):
        from gpucostd.calibration.session import snapshot_info
        return snapshot_info(self)

    # ------------------------------------------------------------------ events
    def _record(self, events: List[Event]) -> None:
        """Store, journal and hand to hooks. The store comes first: nothing reported is lost."""
        if not events:
            return
        from gpucostd.record.journal import send_event
        from gpucostd.snapshot import printable_event
        stored = []
        for e in events:
            e = printable_event(e)      # kernel text may carry terminal escapes
            key = e.fields.get("dedupe_key") if e.fields else None
            saved = self._guard("event store", lambda: self.store.append(e, key), e)
            if saved is None:          # a duplicate (e.g. a kernel line seen before a restart)
                continue
            stored.append(saved)
            if saved.xid is not None:
                k = (saved.gpu, saved.xid)
                self._xid_totals[k] = self._xid_totals.get(k, 0) + 1
            self._count_sxid(saved)
            if self.journal:
                self._guard("journal", lambda: send_event(saved))
        recent = self._recent
        recent.extend(stored)
        del recent[:-RECENT_EVENTS]
        self._guard("hooks", lambda: self.hooks.on_events(stored))

    def _count_sxid(self, e: Event) -> None:
        if e.code == "sxid" and e.fields and isinstance(e.fields.get("sxid"), int):
            k = (str(e.fields.get("pci_bus_id", "")), e.fields["sxid"])
            self._sxid_totals[k] = self._sxid_totals.get(k, 0) + 1

    def ack(self, gpu: Optional[int], code: Optional[str]) -> List[Event]:
        with self._lock:
            events = self.judge.ack(gpu, code)
            self._record(list(events))
            self._guard("health commit", self.judge.commit)
        return list(events)


def _change_events(now: float, changes, code: str, gpus=()) -> List[Event]:
    uuids = {g.index: g.uuid for g in gpus or ()}
    out = []
    for c in changes or ():
        gpu = int(c.subject[4:]) if c.subject.startswith("gpu:") and c.subject[4:].isdigit() \
            else None
        ok = getattr(c, "ok", True)
        verb = {"setting_applied": "set", "setting_restored": "restored"}.get(code, code)
        if ok:
            msg = f"{c.subject}: {c.name} {verb} {c.old} -> {c.new}"
        else:
            msg = f"{c.subject}: {c.name} not {verb}: {c.error}"
        out.append(Event(now, c.subject, code if ok else "setting_failed",
                         Severity.OK if ok else Severity.WARN,
                         "none" if ok else "see message", msg, gpu=gpu, uuid=uuids.get(gpu),
                         fields={"setting": c.name, "old": c.old, "new": c.new}))
    return out


def summary_line(snap: Optional[NodeSnapshot]) -> str:
    """One line for systemd's STATUS=: `8 GPUs, 1 WARN, $0.42/h lost to throttling`."""
    if snap is None:
        return "starting"
    if not snap.nvml_available and not snap.gpus:
        return f"NVML unavailable: {snap.nvml_error or 'unknown reason'}"[:200]
    counts: Dict[str, int] = {}
    for sev in snap.gpu_health.values():
        if sev != Severity.OK:
            counts[sev.name] = counts.get(sev.name, 0) + 1
    parts = [f"{len(snap.gpus)} GPUs"]
    parts += [f"{n} {name}" for name, n in sorted(counts.items())] or ["all OK"]
    per_hour = getattr(snap.cost, "node_throttle_dollars_per_hour", None)
    if per_hour is not None and getattr(snap.cost, "priced", True):
        parts.append(f"${per_hour:.2f}/h lost to throttling")
    else:
        lost = getattr(snap.cost, "node_loss_ratio", None)
        if lost is not None:
            parts.append(f"{lost * 100:.1f}% capacity lost to throttling")
    tk = getattr(snap.cost, "tokens", None)
    if getattr(tk, "tokens_per_second", None) is not None:
        t = f"{tk.tokens_per_second:.0f} tokens/s"
        if tk.tokens_per_dollar is not None:
            from gpucostd.cost.report import priced_illustratively
            t += f" ({tk.tokens_per_dollar:,.0f} per $" + (
                " at illustrative prices)"
                if priced_illustratively(getattr(snap.cost, "notes", ())) else ")")
        parts.append(t)
    return ", ".join(parts)


__all__ = ["Daemon", "summary_line"]
