"""Part "discovery": the inference servers running on a real node, read with no inference
config ([inference] discover).

Every ``discover_interval_seconds`` (and on the first cycle) it lists the processes of known
servers and their listening ports (gpucostd.probes.discovery, psutil), asks each new port's
/metrics once, and keeps the ports whose exposition names a server and its token counter:
their probes join the inference part's list (the same list object), after the configured
endpoints. A port not taken (no token counter yet, a gRPC port) is asked again at the next
look, never more often. A server gone from the list is dropped with an event; a new one is added with one.
Only the ports of known server processes are ever asked; a configured URL is never doubled.
Runs before "inference"; its data (``DiscoveryStatus``) is what status and /metrics show.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from gpucostd.part import Cycle, Part
from gpucostd.snapshot import Event, Severity

MODES = ("auto", "on", "off")
# new ports asked per scan: each ask has the scrape deadline (at most half the interval), so a
# node with many new ports spreads them over scans instead of holding one cycle up
MAX_ASKS_PER_SCAN = 4


@dataclass(frozen=True)
class DiscoveredEndpoint:
    url: str
    server: str              # as its exposition says ("vllm", "llama.cpp", "ray/vllm", ...)
    process: str
    pid: int
    address: str
    port: int
    since: float             # wall-clock time it was found

    @property
    def how(self) -> str:
        return (f"process {self.process} (pid {self.pid}) listening on "
                f"{self.address}:{self.port}")


@dataclass(frozen=True)
class DiscoveryStatus:
    enabled: bool
    endpoints: Tuple[DiscoveredEndpoint, ...] = ()
    # ports of known servers that were asked but not taken: (url, how, why)
    skipped: Tuple[Tuple[str, str, str], ...] = ()
    last_scan: Optional[float] = None        # wall-clock time of the last scan
    interval_seconds: float = 0.0
    error: Optional[str] = None              # the last scan's failure, in words
    reason: str = ""                         # why it is off
    notes: Tuple[str, ...] = ()              # known servers it could not look into


@dataclass
class _Found:
    endpoint: DiscoveredEndpoint
    probe: object
    key: Tuple[int, int] = field(default=(0, 0))    # (pid, port) that owns it now


class DiscoveryPart(Part):
    name = "discovery"

    def __init__(self, probes: List, configured_urls: Callable[[], List[str]],
                 make_probe: Callable[[str], object], interval_seconds: float,
                 lister=None):
        self.probes = probes                  # the inference part's list (shared)
        self.configured_urls = configured_urls
        self.make_probe = make_probe
        self.interval = float(interval_seconds)
        self.lister = lister                  # () -> [probes.discovery.Process]; psutil if None
        self._found: Dict[str, _Found] = {}
        self._skipped: Dict[str, Tuple[Tuple[int, int], str, str]] = {}
        self._next = None
        self._last_scan: Optional[float] = None
        self._error: Optional[str] = None
        self._notes: Tuple[str, ...] = ()

    def reconfigure(self, config) -> None:
        self.interval = float(config.inference.discover_interval_seconds)
        self.off = config.inference.discover == "off"
        self.probe_timeout = probe_timeout(config.inference, config.daemon.interval_seconds)
        self._next = None                     # look again on the next cycle

    off = False
    probe_timeout = 2.0                       # seconds: a discovered endpoint's deadline

    def run(self, cycle: Cycle) -> DiscoveryStatus:
        if self.off:
            self._found.clear()
            self._skipped.clear()
            self._reconcile()
            return DiscoveryStatus(False, reason="[inference] discover = \"off\"")
        if self._next is None or cycle.monotonic >= self._next:
            self._next = cycle.monotonic + self.interval
            self._scan(cycle)
        self._reconcile()
        return DiscoveryStatus(True, tuple(f.endpoint for f in self._found.values()),
                               tuple((u, how, why) for u, (_k, how, why)
                                     in self._skipped.items()),
                               self._last_scan, self.interval, self._error,
                               notes=self._notes)

    # ------------------------------------------------------------------ internals
    def _scan(self, cycle: Cycle) -> None:
        from gpucostd.probes.discovery import candidates, psutil_processes, unreadable
        self._last_scan = cycle.now
        try:
            listed = list((self.lister or psutil_processes)())
            found = candidates(listed)
            self._notes = tuple(unreadable(listed))
        except Exception as e:  # noqa: BLE001 - a failed scan keeps what was found
            self._error = (f"cannot list processes: {type(e).__name__}: {e}; discovery keeps "
                           f"the endpoints it had")
            return
        self._error = None
        configured = set(self.configured_urls())
        now_urls = set()
        asks = 0
        for c in found:
            if c.url in configured:
                continue
            now_urls.add(c.url)
            key = (c.pid, c.port)
            had = self._found.get(c.url)
            if had is not None:
                if had.key != key:            # the same URL, now another process's: its probe
                    #                           reads it every cycle; only who owns it changes
                    had.endpoint = DiscoveredEndpoint(
                        c.url, had.endpoint.server, c.process, c.pid, c.address, c.port,
                        had.endpoint.since)
                    had.key = key
                continue
            if asks >= MAX_ASKS_PER_SCAN:
                self._next = cycle.monotonic        # the rest on the next cycle
                continue
            asks += 1
            probe = self.make_probe(c.url)
            reading = probe.read()
            if not getattr(reading, "ok", False):
                self._skipped[c.url] = (key, c.how, str(getattr(reading, "error", "") or
                                                        "no reading"))
                continue
            self._skipped.pop(c.url, None)
            ep = DiscoveredEndpoint(c.url, str(reading.server or c.server), c.process, c.pid,
                                    c.address, c.port, cycle.now)
            self._found[c.url] = _Found(ep, probe, key)
            cycle.events.append(Event(
                cycle.now, "node", "inference_discovered", Severity.OK, "none",
                f"inference server {ep.server} discovered at {ep.url} ({ep.how})",
                fields={"url": ep.url, "server": ep.server, "pid": ep.pid,
                        "process": ep.process, "port": ep.port}))
        for url in [u for u in self._found if u not in now_urls]:
            gone = self._found.pop(url).endpoint
            cycle.events.append(Event(
                cycle.now, "node", "inference_vanished", Severity.WARN, "none",
                f"inference server {gone.server} at {url} is gone ({gone.how} no more); "
                f"its endpoint is dropped",
                fields={"url": url, "server": gone.server, "pid": gone.pid,
                        "process": gone.process, "port": gone.port}))
        for url in [u for u in self._skipped if u not in now_urls]:
            del self._skipped[url]

    def _reconcile(self) -> None:
        """The shared list: the configured probes, then this part's, each once (a reload
        rebuilds the list from the config; the discovered ones come back here)."""
        mine = [f.probe for f in self._found.values()]
        configured = [p for p in self.probes if not getattr(p, "discovered", False)]
        if [id(p) for p in self.probes] != [id(p) for p in configured + mine]:
            self.probes[:] = configured + mine


def probe_timeout(inference, interval_seconds: float) -> float:
    """A discovered endpoint's scrape deadline: [inference] timeout_seconds, at most half the
    loop's interval."""
    return min(float(inference.timeout_seconds), 0.5 * float(interval_seconds))


def discovery_part(inference, interval_seconds: float, probes: List, clock, simulated: bool,
                   one_shot: bool) -> Optional[DiscoveryPart]:
    """The part for a daemon, handed its [inference] section, the loop's interval, the
    inference part's probe list (shared), the clock; or None: discover "off", or "auto" on a
    simulated node, a virtual clock (replay) or a one-shot command."""
    mode = inference.discover
    if mode == "off" or one_shot or clock.virtual:
        return None
    if mode == "auto" and simulated:
        return None
    from gpucostd.probes.inference import InferenceProbe

    def make_probe(url: str):
        probe = InferenceProbe(url, "auto", part.probe_timeout, clock=clock.monotonic)
        probe.discovered = True
        return probe

    def configured() -> List[str]:
        return [p.url for p in probes if not getattr(p, "discovered", False)]
    part = DiscoveryPart(probes, configured, make_probe, inference.discover_interval_seconds)
    part.probe_timeout = probe_timeout(inference, interval_seconds)
    return part


__all__ = ["DiscoveryPart", "DiscoveryStatus", "DiscoveredEndpoint", "discovery_part", "MODES"]
