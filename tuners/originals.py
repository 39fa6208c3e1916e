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

A damaged file (torn by a crash, truncated, hand-edited into something else) is never moved
aside, replaced or overwritten: the values in it may be the only record of what the GPUs had
before gpucostd changed them. ``problem`` then says what is wrong; every write (and so every
tuning change) is refused with that text, and restore puts nothing back, until an operator
decides: fix the file, or move it away (docs/tuning.md, "Saved originals unreadable"). The
store reads the file again on ``reload()``, which the manager calls while a problem stands.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from gpucostd.statefile import read_json, write_atomic

FILENAME = "originals.json"
VERSION = 1
MAX_BYTES = 4 << 20      # a few hundred bytes per GPU; anything far larger is not ours


class OriginalsError(Exception):
    """The originals file cannot be written. str() says what, where and how to fix."""


class OriginalsStore:
    def __init__(self, state_dir: str, clock=None):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self._clock = clock
        self.warnings: List[str] = []
        self.problem: Optional[str] = None    # the file exists but cannot be used
        self._data: Optional[Dict[str, Dict[str, Dict[str, Any]]]] = None

    # ------------------------------------------------------------------ reading
    def _load(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        if self._data is not None:
            return self._data
        data: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self.problem = None
        try:
            raw = read_json(self.path, MAX_BYTES, follow=False)
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
        except (FileNotFoundError, NotADirectoryError):
            pass       # nothing saved (yet); a state dir that cannot exist fails at the write
        except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.problem = (f"{self.path}: saved originals unreadable ({why[:120]}); tuning "
                            f"is refused and the file is kept until an operator fixes or "
                            f"removes it (docs/tuning.md)")
            if self.problem not in self.warnings:
                self.warnings.append(self.problem)
            data = {}
        self._data = data
        return data

    def reload(self) -> None:
        """Forget the cached content (another process may have changed the file)."""
        self._data = None

    def check(self) -> Optional[str]:
        """Read the file (if not read yet); the problem with it, or None when it is usable."""
        self._load()
        return self.problem

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
        self._refuse_if_unreadable()
        if name in data.get(subject, {}):
            return False
        entry: Dict[str, Any] = {"value": value, "saved_at": self._now()}
        entry.update({k: v for k, v in identity.items() if v is not None})
        new = {s: dict(v) for s, v in data.items()}
        new.setdefault(subject, {})[name] = entry
        self._write(new)
        self._data = new
        return True

    def _refuse_if_unreadable(self) -> None:
        if self.problem is not None:
            raise OriginalsError(f"{self.problem}; nothing was changed")

    def remove(self, name: str, subject: str) -> None:
        data = self._load()
        self._refuse_if_unreadable()
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
