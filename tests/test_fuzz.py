"""Property-based fuzzing (hypothesis) of every parser of outside input: the config loader,
the scenario loader, the kernel-log parser, the status socket protocol, the inference
exposition parser and the status renderer. Every input gives a valid result or the documented
error, never another exception.

CI runs FUZZ_EXAMPLES (200) examples per target; the longer campaign (3000 per target, the
command docs/reliability.md gives):
    GPUCOSTD_FUZZ_EXAMPLES=3000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""
from __future__ import annotations

import json
import math
import os

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the [test] "
                                                      "extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from gpucostd import config as config_mod  # noqa: E402
from gpucostd import config_toml  # noqa: E402
from gpucostd.probes.inference import ParseError, parse_metric  # noqa: E402
from gpucostd.probes.kernel_log import KernelFault, NvrmParser  # noqa: E402
from gpucostd.sim import scenario as scenario_mod  # noqa: E402
from gpucostd.sim.mig import MIG_KEYS  # noqa: E402
from gpucostd.views import statusview  # noqa: E402
from gpucostd.views.statusapi import StatusServer  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("GPUCOSTD_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize="CI" in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ------------------------------------------------------------------ building blocks
ODD_NUMBERS = st.sampled_from([0, -1, 1, 2 ** 63, -(2 ** 63) - 1, 10 ** 400, 1e308, -1e308,
                               5e-324, float("inf"), float("-inf"), float("nan"), 0.05, 3600.0])
ODD_STRINGS = st.sampled_from(["", " ", "max", "auto", "\x1b[31m", "a\nb", "\u202e", "é" * 50,
                               "\\", '"', "index:0", "model:*", "uuid:GPU-x", "/bin/true",
                               "0.0.0.0:9477", "x" * 5000, "5.15", "1.2.3.4.5"])
SCALARS = st.one_of(st.booleans(), st.integers(), ODD_NUMBERS,
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    ODD_STRINGS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8),
                                                                        inner, max_size=3)),
                      max_leaves=12)


def toml_key(k: str) -> str:
    return config_toml.toml_key(k)


def toml_value(v) -> str:
    """TOML for a value; dicts become inline tables, odd floats TOML's own words."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return config_toml.toml_value(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def tables(names_and_keys):
    """TOML text: some of the known tables, each with some known (and a few unknown) keys."""
    @st.composite
    def build(draw):
        out = []
        for table, keys in names_and_keys:
            if not draw(st.booleans()):
                continue
            header = draw(st.sampled_from([f"[{table}]", f"[[{table}]]"]) if table.endswith(
                ("override", "gpu", "at", "mig")) else st.just(f"[{table}]"))
            out.append(header)
            chosen = draw(st.lists(st.sampled_from(list(keys) + ["bogus", "x.y"]),
                                   max_size=6, unique=True))
            for key in chosen:
                out.append(f"{toml_key(key)} = {toml_value(draw(VALUES))}")
        return "\n".join(out) + "\n"
    return build()


CONFIG_TABLES = [(s, k) for s, k in config_mod.SCHEMA.items()] + [
    ("tuning.gpu", config_mod.GPU_TUNING_KEYS), ("tuning.gpu.override",
                                                 ["match"] + list(config_mod.GPU_TUNING_KEYS)),
    ("tuning.nic.eth0", config_mod.RING_KEYS), ("cost.model_hour_usd", ["H100*", "*"])]
DEEP = st.builds(lambda table, n, open_, close: f"[{table}]\nx = " + open_ * n + close * n,
                 st.sampled_from(["hooks", "node", "tuning"]), st.integers(1, 3000),
                 st.sampled_from(["[", "{a = "]), st.sampled_from(["]", "}"]))
CONFIG_TEXT = st.one_of(tables(CONFIG_TABLES), st.text(max_size=300), DEEP,
                        st.binary(max_size=300).map(lambda b: b.decode("latin-1")))


