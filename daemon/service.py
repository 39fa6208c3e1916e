"""`gpucostd run`: the long-running service process around the loop.

Wires the loop to its views (HTTP /metrics and /healthz, the status socket), to systemd
(sd_notify) and to signals: SIGTERM/SIGINT stop cleanly within 2 s, SIGHUP reloads the config.
"""
from __future__ import annotations


import errno
import logging
import signal
import threading
import time
from typing import Any, Dict, Optional

from gpucostd.record import logs
from gpucostd.config import Config
from gpucostd.views.statusapi import NotReady

LOG = logging.getLogger("gpucostd")
# An events request answers at most this many (the newest), and one such answer is built at a
# time (the others wait up to EVENTS_WAIT_SECONDS): a member of the socket's group asking for
# 100,000 events four times at once must not stall the loop or grow the daemon by 100s of MiB.
EVENTS_PER_REPLY = 5000
EVENTS_WAIT_SECONDS = 1.5


class _StatusCache:
    """Status JSON rendered when asked for, at most once per snapshot (the socket hands out the
    cached document): a daemon nobody asks spends nothing on it."""

    def __init__(self, render):
        self._render = render                   # snapshot -> status JSON (statusview)
        self._lock = threading.Lock()
        self._snap: Any = None
        self._doc: Optional[Dict[str, Any]] = None

    def set(self, snap: Any) -> None:
        with self._lock:
            self._snap, self._doc = snap, None

    def get(self) -> Dict[str, Any]:
        with self._lock:
            if self._doc is None:
                if self._snap is None:
                    raise NotReady("the daemon is starting; no snapshot yet, try again in a "
                                   "second")
                self._doc = self._render(self._snap)
            return self._doc


def _calibration_handlers(daemon):
    """The status socket's calibrate requests (gpucostd.calibration.session; the loop runs it):
    {"cmd": "calibrate", "action": "start", "params": {...}} -> {"calibration": progress} or
    {"refused": why}; "status" (also: I am still here) -> progress, and "report" once it
    ended; "abort" -> progress. {"cmd": "calibrate_last"} -> {"report": the last or null}."""
    from gpucostd.calibration import session

    def h_calibrate(req):
        action = req.get("action", "status")
        if action == "start":
            try:
                cal = session.start(daemon, req)
            except session.CalibrationRefused as e:
                return {"refused": str(e)}
            return {"calibration": cal.progress()}
        cal = daemon.calibration
        if cal is None or (req.get("id") and req.get("id") != cal.id):
            raise ValueError(f"no calibration {req.get('id') or ''} in this daemon".replace(
                "  ", " "))
        if action == "abort":
            cal.abort(str(req.get("reason") or "interrupted (the calibrate command got "
                                                "SIGINT or SIGTERM)"))
        elif action == "status":
            cal.poll()
        else:
            raise ValueError(f"action {action!r}; use start, status or abort")
        out = {"calibration": cal.progress()}
        if not cal.active:
            out["report"] = cal.report()
        return out

    def h_calibrate_last(req):
        cal = daemon.calibration
        if cal is not None and not cal.active:
            return {"report": cal.report()}
        return {"report": session.last_report(daemon.state_dir)}

    return h_calibrate, h_calibrate_last


def _bind_error(e: OSError, cfg: Config, bound: int) -> str:
    """One line: which address could not be taken, the key that sets it, how to fix it."""
    what = e.strerror or str(e)
    if bound == 0:
        return f"status socket {cfg.daemon.socket_path}: {what} ([daemon] socket_path)"
    address = cfg.daemon.listen_address
    fix = ("another process listens on it (`ss -ltnp` shows which): stop it, or set "
           "[daemon] listen_address to a free host:port (\"\" turns the metrics server off)")
    if e.errno != errno.EADDRINUSE:
        fix = "set [daemon] listen_address to an address of this host (\"\" turns it off)"
    return f"cannot listen on {address}: {what} ([daemon] listen_address); {fix}"


