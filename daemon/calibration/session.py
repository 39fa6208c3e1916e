"""The calibration session of `gpucostd calibrate`: find the power limit that gives the most
tokens per dollar, safely. (The command itself, through the daemon or on a simulated node, is
gpucostd.calibration.command; it imports this module, never the other way round.)

A ``Calibration`` is a state machine the daemon's loop drives, one call per cycle
(``on_cycle(snapshot)``): it steps the power limit of each GPU group (the GPUs of one
inference endpoint) from the top of the range down, measures every step after its warm-up
(gpucostd.calibration.maths has the maths) and puts every limit back at the end. It runs inside
the daemon (the status socket's ``calibrate`` request; the loop, health and enforcement know
it runs: the tuners hold the power limits it steps) or one-shot on a simulated node on a
virtual clock (``run_simulated``).

Safety:
- limits are only ever within the group's [min, max] (the narrowest of its GPUs);
- before the first write the limit each GPU had is saved in the tuners' originals store (if
  none is saved yet) and in ``<state_dir>/calibration-progress.json``; a daemon that died in the
  middle (SIGKILL, power cut) puts those limits back at its next start
  (``recover_interrupted``);
- it aborts, restoring at once, when a GPU's health leaves OK, a throttle reason other than
  SwPowerCap appears, the throughput falls below ``abort_below`` of the best step, the
  endpoint stops answering, a limit changes behind its back, a write fails, the command is
  interrupted (SIGINT/SIGTERM, or it stops asking for progress), the daemon stops or its own
  cycle raises (an internal error: ``cycle`` aborts rather than fail again every cycle);
- each group steps through its own plan (a narrow range rounds to fewer whole watts): one that
  ends first gets its limits back at once while the others go on;
- it refuses to start, saying why, while a GPU is idle, unhealthy or throttled for another
  reason, or when no token source maps to the GPUs.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional

from gpucostd.calibration import levers, maths
from gpucostd.calibration.mig import down_url, group_reading
from gpucostd.calibration.maths import (CalibrationRefused, Group, Params,  # noqa: F401
                                       gpu_trouble, params_from, plan)
from gpucostd.calibration.report import binding_note, dropin_text, kept_overrides, summary
from gpucostd.snapshot import Event, Severity
from gpucostd.statefile import write_atomic

LOG = logging.getLogger("gpucostd.calibrate")

PROGRESS_FILE = "calibration-progress.json"
LAST_FILE = "calibration-last.json"
DROPIN_NAME = "calibrated.toml"
SETTING = "power_limit_watts"
DEFAULT_SIM_SCENARIO = "builtin:calibrate"
# prices of --simulate when neither the config nor the scenario's [prices] sets one (said so
# in the report): the demo's (builtin:h100x8's [prices])
ILLUSTRATIVE_PRICES = {"gpu_hour_usd": 2.99, "energy_usd_per_kwh": 0.08, "pue": 1.3}
CLIENT_TIMEOUT = 30.0        # no progress request for this long: the command went away

EXIT_DONE, EXIT_REFUSED, EXIT_ABORTED = 0, 5, 6


# ---------------------------------------------------------------------- the state machine
class Calibration:
    """One calibration. The loop calls on_cycle(snapshot) after every cycle; abort() may be
    called from any thread (it only asks: the loop restores at its next cycle, or
    restore_now() when the loop is stopping)."""

    def __init__(self, daemon, params: Params, groups: List[Group], notes: List[str],
                 ident: str = "", client_timeout: Optional[float] = CLIENT_TIMEOUT):
        self.daemon = daemon
        self.params = params
        self.groups = groups
        self.notes = list(notes)
        self.id = ident or f"{int(daemon.clock.time())}"
        self.state = "pending"         # pending running done aborted failed
        self.reason: Optional[str] = None
        self.step = -1
        self.step_started: Optional[float] = None
        self.started_at = daemon.clock.time()
        self.finished_at: Optional[float] = None
        self.best_tps: Dict[int, float] = {}
        self.client_timeout = client_timeout
        self.last_poll = daemon.clock.monotonic()
        self._abort_request: Optional[str] = None
        self.dropin: Optional[str] = None
        self.applied = False
        self.restore_errors: List[str] = []
        self.prices = {"gpu_hour_usd": None, "energy_usd_per_kwh":
                       float(daemon.config.cost.energy_usd_per_kwh),
                       "pue": float(daemon.config.cost.pue)}
        self.events: List[Event] = []
        self.scenario = daemon.simulate
        self.dropin_path: Optional[str] = None
        self.summary: Optional[Dict[str, Any]] = None     # of report(), once it has ended

    # -- public
    @property
    def active(self) -> bool:
        return self.state in ("pending", "running")

    @property
    def gpus(self) -> List[int]:
        return [i for g in self.groups for i in g.gpus]

    @property
    def n_steps(self) -> int:
        """The steps of the longest group's plan: each group steps through its own and
        ends (its limits back) after its last one."""
        return max((len(g.steps) for g in self.groups), default=0)

    def stepping(self) -> List[Group]:
        """The groups still stepping (not through their plan yet)."""
        return [g for g in self.groups if not g.done and 0 <= self.step < len(g.steps)]

    def poll(self) -> None:
        self.last_poll = self.daemon.clock.monotonic()

    def abort(self, reason: str) -> None:
        if self.active and self._abort_request is None:
            self._abort_request = reason
            self.daemon.clock.wake()

    # -- the loop's part
    def on_cycle(self, snap) -> None:
        if not self.active:
            return
        if self.state == "pending":
            if self._abort_request:          # asked to stop before anything was written
                self.state, self.reason = "aborted", self._abort_request
                self.finished_at = self.daemon.clock.time()
                self._save_last()
                return
            self._begin(snap)
            return
        now = snap.monotonic
        if self._abort_request:
            return self._abort(self._abort_request)
        if self.client_timeout is not None and now - self.last_poll > self.client_timeout:
            return self._abort(f"the calibrate command stopped asking for progress for "
                               f"{self.client_timeout:g} s (interrupted or disconnected)")
        readings = {r.url: r for r in snap.inference or () if r}
        stepping = self.stepping()
        for grp in stepping:
            limit = grp.steps[self.step]
            for i in grp.gpus:
                why = gpu_trouble(snap, i)
                if why:
                    return self._abort(why)
                why = levers.changed_behind(grp, snap.gpu(i), limit)
                if why:
                    return self._abort(why)
            r = group_reading(grp.url, grp.urls, readings)       # MIG: every instance's
            if r is None or not r.ok:
                where = down_url(grp.url, grp.urls, readings)
                return self._abort(f"the inference endpoint {where} stopped answering ("
                                   f"{getattr(r, 'error', None) or 'no reading'})")
            if now < self.step_started + self.params.warmup:
                continue
            grp.window.add(maths.sample_of(snap, grp, r))
            best = self.best_tps.get(id(grp))
            w = grp.window
            if best and w.seconds >= min(5.0, self.params.dwell_seconds - self.params.warmup):
                tps = w.tokens_per_second()
                if tps is not None and tps < self.params.abort_below * best:
                    return self._abort(
                        f"{grp.label()}: throughput {tps:,.0f} tokens/s at "
                        f"{levers.step_words(grp, limit)} is below "
                        f"the hard floor {self.params.abort_below * 100:g}% of the best step "
                        f"({best:,.0f} tokens/s)")
        if now >= self.step_started + self.params.dwell_seconds:
            for grp in stepping:
                row = maths.step_row(grp.steps[self.step], grp.window, grp.price_sum,
                                     self._energy_price(), self._pue(), grp.lever)
                grp.rows.append(row)
                tps = row.get("tokens_per_second")
                if tps is not None:
                    self.best_tps[id(grp)] = max(self.best_tps.get(id(grp), 0.0), tps)
                grp.window = maths.Window()
            if all(self.step + 1 >= len(g.steps) for g in stepping):
                return self._finish()
            for grp in stepping:
                if self.step + 1 >= len(grp.steps):
                    self._group_done(grp)       # through its own plan: restored now
            self._set_step(self.step + 1)

    # -- internals
    def _energy_price(self) -> float:
        return float(self.prices["energy_usd_per_kwh"] or 0.0)

    def _pue(self) -> float:
        return float(self.prices["pue"] or 1.0)

    def _begin(self, snap) -> None:
        d = self.daemon
        try:
            # the groups were planned on the snapshot the request saw: check again now
            levers.plan(d, snap, replace(self.params, gpus=tuple(self.gpus)))
            for grp in self.groups:
                grp.start = levers.start_values(d, snap, grp)
        except CalibrationRefused as e:
            self.state, self.reason = "refused", str(e)
            self.finished_at = d.clock.time()
            self._save_last()
            return
        for g in self.groups:
            for i in g.gpus:
                d.tuning.hold(levers.setting(g), i)
        try:
            self._write_progress()                   # before anything is saved or written
            for grp in self.groups:
                for i in grp.gpus:
                    grp.saved[i] = d.tuning.save_original(
                        levers.setting(grp), i, levers.original(grp, grp.start[i]),
                        uuid=grp.uuids.get(i))
            self._write_progress()
        except Exception as e:  # noqa: BLE001 - OriginalsError, OSError: nothing written yet
            self.state, self.reason = "failed", f"cannot save the original limits: {e}"
            self._release()
            self.finished_at = d.clock.time()
            self._save_last()
            return
        self.state = "running"
        gpus = ", ".join(map(str, self.gpus))
        self._event("calibration_started", Severity.OK, "none",
                    f"{self.kind()} started on GPU {gpus}: "
                    f"{self.n_steps} steps of {self.params.dwell_seconds:g} s",
                    {"gpus": self.gpus, "params": self.params.to_json()})
        self._set_step(0)

    def kind(self) -> str:
        """"power-limit calibration", "SM-clock calibration" or both."""
        words = {"power": "power-limit", "clocks": "SM-clock", "profile": "power-profile"}
        used = []
        for g in self.groups:
            if words.get(g.lever, g.lever) not in used:
                used.append(words.get(g.lever, g.lever))
        return " and ".join(used or ["power-limit"]) + " calibration"

    def _set_step(self, k: int) -> None:
        from gpucostd.tuners.base import TunerError
        self.step = k
        stepping = self.stepping()
        for grp in stepping:
            limit = grp.steps[k]
            for i in grp.gpus:
                try:
                    self._write(i, limit, grp)
                except TunerError as e:
                    return self._abort(f"cannot set the {levers.setting(grp)} step: {e}")
        self.step_started = self.daemon.clock.monotonic()
        LOG.info("calibration step %d/%d: %s", k + 1, self.n_steps,
                 ", ".join(f"{g.label()} {levers.step_words(g, g.steps[k])}"
                           for g in stepping))

    def _group_done(self, grp: Group) -> None:
        """A group through its plan while others go on: its limits back now, its GPUs no
        longer held (a failed restore is tried again at the end, still held)."""
        grp.done = True
        errors = self._restore_group(grp)
        if errors:
            LOG.warning("calibration: %s measured; limits NOT restored yet (tried again at the "
                        "end): %s", grp.label(), "; ".join(errors))
            return
        for i in grp.gpus:
            self.daemon.tuning.release(levers.setting(grp), i)
        try:
            self._write_progress()              # a crash now restores only the others
        except OSError as e:
            LOG.warning("calibration: cannot update %s: %s", PROGRESS_FILE, e)
        LOG.info("calibration: %s measured at its %d steps; restored", grp.label(),
                 len(grp.steps))

    def _write(self, index: int, watts: Any, grp: Group) -> None:
        if grp.lever != "profile" and not grp.lo - 1e-6 <= watts <= grp.hi + 1e-6:
            raise AssertionError(f"{watts} outside {grp.lo}..{grp.hi}")   # never outside
        self.daemon.tuning.set(levers.setting(grp), index, levers.value(grp, watts),
                               grp.names.get(index), grp.uuids.get(index))

    def _restore_all(self) -> List[str]:
        """Every GPU back at its start limit; the originals we saved forgotten. Errors as
        text (the progress file stays, so the next start tries again)."""
        errors: List[str] = []
        for grp in self.groups:
            if not grp.restored:
                errors.extend(self._restore_group(grp))
        if not errors:
            _remove(os.path.join(self.daemon.state_dir, PROGRESS_FILE))
        self._release()
        return errors

    def _restore_group(self, grp: Group) -> List[str]:
        from gpucostd.tuners.base import TunerError
        errors: List[str] = []
        tuning = self.daemon.tuning
        for i in grp.gpus:
            if i not in grp.start:
                continue
            start = levers.original(grp, grp.start[i])
            try:
                tuning.restore_held(levers.setting(grp), i, start, grp.names.get(i),
                                    grp.uuids.get(i))
            except TunerError as e:
                errors.append(str(e))
                continue
            if grp.saved.get(i):
                try:
                    tuning.forget_original(levers.setting(grp), i)
                except Exception as e:  # noqa: BLE001
                    errors.append(str(e))
        grp.restored = not errors
        return errors

    def _release(self) -> None:
        for g in self.groups:
            for i in g.gpus:
                self.daemon.tuning.release(levers.setting(g), i)

    def _abort(self, reason: str, restore: bool = False) -> None:
        was_running = self.state == "running"
        self.state, self.reason = "aborted", reason
        self.finished_at = self.daemon.clock.time()
        errors = self._restore_all() if was_running or restore else []
        self.restore_errors = errors
        LOG.warning("calibration aborted: %s; limits %s", reason,
                    "restored" if not errors else "NOT restored: " + "; ".join(errors))
        for grp in self.groups:
            maths.finish_rows(grp.rows)
        self._event("calibration_aborted", Severity.WARN,
                    "none" if not errors else "run `gpucostd restore` as root",
                    f"{self.kind()} aborted: {reason}; limits "
                    + ("restored" if not errors else "NOT restored: " + "; ".join(errors)),
                    {"gpus": self.gpus, "reason": reason})
        self._save_last()

    def _finish(self) -> None:
        d = self.daemon
        errors = self._restore_all()
        self.restore_errors = errors
        self.finished_at = d.clock.time()
        for grp in self.groups:
            grp.recommendation = maths.recommend(grp.rows, self.params.min_throughput)
            note = binding_note(grp.rows, len(grp.gpus)) if grp.lever == "power" \
                else None
            if note:
                grp.notes.append(note)
        self.state = "done" if not errors else "failed"
        if errors:
            self.reason = "limits not restored: " + "; ".join(errors)
        recs = {i: (g.recommendation.get("tokens_per_dollar") or {}).get("setting")
                for g in self.groups for i in g.gpus}
        words = {i: levers.step_words(g, recs[i]) for g in self.groups for i in g.gpus
                 if recs[i] is not None}
        if self.params.apply and not errors:
            if any(v is None for v in recs.values()):
                self.notes.append("not applied: a group has no tokens-per-dollar "
                                  "recommendation (set [cost] gpu_hour_usd)")
            else:
                try:
                    self.dropin = self._apply(recs)
                    self.applied = True
                except OSError as e:
                    self.notes.append(f"not applied: cannot write the drop-in: "
                                      f"{e.strerror or e}")
        text = ", ".join(f"GPU {i} {w}" for i, w in words.items())
        self._event("calibration_finished", Severity.OK if not errors else Severity.WARN,
                    "none" if not errors else "run `gpucostd restore` as root",
                    f"{self.kind()} finished: recommended {text or 'nothing'}"
                    + (f"; applied ({self.dropin})" if self.applied else "; limits restored"),
                    {"gpus": self.gpus, "recommended": {str(k): v for k, v in recs.items()},
                     "levers": {str(i): g.lever for g in self.groups for i in g.gpus},
                     "applied": self.applied})
        self._save_last()

    def _apply(self, recs: Dict[int, int]) -> str:
        path = self.dropin_path or dropin_path(self.daemon.config.path)
        kept: List = []
        try:
            from gpucostd.config import MAX_CONFIG_BYTES, tomllib
            from gpucostd.statefile import read_regular
            blob = read_regular(path, MAX_CONFIG_BYTES)[0]
            kept = kept_overrides(tomllib.loads(blob.decode("utf-8")), self.groups)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, RecursionError) as e:   # UnreadableFile, TOMLDecodeError
            self.notes.append(f"the earlier {path} was unreadable ({e}); replaced")
        text = dropin_text(self.groups, recs, self.daemon.config, self.daemon.clock.time(),
                           kept)
        write_atomic(path, text, mode=0o644)
        LOG.info("calibration: recommended limits written to %s; reloading", path)
        self.daemon.request_reload()
        return path

    def _event(self, code: str, sev: Severity, action: str, msg: str,
               fields: Dict[str, Any]) -> None:
        self.events.append(Event(self.daemon.clock.time(), "node", code, sev, action, msg,
                                 fields=fields))

    def take_events(self) -> List[Event]:
        out, self.events = self.events, []
        return out

    def fail(self, error: BaseException) -> None:
        """An unexpected error in the calibration's own cycle: abort and restore now (else the
        loop would call it again every cycle, failing the same way forever)."""
        reason = f"internal error in the calibration ({type(error).__name__}: {error})"
        LOG.error("calibration: %s", reason, exc_info=error)
        if not self.active:
            return
        try:
            self._abort(reason, restore=self.state == "running" or any(
                any(g.saved.values()) for g in self.groups))
        except Exception as e:  # noqa: BLE001 - it ends, whatever happens
            problem = f"{type(e).__name__}: {e}"
            self.state, self.reason = "failed", f"{reason}; restoring failed: {problem}"
            self.restore_errors = [problem]
            self._event("calibration_aborted", Severity.WARN, "run `gpucostd restore` as root",
                        f"{self.kind()} aborted: {self.reason}; limits NOT restored",
                        {"gpus": self.gpus, "reason": self.reason})
            self._save_last()
        self._release()

    def _write_progress(self) -> None:
        data = {"version": 1, "id": self.id, "started_at": self.started_at, "pid": os.getpid(),
                "gpus": [dict({"index": i, "uuid": g.uuids.get(i),
                               "saved_original": bool(g.saved.get(i))},
                              **({"start_watts": g.start[i]} if g.lever == "power" else
                                 {"setting": levers.setting(g), "start": _json(g.start[i])}))
                         for g in self.groups if not g.restored for i in g.gpus]}
        write_atomic(os.path.join(self.daemon.state_dir, PROGRESS_FILE),
                     json.dumps(data, indent=2) + "\n")

    def _save_last(self) -> None:
        try:
            write_atomic(os.path.join(self.daemon.state_dir, LAST_FILE),
                         json.dumps(self.report(), indent=2, sort_keys=True) + "\n")
        except OSError as e:
            LOG.warning("cannot keep the calibration report: %s", e)

    # -- views
    def progress(self) -> Dict[str, Any]:
        out = {"id": self.id, "state": self.state, "reason": self.reason,
               "gpus": self.gpus, "steps": self.n_steps, "step": self.step + 1}
        if self.state == "running" and self.step >= 0:
            elapsed = self.daemon.clock.monotonic() - (self.step_started or 0)
            out["step_elapsed_seconds"] = round(max(0.0, elapsed), 1)
            # the limits held now: a group through its plan has its own back already
            out.update(levers.progress(self.stepping(), self.step))
            n = self.n_steps
            out["remaining_seconds"] = round(max(0.0, (n - self.step) *
                                                 self.params.dwell_seconds - elapsed), 1)
        return out

    def report(self) -> Dict[str, Any]:
        cfg = self.daemon.config
        groups = []
        for g in self.groups:
            rec = g.recommendation
            groups.append({
                "gpus": list(g.gpus), "endpoint": g.url, "endpoints": list(g.urls),
                "uuids": {str(i): g.uuids.get(i) for i in g.gpus},
                "lever": g.lever, "lever_why": g.lever_why, "notes": list(g.notes),
                "steps": list(g.steps), "start": [_json(g.start.get(i)) for i in g.gpus],
                "restored": g.restored,
                **({"range_watts": [g.lo, g.hi], "steps_watts": list(g.steps),
                    "start_limits_watts": [g.start.get(i) for i in g.gpus]}
                   if g.lever == "power" else {}),
                "gpu_hour_usd": round(g.price_sum, 6), "rows": g.rows,
                "recommendation": {k: rec.get(k) for k in (
                    "tokens_per_dollar", "tokens_per_joule", "tokens_per_joule_at_floor",
                    "joule_gain", "why")},
            })
        return {"schema": 1, "id": self.id, "state": self.state, "reason": self.reason,
                "host": getattr(self.daemon, "hostname", None), "scenario": self.scenario,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "params": self.params.to_json(), "currency": cfg.cost.currency,
                "prices": {"gpu_hour_usd": [g.price_sum for g in self.groups],
                           "energy_usd_per_kwh": self._energy_price(), "pue": self._pue()},
                "groups": groups, "applied": self.applied, "dropin": self.dropin,
                "restore_errors": self.restore_errors, "notes": self.notes}


def _json(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _whole(w: float):
    w = round(float(w), 3)
    return int(w) if w.is_integer() else w


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------- drop-in
def dropin_path(config_path: Optional[str]) -> str:
    from gpucostd.config import dropin_dir
    return os.path.join(dropin_dir(config_path), DROPIN_NAME)


# ---------------------------------------------------------------------- in the daemon
def start(daemon, request: Dict[str, Any]) -> "Calibration":
    """The status socket's calibrate start: validate against the latest snapshot, then hand
    the calibration to the loop (its next cycle saves the originals and sets the first step).
    Raises CalibrationRefused / ValueError."""
    params = params_from(request.get("params") or {})
    current = getattr(daemon, "calibration", None)
    if current is not None and current.active:
        raise CalibrationRefused(f"a calibration is already running on GPU "
                                 f"{', '.join(map(str, current.gpus))} (id {current.id})")
    groups, notes = levers.plan(daemon, daemon.latest, params)
    cal = Calibration(daemon, params, groups, notes,
                      ident=f"{int(daemon.clock.time())}-{os.getpid()}")
    daemon.calibration = cal
    daemon.clock.wake()
    return cal


def cycle(daemon, snap) -> List[Event]:
    """The loop's call after each cycle: drive the calibration, return its events."""
    cal = getattr(daemon, "calibration", None)
    if cal is None:
        return []
    try:
        cal.on_cycle(snap)
    except Exception as e:  # noqa: BLE001 - never left running half-way: abort, restore
        cal.fail(e)
    return cal.take_events()


