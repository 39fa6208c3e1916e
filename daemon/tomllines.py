"""Where a table or a key stands in TOML text: tomllib keeps no positions, and an error that
says "gpucostd.toml:14" needs one. Used by the config and the scenario loaders alike.

A light line scanner, not a parser: it finds `[table]` / `[[table]]` headers (quotes and spaces
in a dotted name do not count) and `key =` lines inside them."""
from __future__ import annotations

import re
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
