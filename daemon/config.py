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
import stat
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11
    import tomli as tomllib

from gpucostd import (DEFAULT_PATH, DEFAULT_SOCKET, _is_root,  # noqa: E402,F401 (re-exported)
                      default_socket_path, user_runtime_dir)

from gpucostd.config_schema import (DEFAULT_LISTEN, DEFAULT_STATE_DIR,  # noqa: F401 (re-exported)
                                    GPU_TUNING_KEYS, RING_KEYS, SCHEMA, Key, _k)
from gpucostd.tomllines import TomlLines
# A config is a few kilobytes; anything far larger is a mistake (or an attack on memory) and is
# refused before it is read.
MAX_CONFIG_BYTES = 1 << 20


class FileError(Exception):
    """A file the user wrote that cannot be used: str() is `path:line: message`."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None,
                 key: Optional[str] = None):
        self.path, self.line, self.key, self.bare = path, line, key, message
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        super().__init__(where + message)


class ConfigError(FileError):
    """A config that cannot be used. str() is the full message for the user."""


ENDPOINT_KEYS = ("url", "gpus", "tokens_metric", "parallel")
PARALLEL = ("tensor", "data")
_SEL_NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"
_SEL_RE = re.compile(r"^\s*(" + _SEL_NAME + r")\s*(?:\{(.*)\})?\s*$")
_SEL_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=|!=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_selector(text: str) -> Tuple[str, Tuple[Tuple[str, str, str], ...]]:
    """'name{label="value",other!="x"}' -> (name, ((label, op, value), ...)). "auto" ->
    ("auto", ()). ValueError with the accepted form."""
    m = _SEL_RE.match(text or "")
    form = ('use a metric name, optionally with label matchers: '
            'name{label="value",other!="x"}, or "auto"')
    if not m:
        raise ValueError(f"{text!r} is not a metric selector; {form}")
    name, body = m.group(1), m.group(2)
    labels: List[Tuple[str, str, str]] = []
    pos = 0
    body = (body or "").strip()
    while pos < len(body):
        lm = _SEL_LABEL.match(body, pos)
        if not lm or lm.end() == pos:
            raise ValueError(f"{text!r}: bad label matcher at {body[pos:pos + 20]!r}; {form}")
        value = re.sub(r"\\(.)", r"\1", lm.group(3))
        labels.append((lm.group(1), lm.group(2), value))
        pos = lm.end()
    return name, tuple(labels)


@dataclass(frozen=True)
class InferenceEndpoint:
    """One inference server's /metrics: its tokens go to `gpus` (None: all GPUs)."""
    url: str
    gpus: Optional[Tuple[int, ...]]
    tokens_metric: str
    parallel: str = "tensor"
    line: Optional[int] = None
