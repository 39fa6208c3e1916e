"""Logging: to the journal (structured) under systemd, to stderr otherwise.

One line per event, no tracebacks for expected faults: code logs expected faults with
`log.warning("...")` and only unexpected exceptions with `log.exception`.
"""
from __future__ import annotations

import logging
import os
import sys

LOG = logging.getLogger("gpucostd")


def under_systemd() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _JournalOrStderr(logging.Handler):
    """Sends records to the journal with structured fields (record.journal_fields)."""

    def __init__(self):
        super().__init__()
        from systemd import journal  # lazy: only under systemd
        self._send = journal.send

    def emit(self, record):
        try:
            fields = {k: str(v) for k, v in getattr(record, "journal_fields", {}).items()
                      if v is not None}
            priority = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                        logging.ERROR: 3, logging.CRITICAL: 2}.get(record.levelno, 6)
            self._send(self.format(record), PRIORITY=str(priority),
                       SYSLOG_IDENTIFIER="gpucostd", **fields)
        except Exception:  # pragma: no cover - never let logging kill the daemon
            self.handleError(record)


_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class _SyslogPrefix(logging.Formatter):
    """`<6>message`: the syslog priority of the record's level, as journald's stream reader
    expects (not Python's level number)."""

    def format(self, record):
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < 30 else 3)
        return f"<{priority}>" + " ".join(super().format(record).splitlines())


def setup(level: str = "info") -> None:
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(getattr(logging, level.upper(), logging.INFO))
    handler: logging.Handler
    if under_systemd():
        try:
            handler = _JournalOrStderr()
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            # No systemd module (a pip install without the [systemd] extra): stderr is the
            # journal's stream; journald reads a "<N>" syslog priority prefix on each line.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_SyslogPrefix())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s gpucostd %(levelname)s %(message)s",
                                               "%Y-%m-%dT%H:%M:%S"))
    LOG.addHandler(handler)


def set_level(level: str) -> None:
    LOG.setLevel(getattr(logging, level.upper(), logging.INFO))
