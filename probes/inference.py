"""Reads a local inference server's generated-tokens counter from its Prometheus endpoint.

One short HTTP GET per cycle and endpoint, under ONE deadline for the whole exchange (connect,
request, status line, headers, redirects, body): every socket wait gets only the time left, so
a server that trickles its headers or body a byte at a time, or redirects, cannot hold up the
daemon's cycle. Never raises for an expected fault: an unreachable endpoint, an HTTP error, a
missing metric or malformed text come back as an InferenceReading whose `error` says what,
where and how to fix; the loop turns that into a finding.

Which series counts generated tokens depends on the server; with ``tokens_metric = "auto"``
the exposition says which server it is (``SERVERS``, real expositions in
tests/fixtures/expositions/, names in docs/cost.md). ``tokens_metric`` may also be a selector
``name{label="value",other!="x"}``: only matching series are summed.
"""
from __future__ import annotations

import http.client
import ipaddress
import math
import re
import socket
import ssl
import threading
import time as _time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gpucostd.config import parse_selector
from gpucostd.probes.inference_wrappers import wrapped, wrapped_counter

# A /metrics page larger than this is refused (said, not parsed): real serving expositions are
# tens of kB (tests/fixtures/expositions/); parsing an 8 MiB one every cycle cost 42% of a core.
MAX_BYTES = 1024 * 1024
# Plausibility (docs/cost.md, "Plausible token counts"). The fastest published serving figures
# are tens of thousands of generated tokens per second per GPU; a bound 30x above them only
# catches garbage or a fake server, never a fast real one. A counter above MAX_TOKEN_COUNT (about
# 30,000 GPU-years at that bound; a node's counter stays far below) is refused.
MAX_TOKENS_PER_GPU_SECOND = 1_000_000.0
MAX_TOKEN_COUNT = 1e18           # the same bound as gpucostd.cost.efficiency.MAX_TOKEN_COUNT
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024

