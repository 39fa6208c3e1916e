"""The tuning manager: plan, apply, verify (drift, enforcement) and restore of every setting.

One manager owns the tuner modules (GPU power limit, GPU persistence mode, NIC rings) and the
saved originals. The discipline (learned from tuned, plus the periodic verify tuned lacks):
- before the first write to a setting its original is saved to <state_dir>/originals.json
  (atomically, fsynced); an original already there is never overwritten;
- every write is read back; a setting counts as applied only when the read-back matches;
- verify (at most every tuning.verify_interval_seconds) compares actual with desired; a setting
  that was in sync and now is not has *drifted*: one "drift" event with old/new values, one
  count in the drift counter, and (with tuning.enforce) it is written again;
- restore writes every saved original back and removes it from the file; the loop skips it
  while the system is shutting down (`shutdown_in_progress()`).
One failing setting never stops the others; every failure is a message saying what and how.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import textwrap
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from gpucostd.snapshot import Event, Setting, Severity
from gpucostd.tuners.base import (Change, Planned, TunerError, fmt_value, gpu_label,
                                  normalise_number)
from gpucostd.tuners.gpu_clocks import GpuLockedClocksTuner, GpuPowerProfileTuner
from gpucostd.tuners.gpu_persistence import GpuPersistenceTuner
from gpucostd.tuners.gpu_power import GpuPowerTuner
from gpucostd.tuners.nic_rings import NicRingsTuner
from gpucostd.tuners.originals import OriginalsError, OriginalsStore

LOG = logging.getLogger("gpucostd.tuning")
WIDTH = 100
DEFAULT_RESTORE_HINT = "run `gpucostd restore` as root once the cause is fixed"
UNITS = {"power_limit_watts": "W"}

__all__ = ["TuningManager", "Change", "shutdown_in_progress", "format_plan", "format_changes",
           "plan_exit_code"]


class TuningManager:
    def __init__(self, config, gateway, state_dir: str, clock, netlink=None,
                 nic_driver: Optional[Callable[[str], Optional[str]]] = None,
                 restore_hint: Optional[str] = None):
        self.config = config
        self.gateway = gateway
        self.state_dir = state_dir
        self.clock = clock
        self.restore_hint = restore_hint or DEFAULT_RESTORE_HINT
        self._netlink = netlink
        self._own_netlink = netlink is None
        self.originals = OriginalsStore(state_dir, clock)
        self.power = GpuPowerTuner(gateway)
        self.persistence = GpuPersistenceTuner(gateway)
        self.clocks = GpuLockedClocksTuner(gateway)
        self.profile = GpuPowerProfileTuner(gateway)
        # the host's facts come from the loop's host probe: a NIC's driver, for the message
        # of a driver that cannot set its rings
        self.nic = NicRingsTuner(self._get_netlink, nic_driver)
        self.drift_counts: Dict[Tuple[str, str], int] = {}
        self._established: Dict[Tuple[str, str], Any] = {}   # desired value seen in sync
        self._drifted: Dict[Tuple[str, str], Any] = {}       # drift counted, not resolved
        self._last_verify: Optional[float] = None
        self._settings: List[Setting] = []
        self._gpus: Tuple[Any, ...] = ()
        # (name, subject) of settings another part holds for now (`gpucostd calibrate` steps
        # the power limit): apply and verify neither write nor count drift on them
        self.held: set = set()

    # ------------------------------------------------------------------ plumbing
    def _get_netlink(self):
        if self._netlink is None:
            from gpucostd.hw.netlink import Netlink
            self._netlink = Netlink()
        return self._netlink

    @property
    def nic_rings(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        """{ifname: {"current": {queue: n}, "max": {queue: n}}} as last read (for
        snapshot.extra["nic_rings"])."""
        configured = set(self.config.nic_tuning)
        return {k: v for k, v in self.nic.rings.items() if k in configured}

    @property
    def settings(self) -> List[Setting]:
        return list(self._settings)

    @property
    def warnings(self) -> List[str]:
        return list(self.originals.warnings)

    @property
    def originals_problem(self) -> Optional[str]:
        """Why the saved originals cannot be used (then nothing is tuned), or None."""
        return self.originals.check()

    def reconfigure(self, config) -> None:
        """A reloaded config: the next verify runs at once and applies the new desired state."""
        self.config = config
        self._last_verify = None
        self.originals.reload()       # an operator may have fixed or removed a damaged file

    def reload_originals(self) -> None:
        """Read the saved originals again (the state directory was made again)."""
        self.originals.reload()

    def close(self) -> None:
        if self._own_netlink and self._netlink is not None:
            try:
                self._netlink.close()
            except Exception:
                pass
            self._netlink = None

    @property
    def gpu_tuners(self) -> Tuple[Any, ...]:
        return (self.power, self.persistence, self.clocks, self.profile)

    def _plan_items(self, gpus: Iterable[Any]) -> List[Planned]:
        from gpucostd.config import ConfigError
        gpus = tuple(sorted(gpus or (), key=lambda g: g.index))
        if gpus:
            self._gpus = gpus
        items: List[Planned] = []
        for g in gpus:
            try:
                desired, sources = self.config.gpu_settings_for(g.index, g.uuid, g.name)
            except ConfigError as e:
                items.append(Planned(None, f"gpu:{g.index}", "gpu_settings", None, None,
                                     "tuning.gpu.override", gpu_label(g.index, g.name),
                                     error=str(e)))
                continue
            for tuner in self.gpu_tuners:
                try:
                    items.extend(tuner.plan(g, desired, sources))
                except Exception as e:    # a tuner bug must not take the others down
                    LOG.exception("planning %s for GPU %s failed", tuner.names[0], g.index)
                    items.append(Planned(tuner, f"gpu:{g.index}", tuner.names[0], None, None,
                                         "tuning.gpu", gpu_label(g.index, g.name),
                                         error=f"GPU {g.index}: internal error: {e}"))
        for ifname in sorted(self.config.nic_tuning):
            try:
                items.extend(self.nic.plan(ifname, self.config.nic_tuning[ifname]))
            except Exception as e:
                LOG.exception("planning rings of %s failed", ifname)
                items.append(Planned(self.nic, f"nic:{ifname}", "ring", None, None,
                                     f"tuning.nic.{ifname}", ifname,
                                     error=f"{ifname}: internal error: {e}"))
        return items

    def _write(self, p: Planned) -> Change:
        """Save the original (if none is saved yet), write desired, read back."""
        old = p.actual
        if old is None:      # no original to save means nothing to restore: do not write
            p.error = (f"{p.label}: {p.name}: the current value cannot be read, so it could "
                       f"not be restored later; not changed")
            return Change(p.subject, p.name, old, p.desired, False, p.error)
        try:
            saved = self.originals.save_if_absent(p.name, p.subject, p.actual, **p.identity)
        except OriginalsError as e:
            p.error = str(e)
            return Change(p.subject, p.name, old, p.desired, False, p.error)
        try:
            p.actual = p.tuner.apply(p)
        except TunerError as e:
            p.error = str(e)
            try:
                p.actual = p.tuner.verify(p)
            except TunerError:
                p.actual = None
            if saved and p.actual is not None and p.actual == old:
                try:     # nothing changed after all: the saved original is not needed
                    self.originals.remove(p.name, p.subject)
                except OriginalsError:
                    pass
            return Change(p.subject, p.name, old, p.desired, False, p.error)
        self._established[p.key] = p.desired
        self._drifted.pop(p.key, None)
        return Change(p.subject, p.name, old, p.desired, True)

    # ------------------------------------------------------------------ held settings
    # A part that steps a GPU setting for a while (`gpucostd calibrate`) holds it: apply and
    # verify neither write nor count drift on it meanwhile, and the part sets and restores it
    # through these methods alone (never the tuners or the originals store themselves).
    def hold(self, name: str, index: int) -> None:
        """Hold setting `name` of GPU `index` (apply and verify leave it alone)."""
        self.held.add((name, f"gpu:{index}"))

    def release(self, name: str, index: int) -> None:
        """Give a held setting back to apply and verify."""
        self.held.discard((name, f"gpu:{index}"))

    def is_held(self, name: str, index: int) -> bool:
        return (name, f"gpu:{index}") in self.held

    def save_original(self, name: str, index: int, value: Any,
                      uuid: Optional[str] = None) -> bool:
        """Save `value` as the original of GPU `index`'s setting unless one is saved already
        (True when this call saved it). Raises OriginalsError when it cannot be saved."""
        return self.originals.save_if_absent(name, f"gpu:{index}", value,
                                             **({"uuid": uuid} if uuid else {}))

    def forget_original(self, name: str, index: int) -> None:
        """The saved original of a setting put back by its holder is not needed any more."""
        self.originals.remove(name, f"gpu:{index}")

    def _held_planned(self, name: str, index: int, value: Any, gpu_name: Optional[str],
                      uuid: Optional[str]) -> Planned:
        tuner = self._tuner_named(name)
        return Planned(tuner, f"gpu:{index}", name, tuner.coerce(value), None, "calibrate",
                       gpu_label(index, gpu_name), target=index,
                       identity={"uuid": uuid} if uuid else {})

    def set(self, name: str, index: int, value: Any, gpu_name: Optional[str] = None,
            uuid: Optional[str] = None) -> Any:
        """Write a held setting and read it back (the value read). Raises TunerError."""
        return self._tuner_named(name).apply(
            self._held_planned(name, index, value, gpu_name, uuid))

    def restore_held(self, name: str, index: int, value: Any, gpu_name: Optional[str] = None,
                     uuid: Optional[str] = None) -> None:
        """Put a held setting back at `value` (its holder's saved start). Raises TunerError."""
        p = self._held_planned(name, index, value, gpu_name, uuid)
        self._tuner_named(name).restore(p, p.desired)

    def read(self, name: str, index: int) -> Any:
        """The value of GPU `index`'s setting `name` as its tuner reads it. Raises TunerError."""
        tuner = self._tuner_named(name)
        return tuner.verify(self._held_planned(name, index, None, None, None))

    def text(self, name: str, value: Any) -> str:
        """A setting's value in words ("600 W", "345..1500 MHz", "unlocked")."""
        return self._tuner_named(name).text(value)

    def _tuner_named(self, name: str):
        for tuner in self.gpu_tuners:
            if name in tuner.names:
                return tuner
        raise KeyError(f"no GPU tuner sets {name!r}")

    # ------------------------------------------------------------------ API
    def plan(self, gpus: Iterable[Any]) -> List[Setting]:
        """Every configured setting with its actual and desired value (nothing is written)."""
        return [p.setting() for p in self._plan_items(gpus)]

    def apply(self, gpus: Iterable[Any]) -> List[Change]:
        """Apply every setting that is out of sync; returns the writes made and the refusals."""
        items = self._plan_items(gpus)
        changes: List[Change] = []
        for p in items:
            if p.key in self.held:
                continue
            if p.error is not None:
                changes.append(Change(p.subject, p.name, p.actual, p.desired, False, p.error))
            elif p.in_sync:
                self._established[p.key] = p.desired
                self._save_in_sync(p)
            else:
                changes.append(self._write(p))
        self._settings = [p.setting() for p in items]
        return changes

    def _save_in_sync(self, p: Planned) -> None:
        """A setting already at its desired value when gpucostd takes it over: its current
        value is the original (so a later drift that gets re-applied is not mistaken for it)."""
        try:
            self.originals.save_if_absent(p.name, p.subject, p.actual, **p.identity)
        except OriginalsError as e:
            LOG.warning("%s", e)

    def verify(self, gpus: Iterable[Any], now: Optional[float] = None
               ) -> Tuple[List[Setting], List[Event]]:
        """Read every setting again (at most every verify_interval_seconds; otherwise return the
        last result); report drift as events and re-apply it when tuning.enforce is on."""
        now = self.clock.monotonic() if now is None else now
        interval = self.config.tuning.verify_interval_seconds
        if self._last_verify is not None and now - self._last_verify < interval:
            return list(self._settings), []
        self._last_verify = now
        if self.originals.problem is not None:
            self.originals.reload()   # fixed or removed by an operator since: tune again
        enforce = bool(self.config.tuning.enforce)
        items = self._plan_items(gpus)
        events: List[Event] = []
        for p in items:
            if p.error is not None or p.key in self.held:
                continue
            if p.in_sync:
                self._established[p.key] = p.desired
                self._drifted.pop(p.key, None)
                continue
            was = self._established.get(p.key, _MISSING)
            if was is not _MISSING and was == p.desired:
                events.extend(self._drift(p, enforce))
            elif enforce:        # never applied (an earlier failure, a new config): apply now
                change = self._write(p)
                if change.ok:
                    LOG.info("%s: %s set %s -> %s", p.subject, p.name, change.old, change.new)
        self._settings = [p.setting() for p in items]
        return list(self._settings), events

    def _drift(self, p: Planned, enforce: bool) -> List[Event]:
        desired, actual = p.desired, p.actual
        unit = UNITS.get(p.name, "")
        first = p.key not in self._drifted
        action = "none"
        if enforce:
            change = self._write(p)
            if change.ok:
                tail = f"; re-applied {fmt_value(desired, unit)}"
            else:
                tail = f"; re-apply failed: {change.error}"
                action = "find what changes the setting; " + self.restore_hint
                self._drifted[p.key] = actual
        else:
            tail = "; left as is (tuning.enforce = false)"
            action = "run `gpucostd apply`, or set tuning.enforce = true"
            self._drifted[p.key] = actual
        if not first:
            return []      # the same drift, still unresolved: counted and reported once
        self.drift_counts[p.key] = self.drift_counts.get(p.key, 0) + 1
        gpu = int(p.subject[4:]) if p.subject.startswith("gpu:") and \
            p.subject[4:].isdigit() else None
        msg = (f"{p.label}: {p.name} changed outside gpucostd from {fmt_value(desired, unit)} "
               f"to {fmt_value(actual, unit)}{tail}")
        LOG.warning("%s", msg)
        return [Event(self.clock.time(), p.subject, "drift", Severity.WARN, action, msg,
                      gpu=gpu, uuid=p.identity.get("uuid"),
                      fields={"setting": p.name, "old": desired, "new": actual,
                              "reapplied": bool(enforce and p.in_sync)})]

    def restore(self, gpus: Optional[Iterable[Any]] = None) -> List[Change]:
        """Put every saved original back; an entry leaves originals.json once restored."""
        if gpus:
            self._gpus = tuple(sorted(gpus, key=lambda g: g.index))
        self.originals.reload()
        changes: List[Change] = []
        problem = self.originals.check()
        if problem is not None:
            return [Change("node", "originals", None, None, False,
                           f"{problem}; nothing was restored")]
        for name, subject, entry in self.originals.items():
            original = entry.get("value")
            p = self._restore_item(name, subject, entry)
            if p is None:
                changes.append(Change(subject, name, None, original, False,
                                      f"{subject}: unknown setting {name!r} in "
                                      f"{self.originals.path}; left there"))
                continue
            if p.error:
                changes.append(Change(subject, name, None, original, False, p.error))
                continue
            try:
                original = getattr(p.tuner, "original_value", normalise_number)(original)
                if original is None:
                    raise ValueError
            except (TypeError, ValueError):     # a hand-edited file: never crash the restore
                changes.append(Change(subject, name, None, entry.get("value"), False,
                                      f"{subject}: {name}: the saved original "
                                      f"{entry.get('value')!r} in {self.originals.path} is not "
                                      f"a value; correct or remove that entry"))
                continue
            try:
                current = p.tuner.verify(p)
            except TunerError:
                current = None
            if current is not None and current == original and \
                    not getattr(p.tuner, "always_restore", False):
                self._forget(name, subject, changes, in_place=True)
                continue
            try:
                p.tuner.restore(p, original)
            except TunerError as e:
                changes.append(Change(subject, name, current, original, False,
                                      f"{e}; {self.restore_hint}"))
                continue
            changes.append(Change(subject, name, current, original, True))
            self._forget(name, subject, changes, in_place=True)
        self._established.clear()
        self._drifted.clear()
        return changes

    def _forget(self, name: str, subject: str, changes: List[Change],
                in_place: bool = False) -> None:
        """Remove a restored entry. When the original is back on the hardware (`in_place`) and
        only the file cannot be written (a full or read-only state dir), that is no failed
        restore: a warning, not a second, contradictory change next to the restored one. The
        entry stays, and the next restore finds the value in place and removes it."""
        try:
            self.originals.remove(name, subject)
        except OriginalsError as e:
            if in_place:
                LOG.warning("%s: %s is back at its original, but its entry stays in %s: %s",
                            subject, name, self.originals.path, e)
                return
            changes.append(Change(subject, name, None, None, False, str(e)))

    def _restore_item(self, name: str, subject: str, entry: Dict[str, Any]
                      ) -> Optional[Planned]:
        if subject.startswith("gpu:") and subject[4:].isdigit():
            tuner = {t.name: t for t in self.gpu_tuners}.get(name)
            if tuner is None:
                return None
            index, gname = int(subject[4:]), None
            uuid = entry.get("uuid")
            p = Planned(tuner, subject, name, entry.get("value"), None, "original",
                        gpu_label(index, None), target=index,
                        identity={"uuid": uuid} if uuid else {})
            gpus = self._known_gpus()
            if uuid and gpus:
                # GPUs may be renumbered after a reboot: the UUID decides, never the index
                match = [g for g in gpus if g.uuid == uuid]
                if not match:
                    unknown = [str(g.index) for g in gpus if not g.uuid]
                    where = (f"is not among the GPUs that answer now (GPU {', '.join(unknown)} "
                             f"could not be identified)" if unknown else
                             "is not on this node now")
                    p.error = (f"{subject}: {name}: the GPU it was saved for ({uuid}) {where}; "
                               f"its original {fmt_value(p.desired)} stays in "
                               f"{self.originals.path}; run `gpucostd restore` once that GPU "
                               f"is back")
                    return p
                index, gname = match[0].index, match[0].name
            else:
                gname = next((g.name for g in gpus if g.index == index), None)
            p.target, p.label = index, gpu_label(index, gname)
            return p
        return self.nic.restore_item(subject, name)

    def _known_gpus(self) -> Tuple[Any, ...]:
        """The GPUs of the last reading; without one (`gpucostd restore`), their UUIDs as the
        gateway reports them. Empty when neither can tell."""
        if any(g.uuid for g in self._gpus):
            return self._gpus
        get_uuid = getattr(self.gateway, "get_uuid", None)
        count = (getattr(self.gateway, "device_count", None) or 0) if get_uuid else 0
        found = []
        for index in range(count):
            try:
                found.append(_GpuId(index, get_uuid(index), None))
            except Exception as e:     # NvmlError: that GPU cannot say who it is
                LOG.warning("GPU %d: cannot read its UUID for restore: %s", index, e)
                found.append(_GpuId(index, None, None))
        if any(g.uuid for g in found):
            self._gpus = tuple(found)
            return self._gpus
        return ()

class _Missing:
    pass


_MISSING = _Missing()


class _GpuId(NamedTuple):
    """A GPU as NVML names it when there is no reading (restore by hand)."""
    index: int
    uuid: Optional[str]
    name: Optional[str]


# ---------------------------------------------------------------------- system shutdown
SHUTDOWN_TARGETS = ("shutdown.target", "reboot.target", "poweroff.target", "halt.target",
                    "kexec.target", "soft-reboot.target")


def shutdown_in_progress(run=None, timeout: float = 0.8) -> bool:
    """True when systemd is taking the system down (a start job for shutdown/reboot/poweroff/
    halt/kexec/soft-reboot.target is queued, or `systemctl is-system-running` says
    "stopping"). False when systemctl is absent or does not answer within `timeout` (each of
    the two calls): then a stop is an ordinary stop. The timeout is short because a stop must
    finish within about 2 s."""
    if run is None:
        if shutil.which("systemctl") is None:
            return False

        def run(argv):
            try:
                r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   timeout=timeout, check=False, text=True)
                return r.stdout or ""
            except (OSError, subprocess.SubprocessError):
                return ""
    out = run(["systemctl", "list-jobs", "--no-legend", "--no-pager", "--full"])
    for line in out.splitlines():
        fields = line.split()
        # JOB UNIT TYPE STATE
        if len(fields) >= 3 and fields[1] in SHUTDOWN_TARGETS and fields[2] == "start":
            return True
    state = run(["systemctl", "is-system-running"]).strip()
    return state == "stopping"


