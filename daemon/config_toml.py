"""The config as text: TOML written back (`gpucostd config show`), the line of a key in the
text a user wrote (tomllib gives no positions), and where each effective value came from."""
from __future__ import annotations

import re
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from gpucostd.tomllines import TomlLines

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11
    import tomli as tomllib

# a drop-in's power_limit_watts replaces the base file's power_limit_percent, and back
ALTERNATIVES = {"power_limit_watts": "power_limit_percent",
                "power_limit_percent": "power_limit_watts"}


class Locator(TomlLines):
    """Finds the line of `key` in `[section]` of the raw text (tomllib gives no positions): the
    one line finder, gpucostd.tomllines, under the config's name for it."""

    def find(self, section: str, key: Optional[str] = None, nth: int = 0) -> Optional[int]:
        """Line of `key` in the nth `[section]` (or of the header itself when key is None)."""
        return self.line(section, key, nth)


def merge(base: Dict[str, Any], over: Mapping[str, Any]) -> None:
    for k, v in over.items():
        if k == "override" and isinstance(v, list) and isinstance(base.get(k), list):
            for item in v:
                same = next((b for b in base[k] if isinstance(b, dict) and isinstance(item, dict)
                             and b.get("match") == item.get("match")), None)
                if same is None:
                    base[k].append(dict(item))
                else:
                    merge(same, item)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            if k in ALTERNATIVES:
                base.pop(ALTERNATIVES[k], None)
            base[k] = v


def key_sources(raw: Mapping[str, Any], path: str, loc: "Locator",
             out: Dict[str, str]) -> None:
    """Where each key of one file is: dotted key -> "path:line"."""
    def where(section, key, nth=0):
        line = loc.find(section, key, nth)
        return f"{path}:{line}" if line else path

    def walk(table, prefix):
        for k, v in table.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(v, name)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for i, item in enumerate(v):
                    ident = item.get("match", i)
                    for a in item:
                        out[f"{name}[{ident}].{a}"] = where(name, a, i)
            else:
                if k in ALTERNATIVES:
                    out.pop(f"{prefix}.{ALTERNATIVES[k]}", None)
                out[name] = where(prefix, k)
    walk(raw, "")


def source_map(files: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    """dotted key ("cost.gpu_hour_usd", "tuning.gpu.override[index:0].power_limit_watts") ->
    "path:line" of the file that set it last (what `config show` prints beside each value)."""
    sources: Dict[str, str] = {}
    for p, text in files:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue
        if "endpoint" in raw.get("inference", {}):
            for k in [k for k in sources if k.startswith("inference.endpoint[")]:
                del sources[k]
        key_sources(raw, p, Locator(text), sources)
    return sources


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or
                                                      ord(c) == 0x7f else c) for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)


def dump_toml(data: Mapping[str, Any], prefix: str = "",
              comment: Optional[Callable[[str], Optional[str]]] = None, _raw: str = "") -> str:
    """Minimal TOML writer for plain tables, arrays of tables and scalar/list values.
    `comment(dotted_key)`, when given, returns the comment to print after a value (dotted keys
    as in source_map)."""
    def note(raw_key: str) -> str:
        c = comment(raw_key) if comment is not None else None
        return f"  # {c}" if c else ""

    lines: List[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not (
        isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
    if prefix and (scalars or not data):
        lines.append(f"[{prefix}]")
    for k, v in scalars.items():
        raw = f"{_raw}.{k}" if _raw else k
        lines.append(f"{toml_key(k)} = {toml_value(v)}{note(raw)}")
    if lines:
        lines.append("")
    for k, v in data.items():
        name = f"{prefix}.{toml_key(k)}" if prefix else toml_key(k)
        raw = f"{_raw}.{k}" if _raw else k
        if isinstance(v, dict):
            lines.append(dump_toml(v, name, comment, raw))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                ident = item.get("match", i)
                lines.append(f"[[{name}]]")
                lines.extend(f"{toml_key(a)} = {toml_value(b)}{note(f'{raw}[{ident}].{a}')}"
                             for a, b in item.items())
                lines.append("")
    return "\n".join(line for line in lines if line is not None).rstrip("\n") + "\n"
