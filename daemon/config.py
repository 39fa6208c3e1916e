"""The configuration: one TOML file, validated at load, immutable once loaded.

Every key is declared in SCHEMA (gpucostd.config_schema) with its type, default, allowed values and a one-line doc;
docs/configuration.md lists the same keys. Unknown keys are errors: a typo must
never silently disable enforcement.
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11
    import tomli as tomllib

from gpucostd import (DEFAULT_PATH, DEFAULT_SOCKET, is_root,  # noqa: E402,F401 (re-exported)
                      default_socket_path, user_runtime_dir)

from gpucostd.config_schema import (DEFAULT_LISTEN, DEFAULT_STATE_DIR,  # noqa: F401 (re-exported)
                                    GPU_TUNING_KEYS, RING_KEYS, SCHEMA, Key, make_key)
from gpucostd.config_inference import (ENDPOINT_KEYS, PARALLEL,  # noqa: F401 (re-exported)
                                       InferenceEndpoint, check_inference, check_metric,
                                       owner_uid, parse_endpoints, parse_selector)
from gpucostd.config_toml import (Locator, dump_toml, key_sources,  # noqa: F401 (re-exported)
                                  merge, source_map)
# A config is a few kilobytes; anything far larger is a mistake (or an attack on memory) and is
# refused before it is read.
MAX_CONFIG_BYTES = 1 << 20
MAX_DROPINS = 128               # gpucostd.d/*.toml files read
MAX_TOTAL_BYTES = 2 << 20       # the config and its drop-ins together


class FileError(Exception):
    """A file the user wrote that cannot be used: str() is `path:line: message`."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None,
                 key: Optional[str] = None):
        self.path, self.line, self.key, self.bare = path, line, key, message
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        super().__init__(where + message)


def _glob_price(table: Tuple[Tuple[str, float], ...], name: Optional[str]) -> Optional[float]:
    """The price of the first (glob, price) of `table` that `name` matches; None: none does."""
    for glob, price in table:
        if name is not None and fnmatch.fnmatchcase(name, glob):
            return price
    return None


class ConfigError(FileError):
    """A config that cannot be used. str() is the full message for the user."""


# Tables whose keys are free (names chosen by the user) or that hold lists of tables.
DYNAMIC = {
    "tuning.gpu": "GPU settings for all GPUs: " + ", ".join(GPU_TUNING_KEYS),
    "tuning.gpu.override": "[[tuning.gpu.override]] match = \"index:N\"|\"uuid:GPU-...\"|"
                           "\"model:GLOB\" plus GPU settings",
    "tuning.nic": "[tuning.nic.IFNAME] rx/tx/rx_mini/rx_jumbo = N or \"max\"",
    "cost.model_hour_usd": "model-name glob = price of one GPU-hour",
    "cost.mig_profile_hour_usd": "MIG profile glob = price of one instance-hour",
    "inference.endpoint": "[[inference.endpoint]] url = \"http://...\", gpus = [0, 1] or "
                          "instances = [\"0/1/0\"], tokens_metric, parallel = \"tensor\"|\"data\"",
}