# ---------------------------------------------------------------------- text views
def _cell(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]}-{value[1]}"
    return fmt_value(value, UNITS.get(name, ""))


def _action(s: Setting) -> str:
    if s.error:
        return "ERROR"
    return "keep" if s.desired == s.actual else "change"


def plan_exit_code(settings: Sequence[Setting]) -> int:
    """`gpucostd plan`: 0 nothing would change, 1 something would, 2 an error."""
    if any(s.error for s in settings):
        return 2
    return 1 if any(s.desired != s.actual for s in settings) else 0


def format_plan(settings: Sequence[Setting], width: int = WIDTH) -> str:
    """current -> desired per setting with what would happen; fits `width` columns."""
    if not settings:
        return "no settings configured ([tuning.gpu], [[tuning.gpu.override]], [tuning.nic.X])\n"
    head = f"{'SUBJECT':<12} {'SETTING':<20} {'CURRENT':>9}    {'DESIRED':<9} {'ACTION':<7} "
    lines = [(head + "SOURCE")[:width]]
    for s in settings:
        row = (f"{s.subject[:12]:<12} {s.name[:20]:<20} {_cell(s.actual, s.name)[:9]:>9} -> "
               f"{_cell(s.desired, s.name)[:9]:<9} {_action(s):<7} ")
        lines.append((row + s.source)[:width].rstrip())
        if s.error:
            lines.extend("  " + w for w in textwrap.wrap(s.error, width - 2,
                                                         break_on_hyphens=False))
    changes = sum(1 for s in settings if not s.error and s.desired != s.actual)
    errors = sum(1 for s in settings if s.error)
    lines.append(f"{len(settings)} settings: {changes} would change, {errors} with errors, "
                 f"{len(settings) - changes - errors} in sync")
    return "\n".join(lines) + "\n"


def format_changes(changes: Sequence[Change], width: int = WIDTH) -> str:
    """What apply/restore did; fits `width` columns."""
    if not changes:
        return "nothing to change: every setting is in sync\n"
    lines = []
    for c in changes:
        status = "ok" if c.ok else "FAILED"
        row = (f"{status:<6} {c.subject[:12]:<12} {c.name[:20]:<20} "
               f"{_cell(c.old, c.name)[:12]} -> {_cell(c.new, c.name)[:12]}")
        lines.append(row[:width])
        if c.error:
            lines.extend("       " + w for w in textwrap.wrap(c.error, width - 7,
                                                              break_on_hyphens=False))
    ok = sum(1 for c in changes if c.ok)
    lines.append(f"{ok} changed, {len(changes) - ok} failed")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- metrics