# name{labels} value [timestamp]; names may contain colons (vllm:..., sglang:...)
_NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"
_SAMPLE = re.compile(r"^(" + _NAME + r")(\{.*\})?\s+(\S+)(\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_NAME_RE = re.compile(_NAME + "$")
_TYPE = re.compile(r"^#\s*(?:TYPE|HELP)\s+(" + _NAME + r")(?:\s+(\S+))?")

# (server, generated-token series, {what: series}) in detection order. Each series is a
# selector; the first token series with samples names the server.
SERVERS: Tuple[Tuple[str, str, Dict[str, Tuple[str, ...]]], ...] = (
    ("vllm", "vllm:generation_tokens_total", {
        "running": ("vllm:num_requests_running",), "waiting": ("vllm:num_requests_waiting",),
        "kv": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "preemptions": ("vllm:num_preemptions_total",),
        # histograms: time requests spent waiting, and running (queue vs inference time)
        "queue_seconds": ("vllm:request_queue_time_seconds_sum",),
        "queue_requests": ("vllm:request_queue_time_seconds_count",),
        "inference_seconds": ("vllm:request_inference_time_seconds_sum",),
        "inference_requests": ("vllm:request_inference_time_seconds_count",)}),
    ("sglang", "sglang:generation_tokens_total", {
        "running": ("sglang:num_running_reqs",), "waiting": ("sglang:num_queue_reqs",),
        "kv": ("sglang:token_usage",)}),
    ("llama.cpp", "llamacpp:tokens_predicted_total", {
        "running": ("llamacpp:requests_processing",), "waiting": ("llamacpp:requests_deferred",)}),
    ("dynamo", "dynamo_frontend_output_tokens_total", {
        "running": ("dynamo_frontend_inflight_requests",),
        "waiting": ("dynamo_frontend_queued_requests",)}),
    ("tgi", "tgi_request_generated_tokens_sum", {
        "running": ("tgi_batch_current_size",), "waiting": ("tgi_queue_size",)}),
    # trtllm-serve's MetricsCollector in newer TensorRT-LLM (tensorrt_llm/metrics/collector.py,
    # NVIDIA/TensorRT-LLM@050f80de: a generation-token counter and vLLM-like gauges)
    ("tensorrt-llm", "trtllm_generation_tokens_total", {
        "running": ("trtllm_num_requests_running",), "waiting": ("trtllm_num_requests_waiting",),
        "kv": ("trtllm_kv_cache_utilization",)}),
    ("tensorrt-llm", 'nv_llm_output_token_len_sum{response_metric_type="total_output_tokens"}', {
        "running": ('nv_trt_llm_request_metrics{request_type="active"}',),
        "waiting": ('nv_trt_llm_request_metrics{request_type="waiting"}',),
        "kv": ('nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}',)}),
    # NVIDIA NIM for LLMs: vLLM's families with no prefix (NIM docs, "Observability":
    # generation_tokens_total, num_requests_running/waiting, gpu_cache_usage_perc; model_name)
    ("nim", "generation_tokens_total", {
        "running": ("num_requests_running",), "waiting": ("num_requests_waiting",),
        "kv": ("gpu_cache_usage_perc", "kv_cache_usage_perc")}),
)
# A known server's counter under a wrapper's prefix (Ray Serve LLM's ray_vllm:* or ray_vllm_*)
# is read as "<prefix>/<server>" ("ray/vllm"): gpucostd.probes.inference_wrappers.
TRTLLM_NO_COUNTER = (
    "TensorRT-LLM exposes no generated-token counter here (nv_trt_llm_v1_metrics "
    "total_generation_tokens and the inflight-batcher token figures are per-iteration gauges; "
    "trtllm-serve before trtllm_generation_tokens_total has none): point [inference] at the "
    "Dynamo frontend "
    "(dynamo_frontend_output_tokens_total) or a Triton backend with the nv_llm_output_token_len "
    "histogram, or set tokens_metric")
# How a TensorRT-LLM exposition without a token counter is recognised: the Triton backend's
# nv_trt_llm_*; its MetricsCollector re-exported by Dynamo as trtllm_* (trtllm: in Dynamo's first
# release, ai-dynamo/dynamo PR #3676); trtllm-serve's /prometheus/metrics as first released, whose
# families have no prefix at all and are told apart by their engine_type label.
_TRTLLM_PREFIXES = ("nv_trt_llm_", "trtllm_", "trtllm:")
_TRTLLM_BARE = ("request_success_total", "e2e_request_latency_seconds_sum",
                "e2e_request_latency_seconds_count", "time_to_first_token_seconds_count",
                "request_queue_time_seconds_count")


@dataclass(frozen=True)
class InferenceReading:
    tokens_total: Optional[float]      # the counter summed over its (selected) label sets
    time: float                        # monotonic time of the reading
    metric: str = ""                   # the series actually used (e.g. name + "_sum")
    series: int = 0                    # number of label sets summed
    error: Optional[str] = None        # why there is no value, in words
    url: str = ""
    server: Optional[str] = None       # detected server ("vllm", "sglang", ...), if known
    requests_running: Optional[float] = None
    requests_waiting: Optional[float] = None
    kv_cache_usage: Optional[float] = None      # 0..1
    preemptions_total: Optional[float] = None
    # request queue and inference time histograms' sums (s) and counts (requests), where the
    # server has them: their deltas give mean queue time vs inference time
    queue_seconds_total: Optional[float] = None
    queue_requests_total: Optional[float] = None
    inference_seconds_total: Optional[float] = None
    inference_requests_total: Optional[float] = None
    gpus: Optional[Tuple[int, ...]] = None      # the GPUs its tokens go to (None: all)
    parallel: str = "tensor"
    instances: Optional[Tuple[str, ...]] = None  # MIG "gpu/gi/ci" it serves on (gpus: theirs)

    @property
    def ok(self) -> bool:
        return self.error is None and self.tokens_total is not None

    @property
    def counter_id(self) -> str:
        """Which counter the value comes from: a change (another URL or series) starts the
        token rate over instead of counting the new counter's value as tokens."""
        return f"{self.url} {self.metric}"


class ParseError(ValueError):
    pass


def _parse_value(text: str) -> float:
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    return float(text)


class Exposition:
    """Prometheus text exposition, parsed once: samples by name, and the names declared by
    HELP/TYPE lines (a declared family without samples is absent, not 0)."""

    def __init__(self, text: str):
        # name -> [(line number, the sample line)]; a line is parsed in full only when its
        # name is asked for (a vLLM page has hundreds of series, the probe wants a handful)
        self.samples: Dict[str, List[Tuple[int, str]]] = {}
        self.declared: Dict[str, str] = {}
        bad = good = 0
        self.first_bad: Optional[Tuple[int, str]] = None
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line:
                continue
            if line[0] == "#":
                m = _TYPE.match(line)
                if m:
                    self.declared.setdefault(m.group(1), m.group(2) or "")
                continue
            cut = len(line)
            for sep in ("{", " ", "\t"):
                k = line.find(sep)
                if 0 <= k < cut:
                    cut = k
            name = line[:cut]
            if cut == len(line) or not _NAME_RE.match(name):
                bad += 1
                if self.first_bad is None:
                    self.first_bad = (lineno, line[:80])
                continue
            good += 1
            self.samples.setdefault(name, []).append((lineno, line))
        self.garbage = bool(bad and not good and not self.declared)

    def has(self, name: str) -> bool:
        return name in self.samples

    def names_with_prefix(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.samples) or any(
            n.startswith(prefix) for n in self.declared)

    def select(self, selector: str, counter: bool = True) -> Optional[Tuple[float, int]]:
        """(sum, series) of the samples matching `selector`, or None when none match.
        Raises ParseError for a value that is not a (token) count."""
        name, matchers = parse_selector(selector)
        rows = self.samples.get(name)
        if not rows:
            return None
        total, n = 0.0, 0
        for lineno, line in rows:
            m = _SAMPLE.match(line)
            if not m:
                raise ParseError(f"line {lineno}: {line[:60]!r} is not a sample line")
            labels, value = m.group(2) or "", m.group(3)
            if matchers and not _matches(_labels(labels), matchers):
                continue
            try:
                v = _parse_value(value)
            except ValueError:
                raise ParseError(f"line {lineno}: {name} has a value that is not a number: "
                                 f"{value[:40]!r}") from None
            if counter and (not math.isfinite(v) or v < 0):
                raise ParseError(f"line {lineno}: {name} = {value} is not a token count")
            if not math.isfinite(v):
                continue
            total += v
            n += 1
        if counter and n and not total <= MAX_TOKEN_COUNT:
            raise ParseError(f"{name} sums to {total:.3g}, beyond any plausible token count "
                             f"(at most {MAX_TOKEN_COUNT:.0e}); not counted")
        return (total, n) if n else None


def _labels(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    body = text[1:-1] if text.startswith("{") else text
    for m in _LABEL.finditer(body):
        out[m.group(1)] = re.sub(r"\\(.)", lambda x: {"n": "\n"}.get(x.group(1), x.group(1)),
                                 m.group(2))
    return out


def _matches(labels: Dict[str, str], matchers: Sequence[Tuple[str, str, str]]) -> bool:
    for key, op, value in matchers:
        have = labels.get(key, "")
        if (op == "=" and have != value) or (op == "!=" and have == value):
            return False
    return True


def _candidates(metric: str) -> List[str]:
    """A configured name and its usual variants: the histogram/summary _sum, with and
    without _total (the labels, if any, stay on each)."""
    name, _ = parse_selector(metric)
    rest = metric.strip()[len(name):].strip()
    names = [name]
    if not name.endswith("_sum"):
        names.append(name + "_sum")
    names.append(name[: -len("_total")] if name.endswith("_total") else name + "_total")
    return [n + rest for n in names]


def read_tokens(text, metric: str = "auto") -> Tuple[float, str, int, Optional[str]]:
    """(tokens, series used, label sets summed, server) from exposition text (or an
    Exposition). Raises ParseError (missing, declared but empty, malformed, TensorRT-LLM
    without a counter) in words."""
    exp = text if isinstance(text, Exposition) else Exposition(text)
    if exp.garbage:
        lineno, line = exp.first_bad
        raise ParseError(f"not Prometheus text exposition (line {lineno}: {line!r})")
    if metric == "auto":
        for server, series, _extra in SERVERS:
            got = exp.select(series)
            if got is not None:
                return got[0], series, got[1], server
        under_prefix = wrapped_counter(exp, SERVERS)
        if under_prefix is not None:
            return under_prefix
        if _is_tensorrt_llm(exp):
            raise ParseError(TRTLLM_NO_COUNTER)
        declared = [s for _srv, s, _e in SERVERS if parse_selector(s)[0] in exp.declared]
        if declared:
            raise ParseError(f"{declared[0]} is declared but has no samples yet (the server "
                             "has not served a request since it started?)")
        raise ParseError("no known generated-token counter found (looked for "
                         + ", ".join(s for _srv, s, _e in SERVERS) + "); set [inference] "
                         "tokens_metric to the server's generated-tokens series")
    wanted = _candidates(metric)
    for series in wanted:
        got = exp.select(series)
        if got is not None:
            return got[0], series, got[1], _server_of(series)
    name = parse_selector(metric)[0]
    if parse_selector(metric)[1] and exp.has(name):
        raise ParseError(f"no series of {name} matches {metric}; check the label values in "
                         f"[inference] tokens_metric")
    if name in exp.declared and not exp.has(name):
        raise ParseError(f"{name} is declared but has no samples yet (the server has not "
                         "served a request since it started?)")
    raise ParseError(f"metric {name} not found (looked for "
                     f"{', '.join(parse_selector(w)[0] for w in wanted)}); set [inference] "
                     f"tokens_metric to the server's generated-tokens counter")


def _is_tensorrt_llm(exp: Exposition) -> bool:
    if any(exp.names_with_prefix(p) for p in _TRTLLM_PREFIXES):
        return True
    return any('engine_type="' in line
               for name in _TRTLLM_BARE for _n, line in exp.samples.get(name, ()))


def _server_of(series: str) -> Optional[str]:
    name = parse_selector(series)[0]
    for server, token_series, _extra in SERVERS:
        if parse_selector(token_series)[0] == name:
            return server
    return None


TIMING_FIGURES = ("queue_seconds", "queue_requests", "inference_seconds", "inference_requests")


def serving_figures(text, server: Optional[str]) -> Dict[str, Optional[float]]:
    """Requests running/waiting, KV-cache usage (0..1), preemptions and the queue/inference
    time histograms' sums and counts (TIMING_FIGURES) of a known server (None where the
    server does not say)."""
    out: Dict[str, Optional[float]] = {"running": None, "waiting": None, "kv": None,
                                       "preemptions": None}
    out.update({k: None for k in TIMING_FIGURES})
    extra: Dict[str, Tuple[str, ...]] = {}
    prefix, _, base = (server or "").rpartition("/")     # "ray/vllm": ray_vllm:* series
    for name, _t, more in SERVERS:      # a server may have several entries (TensorRT-LLM has)
        if name == base:
            for what, selectors in more.items():
                extra[what] = extra.get(what, ()) + tuple(
                    w for sel in selectors for w in wrapped(prefix, sel))
    if not extra:
        return out
    exp = text if isinstance(text, Exposition) else Exposition(text)
    for what, selectors in extra.items():
        for sel in selectors:
            try:
                got = exp.select(sel, counter=False)
            except ParseError:
                got = None
            if got is not None:
                out[what] = got[0] if what != "kv" else got[0] / max(1, got[1])
                break
    return out


def parse_metric(text: str, metric: str) -> Tuple[float, str, int]:
    """Sum of `metric` (a name or selector, or "auto") over its label sets: (sum, series used,
    label sets). Falls back to `metric`_sum and the name with/without `_total`."""
    return read_tokens(text, metric)[:3]


# --------------------------------------------------------------------------- HTTP
class _ProbeError(Exception):
    pass


class _DeadlineMixin:
    """Every socket wait gets only the time left before `_gpucostd_end` (monotonic)."""
    _gpucostd_end = 0.0

    def _arm(self) -> None:
        left = self._gpucostd_end - _time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline passed")
        self.settimeout(left)

    def recv_into(self, *a, **k):
        self._arm()
        return super().recv_into(*a, **k)

    def recv(self, *a, **k):
        self._arm()
        return super().recv(*a, **k)

    def sendall(self, *a, **k):
        self._arm()
        return super().sendall(*a, **k)


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass


_RESOLVED_FOR = 30.0      # seconds a name's addresses are reused before it is looked up again
_resolved: Dict[Tuple[str, int], Tuple[float, list]] = {}
_lookups: Dict[Tuple[str, int], "_Lookup"] = {}
_lookups_lock = threading.Lock()


class _Lookup(threading.Thread):
    """One getaddrinfo in a thread of its own: a resolver that hangs (a dead DNS server) costs
    the probe its deadline, never the cycle. One lookup per name at a time: the next cycle
    waits on the one still running instead of starting another."""

    def __init__(self, key: Tuple[str, int]):
        super().__init__(name=f"resolve {key[0]}", daemon=True)
        self.key, self.done = key, threading.Event()
        self.result: Optional[list] = None
        self.error: Optional[OSError] = None

    def run(self) -> None:
        try:
            self.result = socket.getaddrinfo(self.key[0], self.key[1], 0, socket.SOCK_STREAM)
        except OSError as e:
            self.error = e
        finally:
            with _lookups_lock:
                _lookups.pop(self.key, None)
                if self.result:
                    _resolved[self.key] = (_time.monotonic(), self.result)
            self.done.set()


def _resolve(host: str, port: int, end: float) -> list:
    """getaddrinfo under the exchange's deadline. An address literal needs no lookup."""
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except ValueError:
        pass
    key = (host, port)
    with _lookups_lock:
        cached = _resolved.get(key)
        if cached and _time.monotonic() - cached[0] < _RESOLVED_FOR:
            return cached[1]
        lookup = _lookups.get(key)
        if lookup is None:
            lookup = _lookups[key] = _Lookup(key)
            lookup.start()
    if not lookup.done.wait(max(0.0, end - _time.monotonic())):
        raise socket.timeout(f"looking up {host} took longer than the deadline")
    if lookup.error is not None:
        raise lookup.error
    return lookup.result or []


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, end: float, tls: bool):
        super().__init__(host, port, timeout=max(0.001, end - _time.monotonic()))
        self._end = end
        self._tls = tls

    def connect(self) -> None:
        err: Optional[OSError] = None
        for af, kind, proto, _name, addr in _resolve(self.host, self.port, self._end):
            s = _DeadlineSocket(af, kind, proto)
            s._gpucostd_end = self._end
            try:
                s._arm()
                s.connect(addr)
            except OSError as e:
                s.close()
                err = e
                continue
            if self._tls:
                ctx = ssl.create_default_context()
                ctx.sslsocket_class = type("_S", (_DeadlineSSLSocket,),
                                           {"_gpucostd_end": self._end})
                s.settimeout(max(0.001, self._end - _time.monotonic()))
                s = ctx.wrap_socket(s, server_hostname=self.host)
            self.sock = s
            return
        raise err or OSError(f"cannot resolve {self.host}")


class InferenceProbe:
    """InferenceProbe(url, metric, timeout).read() -> InferenceReading (never raises).

    `fetch`: a callable returning the exposition text instead of an HTTP GET (the simulated
    servers in replay); `gpus`, `parallel`, `instances` go into the reading for the accountant."""

    def __init__(self, url: str, metric: str = "auto", timeout: float = 0.5,
                 clock: Optional[Callable[[], float]] = None, opener=None,
                 fetch: Optional[Callable[[], str]] = None,
                 gpus: Optional[Sequence[int]] = None, parallel: str = "tensor",
                 gpu_count: Optional[Callable[[], int]] = None, expect_owner: Optional[int] = None,
                 instances: Optional[Sequence[str]] = None):
        """`gpu_count`: the node's GPUs (the bound of an endpoint that names none);
        `expect_owner`: for a loopback URL, the uid that must own the listening socket."""
        self.url = url
        self._gpu_count = gpu_count
        self.expect_owner = expect_owner
        self._last: Optional[Tuple[float, float, str]] = None    # (time, total, series)
        self.metric = metric or "auto"
        self.timeout = float(timeout)
        self._now = clock or _time.monotonic
        self._fetch_fn = fetch
        self.gpus = tuple(gpus) if gpus is not None else None
        self.parallel, self.instances = parallel, (tuple(instances) if instances else None)

    def read(self) -> InferenceReading:
        now = self._now()
        base = dict(url=self.url, gpus=self.gpus, parallel=self.parallel, instances=self.instances)
        try:
            if self._fetch_fn is None and self.expect_owner is not None:
                self._check_owner()
            text = self._fetch_fn() if self._fetch_fn is not None else self._fetch()
            exp = Exposition(text)
            total, name, n, server = read_tokens(exp, self.metric)
            figures = serving_figures(exp, server)
            self._check_rate(total, name, now)
        except _ProbeError as e:
            return InferenceReading(None, now, self.metric, 0, str(e), **base)
        except ParseError as e:
            return InferenceReading(None, now, self.metric, 0, f"{self.url}: {e}", **base)
        self._last = (now, total, name)
        return InferenceReading(total, now, name, n, None, server=server,
                                requests_running=figures["running"],
                                requests_waiting=figures["waiting"], kv_cache_usage=figures["kv"],
                                preemptions_total=figures["preemptions"],
                                queue_seconds_total=figures["queue_seconds"],
                                queue_requests_total=figures["queue_requests"],
                                inference_seconds_total=figures["inference_seconds"],
                                inference_requests_total=figures["inference_requests"], **base)

    def _check_rate(self, total: float, series: str, now: float) -> None:
        """The tokens since the last good reading (all of them after a counter reset) may not
        exceed MAX_TOKENS_PER_GPU_SECOND x the endpoint's GPUs x the seconds between (+1 s)."""
        if self._last is None or self._last[2] != series:
            return
        t0, last, _ = self._last
        made = total - last if total >= last else total
        gpus = len(self.gpus) if self.gpus else (self._gpu_count() if self._gpu_count else 1)
        gpus = max(1, int(gpus or 1))
        seconds = max(0.0, now - t0) + 1.0
        bound = MAX_TOKENS_PER_GPU_SECOND * gpus * seconds
        if made > bound:
            raise ParseError(f"{series} grew by {made:.3g} tokens in {seconds - 1:.1f} s from "
                             f"{gpus} GPU(s), more than the plausible "
                             f"{MAX_TOKENS_PER_GPU_SECOND:.0e} per GPU per second; not counted "
                             f"(is this really the inference server?)")

    def _check_owner(self) -> None:
        """[inference] expect_owner: on a loopback URL the listening socket must belong to
        that uid, else a local user could pose as the server (its tokens run the floor's drain
        hook). The owner is the uid column of /proc/net/tcp and tcp6."""
        parts = urllib.parse.urlsplit(self.url)
        host = (parts.hostname or "").lower()
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return
        port = parts.port or (443 if parts.scheme == "https" else 80)
        owners = listening_owners(port)
        if not owners:
            return          # nothing listens: the connection is refused, said as such
        if owners != {self.expect_owner}:
            import pwd
            names = []
            for uid in sorted(owners):
                try:
                    names.append(f"uid {uid} ({pwd.getpwuid(uid).pw_name})")
                except KeyError:
                    names.append(f"uid {uid}")
            raise _ProbeError(f"{self.url}: the socket listening on port {port} belongs to "
                              f"{', '.join(names)}, not uid {self.expect_owner} "
                              f"([inference] expect_owner); not read: another user may pose as "
                              f"the inference server")

    def _fetch(self) -> str:
        if not re.match(r"^https?://", self.url):
            raise _ProbeError(f"{self.url!r} is not an http:// or https:// URL; set "
                              f"[inference] metrics_url like http://127.0.0.1:8000/metrics")
        end = _time.monotonic() + self.timeout
        url = self.url
        phase = "answer"
        try:
            for _hop in range(MAX_REDIRECTS + 1):
                parts = urllib.parse.urlsplit(url)
                tls = parts.scheme == "https"
                conn = _Connection(parts.hostname or "", parts.port or (443 if tls else 80),
                                   end, tls)
                try:
                    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                    conn.request("GET", path, headers={"Accept": "text/plain",
                                                       "Accept-Encoding": "identity",
                                                       "User-Agent": "gpucostd"})
                    resp = conn.getresponse()
                    if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                        url = urllib.parse.urljoin(url, resp.getheader("Location"))
                        if not re.match(r"^https?://", url):
                            raise _ProbeError(f"{self.url} redirects to {url!r}, which is not "
                                              f"http(s); set [inference] metrics_url to the "
                                              f"final URL")
                        continue          # same deadline: a redirect does not reset it
                    if resp.status != 200:
                        raise _ProbeError(f"{self.url} answered HTTP {resp.status} "
                                          f"{resp.reason}; check the URL path (usually "
                                          f"/metrics)")
                    phase = "finish"
                    body = self._read_body(resp, end)
                finally:
                    conn.close()
                break
            else:
                raise _ProbeError(f"{self.url} redirected more than {MAX_REDIRECTS} times; set "
                                  f"[inference] metrics_url to the final URL")
        except _ProbeError:
            raise
        except (socket.timeout, TimeoutError):
            verb = "finish its answer" if phase == "finish" else "answer"
            raise _ProbeError(f"{self.url} did not {verb} within {self.timeout:g} s "
                              f"([inference] timeout_seconds)") from None
        except ConnectionRefusedError:
            raise _ProbeError(f"{self.url} is unreachable (connection refused): is the "
                              f"inference server running with metrics enabled?") from None
        except http.client.HTTPException as e:
            # not an HTTP answer (BadStatusLine), a header line too long, a broken chunk ...
            raise _ProbeError(f"{self.url} did not answer with valid HTTP "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:80]}); is "
                              f"this the inference server's /metrics endpoint?") from None
        except (OSError, ValueError) as e:
            raise _ProbeError(f"{self.url} is unreachable: {e}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise _ProbeError(f"{self.url} returned text that is not UTF-8; is this a "
                              f"Prometheus /metrics endpoint?") from None

    def _read_body(self, resp, end: float) -> bytes:
        """The body, at most MAX_BYTES, complete (a body shorter than its Content-Length is
        an error, not a smaller count) and finished before the deadline."""
        chunks = []
        size = 0
        announced = getattr(resp, "length", None)
        if isinstance(announced, int) and announced > MAX_BYTES:     # said before a byte
            raise _ProbeError(f"{self.url} returned more than {_size(MAX_BYTES)} ({announced} "
                              f"bytes announced; not read: serving servers' /metrics are tens "
                              f"of kB): is this the inference server's /metrics endpoint?")
        read1 = getattr(resp, "read1", None) or resp.read
        while True:
            if _time.monotonic() > end:
                raise socket.timeout("deadline passed")
            chunk = read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BYTES:
                raise _ProbeError(f"{self.url} returned more than "
                                  f"{_size(MAX_BYTES)} (not read further; "
                                  f"serving servers' /metrics are tens of kB): is this the "
                                  f"inference server's /metrics endpoint?")
            chunks.append(chunk)
        missing = getattr(resp, "length", None)
        if isinstance(missing, int) and missing > 0:
            raise _ProbeError(f"{self.url} closed the connection {missing} bytes before the end "
                              f"of its answer (Content-Length); is the server restarting?")
        return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def listening_owners(port: int, root: str = "/proc/net") -> set:
    """The uids owning TCP sockets in LISTEN on `port` (any local address), from
    /proc/net/tcp and tcp6 (columns: sl local rem st ... uid)."""
    out = set()
    want = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{root}/{name}", "r", encoding="ascii", errors="replace") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 7 and cols[3] == "0A" and cols[1].endswith(want):
                        try:
                            out.add(int(cols[7]))
                        except ValueError:
                            pass
        except OSError:
            continue
    return out


__all__ = ["InferenceProbe", "InferenceReading", "parse_metric", "read_tokens", "ParseError",
           "SERVERS", "Exposition", "serving_figures"]