# --------------------------------------------------------------------------- the config
class _View(Mapping):
    """Read-only attribute view of one section."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getattr__(self, name):
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("config is immutable")

    def __getitem__(self, k):
        return self._data[k]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


@dataclass(frozen=True)
class GpuOverride:
    match: str
    kind: str        # "index" | "uuid" | "model"
    value: str
    settings: Mapping[str, Any]
    line: Optional[int]

    def matches(self, index: int, uuid: Optional[str], model: Optional[str]) -> bool:
        if self.kind == "index":
            return str(index) == self.value
        if self.kind == "uuid":
            return uuid is not None and uuid.lower() == self.value.lower()
        return model is not None and fnmatch.fnmatchcase(model, self.value)


_SPECIFICITY = {"index": 3, "uuid": 3, "model": 1}


# what a status line or finding says to do about illustrative prices
PRICES_FIX = "set [cost] gpu_hour_usd and energy_usd_per_kwh for your own prices"


class Config:
    """Validated, immutable configuration. Sections are attributes: ``cfg.daemon.interval_seconds``.
    Nothing changes one once it is made: a reload, replay's private settings or a simulated
    node's prices make a new one (``updated``, ``with_endpoints``).
    """

    def __init__(self, values: Dict[str, Dict[str, Any]], path: Optional[str],
                 overrides: Tuple[GpuOverride, ...], nics: Mapping[str, Mapping[str, Any]],
                 model_prices: Tuple[Tuple[str, float], ...], raw_text: str = "",
                 endpoints: Tuple[InferenceEndpoint, ...] = (), *,
                 warnings: Sequence[str] = (), files: Sequence[Tuple[str, str]] = (),
                 price_note: Optional[str] = None, mig_prices: Tuple[Tuple[str, float], ...] = ()):
        init = object.__setattr__
        init(self, "path", path)
        init(self, "_endpoints", tuple(endpoints))
        init(self, "_values", values)
        for section, data in values.items():
            if "." in section:          # a subtable ([drain.slurm]): an attribute of its parent
                continue
            subs = {s.split(".", 1)[1]: _View(d) for s, d in values.items()
                    if s.startswith(section + ".")}
            init(self, section, _View(dict(data, **subs)))
        init(self, "gpu_tuning", _View(values["tuning"]["gpu"]))
        init(self, "gpu_overrides", overrides)
        init(self, "nic_tuning", _View({k: _View(v) for k, v in nics.items()}))
        init(self, "model_prices", model_prices)
        init(self, "mig_prices", tuple(mig_prices))   # (profile glob, $ per instance-hour)
        init(self, "raw_text", raw_text)
        # trust problems a root daemon reports as findings (see load()); () when none
        init(self, "warnings", tuple(warnings))
        init(self, "files", tuple(files))          # (path, text) read, in order (load)
        # a simulated node priced at its scenario's illustrative prices says so (None: the
        # prices are the config's own)
        init(self, "price_note", price_note)

    def __setattr__(self, name, value):
        raise AttributeError(f"config is immutable (make a new one: updated()); {name}")

    # -- GPU tuning resolution
    def gpu_settings_for(self, index: int, uuid: Optional[str], model: Optional[str]
                         ) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """Desired GPU settings for one GPU and, per key, where the value came from.

        The most specific matching override wins (index/uuid over model); validation at load
        guarantees no two overrides of the same specificity can match one GPU with the same
        keys... except at runtime (model globs vs actual models), where we raise ConfigError.
        """
        desired = {k: v for k, v in self._values["tuning"]["gpu"].items() if v is not None}
        source = {k: "tuning.gpu" for k in desired}
        matching = [o for o in self.gpu_overrides if o.matches(index, uuid, model)]
        matching.sort(key=lambda o: _SPECIFICITY[o.kind])
        for level in sorted({_SPECIFICITY[o.kind] for o in matching}):
            same = [o for o in matching if _SPECIFICITY[o.kind] == level]
            if len(same) > 1:
                raise ConfigError(
                    f"overrides {', '.join(repr(o.match) for o in same)} all match GPU {index} "
                    f"({model}); make the matches disjoint", self.path, same[1].line,
                    "tuning.gpu.override")
            for k, v in same[0].settings.items():
                if v is not None:
                    desired[k] = v
                    source[k] = f"override {same[0].match}"
        if "power_limit_watts" in desired and "power_limit_percent" in desired:
            # the more specific source wins; at equal level watts was refused at load
            if source["power_limit_watts"] == "tuning.gpu" and source["power_limit_percent"] != "tuning.gpu":
                del desired["power_limit_watts"], source["power_limit_watts"]
            else:
                del desired["power_limit_percent"], source["power_limit_percent"]
        return desired, source

    @property
    def inference_endpoints(self) -> Tuple[InferenceEndpoint, ...]:
        """Every configured inference endpoint: [inference] metrics_url (all GPUs) or the
        [[inference.endpoint]] entries."""
        if self.inference.metrics_url:
            return (InferenceEndpoint(self.inference.metrics_url, None,
                                      self.inference.tokens_metric),)
        return self._endpoints

    def with_endpoints(self, endpoints) -> "Config":
        """A copy whose inference endpoints are `endpoints` (the simulated servers)."""
        return self._copy(endpoints=tuple(endpoints))

    def price_for_model(self, model: Optional[str]) -> float:
        price = _glob_price(self.model_prices, model)
        return self.cost.gpu_hour_usd if price is None else price

    def price_for_mig(self, profile: Optional[str]) -> Optional[float]:
        """[cost.mig_profile_hour_usd]: the price of one hour of a MIG instance of `profile`;
        None: priced at its share of its GPU's hour (docs/cost.md, "MIG instances")."""
        return _glob_price(self.mig_prices, profile)

    def updated(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys of some sections replaced (for replay's private settings;
        callers pass values that are valid)."""
        values = {s: dict(v) for s, v in self._values.items()}
        for section, changes in sections.items():
            values[section].update(changes)
        return self._copy(values=values)

    def priced(self, cost: Mapping[str, Any], note: str) -> "Config":
        """A copy priced at illustrative [cost] values, with the note that says so."""
        return self.updated(cost=cost)._copy(price_note=note)

    def _copy(self, **change: Any) -> "Config":
        args = dict(values=self._values, endpoints=self._endpoints, warnings=self.warnings,
                    files=self.files, price_note=self.price_note, mig_prices=self.mig_prices)
        args.update(change)
        values = args.pop("values")
        return Config(values, self.path, self.gpu_overrides,
                      {n: dict(v) for n, v in self.nic_tuning.items()}, self.model_prices,
                      self.raw_text, **args)

    def as_dict(self) -> Dict[str, Any]:
        out = {s: dict(v) for s, v in self._values.items() if "." not in s}
        for s, v in self._values.items():
            if "." in s:                # [drain.slurm] is written under [drain]
                parent, _dot, sub = s.partition(".")
                out[parent][sub] = dict(v)
        tuning = dict(out["tuning"])
        gpu = {k: v for k, v in tuning.pop("gpu").items() if v is not None}
        if self.gpu_overrides:
            gpu["override"] = [dict({"match": o.match}, **{k: v for k, v in o.settings.items()
                                                          if v is not None})
                               for o in self.gpu_overrides]
        tuning["gpu"] = gpu
        tuning["nic"] = {n: dict(v) for n, v in self.nic_tuning.items()}
        out["tuning"] = tuning
        out["cost"] = dict(out["cost"], model_hour_usd=dict(self.model_prices),
                           **({"mig_profile_hour_usd": dict(self.mig_prices)}
                              if self.mig_prices else {}))
        if self._endpoints:
            out["inference"] = dict(out["inference"], endpoint=[
                dict({"url": e.url}, **({"gpus": list(e.gpus)} if e.gpus is not None else {}),
                     **({"instances": list(e.instances)} if e.instances is not None else {}),
                     tokens_metric=e.tokens_metric, parallel=e.parallel)
                for e in self._endpoints])
        return out

    def to_toml(self, sources: bool = False) -> str:
        """The effective config as TOML; with `sources`, each value says where it came from
        (`# FILE:LINE`, or `# default`)."""
        if not sources:
            return dump_toml(self.as_dict())
        where = source_map(self.files)
        head = "# files read, in order: " + (", ".join(p for p, _t in self.files) or
                                             "none (all defaults)") + "\n"
        return head + dump_toml(self.as_dict(), comment=lambda k: where.get(k, "default"))


# --------------------------------------------------------------------------- loading
def default_state_dir() -> str:
    if is_root():
        return DEFAULT_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME")
    return os.path.join(base, "gpucostd") if base else f"/tmp/gpucostd-{os.getuid()}/state"


def _versionish(text: str) -> bool:
    return bool(re.fullmatch(r"\d+(\.\d+){0,3}", text))


def _check_value(key: Key, value: Any, name: str, err: Callable[[str], ConfigError]) -> Any:
    t = key.type
    if t == "bool":
        if not isinstance(value, bool):
            raise err(f"{name} = {value!r} must be true or false")
        return value
    if t in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                t == "int" and not isinstance(value, int)):
            want = "an integer" if t == "int" else "a number"
            raise err(f"{name} = {value!r} must be {want}")
        if isinstance(value, float) and not math.isfinite(value):
            raise err(f"{name} = {value!r} must be a finite number")
        # every number key has both bounds (tests/test_reliability_round3.py); an integer with
        # none is still held to 64 bits, so no value can overflow SQLite or C later
        lo_b = key.min if key.min is not None else (-2 ** 63 if t == "int" else None)
        hi_b = key.max if key.max is not None else (2 ** 63 - 1 if t == "int" else None)
        if (lo_b is not None and value < lo_b) or (hi_b is not None and value > hi_b):
            def shown(x):
                return f"{x:g}" if t == "float" or abs(x) >= 1e15 else str(int(x))
            lo = "" if lo_b is None else shown(lo_b)
            hi = "" if hi_b is None else shown(hi_b)
            raise err(f"{name} = {value!r} is out of range; allowed {lo}..{hi}")
        return float(value) if t == "float" else value
    if t == "str":
        if not isinstance(value, str):
            raise err(f"{name} = {value!r} must be a string")
        return value
    if t == "choice":
        if value not in key.choices:
            raise err(f"{name} = {value!r} is not allowed; choose one of "
                      + ", ".join(f'"{c}"' for c in key.choices))
        return value
    if t == "clock_range":
        if not isinstance(value, list) or len(value) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise err(f"{name} = {value!r} must be [min, max] in MHz, e.g. [1200, 1500]")
        if value[0] > value[1] or value[0] < (key.min or 1) or value[1] > (key.max or 100000):
            raise err(f"{name} = {value!r}: min must not be above max, both "
                      f"{key.min:g}..{key.max:g} MHz; the GPU's supported clocks are checked "
                      f"by `gpucostd plan`")
        return list(value)
    if t == "version":
        if not isinstance(value, str) or not _versionish(value):
            raise err(f'{name} = {value!r} must be a version string like "5.15"')
        return value
    if t == "ports":
        if not isinstance(value, list) or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value):
            raise err(f"{name} = {value!r} must be a list of TCP ports 1..65535, e.g. "
                      f"[8000, 8080]")
        return list(value)
    if t == "paths":
        if not isinstance(value, list) or not all(isinstance(p, str) and os.path.isabs(p)
                                                  for p in value):
            raise err(f"{name} = {value!r} must be a list of absolute paths, e.g. "
                      f'["/models"]')
        return list(value)
    if t == "argv":
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise err(f'{name} = {value!r} must be a list of strings (argv, no shell), '
                      f'e.g. ["/usr/local/bin/drain", "--reason"]')
        if value and not os.path.isabs(value[0]):
            raise err(f"{name}: the program {value[0]!r} must be an absolute path")
        return list(value)
    raise AssertionError(t)


def _check_listen(value: str, err) -> None:
    if value == "":
        return
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise err(f'daemon.listen_address = {value!r} must be "host:port" with a port 1..65535, '
                  f'e.g. "{DEFAULT_LISTEN}" (empty string disables the HTTP server)')


def _check_textfile(value: str, err) -> None:
    if value and (not os.path.isabs(value) or not value.endswith(".prom")):
        raise err(f"export.textfile_path = {value!r} must be an absolute path ending in .prom "
                  f"(node_exporter's textfile collector reads only *.prom), e.g. "
                  f'"/var/lib/prometheus/node-exporter/gpucostd.prom"')


def parse(text: str, path: Optional[str] = None) -> Config:
    """Parse and validate config text. Raises ConfigError with file, line, key and the fix, and
    nothing else: whatever the text holds, a reload is refused, never a crash."""
    try:
        return _parse(text, path)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("values are nested too deeply (arrays or tables inside each other "
                          "hundreds of levels deep); no gpucostd key takes such a value",
                          path) from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file
        raise ConfigError(f"cannot be used ({type(e).__name__}: {str(e)[:120]}); check the "
                          f"file against the configuration reference in docs/configuration.md",
                          path) from None


def _parse(text: str, path: Optional[str]) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(f"not valid TOML: {e}", path, int(m.group(1)) if m else None) from None
    loc = Locator(text)

    def err_at(section, key=None, nth=0):
        def make(msg):
            return ConfigError(msg, path, loc.line(section, key, nth) or loc.line(section),
                               f"{section}.{key}" if key else section)
        return make

    values: Dict[str, Dict[str, Any]] = {s: {k: key.default for k, key in keys.items()}
                                         for s, keys in SCHEMA.items()}
    values["tuning"]["gpu"] = {k: None for k in GPU_TUNING_KEYS}
    overrides: List[GpuOverride] = []
    nics: Dict[str, Dict[str, Any]] = {}
    prices: List[Tuple[str, float]] = []
    mig_prices: List[Tuple[str, float]] = []
    endpoints: List[InferenceEndpoint] = []

    for section, table in raw.items():
        if section not in SCHEMA or "." in section:
            raise err_at(section)(f"unknown section [{section}]; known sections: "
                                 + ", ".join(f"[{s}]" for s in SCHEMA))
        if not isinstance(table, dict):
            raise err_at(section)(f"{section} must be a table [{section}]")
        for name, value in table.items():
            full = f"{section}.{name}"
            err = err_at(section, name)
            if section == "tuning" and name == "gpu":
                _parse_gpu_tuning(value, values, overrides, err_at, loc)
                continue
            if section == "tuning" and name == "nic":
                _parse_nics(value, nics, err_at)
                continue
            if section == "inference" and name == "endpoint":
                parse_endpoints(value, endpoints, err_at, loc)
                continue
            if section == "cost" and name in ("model_hour_usd", "mig_profile_hour_usd"):
                what = "model" if name == "model_hour_usd" else "MIG profile"
                if not isinstance(value, dict):
                    raise err(f"cost.{name} must be a table of {what} glob = price")
                for glob, price in value.items():
                    _check_value(make_key("float", 0, "", min=0, max=1e6), price,
                                 f"cost.{name}.{glob!r}", err_at(f"cost.{name}", glob))
                    (prices if what == "model" else mig_prices).append((glob, float(price)))
                continue
            if f"{section}.{name}" in SCHEMA:      # a subtable: [drain.slurm]
                _parse_subtable(section, name, value, values, err_at)
                continue
            if name not in SCHEMA[section]:
                close = [k for k in SCHEMA[section] if k.split("_")[0] == name.split("_")[0]]
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise err(f"unknown key {full}{hint}; keys of [{section}]: "
                          + ", ".join(SCHEMA[section]))
            values[section][name] = _check_value(SCHEMA[section][name], value, full, err)
    _check_listen(values["daemon"]["listen_address"], err_at("daemon", "listen_address"))
    _check_textfile(values["export"]["textfile_path"], err_at("export", "textfile_path"))
    check_inference(values["inference"], endpoints, err_at)
    if "socket_path" not in raw.get("daemon", {}):
        values["daemon"]["socket_path"] = default_socket_path()
    if "state_dir" not in raw.get("daemon", {}):
        values["daemon"]["state_dir"] = default_state_dir()
    return Config(values, path, tuple(overrides), nics, tuple(prices), text, tuple(endpoints),
                  mig_prices=tuple(mig_prices))


def _parse_subtable(section: str, name: str, value: Any, values: Dict[str, Dict[str, Any]],
                    err_at) -> None:
    sub = f"{section}.{name}"
    if not isinstance(value, dict):
        raise err_at(section, name)(f"{sub} must be a table [{sub}]")
    for k, v in value.items():
        if k not in SCHEMA[sub]:
            raise err_at(sub, k)(f"unknown key {sub}.{k}; keys of [{sub}]: "
                                 + ", ".join(SCHEMA[sub]))
        values[sub][k] = _check_value(SCHEMA[sub][k], v, f"{sub}.{k}", err_at(sub, k))


def _parse_gpu_settings(table: Mapping[str, Any], prefix: str, err_for, allow_match=False
                        ) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, value in table.items():
        if allow_match and name == "match":
            continue
        if name not in GPU_TUNING_KEYS:
            raise err_for(name)(f"unknown key {prefix}.{name}; GPU settings are: "
                                + ", ".join(GPU_TUNING_KEYS))
        out[name] = _check_value(GPU_TUNING_KEYS[name], value, f"{prefix}.{name}", err_for(name))
    if "power_limit_watts" in out and "power_limit_percent" in out:
        raise err_for("power_limit_percent")(
            f"{prefix}: set power_limit_watts or power_limit_percent, not both")
    return out


def _parse_gpu_tuning(value, values, overrides, err_at, loc):
    if not isinstance(value, dict):
        raise err_at("tuning", "gpu")("tuning.gpu must be a table [tuning.gpu]")
    plain = {k: v for k, v in value.items() if k != "override"}
    values["tuning"]["gpu"].update(
        _parse_gpu_settings(plain, "tuning.gpu", lambda k: err_at("tuning.gpu", k)))
    ovs = value.get("override", [])
    if not isinstance(ovs, list):
        raise err_at("tuning.gpu", "override")(
            "tuning.gpu.override must be an array of tables [[tuning.gpu.override]]")
    for i, ov in enumerate(ovs):
        sec = "tuning.gpu.override"

        def e(k=None, i=i):
            return err_at(sec, k, i)
        match = ov.get("match")
        if not isinstance(match, str):
            raise e("match")(f"[[tuning.gpu.override]] #{i + 1} needs match = \"index:N\", "
                             f"\"uuid:GPU-...\" or \"model:GLOB\"")
        kind, sep, val = match.partition(":")
        if not sep or kind not in _SPECIFICITY or not val or (
                kind == "index" and not val.isdigit()):
            raise e("match")(f'tuning.gpu.override.match = {match!r} must be "index:N", '
                             f'"uuid:GPU-..." or "model:GLOB"')
        settings = _parse_gpu_settings(ov, sec, lambda k, i=i: err_at(sec, k, i), True)
        for prev in overrides:
            if prev.kind == kind and prev.value.lower() == val.lower():
                raise e("match")(f"two overrides have match = {match!r}; merge them")
            if prev.kind == "model" and kind == "model" and (
                    fnmatch.fnmatchcase(val, prev.value) or fnmatch.fnmatchcase(prev.value, val)):
                raise e("match")(f"overrides {prev.match!r} and {match!r} overlap; make the "
                                 f"model globs disjoint")
        overrides.append(GpuOverride(match, kind, val, settings, loc.line(sec, None, i)))


def _parse_nics(value, nics, err_at):
    if not isinstance(value, dict):
        raise err_at("tuning", "nic")("tuning.nic must hold tables [tuning.nic.IFNAME]")
    for ifname, rings in value.items():
        sec = f"tuning.nic.{ifname}"
        if not isinstance(rings, dict):
            raise err_at(sec)(f"{sec} must be a table of rx/tx/rx_mini/rx_jumbo")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", ifname):
            raise err_at(sec)(f"{ifname!r} is not a valid interface name")
        out = {}
        for k, v in rings.items():
            if k not in RING_KEYS:
                raise err_at(sec, k)(f"unknown key {sec}.{k}; ring keys are: "
                                     + ", ".join(RING_KEYS))
            if v != "max" and (isinstance(v, bool) or not isinstance(v, int) or not
                               0 < v <= 1 << 20):
                raise err_at(sec, k)(f'{sec}.{k} = {v!r} must be an integer 1..{1 << 20} or '
                                     f'"max"')
            out[k] = v
        nics[ifname] = out


def load(path: Optional[str] = None, *, missing_ok: Optional[bool] = None) -> Config:
    """Load the config file, then its drop-ins (gpucostd.d/*.toml beside it, in name order).
    The default path may be missing (all defaults); an explicit path must exist."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    if missing_ok is None:
        missing_ok = not explicit
    warnings: List[str] = []
    text = _read_text(path, missing_ok, warnings)
    dropins = dropin_files(path)
    if not dropins:
        cfg = parse(text or "", path if text is not None else None)
        cfg = cfg._copy(files=((path, text),) if text is not None else ())
    else:
        cfg = _parse_files(_read_dropins(path, text, dropins, warnings))
    if is_root():
        warnings.extend(_hook_trust(cfg))
    return cfg._copy(warnings=tuple(warnings))


def _read_dropins(path: str, text: Optional[str], dropins: List[str],
                  warnings: Optional[List[str]] = None) -> List[Tuple[str, Optional[str]]]:
    """The config's text and its drop-ins', held to MAX_DROPINS files and MAX_TOTAL_BYTES in
    all (each file is read with what is left of that budget as its cap, so 300 drop-ins of
    1 MiB are refused after 2 MiB, not read into memory for seconds)."""
    if len(dropins) > MAX_DROPINS:
        raise ConfigError(f"{len(dropins)} drop-ins; at most {MAX_DROPINS} are read: merge "
                          f"them into fewer files", dropin_dir(path))
    files: List[Tuple[str, Optional[str]]] = [(path, text)]
    left = MAX_TOTAL_BYTES - len((text or "").encode("utf-8"))
    for p in dropins:
        if left <= 0:
            raise ConfigError(f"the config and its drop-ins hold more than {MAX_TOTAL_BYTES} "
                              f"bytes together; {p} is not read", p)
        t = _read_text(p, False, warnings, min(MAX_CONFIG_BYTES, left))
        left -= len((t or "").encode("utf-8"))
        files.append((p, t))
    return files


def _read_text(path: str, missing_ok: bool, warnings: Optional[List[str]] = None,
               limit: int = MAX_CONFIG_BYTES) -> Optional[str]:
    """The text of one config file (None: missing and allowed to be). A root daemon refuses a
    file another user can change; a group-writable one adds a line to `warnings`."""
    try:
        data, st = _read_config(path, limit)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError("no such file; create it or pass --config FILE", path) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path) from None
    if is_root():
        found = _root_trust(path, st)
        if warnings is not None:
            warnings.extend(found)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path) from None


def _root_trust(path: str, st) -> List[str]:
    """A root daemon runs hooks and changes hardware as the config says: a config another user
    can change is refused. One that only a non-root group may write is a warning (a finding),
    not a refusal: sites let an admin group edit /etc, and refusing would stop their daemon at
    an upgrade; those members can usually become root anyway."""
    from gpucostd.statefile import writable_by_others
    problem = writable_by_others(path, st)
    if problem is None:
        return []
    kind, why = problem
    if kind == "group":
        return [f"config {why}; its members can make the root daemon run any hook program"]
    raise ConfigError(f"refused: a user other than root can change this file, and a root "
                      f"daemon would run its hooks and settings ({why})", path)


def _hook_trust(cfg: "Config") -> List[str]:
    """Hook programs a non-root user can change: said at load; the runner refuses to run them."""
    from gpucostd.statefile import untrusted_hook
    out = []
    for hook in ("on_critical", "on_recovered", "on_inefficient", "on_efficient"):
        argv = cfg.hooks[hook]
        if not argv:
            continue
        if not os.path.exists(argv[0]):
            out.append(f"hooks.{hook}: {argv[0]} does not exist; the hook fails until it does")
            continue
        problem = untrusted_hook(argv)
        if problem is not None:
            out.append(f"hooks.{hook}: {problem}; a root daemon will not run it")
    return out


def _read_config(path: str, limit: int = MAX_CONFIG_BYTES) -> Tuple[bytes, os.stat_result]:
    """statefile.read_regular (the one loader: O_NONBLOCK, regular files only, size-capped) with
    its refusals as ConfigErrors. FileNotFoundError passes through."""
    from gpucostd.statefile import UnreadableFile, read_regular
    try:
        return read_regular(path, limit)
    except UnreadableFile as e:
        why = str(e)
        if "not a regular file" in why:
            why += "; point --config at a TOML file"
        elif "bytes" in why:
            why += (f" (a config file may be at most {MAX_CONFIG_BYTES} bytes, with its "
                    f"drop-ins {MAX_TOTAL_BYTES} in all: is this the right file?)")
        raise ConfigError(why, path) from None


# --------------------------------------------------------------------------- drop-ins
# /etc/gpucostd/gpucostd.toml first, then /etc/gpucostd/gpucostd.d/*.toml in name order (C
# locale byte order); a later file wins key by key. [[tuning.gpu.override]] entries with the
# same match merge (a later power_limit_watts replaces an earlier power_limit_percent and vice
# versa); a later [[inference.endpoint]] list replaces the earlier one.
DROPIN_DIR = "gpucostd.d"
def dropin_dir(path: Optional[str]) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path or DEFAULT_PATH)), DROPIN_DIR)


def dropin_files(path: Optional[str]) -> List[str]:
    d = dropin_dir(path)
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    return [os.path.join(d, n) for n in names if n.endswith(".toml") and not n.startswith(".")
            and os.path.isfile(os.path.join(d, n))]


def load_files(path: Optional[str], extra: List[str]) -> Config:
    """The config at `path` with its drop-ins and then the files `extra` (a what-if: the
    simulated --apply of `gpucostd calibrate`)."""
    main = path or DEFAULT_PATH
    return _parse_files(_read_dropins(main, _read_text(main, path is None),
                                      dropin_files(path) + list(extra)))


def _parse_files(files: List[Tuple[str, Optional[str]]]) -> Config:
    merged: Dict[str, Any] = {}
    read = [(p, t) for p, t in files if t is not None]
    for p, text in read:
        parse(text, p)                        # each file alone first: errors name its line
        merge(merged, tomllib.loads(text))
    names = [p for p, _t in read]
    try:
        cfg = parse(dump_toml(merged) if merged else "",
                    files[0][0] if files[0][1] is not None else None)
    except ConfigError as e:
        raise ConfigError(f"{e.bare} (in the merged config of {', '.join(names)})",
                          names[-1] if names else None) from None
    return cfg._copy(files=tuple(read))