def run_daemon(cfg: Config, scenario: Optional[str]) -> int:
    from gpucostd.views import metrics
    from gpucostd.views import statusview
    from gpucostd.views.httpserver import MetricsServer, Published
    from gpucostd.views.textfile import TextfileWriter
    from gpucostd.loop import Daemon
    from gpucostd.notify import Notifier
    from gpucostd.views.statusapi import StatusServer

    logs.setup(cfg.daemon.log_level)
    web = None            # before anything starts: a bad web config stops the start (exit 2)
    if cfg.daemon.web_config_file:
        from gpucostd.views.webconfig import WebConfigError, WebConfigWatcher
        try:
            web = WebConfigWatcher(cfg.daemon.web_config_file)
        except WebConfigError as e:
            LOG.error("cannot start: %s", e)
            return 2
    notifier = Notifier()
    try:
        daemon = Daemon(cfg, simulate=scenario, notifier=notifier)
    except Exception as e:  # a scenario error, an unwritable state dir, ...
        from gpucostd.sim.scenario import ScenarioError
        if isinstance(e, (ScenarioError, OSError)):
            LOG.error("cannot start: %s", e)
            return 2 if isinstance(e, ScenarioError) else 1
        raise

    published = Published(daemon.clock.monotonic, renderer=metrics.render)
    published.interval = cfg.daemon.interval_seconds
    status_cache = _StatusCache(statusview.snapshot_json)
    textfile = TextfileWriter(published.exposition)

    def publish(snap):
        published.interval = daemon.config.daemon.interval_seconds
        published.publish_snapshot(snap, snap.monotonic)      # rendered when scraped
        textfile.update(daemon.config.export.textfile_path, snap.monotonic)
        status_cache.set(snap)                                # rendered when asked

    daemon.add_publisher(publish)

    def h_status(req):
        doc = status_cache.get()
        if daemon.watcher is not None:        # read, not yet judged: shown at once
            doc = statusview.with_pending_faults(doc, daemon.watcher.pending())
        return {"status": doc}

    events_gate = threading.BoundedSemaphore(1)     # one large answer in memory at a time

    def h_events(req):
        since = req.get("since")
        asked = max(1, min(int(req.get("limit") or 200), 100_000))
        limit = min(asked, EVENTS_PER_REPLY)
        if not events_gate.acquire(timeout=EVENTS_WAIT_SECONDS):
            raise NotReady("busy answering other events requests; ask again in a moment")
        try:
            events = daemon.store.query(since=float(since) if since is not None else None,
                                        limit=limit)
            reply: Dict[str, Any] = {"events": [statusview.event_json(e) for e in events]}
        finally:
            events_gate.release()
        if asked > limit and len(events) == limit:
            reply["more"] = True
            reply["note"] = (f"at most {EVENTS_PER_REPLY} events per request: these are the "
                             f"newest; narrow the window (since) for older ones")
        return reply

    def h_cost(req):
        from gpucostd.cost.accountant import breakdown
        return {"cost": breakdown(daemon.cost, float(req.get("since_seconds") or 86400))}

    def h_ack(req):
        gpu = req.get("gpu")
        code = req.get("code")
        events = daemon.ack(None if gpu is None else int(gpu),
                            None if code is None else str(code))
        return {"events": [statusview.event_json(e) for e in events]}

    h_calibrate, h_calibrate_last = _calibration_handlers(daemon)
    servers = []
    try:
        servers.append(StatusServer(cfg.daemon.socket_path,
                                    {"status": h_status, "events": h_events, "cost": h_cost,
                                     "ack": h_ack, "ping": lambda req: {},
                                     "calibrate": h_calibrate,
                                     "calibrate_last": h_calibrate_last},
                                    group=cfg.daemon.socket_group,
                                    root_only=("ack", "calibrate")))
        if cfg.daemon.listen_address:
            servers.append(MetricsServer(cfg.daemon.listen_address, published, web=web))
    except OSError as e:
        for s in servers:          # bound, never started: close, never shutdown() (it would wait)
            s.close()
        LOG.error("cannot start: %s", _bind_error(e, cfg, bound=len(servers)))
        daemon.shutdown(system_shutdown=True)
        return 1

    def on_term(signum, frame):
        LOG.info("received %s, stopping", signal.Signals(signum).name)
        daemon.stop()

    def on_hup(signum, frame):
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)

    for s in servers:
        s.start()
    daemon.start()
    LOG.info("gpucostd running: metrics on %s%s, status socket %s%s",
             cfg.daemon.listen_address or "(off)",
             "" if web is None else (" (TLS)" if web.current().ssl_context else "")
             + ("" if web is None or not web.current().users else " (basic auth)"),
             cfg.daemon.socket_path,
             f", simulated node {scenario}" if scenario else "")
    started = time.monotonic()
    try:
        daemon.run()
    finally:
        for s in servers:
            s.stop()
        textfile.remove()
        daemon.shutdown()
        LOG.info("gpucostd stopped after %.0f s", time.monotonic() - started)
    return 0


__all__ = ["run_daemon"]
