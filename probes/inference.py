"""Reads a local inference server's generated-tokens counter from its Prometheus endpoint.

One short HTTP GET per cycle (urllib, no extra dependencies). Never raises for an expected
fault: an unreachable endpoint, an HTTP error, a missing metric or malformed text come back as
an InferenceReading whose `error` says what, where and how to fix; the loop turns that into a
finding. The metric names of common servers are listed in docs/cost.md.
"""
from __future__ import annotations

import http.client
import math
import os
import re
import socket
import time as _time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

MAX_BYTES = 8 * 1024 * 1024      # a /metrics page larger than this is refused
_CHUNK = 64 * 1024

# name{labels} value [timestamp]; names may contain colons (vllm:..., sglang:...)
_NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"
_SAMPLE = re.compile(r"^(" + _NAME + r")(\{.*\})?\s+(\S+)(\s+-?\d+)?\s*$")


@dataclass(frozen=True)
class InferenceReading:
    tokens_total: Optional[float]      # the counter summed over its label sets
    time: float                        # monotonic time of the reading
    metric: str = ""                   # the series actually used (e.g. name + "_sum")
    series: int = 0                    # number of label sets summed
    error: Optional[str] = None        # why there is no value, in words

    @property
    def ok(self) -> bool:
        return self.error is None and self.tokens_total is not None


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


def parse_metric(text: str, metric: str) -> Tuple[float, str, int]:
    """Sum of `metric` over all its label sets in Prometheus text exposition.

    Falls back to `metric`_sum (a histogram or summary of generated tokens, e.g. TGI's
    tgi_request_generated_tokens) and to the name with/without `_total`. Raises ParseError
    (missing, malformed) with the reason in words."""
    wanted = [metric]
    if not metric.endswith("_sum"):
        wanted.append(metric + "_sum")
    if metric.endswith("_total"):
        wanted.append(metric[: -len("_total")])
    else:
        wanted.append(metric + "_total")
    prefix = os.path.commonprefix(wanted)
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    bad_lines = good_lines = 0
    first_bad = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if good_lines and not line.startswith(prefix):
            continue        # the text is known to be an exposition: parse only candidates
        m = _SAMPLE.match(line)
        if not m:
            bad_lines += 1
            if first_bad is None:
                first_bad = (lineno, line[:80])
            continue
        good_lines += 1
        name = m.group(1)
        if name not in wanted:
            continue
        try:
            v = _parse_value(m.group(3))
        except ValueError:
            raise ParseError(f"line {lineno}: {name} has a value that is not a number: "
                             f"{m.group(3)[:40]!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ParseError(f"line {lineno}: {name} = {m.group(3)} is not a token count")
        sums[name] = sums.get(name, 0.0) + v
        counts[name] = counts.get(name, 0) + 1
    for name in wanted:
        if name in sums:
            return sums[name], name, counts[name]
    if bad_lines and not good_lines:
        lineno, line = first_bad
        raise ParseError(f"not Prometheus text exposition (line {lineno}: {line!r})")
    raise ParseError(f"metric {metric} not found (looked for {', '.join(wanted)}); set "
                     f"[inference] tokens_metric to the server's generated-tokens counter")


class InferenceProbe:
    """InferenceProbe(url, metric, timeout).read() -> InferenceReading (never raises)."""

    def __init__(self, url: str, metric: str = "vllm:generation_tokens_total",
                 timeout: float = 0.5, clock: Optional[Callable[[], float]] = None,
                 opener=None):
        self.url = url
        self.metric = metric
        self.timeout = float(timeout)
        self._now = clock or _time.monotonic
        # no proxies: the endpoint is local, and an environment proxy must not capture it
        self._opener = opener or urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def read(self) -> InferenceReading:
        now = self._now()
        try:
            text = self._fetch()
            total, name, n = parse_metric(text, self.metric)
        except _ProbeError as e:
            return InferenceReading(None, now, self.metric, 0, str(e))
        except ParseError as e:
            return InferenceReading(None, now, self.metric, 0, f"{self.url}: {e}")
        return InferenceReading(total, now, name, n, None)

    def _fetch(self) -> str:
        if not re.match(r"^https?://", self.url):
            raise _ProbeError(f"{self.url!r} is not an http:// or https:// URL; set "
                              f"[inference] metrics_url like http://127.0.0.1:8000/metrics")
        req = urllib.request.Request(self.url, headers={"Accept": "text/plain"})
        # the socket timeout bounds each wait; this deadline bounds the whole answer, so a
        # server that trickles its body cannot hold up the daemon's cycle
        deadline = _time.monotonic() + self.timeout
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status = getattr(resp, "status", 200)
                if status != 200:
                    raise _ProbeError(f"{self.url} answered HTTP {status}; expected 200")
                body = self._read_body(resp, deadline)
        except _ProbeError:
            raise
        except urllib.error.HTTPError as e:
            raise _ProbeError(f"{self.url} answered HTTP {e.code} {e.reason}; check the URL "
                              f"path (usually /metrics)") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _ProbeError(f"{self.url} did not answer within {self.timeout:g} s "
                                  f"([inference] timeout_seconds)") from None
            if isinstance(reason, ConnectionRefusedError):
                raise _ProbeError(f"{self.url} is unreachable (connection refused): is the "
                                  f"inference server running with metrics enabled?") from None
            raise _ProbeError(f"{self.url} is unreachable: {reason}") from None
        except (socket.timeout, TimeoutError):
            raise _ProbeError(f"{self.url} did not answer within {self.timeout:g} s "
                              f"([inference] timeout_seconds)") from None
        except http.client.HTTPException as e:
            # not an HTTP answer (BadStatusLine), a header line too long, a broken chunk ...
            raise _ProbeError(f"{self.url} did not answer with valid HTTP "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:80]}); is this the inference "
                              f"server's /metrics endpoint?") from None
        except (OSError, ValueError) as e:
            raise _ProbeError(f"{self.url} is unreachable: {e}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise _ProbeError(f"{self.url} returned text that is not UTF-8; is this a "
                              f"Prometheus /metrics endpoint?") from None

    def _read_body(self, resp, deadline: float) -> bytes:
        """The body, at most MAX_BYTES, complete (a body shorter than its Content-Length is
        an error, not a smaller count) and finished before the deadline."""
        read1 = getattr(resp, "read1", None) or resp.read
        chunks = []
        size = 0
        while True:
            if _time.monotonic() > deadline:
                raise _ProbeError(f"{self.url} did not finish its answer within "
                                  f"{self.timeout:g} s ([inference] timeout_seconds)")
            chunk = read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BYTES:
                raise _ProbeError(f"{self.url} returned more than "
                                  f"{MAX_BYTES // (1024 * 1024)} MiB; is this a Prometheus "
                                  f"/metrics endpoint?")
            chunks.append(chunk)
        missing = getattr(resp, "length", None)
        if isinstance(missing, int) and missing > 0:
            raise _ProbeError(f"{self.url} closed the connection {missing} bytes before the end "
                              f"of its answer (Content-Length); is the server restarting?")
        return b"".join(chunks)


class _ProbeError(Exception):
    pass


__all__ = ["InferenceProbe", "InferenceReading", "parse_metric", "ParseError"]
