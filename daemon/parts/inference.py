"""Part "inference": one reading per inference endpoint (tokens, requests), each under its own
deadline; on a real clock the endpoints are read in parallel."""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Sequence

from gpucostd.part import Cycle, Part


class InferencePart(Part):
    name = "inference"

    def __init__(self, probes: Sequence, parallel: bool = True):
        self.probes = probes            # gpucostd.probes.inference.InferenceProbe (the
        #                                 loop's list: a reload changes it in place)
        self.parallel = parallel        # False on a virtual clock (replay)

    @property
    def urls(self) -> List[str]:
        return [p.url for p in self.probes]

    def run(self, cycle: Cycle) -> tuple:
        """Every endpoint's reading (None: it gave none in its deadline), in endpoint order."""
        probes = self.probes
        if len(probes) <= 1 or not self.parallel:
            return tuple(p.read() for p in probes)
        out: list = [None] * len(probes)

        def one(i):
            out[i] = probes[i].read()
        threads = [threading.Thread(target=one, args=(i,), daemon=True,
                                    name="gpucostd-inference") for i in range(len(probes))]
        for t in threads:
            t.start()
        end = time.monotonic() + max(p.timeout for p in probes) + 0.5
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        return tuple(out)


def endpoint_probes(config, sim=None, serving=None, clock=None, one_shot: bool = False,
                    gpu_count=None):
    """(probes, serving): one InferenceProbe per configured endpoint; with --simulate and no
    endpoint configured, the scenario's simulated servers ([serving]): HTTP on loopback on a
    real clock, read in-process on a virtual one (replay) and in one-shot commands. `serving`
    is the simulated servers already started (kept across a reload)."""
    from gpucostd.config import InferenceEndpoint
    from gpucostd.probes.inference import InferenceProbe
    endpoints = list(config.inference_endpoints)
    fetchers: Dict[str, Callable[[], str]] = {}
    if not endpoints and sim is not None and sim.scenario.serving is not None:
        if serving is None:
            from gpucostd.sim.serving import SimulatedServing
            serving = SimulatedServing(sim)
            if not clock.virtual and not one_shot:
                serving.start()     # one-shot commands read it in-process
        for k, ep in enumerate(serving.endpoints):
            url = serving.urls[k] if serving.urls else f"sim://endpoint/{k}/metrics"
            if not serving.urls:
                fetchers[url] = (lambda k=k: serving.fetch(k))
            endpoints.append(InferenceEndpoint(url, tuple(ep.gpus), "auto", ep.parallel,
                                               instances=getattr(ep, "instances", None)))
    # one deadline per scrape, at most half the interval (the watchdog and the cycle wait)
    timeout = min(float(config.inference.timeout_seconds),
                  0.5 * float(config.daemon.interval_seconds))
    from gpucostd.config import owner_uid
    owner = owner_uid(config.inference.expect_owner)
    probes = [InferenceProbe(e.url, e.tokens_metric, timeout, clock=clock.monotonic,
                             fetch=fetchers.get(e.url), gpus=e.serving_gpus,
                             parallel=e.parallel, expect_owner=owner, gpu_count=gpu_count,
                             instances=e.instances)
              for e in endpoints]
    return probes, serving
