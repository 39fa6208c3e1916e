"""Saved originals: the value a setting had before gpucostd first wrote it.

One JSON file, ``<state_dir>/originals.json``::

    {"version": 1,
     "originals": {"gpu:0": {"power_limit_watts": {"value": 700.0, "saved_at": 1.7e9,
                                                   "uuid": "GPU-..."}}}}

Rules (tuned's discipline):
- an original is saved *before* the first write to its setting, and the file is on disk
  (tmp file + fsync + rename + fsync of the directory) before the write happens;
- an original already saved is never overwritten (a second start, or a start after a crash in
  the middle of an apply, keeps the value from before the very first write);
- an entry is removed once its original has been put back.

A damaged file is moved aside (``originals.json.corrupt-<time>``) rather than crashing the daemon;
``warnings`` says what happened so the caller can report it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from gpucostd.statefile import write_atomic

FILENAME = "originals.json"
VERSION = 1


class OriginalsError(Exception):
    """The originals file cannot be written. str() says what, where and how to fix."""


class OriginalsStore:
    def __init__(self, state_dir: str, clock=None):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self._clock = clock
        self.warnings: List[str] = []
        self._data: Optional[Dict[str, Dict[str, Dict[str, Any]]]] = None

    # ------------------------------------------------------------------ reading
    def _load(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        if self._data is not None:
            return self._data
        data: Dict[str, Dict[str, Dict[str, Any]]] = {}
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                raw = json.load(f)
            originals = raw.get("originals") if isinstance(raw, dict) else None
            if not isinstance(originals, dict):
                raise ValueError("no 'originals' table")
            for subject, settings in originals.items():
                if not isinstance(settings, dict):
                    raise ValueError(f"entry {subject!r} is not a table")
                for name, entry in settings.items():
                    if not isinstance(entry, dict) or "value" not in entry:
                        raise ValueError(f"entry {subject!r}/{name!r} has no value")
                data[subject] = dict(settings)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:   # json.JSONDecodeError is a ValueError
            aside = f"{self.path}.corrupt-{int(time.time())}"
            try:
                os.replace(self.path, aside)
                where = f"moved aside to {aside}"
            except OSError:
                where = "left in place"
            self.warnings.append(
                f"{self.path}: unreadable saved originals ({e}); {where}; settings changed by "
                f"an earlier run cannot be restored automatically, check them by hand")
            data = {}
        self._data = data
        return data

    def reload(self) -> None:
        """Forget the cached content (another process may have changed the file)."""
        self._data = None

    def get(self, name: str, subject: str) -> Tuple[bool, Any]:
        entry = self._load().get(subject, {}).get(name)
        if entry is None:
            return False, None
        return True, entry.get("value")

    def entry(self, name: str, subject: str) -> Optional[Dict[str, Any]]:
        entry = self._load().get(subject, {}).get(name)
        return dict(entry) if entry is not None else None

    def items(self) -> List[Tuple[str, str, Dict[str, Any]]]:
        """(name, subject, entry) for every saved original, in a stable order."""
        out = []
        for subject in sorted(self._load(), key=_subject_key):
            for name in sorted(self._load()[subject]):
                out.append((name, subject, dict(self._load()[subject][name])))
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self._load().values())

    # ------------------------------------------------------------------ writing
    def save_if_absent(self, name: str, subject: str, value: Any, **identity: Any) -> bool:
        """Save `value` as the original of (name, subject) unless one is saved already.

        Returns True when it saved, False when an original was already there. Raises
        OriginalsError when the file cannot be written (then nothing may be changed)."""
        data = self._load()
        if name in data.get(subject, {}):
            return False
        entry: Dict[str, Any] = {"value": value, "saved_at": self._now()}
        entry.update({k: v for k, v in identity.items() if v is not None})
        new = {s: dict(v) for s, v in data.items()}
        new.setdefault(subject, {})[name] = entry
        self._write(new)
        self._data = new
        return True

    def remove(self, name: str, subject: str) -> None:
        data = self._load()
        if name not in data.get(subject, {}):
            return
        new = {s: dict(v) for s, v in data.items()}
        del new[subject][name]
        if not new[subject]:
            del new[subject]
        self._write(new)
        self._data = new

    def _now(self) -> float:
        return self._clock.time() if self._clock is not None else time.time()

    def _write(self, data: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
        text = json.dumps({"version": VERSION, "originals": data}, indent=2, sort_keys=True)
        try:
            write_atomic(self.path, text + "\n")
        except OSError as e:
            raise OriginalsError(
                f"cannot save originals to {self.path}: {e.strerror or e}; make the state "
                f"directory writable (daemon.state_dir) — nothing was changed") from None


def _subject_key(subject: str):
    kind, _, rest = subject.partition(":")
    return (kind, int(rest) if rest.isdigit() else 0, rest)