# ------------------------------------------------------------------ the config loader
@FUZZ
@given(CONFIG_TEXT)
def test_fuzz_config_loader_gives_a_config_or_a_config_error(text):
    try:
        cfg = config_mod.parse(text, "fuzz.toml")
    except config_mod.ConfigError as e:
        assert str(e).startswith("fuzz.toml")
        return
    # `config show` prints TOML that `config check` accepts, with the same meaning
    again = config_mod.parse(cfg.to_toml(), "shown.toml")
    assert again.as_dict() == cfg.as_dict() or _nan_equal(again.as_dict(), cfg.as_dict())


def _nan_equal(a, b):
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                    default=str)


# ------------------------------------------------------------------ the scenario loader
SCENARIO_TABLES = [("node", scenario_mod.NODE_FIELDS), ("gpu_defaults", scenario_mod.GPU_FIELDS),
                   ("gpu", list(scenario_mod.GPU_FIELDS) + ["index"]),
                   ("at", list(scenario_mod.TIMELINE_EXTRA) + list(scenario_mod.GPU_FIELDS)),
                   ("mig", list(MIG_KEYS))]


@FUZZ
@given(st.one_of(tables(SCENARIO_TABLES), st.text(max_size=300), DEEP))
def test_fuzz_scenario_loader_gives_a_scenario_or_a_scenario_error(text):
    try:
        sc = scenario_mod.parse_scenario(text, "fuzz.toml")
    except scenario_mod.ScenarioError as e:
        assert str(e).startswith("fuzz.toml")
        return
    assert sc is not None


# ------------------------------------------------------------------ the kernel-log parser
BUS = st.sampled_from(["PCI:0000:18:00", "0000:18:00.0", "PCI:ffff:ff:1f", "PCI:", "", "x" * 80])
XID_LINE = st.builds(
    lambda bus, xid, pid, name, tail: f"NVRM: Xid ({bus}): {xid}, pid={pid}, name={name}, {tail}",
    BUS, st.one_of(st.integers(-5, 200), st.just(10 ** 30), st.text(max_size=5)),
    st.one_of(st.integers(), st.text(max_size=5)), st.text(max_size=20), st.text(max_size=60))
KERNEL_LINE = st.one_of(XID_LINE, st.text(max_size=200), st.binary(max_size=200),
                        st.builds(lambda b: f"NVRM: GPU at PCI:{b}: GPU has fallen off the bus.",
                                  st.text(max_size=20)),
                        st.builds(lambda t: "NVRM: " + t, st.text(max_size=120)))


@FUZZ
@given(st.lists(KERNEL_LINE, min_size=1, max_size=8))
def test_fuzz_kernel_log_parser_gives_faults_never_an_exception(lines):
    parser = NvrmParser()
    faults = []
    for i, line in enumerate(lines):
        faults += parser.feed(line, time=1.7e9 + i)
    faults += parser.flush(force=True)
    assert all(isinstance(f, KernelFault) for f in faults)


# ------------------------------------------------------------------ the status socket protocol
class _Protocol:
    """The server's dispatch with handlers that read requests like the daemon's do."""
    handlers = {
        "status": lambda req: {"status": {}},
        "events": lambda req: {"events": [int(req.get("limit") or 200),
                                          float(req["since"]) if req.get("since") is not None
                                          else None]},
        "cost": lambda req: {"cost": float(req.get("since_seconds") or 86400)},
        "ack": lambda req: {"events": [None if req.get("gpu") is None else int(req["gpu"])]},
        "ping": lambda req: {},
    }
    root_only = {"ack"}
    dispatch = StatusServer.dispatch


REQUEST = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda cmd, extra: json.dumps(dict({"cmd": cmd}, **extra)).encode(),
              st.sampled_from(["status", "events", "cost", "ack", "ping", "x", ""]),
              st.dictionaries(st.sampled_from(["limit", "since", "since_seconds", "gpu", "code"]),
                              VALUES, max_size=3)),
    st.builds(lambda n, c: (b'{"cmd": "events", "limit": ' + c * n + b"}"),
              st.integers(1, 2000), st.sampled_from([b"9", b"[", b"1e9"])),
    st.sampled_from([b'{"cmd": "events", "limit": Infinity}', b'{"cmd": "cost", '
                     b'"since_seconds": -Infinity}', b'{"cmd": NaN}', b"[" * 5000]))


