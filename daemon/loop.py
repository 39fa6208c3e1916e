"""The daemon loop: run the cycle's parts (gpucostd.part; one file each in daemon/parts/), hand
their results to the node judge, record, publish one immutable snapshot per cycle; it judges
nothing itself. Each part runs timed and guarded: a failure costs that part alone (a part_failed
finding, gpucostd_part_last_success 0). One-shot commands build a Daemon and call step() once.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import threading
from typing import Any, Callable, Dict, List, Optional

from gpucostd import __version__
from gpucostd.clock import RealClock
from gpucostd.config import PRICES_FIX, Config
from gpucostd.part import Cycle, Part, PartResult
from gpucostd.snapshot import (DaemonInfo, Event, KernelLogStatus, NodeSnapshot, Severity,
                               StateDirStatus)
from gpucostd.views.statusline import summary_line

LOG = logging.getLogger("gpucostd")


class Daemon:
    """One node's daemon. `step()` runs one cycle; `run()` loops until stop()."""

    def __init__(self, config: Config, clock=None, simulate: Optional[str] = None,
                 kernel_log: Optional[str] = None, notifier=None, one_shot: bool = False,
                 state_dir: Optional[str] = None, journal: bool = True):
        from gpucostd.calibration.session import LastCalibration
        from gpucostd.cost.accountant import CostAccountant
        from gpucostd.health.judge import HealthJudge
        from gpucostd.health.node import NodeJudge
        from gpucostd.hw.nvml import NvmlGateway
        from gpucostd.probes.deploy import DeployProbe
        from gpucostd.probes.gpu import GpuProbe
        from gpucostd.probes.host import HostProbe
        from gpucostd.record.events import EventStore
        from gpucostd.record.hooks import HookRunner
        from gpucostd.record.recorder import Recorder
        from gpucostd.statefile import ensure_private_dir
        from gpucostd.tuners.manager import TuningManager

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
        self._part_errors: Dict[str, str] = {}     # steps outside the parts that failed
        self._logged: Dict[str, str] = {}          # the failure last logged, per part/step
        self.state_dir = state_dir = state_dir or config.daemon.state_dir
        # refused (UnsafePathError) when another user could read or replace events, originals
        ensure_private_dir(state_dir, 0o750, "state directory")

        self.sim = None
        library = None
        if simulate is not None:
            from gpucostd.sim.scenario import load_scenario
            from gpucostd.sim.nvml import SimulatedNode
            self.sim = SimulatedNode(load_scenario(simulate), self.clock)
            library = self.sim.library
            config = self._sim_prices(config)
        self.config = config
        self.gateway = NvmlGateway(timeout_seconds=config.daemon.nvml_timeout_seconds,
                                   retry_seconds=config.daemon.nvml_retry_seconds,
                                   library=library, clock=self.clock)
        self.gpu_probe = GpuProbe(self.gateway)
        self.host_probe = HostProbe(config.daemon.host_root)
        self.store = EventStore(state_dir, config.events.max_age_days, config.events.max_count,
                                clock=self.clock)
        self.judge = HealthJudge(config, self.clock, state_dir, save_on_judge=False)
        self.node_judge = NodeJudge()
        self.hooks = HookRunner(config)
        self.cost = CostAccountant(config, state_dir, self.clock)
        self.tuning = TuningManager(config, self.gateway, state_dir, self.clock,
                                    nic_driver=self.host_probe.nic_driver)
        from gpucostd.parts.kernel_log import kernel_log_reader
        self.watcher, sim_parser = kernel_log_reader(kernel_log or config.daemon.kernel_log,
                                                     state_dir, self.clock, self.sim, one_shot)
        self.sim_serving = None               # the scenario's simulated inference servers
        self.inference: List = []             # one InferenceProbe per endpoint
        self._configure_inference()
        self.recorder = Recorder(self.store, self.hooks, journal, self._guard)
        self.calibration = None     # gpucostd.calibration.session.Calibration, the running/last
        self.calibration_last = LastCalibration(state_dir)    # the last report, before one runs
        self.deploy_probe = DeployProbe(config.daemon.host_root)
        self.parts: List[Part] = self._build_parts(sim_parser)

    def _build_parts(self, sim_parser) -> List[Part]:
        """The cycle's parts, in the order they run (a part reads the data of those before)."""
        from gpucostd.parts.cost import CostPart
        from gpucostd.parts.deploy import DeployPart
        from gpucostd.parts.discovery import discovery_part
        from gpucostd.parts.drain import drain_parts
        from gpucostd.parts.gpu import GpuPart
        from gpucostd.parts.health import HealthPart
        from gpucostd.parts.host import HostPart
        from gpucostd.parts.inference import InferencePart
        from gpucostd.parts.kernel_log import KernelLogPart
        from gpucostd.parts.state_dir import StateDirPart
        from gpucostd.parts.tuning import TuningPart
        cfg = self.config
        parts: List[Part] = [GpuPart(self.gateway, self.gpu_probe),
                             KernelLogPart(self.watcher, self.sim, sim_parser, self.store.seen)]
        if not self.one_shot:
            from gpucostd.calibration.session import PROGRESS_FILE, recover_interrupted
            # a calibration the daemon did not end (it was killed): its limits back first
            recover = functools.partial(recover_interrupted, self) if os.path.exists(
                os.path.join(self.state_dir, PROGRESS_FILE)) else None
            parts += [StateDirPart(self.state_dir, self.store, self.tuning.reload_originals),
                      TuningPart(self.tuning, cfg.tuning, cfg.gpu_tuning, cfg.gpu_overrides,
                                 cfg.nic_tuning, recover)]
        discovery = discovery_part(cfg.inference, cfg.daemon.interval_seconds, self.inference,
                                   self.clock, self.sim is not None, self.one_shot)   # or None
        parts += [DeployPart(self.deploy_probe, cfg.checks, cfg.tuning),
                  HostPart(self.host_probe, self.gateway, cfg.checks, cfg.nic_tuning, cfg.tuning),
                  HealthPart(self.judge)] + ([discovery] if discovery else []) + [
                  InferencePart(self.inference, parallel=not self.clock.virtual),
                  CostPart(self.cost, self.inference)] + drain_parts(self)
        return parts

    def add_part(self, part: Part, before: Optional[str] = None) -> None:
        """Add a part to the cycle (at the end, or before the part named `before`)."""
        names = [p.name for p in self.parts]
        self.parts.insert(names.index(before) if before in names else len(names), part)

    def _configure_inference(self) -> None:
        """The endpoints' probes, again after a reload (the parts hold this same list)."""
        from gpucostd.parts.inference import endpoint_probes
        self.inference[:], self.sim_serving = endpoint_probes(
            self.config, self.sim, self.sim_serving, self.clock, self.one_shot,
            gpu_count=lambda: len(self._latest.gpus) if self._latest is not None else 0)

    def _sim_prices(self, config: Config) -> Config:
        """`gpucostd run --simulate` with no price in the config: the scenario's illustrative
        [prices], said in the log and (finding prices_illustrative, cost notes) in status."""
        if self.sim is None or self.clock.virtual or self.one_shot:
            return config
        from gpucostd.sim.sections import with_scenario_prices
        config = with_scenario_prices(config, self.sim.scenario.prices, self.simulate)
        if config.price_note:
            LOG.warning("simulated node: %s", config.price_note)
        return config

    def _guard(self, what: str, fn, default=None):
        """Run one step outside the parts (record, commit, publish); an unexpected exception
        is logged once per distinct message, shown as a part_failed finding, and the cycle
        goes on with `default`."""
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - the loop must survive any step
            self._part_errors[what] = self._log_failure(what, f"{type(e).__name__}: {e}")
            return default
        self._part_errors.pop(what, None)
        return result

    def _log_failure(self, what: str, msg: str) -> str:
        """Log a failure (with its traceback) once per distinct message."""
        if self._logged.get(what) != msg:
            LOG.exception("internal error in %s (the daemon goes on): %s", what, msg)
        self._logged[what] = msg
        return msg

    def add_publisher(self, fn: Callable[[NodeSnapshot], None]) -> None:
        self._publishers.append(fn)

    @property
    def latest(self) -> Optional[NodeSnapshot]:
        return self._latest

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for warning in self.config.warnings:
            LOG.warning("%s", warning)
        if self.watcher is not None:
            self.watcher.start()
        from gpucostd.record.journal import startup_event
        events = [startup_event(__version__, self.clock.time(), config_path=self.config.path,
                                simulate=self.simulate)]
        note = self.config.price_note
        if note:        # in `gpucostd status` (recent events) and `gpucostd events`
            events.append(Event(self.clock.time(), "node", "prices_illustrative", Severity.OK,
                                PRICES_FIX, note[0].upper() + note[1:]))
        self.recorder.record(events)

    def record(self, events: List[Event]) -> None:
        """Store, journal and hand events to the hooks (a command that drives the loop)."""
        with self._lock:
            self.recorder.record(list(events))

    def retune(self, config: Config) -> None:
        """A config whose tuning changed, taken at once (no reload event): the tuners plan with
        it and the next cycle applies it (`gpucostd calibrate --simulate --apply`)."""
        with self._lock:
            self.config = config
            self.tuning.reconfigure(config)
            self._reconfigure_parts(config, only=("tuning",))
            self._reload_requested.clear()

    def _reconfigure_parts(self, config: Config, only=None) -> None:
        for part in self.parts:
            fn = getattr(part, "reconfigure", None)
            if fn is not None and (only is None or part.name in only):
                self._guard(f"reconfigure {part.name}", lambda: fn(config))

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
        """Loop until stop(); the first complete snapshot sends READY=1. Regular cycles keep
        their times; wake-ups share one early cycle that never moves them; the watchdog is fed
        while the loop waits (docs/reliability.md, "The cycle schedule")."""
        from gpucostd.clock import EARLY_GAP, wait_for_cycle
        interval = self.config.daemon.interval_seconds
        next_at, last_early = self.clock.monotonic(), float("-inf")
        while not self._stop.is_set():
            began = self.clock.monotonic()
            last_early = began if began < next_at else last_early    # woken before its time
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
                interval = self.config.daemon.interval_seconds
            snap = self.step()
            if self.notifier is not None:
                (self.notifier.ready if snap.cycle == 1 else self.notifier.status)(
                    summary_line(snap))
                self.notifier.watchdog()
            now = self.clock.monotonic()
            if now >= next_at:         # the regular cycle (an early one that ran into it counts)
                next_at = max(next_at + interval, now)    # a slow cycle: no catch-up burst
            wait_for_cycle(self.clock, next_at, max(now + (now - began), last_early + EARLY_GAP),
                           self._stop, self.notifier)

    def shutdown(self, system_shutdown: Optional[bool] = None) -> None:
        """Restore tuned settings (unless the system is shutting down), flush, close."""
        if self.notifier is not None:
            self.notifier.stopping()
        if self.calibration is not None:      # a calibration's limits back, whatever comes
            from gpucostd.calibration.session import stop
            with self._lock:
                self.recorder.record(self._guard("calibration stop", lambda: stop(self), []) or [])
        if self.config.tuning.restore_on_stop and not self.one_shot:
            if system_shutdown is None:
                from gpucostd.tuners.manager import shutdown_in_progress
                system_shutdown = self._guard("shutdown check", shutdown_in_progress, False)
            if system_shutdown:
                LOG.info("system shutdown in progress: tuned settings are left as they are")
            else:
                from gpucostd.parts.tuning import change_events
                gpus = self._latest.gpus if self._latest is not None else None
                changes = self._guard("restore", lambda: self.tuning.restore(gpus), []) or []
                self.recorder.record(change_events(self.clock.time(), changes, "setting_restored",
                                           gpus))
        for part in [p for p in self.parts if hasattr(p, "close")]:   # their threads: kmsg, drain
            self._guard(f"{part.name} close", part.close)
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
            self.recorder.record([Event(self.clock.time(), "node", "config_rejected", Severity.WARN,
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
        self._guard("reconfigure hooks", lambda: self.hooks.reconfigure(new))
        self._guard("reconfigure tuning", lambda: self.tuning.reconfigure(new))
        self._reconfigure_parts(new)   # (tuning: apply the new desired state next cycle)
        self._configure_inference()
        self.recorder.record([Event(self.clock.time(), "node", "config_reloaded", Severity.OK, "none",
                            f"config reloaded from {new.path or 'defaults'}")])
        if self.notifier is not None:
            self.notifier.ready(summary_line(self._latest) if self._latest else "running")
        return True

    # ------------------------------------------------------------------ one cycle
    def step(self) -> NodeSnapshot:
        with self._lock:
            return self._step()

    def _step(self) -> NodeSnapshot:
        from gpucostd.health.node import NodeInputs
        self.cycle += 1
        cycle = Cycle(self.cycle, self.clock.time(), self.clock.monotonic(),
                      on_error=self._log_failure)
        for part in self.parts:
            cycle.run(part)
        failed = {k: PartResult(k, False, 0.0, v) for k, v in self._part_errors.items()}
        inputs = NodeInputs(cycle.now, dict(cycle.results, **failed), self.config,
                            self.started_at, bool(self.gateway.available),
                            [p.url for p in self.inference], cycle.events)
        verdict = self.node_judge.judge(inputs)
        self.recorder.record(cycle.events)
        # only now that the events are stored: the judge's "already reported" state and the
        # kernel-log position
        for part in self.parts:
            if hasattr(part, "after_record"):
                self._guard(f"{part.name} commit", part.after_record)
        snap = self._snapshot(cycle, verdict)
        self._latest = snap
        if self.calibration is not None:
            from gpucostd.calibration.session import cycle as calibration_cycle
            self.recorder.record(self._guard("calibration", lambda: calibration_cycle(self, snap),
                                     []) or [])
        for publish in self._publishers:
            self._guard("publish", lambda: publish(snap))
        return snap

    def _snapshot(self, cycle: Cycle, verdict) -> NodeSnapshot:
        """The cycle's snapshot: each part's data in its declared field (a part that failed
        this cycle leaves the previous snapshot's value)."""
        from gpucostd.calibration.session import snapshot_info
        last = self._latest

        def kept(name: str, attr: str, default: Any, field: Optional[str] = None) -> Any:
            data = cycle.data(name)
            return getattr(data, attr) if data is not None else getattr(last, field or attr,
                                                                         default)
        state = cycle.data("state_dir") or StateDirStatus()
        state = dataclasses.replace(state, events_pending=int(self._guard(
            "event store", lambda: self.store.pending, 0) or 0))
        health = cycle.data("health")
        gw = self.gateway
        return NodeSnapshot(
            time=cycle.now, monotonic=cycle.monotonic, cycle=self.cycle,
            hostname=self.hostname, started_at=self.started_at,
            started_monotonic=self.started_mono,
            nvml_available=bool(gw.available), nvml_error=gw.error,
            driver_version=gw.driver_version, cuda_version=gw.cuda_version,
            gpus=cycle.data("gpu", ()), gpu_health=verdict.gpu_health,
            node_health=verdict.node_health, findings=verdict.findings,
            recent_events=tuple(self.recorder.recent),
            settings=kept("tuning", "settings", ()), checks=kept("host", "checks", ()),
            cost=getattr(cycle.data("cost"), "report", None),
            counters={"xid_totals": dict(self.recorder.xid_totals),
                      "sxid_totals": dict(self.recorder.sxid_totals),
                      "drift": dict(self.tuning.drift_counts)},
            daemon=DaemonInfo(__version__, os.getpid(), self.config.path, self.simulate),
            kernel_log=kept("kernel_log", "status", KernelLogStatus(), "kernel_log"),
            state_dir=state, host=kept("host", "facts", None, "host"),
            persistenced=kept("host", "persistenced", None),
            nic_rings=kept("tuning", "nic_rings", {}),
            inference=tuple(cycle.data("inference", ())),
            gpu_inventory=(health.extra or {}).get("gpu_inventory") if health else None,
            calibration=self._guard("calibration info", lambda: snapshot_info(self)),
            parts=tuple(cycle.results.values()))

    def ack(self, gpu: Optional[int], code: Optional[str]) -> List[Event]:
        with self._lock:
            events = self.judge.ack(gpu, code)
            self.recorder.record(list(events))
            self._guard("health commit", self.judge.commit)
        return list(events)


__all__ = ["Daemon", "summary_line"]
