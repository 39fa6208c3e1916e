"""The [inference] section: endpoint URLs, their GPUs and the token metric's selector."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

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


def check_url(url: Any, name: str, err) -> None:
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise err(f"{name} = {url!r} must be an http:// or https:// URL, e.g. "
                  f'"http://127.0.0.1:8000/metrics"')


def check_metric(text: Any, name: str, err) -> str:
    if not isinstance(text, str):
        raise err(f"{name} = {text!r} must be a string")
    try:
        parse_selector(text)
    except ValueError as e:
        raise err(f"{name}: {e}") from None
    return text


def owner_uid(text: str) -> Optional[int]:
    """[inference] expect_owner as a uid: a user name or a number; None when empty.
    Raises ValueError for a user this host does not know."""
    text = (text or "").strip()
    if not text:
        return None
    if text.isdigit() and len(text) <= 10:
        return int(text)
    import pwd
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"no user {text!r} on this host") from None


def check_inference(inf: Dict[str, Any], endpoints: List[InferenceEndpoint], err_at) -> None:
    check_metric(inf["tokens_metric"], "inference.tokens_metric",
                  err_at("inference", "tokens_metric"))
    try:
        owner_uid(inf["expect_owner"])
    except ValueError as e:
        raise err_at("inference", "expect_owner")(
            f"inference.expect_owner = {inf['expect_owner']!r}: {e}; give the user name or "
            f"uid the inference server runs as, e.g. \"vllm\"") from None
    if inf["metrics_url"]:
        check_url(inf["metrics_url"], "inference.metrics_url", err_at("inference", "metrics_url"))
        if endpoints:
            raise err_at("inference", "metrics_url")(
                "set [inference] metrics_url (one server for all GPUs) or [[inference.endpoint]] "
                "entries, not both")
    # the inherited default metric
    for i, e in enumerate(endpoints):
        if e.tokens_metric == "":
            endpoints[i] = InferenceEndpoint(e.url, e.gpus, inf["tokens_metric"], e.parallel,
                                             e.line)


def parse_endpoints(value, endpoints: List[InferenceEndpoint], err_at, loc) -> None:
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
        check_url(ep["url"], f"{sec}.url", e("url"))
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
        metric = check_metric(ep.get("tokens_metric", ""), f"{sec}.tokens_metric",
                               e("tokens_metric")) if "tokens_metric" in ep else ""
        parallel = ep.get("parallel", "tensor")
        if parallel not in PARALLEL:
            raise e("parallel")(f'{sec}.parallel = {parallel!r}: choose "tensor" (one group: '
                                f'the slowest GPU sets its pace) or "data"')
        endpoints.append(InferenceEndpoint(ep["url"], gpus, metric, parallel,
                                           loc.find(sec, None, i)))