def stop(daemon, reason: str = "the daemon is stopping") -> List[Event]:
    """Daemon shutdown: abort a running calibration and restore at once."""
    cal = getattr(daemon, "calibration", None)
    if cal is None or not cal.active:
        return []
    if cal.state == "running":
        cal._abort(reason)
    else:
        cal.state, cal.reason = "aborted", reason
    return cal.take_events()


def snapshot_info(daemon) -> Optional[Dict[str, Any]]:
    """snapshot.calibration: the running one's progress (with its uuids), and the
    last report's recommended limits per GPU and those --apply wrote while its drop-in is
    still there (for /metrics)."""
    cal = getattr(daemon, "calibration", None)
    info: Dict[str, Any] = {"running": bool(cal is not None and cal.active)}
    if info["running"]:
        info["progress"] = cal.progress()
        info["uuids"] = {str(i): g.uuids.get(i) for g in cal.groups for i in g.gpus}
        return info
    if cal is not None:
        if cal.summary is None:
            cal.summary = summary(cal.report())
        last = cal.summary
    else:
        last = daemon.calibration_last.summary()
    if last:
        last = dict(last)
        if not (last.get("dropin") and os.path.exists(last["dropin"])):
            last["applied"], last["applied_clocks"] = {}, {}
        info["last"] = last
    return info


