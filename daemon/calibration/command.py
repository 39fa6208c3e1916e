"""`gpucostd calibrate`, the command: through the running daemon (the status socket's
``calibrate`` requests; the daemon's loop drives the session, gpucostd.calibration.session) or
one-shot on a simulated node on a virtual clock (``run_simulated``: the daemon's own loop, in
this process). The method, its safety and its records are in gpucostd.calibration.session and
docs/tuning.md.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

from gpucostd.calibration.session import (CLIENT_TIMEOUT, DEFAULT_SIM_SCENARIO, DROPIN_NAME,
                                          EXIT_ABORTED, EXIT_DONE, EXIT_REFUSED,
                                          ILLUSTRATIVE_PRICES, LOG, Calibration,
                                          last_report, stop)
from gpucostd.calibration import levers, report as text
from gpucostd.calibration.maths import (CalibrationRefused, Params, params_from,  # noqa: F401
                                       plan)


# ---------------------------------------------------------------------- one-shot, simulated
def run_simulated(scenario: str, config, params: Params, dropin: Optional[str] = None,
                  progress=None, illustrative_prices: bool = True, on_cycle=None,
                  client_timeout: Optional[float] = None, interrupted=None) -> Dict[str, Any]:
    """The whole calibration on a simulated node on a virtual clock (seconds): the daemon's
    own loop, with a private state directory. Raises CalibrationRefused / ScenarioError.
    With params.apply the drop-in is written to `dropin` (default: a temporary directory)
    and the simulated daemon reloads it; the report says what it then enforces.
    `on_cycle(daemon, calibration)` runs before every cycle (tests inject faults with it).
    `interrupted()` is asked before every cycle: a reason (SIGTERM to the command) aborts the
    calibration, which restores at the next cycle and reports "aborted"."""
    import shutil
    import tempfile
    from gpucostd.clock import VirtualClock
    from gpucostd.loop import Daemon
    from gpucostd.replay import replay_config
    from gpucostd.sim.scenario import load_scenario

    sc = load_scenario(scenario)               # ScenarioError before anything else
    tmp = tempfile.mkdtemp(prefix="gpucostd-calibrate-")
    notes: List[str] = []
    # the scenario's simulated servers, never the configured (real) ones
    cfg = config.updated(inference={"metrics_url": ""}).with_endpoints(())
    if illustrative_prices and getattr(sc, "prices", None) is not None:
        # priced as `gpucostd run --simulate` prices this scenario: its [prices], unless the
        # config sets a price (docs/scenarios.md, "[prices]")
        from gpucostd.sim.sections import with_scenario_prices
        priced = with_scenario_prices(cfg, sc.prices, scenario)
        # (config, note), or a config whose price_note says it (where Config declares one)
        cfg, pnote = priced if isinstance(priced, tuple) else (
            priced, priced.price_note if priced is not cfg else None)
        if pnote:
            notes.append("Prices: " + pnote[:1].upper() + pnote[1:] + ".")
    if illustrative_prices and not cfg.cost.gpu_hour_usd and not cfg.model_prices and \
            not cfg.cost.energy_usd_per_kwh and getattr(sc, "prices", None) is None:
        # a scenario with [prices] is priced at those (as `gpucostd run --simulate` is: the
        # simulated daemon applies them and says so); only one without falls back to these
        cfg = cfg.updated(cost=dict(ILLUSTRATIVE_PRICES))
        notes.append("Prices: illustrative ($%.2f per GPU-hour, $%.2f per kWh, PUE %.1f); set "
                     "[cost] gpu_hour_usd, energy_usd_per_kwh and pue for yours."
                     % (ILLUSTRATIVE_PRICES["gpu_hour_usd"],
                        ILLUSTRATIVE_PRICES["energy_usd_per_kwh"], ILLUSTRATIVE_PRICES["pue"]))
    clock = VirtualClock()
    daemon = None
    try:
        rconfig = replay_config(cfg, os.path.join(tmp, "state"))
        daemon = Daemon(rconfig, clock=clock, simulate=scenario, journal=False)
        daemon.start()
        # the simulated node is in steady state between steps: a dozen samples per step
        # measure it as well as one per second does, in a fraction of the time
        interval = max(float(rconfig.daemon.interval_seconds), params.dwell_seconds / 12.0)
        daemon.step()
        clock.advance(interval)
        daemon.step()
        groups, gnotes = levers.plan(daemon, daemon.latest, params)
        cal = Calibration(daemon, params, groups, gnotes + notes, ident="simulated",
                          client_timeout=client_timeout)
        cal.dropin_path = dropin or os.path.join(tmp, "etc", "gpucostd.d", DROPIN_NAME)
        daemon.calibration = cal
        last_step = -2
        # virtual seconds it may take: every step, the start and the end, twice over; past
        # that something is wrong, and it ends (restoring) rather than runs forever
        deadline = clock.monotonic() + 2 * (max(len(g.steps) for g in groups) + 2) * (
            params.dwell_seconds + interval)
        try:
            while cal.active:
                clock.advance(interval)
                if on_cycle is not None:
                    on_cycle(daemon, cal)
                why = interrupted() if interrupted is not None else None
                if why:
                    cal.abort(why)
                if clock.monotonic() > deadline and cal.active:
                    daemon.record(stop(daemon, "internal error: the calibration did not "
                                                "end in its time (aborted, limits restored)"))
                    break
                daemon.step()
                if progress is not None and cal.step != last_step and cal.active:
                    last_step = cal.step
                    progress(cal.progress())
        except BaseException:
            # SIGINT / SIGTERM (KeyboardInterrupt, SystemExit): restore before leaving
            daemon.record(stop(daemon, "interrupted"))
            raise
        report = cal.report()
        if cal.applied:
            from gpucostd.config import MAX_CONFIG_BYTES
            from gpucostd.statefile import read_regular
            report["dropin_text"] = read_regular(cal.dropin, MAX_CONFIG_BYTES)[0].decode(
                "utf-8", "replace")
            report["enforced_after_apply"] = _sim_apply(daemon, cal, interval)
            if dropin is None:
                report["dropin"] = None
                report["notes"].insert(0, "Simulated --apply: the drop-in was loaded by the "
                                          "simulated daemon and not kept (--dropin FILE keeps "
                                          "it).")
        report["events"] = _calibration_events(daemon)
        return report
    finally:
        if daemon is not None:
            try:
                daemon.shutdown(system_shutdown=True)
            except Exception as e:  # noqa: BLE001
                LOG.debug("calibrate shutdown: %s", e)
        shutil.rmtree(tmp, ignore_errors=True)


def _calibration_events(daemon) -> List[Dict[str, Any]]:
    return [{"code": e.code, "severity": e.severity.name, "message": e.message}
            for e in sorted(daemon.store.query(), key=lambda e: (e.time, e.id or 0))
            if e.code.startswith("calibration")]


def _sim_apply(daemon, cal: Calibration, interval: float) -> Dict[str, Any]:
    """Load the config with the drop-in (as a reload would) and let the simulated daemon
    enforce it for one cycle; returns {gpu: limit} it then reads."""
    from gpucostd.config import load_files
    from gpucostd.replay import replay_config
    base = daemon.config
    new = load_files(base.path, [cal.dropin])
    new = replay_config(new, daemon.state_dir)
    daemon.retune(new)
    clock = daemon.clock
    for _ in range(2):                # the cycle applies after its reading; the next reads it
        clock.advance(interval)
        snap = daemon.step()
    out: Dict[str, Any] = {}
    for grp in cal.groups:
        for i in grp.gpus:
            g = snap.gpu(i)
            if grp.lever == "power":
                out[str(i)] = g.power_limit_watts if g else None
            else:
                name = levers.setting(grp)
                out[str(i)] = levers.value_text(name, daemon.tuning.read(name, i))
    return out


# ---------------------------------------------------------------------- the command
def _out(report: Dict[str, Any], as_json: bool) -> None:
    import sys
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        sys.stdout.write(text.format_report(report))


def _finish(report, as_json: bool, show) -> int:
    """Clear the progress line (when one was shown), print the report, the exit code."""
    import sys
    if show:
        sys.stderr.write("\r" + " " * 99 + "\r")
    _out(report, as_json)
    return _exit_for(report)


def _exit_for(report: Dict[str, Any]) -> int:
    state = report.get("state")
    if state == "done":
        return EXIT_DONE
    if state == "refused":
        return EXIT_REFUSED
    return EXIT_ABORTED


def _progress_printer(stream):
    """Progress on a terminal (one line, rewritten); nothing in a pipe or under systemd."""
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return None

    def show(p: Dict[str, Any]) -> None:
        stream.write("\r" + text.progress_line(p))
        stream.flush()
    return show


def run_cli(args, load_config, socket_path) -> int:
    """`gpucostd calibrate`: exit 0 done, 2 bad arguments or config, 3 daemon unreachable,
    4 not root, 5 refused, 6 aborted."""
    import sys
    if args.last:
        return _cli_last(args, load_config, socket_path)
    try:
        params = params_from({"gpus": args.gpus, "from_watts": args.from_watts,
                              "to_watts": args.to_watts, "steps": args.steps,
                              "dwell_seconds": args.dwell, "warmup_seconds": args.warmup,
                              "min_throughput": args.min_throughput,
                              "abort_below": args.abort_below, "apply": args.apply,
                              "lever": getattr(args, "lever", "auto"),
                              "from_mhz": getattr(args, "from_mhz", None),
                              "to_mhz": getattr(args, "to_mhz", None)})
    except ValueError as e:
        print(f"gpucostd: calibrate: {e}", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    if args.simulate is not None:
        from gpucostd.sim.scenario import ScenarioError
        import signal
        show = _progress_printer(sys.stderr)
        interrupted: List[str] = []

        def on_signal(signum, frame):
            # seen between cycles: the calibration aborts, restores and reports (exit 6), as
            # through the daemon; a second signal stops at once (restoring on the way out)
            if interrupted:
                raise KeyboardInterrupt
            interrupted.append(signal.Signals(signum).name)
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            report = run_simulated(args.simulate or DEFAULT_SIM_SCENARIO, cfg, params,
                                   dropin=args.dropin, progress=show,
                                   interrupted=lambda: interrupted and (
                                       f"interrupted ({interrupted[0]} to the calibrate "
                                       f"command)"))
        except CalibrationRefused as e:
            if show:
                sys.stderr.write("\n")
            print(f"gpucostd: calibrate refused: {e}", file=sys.stderr)
            return EXIT_REFUSED
        except ScenarioError as e:
            print(f"gpucostd: {e}", file=sys.stderr)
            return 2
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return _finish(report, args.json, show)
    if os.geteuid() != 0:
        print("gpucostd: calibrate changes GPU power limits and needs root: run it with sudo "
              "(or try it on a simulated node: gpucostd calibrate --simulate)", file=sys.stderr)
        return 4
    if args.dropin:
        print("gpucostd: calibrate: --dropin is for --simulate; the daemon writes "
              "gpucostd.d/calibrated.toml beside its config", file=sys.stderr)
        return 2
    return _cli_daemon(args, params, socket_path)


def _cli_daemon(args, params: Params, socket_path) -> int:
    import signal
    import sys
    from gpucostd.views.statusclient import StatusClientError, request
    path = socket_path(args)
    try:
        reply = request(path, {"cmd": "calibrate", "action": "start",
                               "params": params.to_json()})
    except StatusClientError as e:
        msg = str(e)
        print(f"gpucostd: calibrate: {msg}", file=sys.stderr)
        return 4 if "needs root" in msg else 3
    if reply.get("refused"):
        print(f"gpucostd: calibrate refused: {reply['refused']}", file=sys.stderr)
        return EXIT_REFUSED
    ident = reply["calibration"]["id"]
    show = _progress_printer(sys.stderr)
    interrupted: List[str] = []

    def on_signal(signum, frame):
        interrupted.append(signal.Signals(signum).name)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    report = None
    failures = 0
    sent_abort = False
    try:
        while True:
            msg = {"cmd": "calibrate", "id": ident, "action": "status"}
            if interrupted and not sent_abort:
                msg = {"cmd": "calibrate", "id": ident, "action": "abort",
                       "reason": f"interrupted ({interrupted[0]} to the calibrate command)"}
            try:
                reply = request(path, msg)
                failures = 0
                sent_abort = sent_abort or msg["action"] == "abort"
            except StatusClientError as e:
                failures += 1
                if failures >= 5:
                    print(f"\ngpucostd: calibrate: lost the daemon: {e}; it aborts and "
                          f"restores by itself when nobody asks for {CLIENT_TIMEOUT:g} s",
                          file=sys.stderr)
                    return 3
                time.sleep(1.0)
                continue
            if "report" in reply:
                report = reply["report"]
                break
            if show:
                show(reply["calibration"])
            time.sleep(0.2 if interrupted else 1.0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return _finish(report, args.json, show)


def _cli_last(args, load_config, socket_path) -> int:
    import sys
    from gpucostd.views.statusclient import StatusClientError, request
    report = None
    try:
        report = request(socket_path(args), {"cmd": "calibrate_last"}).get("report")
    except StatusClientError:
        cfg = load_config(args.config)          # no daemon: the state directory keeps it
        report = last_report(cfg.daemon.state_dir)
    if not report:
        print("gpucostd: no calibration has run yet (gpucostd calibrate)", file=sys.stderr)
        return 3
    _out(report, args.json)
    return 0


__all__ = ["run_cli", "run_simulated", "CalibrationRefused", "params_from"]
