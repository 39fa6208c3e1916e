"""Where a table or a key stands in TOML text: tomllib keeps no positions, and an error that
says "gpucostd.toml:14" needs one. Used by the config and the scenario loaders alike.

A light line scanner, not a parser: it finds `[table]` / `[[table]]` headers (quotes and spaces
in a dotted name do not count) and `key =` lines inside them."""
from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: `gpucostd status` reads socket_path here without typing
    from typing import List, Optional, Tuple

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _norm(name: str) -> str:
    return name.replace('"', "").replace("'", "").replace(" ", "")


class TomlLines:
    def __init__(self, text: str):
        self.lines = text.splitlines()
        # (table name, is an array of tables, header line (0: the top level), last line)
        starts: List[Tuple[str, bool, int]] = [("", False, 0)]
        for no, raw in enumerate(self.lines, 1):
            m = _HEADER.match(raw)
            if m:
                starts.append((_norm(m.group(2)), m.group(1) == "[[", no))
        self.spans: List[Tuple[str, bool, int, int]] = [
            (name, arr, start, starts[i + 1][2] - 1 if i + 1 < len(starts) else len(self.lines))
            for i, (name, arr, start) in enumerate(starts)]

    def tables(self, table: str, array: Optional[bool] = None) -> List[Tuple[int, int]]:
        """(header line, last line) of each `table` in file order; `array` None: [t] and [[t]]
        alike, True: only [[t]], False: only [t]."""
        return [(s, e) for name, arr, s, e in self.spans
                if name == table and (array is None or arr == array)]

    def line(self, table: str, key: Optional[str] = None, occurrence: int = 0,
             array: Optional[bool] = None) -> Optional[int]:
        """The line of `key` in the occurrence-th `table` (of its header when key is None), or
        None when there is no such table or key."""
        spans = self.tables(table, array)
        if occurrence >= len(spans):
            return None
        start, end = spans[occurrence]
        if key is None:
            return start or None
        pat = re.compile(r"^\s*([\"']?)" + re.escape(key) + r"\1\s*=")
        for no in range(start + 1, end + 1):
            if pat.match(self.lines[no - 1]):
                return no
        return None


_BARE_STRING = re.compile(r'''^\s*("[^"\\\n]*"|'[^'\n]*')\s*(#.*)?$''')


def simple_string(text: str, table: str, key: str) -> Tuple[bool, Optional[str]]:
    """The value of `key` in `[table]` when the text sets it in the plain form
    `key = "value"` (or `table.key = ...` at the top level), without parsing the rest of the
    file: (True, value), or (True, None) when the text does not set the key. (False, None):
    the text sets or may set it in a form this scanner does not read (an escape, an inline
    table, a multi-line string, a value that is not a string); parse the file instead."""
    if key not in text:
        return True, None
    current, value = "", None
    key_pat = re.compile(r"^\s*([\"']?)(?:(" + re.escape(table) + r")\1\s*\.\s*)?([\"']?)" +
                         re.escape(key) + r"\3\s*=(.*)$")
    for raw in text.splitlines():
        m = _HEADER.match(raw)
        if m:
            current = _norm(m.group(2)) if m.group(1) == "[" else None
            continue
        if key not in raw:
            continue
        k = key_pat.match(raw)
        here = k is not None and ((k.group(2) is None and current == table) or
                                  (k.group(2) is not None and current == ""))
        if not here:
            if current in ("", table) and re.match(r"^\s*[\"']?" + re.escape(table) +
                                                   r"[\"']?\s*=", raw):
                return False, None          # table = { key = ... }: an inline table
            continue
        v = _BARE_STRING.match(k.group(4))
        if v is None:
            return False, None
        value = v.group(1)[1:-1]
    return True, value