class LastCalibration:
    """The summary of the last calibration's report (calibration-last.json), read once: the
    daemon's home for it while no calibration has run in this process."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self._read = False
        self._summary: Optional[Dict[str, Any]] = None

    def summary(self) -> Optional[Dict[str, Any]]:
        if not self._read:
            rep = last_report(self.state_dir)
            self._summary = summary(rep) if rep else None
            self._read = True
        return self._summary


def last_report(state_dir: str) -> Optional[Dict[str, Any]]:
    from gpucostd.statefile import read_json
    try:
        data = read_json(os.path.join(state_dir, LAST_FILE))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def recover_interrupted(daemon, gpus) -> List[Event]:
    """At start: a calibration that did not end (the daemon was killed) left
    calibration-progress.json; put each GPU's limit back (matched by UUID) and forget the
    originals it saved. Returns the events to record."""
    from gpucostd.tuners.base import TunerError
    path = os.path.join(daemon.state_dir, PROGRESS_FILE)
    from gpucostd.statefile import read_json
    try:
        data = read_json(path)
        entries = list(data["gpus"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Event(daemon.clock.time(), "node", "calibration_restore_failed", Severity.WARN,
                      "check the power limits and run `gpucostd restore` as root",
                      f"{path}: unreadable ({e}); an interrupted calibration's limits may not "
                      f"be restored")]
    by_uuid = {g.uuid: g for g in gpus if g.uuid}
    lever_of = {v: k for k, v in maths.LEVER_SETTINGS.items()}
    done, errors = [], []
    for e in entries:
        try:
            name = e.get("setting", SETTING)
            index, uuid = int(e["index"]), e.get("uuid")
            watts = levers.tuner_form(lever_of[name], e["start_watts"] if name == SETTING
                                      else e["start"])
        except (KeyError, TypeError, ValueError, AttributeError):   # lever_of[name] too
            errors.append(f"bad entry {e!r}")
            continue
        g = by_uuid.get(uuid) if uuid else next((x for x in gpus if x.index == index), None)
        if g is None:
            errors.append(f"GPU {uuid or index} is not on this node now")
            continue
        try:
            daemon.tuning.restore_held(name, g.index, watts, g.name, g.uuid)
        except TunerError as ex:
            errors.append(str(ex))
            continue
        if e.get("saved_original"):
            try:
                daemon.tuning.forget_original(name, g.index)
            except Exception as ex:  # noqa: BLE001
                errors.append(str(ex))
        done.append(f"GPU {g.index} {levers.value_text(name, watts)}")
    if not errors:
        _remove(path)
    now = daemon.clock.time()
    if errors:
        return [Event(now, "node", "calibration_restore_failed", Severity.WARN,
                      "check the power limits and run `gpucostd restore` as root",
                      "an interrupted calibration's limits were not all restored: "
                      + "; ".join(errors) + (f" (restored {', '.join(done)})" if done else ""))]
    return [Event(now, "node", "calibration_restored", Severity.WARN, "none",
                  "a calibration was interrupted (the daemon stopped without ending it); "
                  f"settings restored: {', '.join(done) or 'none'}")]