# Tables whose keys are free (names chosen by the user) or that hold lists of tables.
DYNAMIC = {
    "tuning.gpu": "GPU settings for all GPUs: " + ", ".join(GPU_TUNING_KEYS),
    "tuning.gpu.override": "[[tuning.gpu.override]] match = \"index:N\"|\"uuid:GPU-...\"|"
                           "\"model:GLOB\" plus GPU settings",
    "tuning.nic": "[tuning.nic.IFNAME] rx/tx/rx_mini/rx_jumbo = N or \"max\"",
    "cost.model_hour_usd": "model-name glob = price of one GPU-hour",
    "inference.endpoint": "[[inference.endpoint]] url = \"http://...\", gpus = [0, 1], "
                          "tokens_metric, parallel = \"tensor\"|\"data\"",
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


class Config:
    """Validated, immutable configuration. Sections are attributes: ``cfg.daemon.interval_seconds``.
    """

    def __init__(self, values: Dict[str, Dict[str, Any]], path: Optional[str],
                 overrides: Tuple[GpuOverride, ...], nics: Mapping[str, Mapping[str, Any]],
                 model_prices: Tuple[Tuple[str, float], ...], raw_text: str = "",
                 endpoints: Tuple[InferenceEndpoint, ...] = ()):
        self.path = path
        self._endpoints = tuple(endpoints)
        self._values = values
        for section, data in values.items():
            object.__setattr__(self, section, _View(data))
        self.gpu_tuning = _View(values["tuning"]["gpu"])
        self.gpu_overrides = overrides
        self.nic_tuning = _View({k: _View(v) for k, v in nics.items()})
        self.model_prices = model_prices
        self.raw_text = raw_text
        # trust problems a root daemon reports as findings (see load()); () when none
        self.warnings: Tuple[str, ...] = ()
        self.files: Tuple[Tuple[str, str], ...] = ()    # (path, text) read, in order (load)

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
        c = self.updated()
        c._endpoints = tuple(endpoints)
        return c

    def price_for_model(self, model: Optional[str]) -> float:
        for glob, price in self.model_prices:
            if model is not None and fnmatch.fnmatchcase(model, glob):
                return price
        return self.cost.gpu_hour_usd

    def updated(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys of some sections replaced (for replay's private settings;
        callers pass values that are valid)."""
        values = {s: dict(v) for s, v in self._values.items()}
        for section, changes in sections.items():
            values[section].update(changes)
        cfg = Config(values, self.path, self.gpu_overrides,
                     {n: dict(v) for n, v in self.nic_tuning.items()}, self.model_prices,
                     self.raw_text, self._endpoints)
        cfg.warnings = self.warnings
        cfg.files = self.files
        return cfg

    def as_dict(self) -> Dict[str, Any]:
        out = {s: dict(v) for s, v in self._values.items()}
        tuning = dict(out["tuning"])
        gpu = {k: v for k, v in tuning.pop("gpu").items() if v is not None}
        if self.gpu_overrides:
            gpu["override"] = [dict({"match": o.match}, **{k: v for k, v in o.settings.items()
                                                          if v is not None})
                               for o in self.gpu_overrides]
        tuning["gpu"] = gpu
        tuning["nic"] = {n: dict(v) for n, v in self.nic_tuning.items()}
        out["tuning"] = tuning
        out["cost"] = dict(out["cost"], model_hour_usd=dict(self.model_prices))
        if self._endpoints:
            out["inference"] = dict(out["inference"], endpoint=[
                dict({"url": e.url}, **({"gpus": list(e.gpus)} if e.gpus is not None else {}),
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
    if _is_root():
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
        if (key.min is not None and value < key.min) or (key.max is not None and value > key.max):
            lo = "" if key.min is None else f"{key.min:g}"
            hi = "" if key.max is None else f"{key.max:g}"
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
    loc = TomlLines(text)

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
    endpoints: List[InferenceEndpoint] = []

    for section, table in raw.items():
        if section not in SCHEMA:
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
                _parse_endpoints(value, endpoints, err_at, loc)
                continue
            if section == "cost" and name == "model_hour_usd":
                if not isinstance(value, dict):
                    raise err("cost.model_hour_usd must be a table of model glob = price")
                for glob, price in value.items():
                    _check_value(_k("float", 0, "", min=0, max=1e6), price,
                                 f"cost.model_hour_usd.{glob!r}", err_at("cost.model_hour_usd",
                                                                           glob))
                    prices.append((glob, float(price)))
                continue
            if name not in SCHEMA[section]:
                close = [k for k in SCHEMA[section] if k.split("_")[0] == name.split("_")[0]]
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise err(f"unknown key {full}{hint}; keys of [{section}]: "
                          + ", ".join(SCHEMA[section]))
            values[section][name] = _check_value(SCHEMA[section][name], value, full, err)
    _check_listen(values["daemon"]["listen_address"], err_at("daemon", "listen_address"))
    _check_textfile(values["export"]["textfile_path"], err_at("export", "textfile_path"))
    _check_inference(values["inference"], endpoints, err_at)
    if "socket_path" not in raw.get("daemon", {}):
        values["daemon"]["socket_path"] = default_socket_path()
    if "state_dir" not in raw.get("daemon", {}):
        values["daemon"]["state_dir"] = default_state_dir()
    return Config(values, path, tuple(overrides), nics, tuple(prices), text, tuple(endpoints))


def _check_url(url: Any, name: str, err) -> None:
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise err(f"{name} = {url!r} must be an http:// or https:// URL, e.g. "
                  f'"http://127.0.0.1:8000/metrics"')


def _check_metric(text: Any, name: str, err) -> str:
    if not isinstance(text, str):
        raise err(f"{name} = {text!r} must be a string")
    try:
        parse_selector(text)
    except ValueError as e:
        raise err(f"{name}: {e}") from None
    return text


def _check_inference(inf: Dict[str, Any], endpoints: List[InferenceEndpoint], err_at) -> None:
    _check_metric(inf["tokens_metric"], "inference.tokens_metric",
                  err_at("inference", "tokens_metric"))
    if inf["metrics_url"]:
        _check_url(inf["metrics_url"], "inference.metrics_url", err_at("inference", "metrics_url"))
        if endpoints:
            raise err_at("inference", "metrics_url")(
                "set [inference] metrics_url (one server for all GPUs) or [[inference.endpoint]] "
                "entries, not both")
    # the inherited default metric
    for i, e in enumerate(endpoints):
        if e.tokens_metric == "":
            endpoints[i] = InferenceEndpoint(e.url, e.gpus, inf["tokens_metric"], e.parallel,
                                             e.line)


def _parse_endpoints(value, endpoints: List[InferenceEndpoint], err_at, loc) -> None:
    sec = "inference.endpoint"
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise err_at("inference", "endpoint")(
            "inference.endpoint must be an array of tables [[inference.endpoint]]")
    owner: Dict[int, int] = {}
    for i, ep in enumerate(value):
        def e(k=None, i=i):
            return err_at(sec, k, i)
        for k in ep:
            if k not in ENDPOINT_KEYS:
                raise e(k)(f"unknown key {sec}.{k}; keys of [[{sec}]]: " + ", ".join(ENDPOINT_KEYS))
        if "url" not in ep:
            raise e()(f"[[{sec}]] #{i + 1} needs url = \"http://HOST:PORT/metrics\"")
        _check_url(ep["url"], f"{sec}.url", e("url"))
        gpus = ep.get("gpus")
        if gpus is not None:
            if not isinstance(gpus, list) or not gpus or not all(
                    isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 1024
                    for g in gpus):
                raise e("gpus")(f"{sec}.gpus = {gpus!r} must be a non-empty list of GPU "
                                f"indexes, e.g. [0, 1]")
            for g in gpus:
                if g in owner:
                    raise e("gpus")(f"{sec}.gpus: GPU {g} is already in [[{sec}]] #{owner[g] + 1}"
                                    f"; each GPU's tokens come from one endpoint")
                owner[g] = i
            gpus = tuple(gpus)
        metric = _check_metric(ep.get("tokens_metric", ""), f"{sec}.tokens_metric",
                               e("tokens_metric")) if "tokens_metric" in ep else ""
        parallel = ep.get("parallel", "tensor")
        if parallel not in PARALLEL:
            raise e("parallel")(f'{sec}.parallel = {parallel!r}: choose "tensor" (one group: '
                                f'the slowest GPU sets its pace) or "data"')
        endpoints.append(InferenceEndpoint(ep["url"], gpus, metric, parallel,
                                           loc.line(sec, None, i)))


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
                raise err_at(sec, k)(f'{sec}.{k} = {v!r} must be a positive integer or "max"')
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
        cfg.files = ((path, text),) if text is not None else ()
    else:
        cfg = _parse_files([(path, text)] +
                           [(p, _read_text(p, False, warnings)) for p in dropins])
    if _is_root():
        warnings.extend(_hook_trust(cfg))
    cfg.warnings = tuple(warnings)
    return cfg


def _read_text(path: str, missing_ok: bool, warnings: Optional[List[str]] = None
               ) -> Optional[str]:
    """The text of one config file (None: missing and allowed to be). A root daemon refuses a
    file another user can change; a group-writable one adds a line to `warnings`."""
    try:
        data, st = _read_config(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError("no such file; create it or pass --config FILE", path) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path) from None
    if _is_root():
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
    from gpucostd.statefile import writable_by_others
    out = []
    for hook in ("on_critical", "on_recovered"):
        argv = cfg.hooks[hook]
        if not argv:
            continue
        try:
            problem = writable_by_others(argv[0])
        except OSError as e:
            out.append(f"hooks.{hook}: cannot check {argv[0]}: {e.strerror or e}")
            continue
        if problem is not None:
            out.append(f"hooks.{hook}: {problem[1]}; a root daemon will not run it")
    return out


def _read_config(path: str, limit: int = MAX_CONFIG_BYTES) -> Tuple[bytes, os.stat_result]:
    """The bytes of a config file and its stat, refusing before reading anything that is not a
    regular file (a FIFO would block the loop, a device never ends) or is larger than `limit`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)       # O_NONBLOCK: opening a FIFO does not wait for a writer
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                    "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
            raise ConfigError(f"is {kind}, not a regular file; point --config at a TOML file",
                              path)
        if st.st_size > limit:
            raise ConfigError(f"is {st.st_size} bytes; a config may be at most {limit} bytes "
                              f"(is this the right file?)", path)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:    # it grew while being read
            raise ConfigError(f"is larger than {limit} bytes; a config may be at most {limit} "
                              f"bytes", path)
        return b"".join(chunks), st
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- drop-ins
# /etc/gpucostd/gpucostd.toml first, then /etc/gpucostd/gpucostd.d/*.toml in name order (C
# locale byte order); a later file wins key by key. [[tuning.gpu.override]] entries with the
# same match merge (a later power_limit_watts replaces an earlier power_limit_percent and vice
# versa); a later [[inference.endpoint]] list replaces the earlier one.
DROPIN_DIR = "gpucostd.d"
_ALTERNATIVES = {"power_limit_watts": "power_limit_percent",
                 "power_limit_percent": "power_limit_watts"}


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
    files = [(main, _read_text(main, path is None))]
    files += [(p, _read_text(p, False)) for p in dropin_files(path) + list(extra)]
    return _parse_files(files)


def _merge(base: Dict[str, Any], over: Mapping[str, Any]) -> None:
    for k, v in over.items():
        if k == "override" and isinstance(v, list) and isinstance(base.get(k), list):
            for item in v:
                same = next((b for b in base[k] if isinstance(b, dict) and isinstance(item, dict)
                             and b.get("match") == item.get("match")), None)
                if same is None:
                    base[k].append(dict(item))
                else:
                    _merge(same, item)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            if k in _ALTERNATIVES:
                base.pop(_ALTERNATIVES[k], None)
            base[k] = v


def _sources(raw: Mapping[str, Any], path: str, loc: TomlLines,
             out: Dict[str, str]) -> None:
    """Where each key of one file is: dotted key -> "path:line"."""
    def where(section, key, nth=0):
        line = loc.line(section, key, nth)
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
                if k in _ALTERNATIVES:
                    out.pop(f"{prefix}.{_ALTERNATIVES[k]}", None)
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
        _sources(raw, p, TomlLines(text), sources)
    return sources


def _parse_files(files: List[Tuple[str, Optional[str]]]) -> Config:
    merged: Dict[str, Any] = {}
    read = [(p, t) for p, t in files if t is not None]
    for p, text in read:
        parse(text, p)                        # each file alone first: errors name its line
        _merge(merged, tomllib.loads(text))
    names = [p for p, _t in read]
    try:
        cfg = parse(dump_toml(merged) if merged else "",
                    files[0][0] if files[0][1] is not None else None)
    except ConfigError as e:
        raise ConfigError(f"{e.bare} (in the merged config of {', '.join(names)})",
                          names[-1] if names else None) from None
    cfg.files = tuple(read)
    return cfg


# --------------------------------------------------------------------------- TOML output
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or
                                                      ord(c) == 0x7f else c) for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


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
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}{note(raw)}")
    if lines:
        lines.append("")
    for k, v in data.items():
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        raw = f"{_raw}.{k}" if _raw else k
        if isinstance(v, dict):
            lines.append(dump_toml(v, name, comment, raw))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                ident = item.get("match", i)
                lines.append(f"[[{name}]]")
                lines.extend(f"{_toml_key(a)} = {_toml_value(b)}{note(f'{raw}[{ident}].{a}')}"
                             for a, b in item.items())
                lines.append("")
    return "\n".join(line for line in lines if line is not None).rstrip("\n") + "\n"
