"""A known inference server's series re-exported by a wrapper under its own prefix.

Ray Serve LLM re-exports vLLM's metrics through Ray's metrics agent: as ``ray_vllm:*`` while
Ray's metrics ran on OpenCensus (Ray's Serve LLM dashboards, ray-project/ray PR #52719), and as
``ray_vllm_*`` since Ray moved to OpenTelemetry, which allows no ":" in a metric name (vLLM
sanitizes the names it hands Ray, vllm-project/vllm PR #25439; Ray warns of ":" from PR #57267).
The same holds for any one-word wrapper (``ray_sglang:``, ``myproxy_vllm:``). The server is
named ``"<prefix>/<server>"`` (``"ray/vllm"``); its other series carry the same prefix, in
either spelling. gpucostd.probes.inference asks; this module only spells the names.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Tuple

from gpucostd.config import parse_selector

# one word and "_": ray_, myproxy_ (not my:, x_y_, which no wrapper is known to add)
WRAP_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]*_$")


def spellings(name: str) -> Tuple[str, ...]:
    """A series name as a wrapper may carry it: as the server spells it, then with its ":"
    turned into "_" (OpenTelemetry's rule)."""
    return tuple(dict.fromkeys((name, name.replace(":", "_"))))


def wrapped(prefix: str, selector: str) -> Tuple[str, ...]:
    """A server's series (a name or selector) as the wrapper ``prefix`` exports it, in the
    order to try: ``ray_vllm:num_requests_running``, then ``ray_vllm_num_requests_running``;
    the labels are kept. No prefix: the selector itself."""
    if not prefix:
        return (selector,)
    name = parse_selector(selector)[0]
    rest = selector.strip()[len(name):]
    return tuple(f"{prefix}_{n}{rest}" for n in spellings(name))


def wrapped_counter(exp, servers: Iterable[Tuple[str, str, object]]
                    ) -> Optional[Tuple[float, str, int, str]]:
    """The first known token counter (``servers``: gpucostd.probes.inference.SERVERS) found
    under a wrapper's prefix in ``exp`` (an Exposition): (tokens, series, label sets,
    ``"<prefix>/<server>"``), or None."""
    names = sorted(exp.samples)
    for server, series, _extra in servers:
        name = parse_selector(series)[0]
        rest = series.strip()[len(name):]
        for want in spellings(name):
            for have in names:
                prefix = have[: -len(want)]
                if have.endswith(want) and prefix and WRAP_PREFIX.match(prefix):
                    got = exp.select(have + rest)
                    if got is not None:
                        return got[0], have + rest, got[1], f"{prefix[:-1]}/{server}"
    return None
