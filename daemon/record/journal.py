"""Events to the systemd journal, one line each, with a stable MESSAGE_ID per event code.

Under systemd (``JOURNAL_STREAM`` set, or the journal socket present) and with the
``systemd.journal`` module importable (imported lazily, on first use), an event is sent with
``systemd.journal.send``::

    MESSAGE=<one line>  MESSAGE_ID=<128-bit id of the event code>  PRIORITY=<from severity>
    SYSLOG_IDENTIFIER=gpucostd  CODE  SUBJECT  SEVERITY  ACTION  and, where present,
    GPU  UUID  XID  SETTING  EVENT_ID  and GPUCOSTD_<FIELD> for the event's extra fields

so ``journalctl -u gpucostd MESSAGE_ID=b423b3f884274c40a3490bb23442c194`` lists every Xid. When the
daemon's stderr is not itself the journal (someone runs it in a terminal on a systemd host) the
line also goes to the ``gpucostd`` logger, so it shows on the terminal. Outside systemd the line
goes only to the ``gpucostd`` logger (stderr). A failing journal falls back to the logger; this
module never raises.

The MESSAGE_ID table below is fixed forever (docs/health.md lists it): never change a value, only
add codes. A code missing from the table still gets a stable id (UUIDv5 of the code).
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Any, Callable, Dict, Mapping, Optional

from gpucostd.snapshot import Event, Severity

LOG = logging.getLogger("gpucostd")
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# event code -> MESSAGE_ID (uuid4 values generated once, 2026-11-23; never change them)
MESSAGE_IDS: Dict[str, str] = {
    "xid": "b423b3f884274c40a3490bb23442c194",
    "gpu_lost": "011c49e397894fbda7f467a9dc60b6c7",
    "health_change": "6de1eb59fcff40608904d0864131b359",
    "ecc_uncorrected": "62eb9f490ca248688f1883e6086d2264",
    "remap_pending": "a475f85e2474478bb688f74d81afc985",
    "remap_failure": "5e91e1e2dea14c2fa9162abed6c15b05",
    "retired_pages_pending": "a164615ec8e24547a909ad52d85b235e",
    "gpu_reset": "6d79bf64c7ad47b09e32bd8b0e19fb5d",
    "drift": "8139f47dd9d541febfb291e3f9bc2a23",
    "setting_applied": "8fbde71c91674fe0a4db6b82e6be557d",
    "setting_restored": "15614a01f1bd446b9e9e7254cf84d95a",
    "setting_failed": "b5e8a9cfd18d43af8cfde6919380be88",
    "ack": "f230f56ed76d44e7a5d6ef22780c77f9",
    "config_reloaded": "0c99b362b3c649be8fa437eb4b3ec01c",
    "config_rejected": "f831e24795e94428936309c439936de3",
    "startup": "eca4a2974736425188d71fc0b8728ff4",
    "shutdown": "0e4eb10e9d17430f97892f24aa4dbe2b",
    "hook_failed": "e508bf07953341c2917010861d4f6f2e",
    "hook_ran": "9ba63329bc9948b5a8d34d0f1ff77b47",
}
_FALLBACK_NAMESPACE = uuid.UUID("d9526d90cf5246e3afde6335817c827d")

# syslog priorities: 2 crit, 3 err, 4 warning, 5 notice, 6 info
PRIORITY = {Severity.OK: 6, Severity.WARN: 4, Severity.CRIT: 2, Severity.UNKNOWN: 4}
_LOG_LEVEL = {Severity.OK: logging.INFO, Severity.WARN: logging.WARNING,
              Severity.CRIT: logging.ERROR, Severity.UNKNOWN: logging.WARNING}

_journal_send: Optional[Callable[..., Any]] = None
_journal_checked = False


def message_id(code: str) -> str:
    """The stable 128-bit MESSAGE_ID (32 hex digits) of an event code."""
    known = MESSAGE_IDS.get(code)
    if known is not None:
        return known
    return uuid.uuid5(_FALLBACK_NAMESPACE, str(code)).hex


def _journal() -> Optional[Callable[..., Any]]:
    """systemd.journal.send when running under systemd and importable, else None (cached)."""
    global _journal_send, _journal_checked
    if not _journal_checked:
        _journal_checked = True
        if os.environ.get("JOURNAL_STREAM") or os.path.exists(JOURNAL_SOCKET):
            try:
                from systemd import journal as _j   # lazy: only where the journal exists
                _journal_send = _j.send
            except ImportError:
                _journal_send = None
    return _journal_send


def _stderr_is_journal() -> bool:
    try:
        from gpucostd.record.logs import under_systemd
        return under_systemd()
    except Exception:  # noqa: BLE001 - logging helpers must never break event delivery
        return False


def _one_line(text: Any, limit: int = 2000) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def format_line(event: Event) -> str:
    """`gpu:3 CRIT xid: Xid 79 GPU has fallen off the bus (action: reset GPU)`"""
    sev = event.severity.name if isinstance(event.severity, Severity) else str(event.severity)
    line = f"{event.subject} {sev} {event.code}: {event.message}"
    if event.action and event.action != "none":
        line += f" (action: {event.action})"
    return _one_line(line)


_FIELD_NAME = re.compile(r"[^A-Z0-9_]")


def journal_fields(event: Event) -> Dict[str, str]:
    """The structured fields sent with an event (without MESSAGE)."""
    sev = event.severity if isinstance(event.severity, Severity) else Severity.UNKNOWN
    fields: Dict[str, str] = {
        "MESSAGE_ID": message_id(event.code),
        "PRIORITY": str(PRIORITY.get(sev, 4)),
        "SYSLOG_IDENTIFIER": "gpucostd",
        "CODE": str(event.code),
        "SUBJECT": str(event.subject),
        "SEVERITY": sev.name,
        "ACTION": _one_line(event.action, 500),
    }
    if event.gpu is not None:
        fields["GPU"] = str(event.gpu)
    if event.uuid:
        fields["UUID"] = str(event.uuid)
    if event.xid is not None:
        fields["XID"] = str(event.xid)
    if event.id is not None:
        fields["EVENT_ID"] = str(event.id)
    extra: Mapping[str, Any] = event.fields or {}
    setting = extra.get("setting")
    if setting is None and str(event.subject).startswith("setting:"):
        setting = str(event.subject).split(":")[1] if ":" in event.subject else None
    if setting is not None:
        fields["SETTING"] = str(setting)
    for key, value in extra.items():
        if value is None or key == "setting":
            continue
        name = "GPUCOSTD_" + _FIELD_NAME.sub("_", str(key).upper())
        fields[name[:64]] = _one_line(value, 1000)
    return fields


def send_event(event: Event, sender: Optional[Callable[..., Any]] = None) -> None:
    """Journal one event (see the module docstring). Never raises. `sender` replaces
    systemd.journal.send (tests)."""
    try:
        line = format_line(event)
        send = sender if sender is not None else _journal()
        if send is not None:
            try:
                send(line, **journal_fields(event))
                if sender is None and not _stderr_is_journal():
                    LOG.log(_level(event), "%s", line)
                return
            except Exception as e:  # noqa: BLE001 - journal trouble must not lose the line
                LOG.warning("journal unavailable (%s); events go to the log", e)
        LOG.log(_level(event), "%s", line,
                extra={"journal_fields": {k: v for k, v in journal_fields(event).items()
                                          if k not in ("PRIORITY", "SYSLOG_IDENTIFIER")}})
    except Exception:  # noqa: BLE001 - never let an odd event kill the loop
        LOG.exception("could not log event %r", getattr(event, "code", "?"))


def _level(event: Event) -> int:
    return _LOG_LEVEL.get(event.severity, logging.WARNING) if isinstance(
        event.severity, Severity) else logging.WARNING


def startup_event(version: str, now: float, *, config_path: Optional[str] = None,
                  gpu_count: Optional[int] = None, driver_version: Optional[str] = None,
                  simulate: Optional[str] = None, pid: Optional[int] = None) -> Event:
    parts = [f"gpucostd {version} started"]
    if simulate:
        parts.append(f"simulating {simulate}")
    if gpu_count is not None:
        parts.append(f"{gpu_count} GPUs")
    if driver_version:
        parts.append(f"driver {driver_version}")
    parts.append(f"config {config_path or 'defaults'}")
    fields = {"version": version, "config_path": config_path or "", "pid": pid or os.getpid()}
    if simulate:
        fields["simulate"] = simulate
    if driver_version:
        fields["driver_version"] = driver_version
    return Event(now, "node", "startup", Severity.OK, "none", ", ".join(parts), fields=fields)


def log_startup(version: str, now: float, *, config_path: Optional[str] = None,
                gpu_count: Optional[int] = None, driver_version: Optional[str] = None,
                simulate: Optional[str] = None, sender: Optional[Callable[..., Any]] = None
                ) -> Event:
    """Journal the startup line (MESSAGE_ID of "startup") and return the event, which the loop
    may also store."""
    event = startup_event(version, now, config_path=config_path, gpu_count=gpu_count,
                          driver_version=driver_version, simulate=simulate)
    send_event(event, sender=sender)
    return event


__all__ = ["MESSAGE_IDS", "message_id", "send_event", "log_startup", "startup_event",
           "journal_fields", "format_line", "PRIORITY"]
