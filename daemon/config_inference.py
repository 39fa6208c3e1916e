"""The [inference] section: endpoint URLs, their GPUs and the token metric's selector."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

ENDPOINT_KEYS = ("url", "gpus", "instances", "tokens_metric", "parallel")
# a MIG instance as an endpoint names it: GPU index / GPU instance id / compute instance id, the
# key of gpucostd.snapshot.MigInstance
_INSTANCE_RE = re.compile(r"^(\d{1,4})/(\d{1,4})/(\d{1,4})$")
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
    """One inference server's /metrics: its tokens go to `gpus` (None: all GPUs), or, with
    `instances`, to those MIG instances ("gpu/gi/ci" keys) and through them to their GPUs."""
    url: str
    gpus: Optional[Tuple[int, ...]]
    tokens_metric: str
    parallel: str = "tensor"
    line: Optional[int] = None
    instances: Optional[Tuple[str, ...]] = None

    @property
    def serving_gpus(self) -> Optional[Tuple[int, ...]]:
        """The GPUs its tokens go to: `gpus`, and the parent GPUs of its `instances` (in
        order, once each); None (all GPUs) only when it names neither."""
        if self.instances is None:
            return self.gpus
        out: List[int] = list(self.gpus or ())
        for key in self.instances:
            g = instance_gpu(key)
            if g not in out:
                out.append(g)
        return tuple(out)


def instance_gpu(key: str) -> int:
    """The parent GPU index of an instance key "gpu/gi/ci"."""
    return int(key.split("/", 1)[0])


def parse_instance(text: Any) -> Optional[str]:
    """An instance key in its canonical form ("0/1/0"), or None when `text` is not one."""
    m = _INSTANCE_RE.match(text) if isinstance(text, str) else None
    if not m:
        return None
    return "/".join(str(int(x)) for x in m.groups())


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
                                             e.line, e.instances)


def parse_endpoints(value, endpoints: List[InferenceEndpoint], err_at, loc) -> None:
    sec = "inference.endpoint"
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise err_at("inference", "endpoint")(
            "inference.endpoint must be an array of tables [[inference.endpoint]]")
    owner: Dict[int, int] = {}          # GPU given whole in gpus -> its endpoint
    sliced: Dict[int, int] = {}         # GPU with an instance in instances -> the first such
    inst_owner: Dict[str, int] = {}     # instance key -> its endpoint
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
                if g in sliced:
                    raise e("gpus")(
                        f"{sec}.gpus: GPU {g} is sliced by MIG: [[{sec}]] #{sliced[g] + 1} "
                        f"serves on its instance(s); name the instances this endpoint serves "
                        f"on in instances = [\"{g}/GI/CI\"] instead of the whole GPU")
                owner[g] = i
            gpus = tuple(gpus)
        instances = _parse_instances(ep, sec, e, gpus, owner, sliced, inst_owner, i) \
            if "instances" in ep else None
        metric = check_metric(ep.get("tokens_metric", ""), f"{sec}.tokens_metric",
                               e("tokens_metric")) if "tokens_metric" in ep else ""
        parallel = ep.get("parallel", "tensor")
        if parallel not in PARALLEL:
            raise e("parallel")(f'{sec}.parallel = {parallel!r}: choose "tensor" (one group: '
                                f'the slowest GPU sets its pace) or "data"')
        endpoints.append(InferenceEndpoint(ep["url"], gpus, metric, parallel,
                                           loc.find(sec, None, i), instances))


def _parse_instances(ep, sec, e, gpus, owner, sliced, inst_owner, i) -> Tuple[str, ...]:
    """[[inference.endpoint]] instances = ["0/1/0", ...]: the MIG instances it serves on."""
    value = ep["instances"]
    form = (f'{sec}.instances = {value!r} must be a non-empty list of MIG instances as '
            f'"GPU/GI/CI" (GPU index, GPU instance id, compute instance id, as `gpucostd '
            f'status` lists them), e.g. ["0/1/0", "0/2/0"]')
    if not isinstance(value, list) or not value:
        raise e("instances")(form)
    out: List[str] = []
    for text in value:
        key = parse_instance(text)
        if key is None:
            raise e("instances")(f"{sec}.instances: {text!r} is not an instance; " + form)
        g = instance_gpu(key)
        if g >= 1024:
            raise e("instances")(f"{sec}.instances: {text!r}: GPU index {g} is out of range "
                                 f"(0..1023)")
        if key in out:
            raise e("instances")(f"{sec}.instances: {key} is named twice; name each "
                                 f"instance (GPU/GI/CI) once")
        if key in inst_owner:
            raise e("instances")(f"{sec}.instances: {key} is already in [[{sec}]] "
                                 f"#{inst_owner[key] + 1}; each instance's tokens come from one "
                                 f"endpoint")
        if gpus is not None and g in gpus:
            raise e("instances")(
                f"{sec}: GPU {g} is named twice, whole in gpus and sliced in instances "
                f"({key}); a MIG GPU serves on its instances: drop {g} from gpus")
        if g in owner:
            raise e("instances")(
                f"{sec}.instances: {key} is on GPU {g}, which [[{sec}]] #{owner[g] + 1} serves "
                f"on whole (gpus); a GPU is either whole or sliced: name its instances there "
                f"too, or drop it from that endpoint's gpus")
        out.append(key)
        inst_owner[key] = i
        sliced.setdefault(g, i)
    return tuple(out)