@FUZZ
@given(REQUEST, st.sampled_from([0, 1000, None]))
def test_fuzz_status_socket_protocol_always_answers_ok_or_a_clear_error(line, uid):
    reply = _Protocol().dispatch(line, uid)
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"]
    json.dumps(reply, default=str)


# ------------------------------------------------------------------ the exposition parser
EXPO_LINE = st.one_of(
    st.builds(lambda name, labels, value: f"{name}{labels} {value}",
              st.sampled_from(["vllm:generation_tokens_total", "vllm:generation_tokens",
                               "tgi_request_generated_tokens_sum", "other", "vllm:x"]),
              st.sampled_from(["", '{model="a"}', '{a="\\"}"}', "{", '{a="b",}']),
              st.one_of(st.floats(allow_nan=True), st.text(max_size=8),
                        st.sampled_from(["+Inf", "-Inf", "NaN", "1e400", "0x10", "1_000"]))),
    st.text(max_size=80), st.just("# HELP x y"), st.just("# TYPE x counter"))


@FUZZ
@given(st.lists(EXPO_LINE, max_size=10), st.sampled_from(["vllm:generation_tokens_total",
                                                          "tgi_request_generated_tokens"]))
def test_fuzz_exposition_parser_gives_a_count_or_a_parse_error(lines, metric):
    try:
        value, name, n = parse_metric("\n".join(lines), metric)
    except ParseError as e:
        assert str(e)
        return
    assert math.isfinite(value) and value >= 0 and n >= 1 and isinstance(name, str)


# ------------------------------------------------------------------ the status renderer
GOOD_DOC = {
    "schema": 1, "host": "node1", "time": 1.7e9,
    "daemon": {"uptime_seconds": 31, "simulated_scenario": None},
    "node": {"health": "WARN", "gpu_count": 1, "driver_version": "550", "cuda_version": "12.4",
             "nvml_available": True, "findings": [{"severity": "WARN", "message": "m",
                                                  "action": "a", "since": 1.7e9}]},
    "gpus": [{"index": 0, "model": "H100", "health": "WARN", "state": "ok",
              "temperature_celsius": 86, "power_draw_watts": 540, "power_limit_watts": 700,
              "sm_clock_mhz": 1410, "sm_clock_max_mhz": 1980, "utilization_percent": 95,
              "throttle_reasons": ["HwThermalSlowdown"],
              "findings": [{"severity": "WARN", "message": "hot", "action": "cool",
                            "since": 1.7e9}]}],
    "settings": [{"subject": "gpu:0", "name": "power", "in_sync": False, "actual": 1,
                  "desired": 2}],
    "checks": [{"name": "iommu", "status": "warn", "message": "m", "fix": "f"}],
    "cost": None,
    "events": [{"time": 1.7e9, "severity": "OK", "subject": "node", "message": "started"}],
}


@st.composite
def mutated_doc(draw):
    doc = json.loads(json.dumps(GOOD_DOC))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from([("host",), ("time",), ("daemon",), ("node",),
                                     ("node", "health"), ("node", "findings"), ("gpus",),
                                     ("gpus", 0), ("gpus", 0, "state"), ("gpus", 0, "health"),
                                     ("gpus", 0, "findings"), ("settings",), ("checks",),
                                     ("cost",), ("events",), ("events", 0, "time")]))
        target = doc
        try:
            for p in path[:-1]:
                target = target[p]
            target[path[-1]] = draw(VALUES)
        except (KeyError, IndexError, TypeError):
            pass
    return doc


@FUZZ
@given(st.one_of(mutated_doc(), VALUES))
def test_fuzz_status_renderer_gives_text_never_an_exception(doc):
    text = statusview.render_status(doc, colour=True)
    assert isinstance(text, str) and text.endswith("\n")
    assert all(len(line) <= 100 + 20 for line in text.splitlines())    # + colour codes
    assert statusview.exit_code(doc) in (0, 1, 2, 3)
