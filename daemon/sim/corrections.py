"""What setters change beyond a scenario's exact integrals.

A scenario knows its violation counters, energy counter and endpoint token counters exactly
(piecewise-constant states, integrated analytically). A setter (a power limit set through NVML)
changes the state from the moment of the call until the timeline next sets the field; with
[physics] that moves the clock, the draw, SwPowerCap and the token rate. ``SetterCorrections``
integrates the difference (state with the setter's value minus the scenario's state) over the
same boundaries, so the simulated counters stay exact: the state is constant between the
scenario's boundaries and setter calls, and every setter call advances the integral first.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from gpucostd.sim.clocks import apply_setters
from gpucostd.sim.mig import instance_endpoint_rate
from gpucostd.sim.physics import ACTIVITY_NAMES, state_activity
from gpucostd.snapshot import VIOLATION_REASONS


class _Correction:
    __slots__ = ("t", "power", "energy", "tokens", "activity")

    def __init__(self):
        self.t = 0.0
        self.activity = [0.0] * len(ACTIVITY_NAMES)   # GPM activity integrals
        self.power = 0.0       # seconds of the "power" violation counter (SwPowerCap)
        self.energy = 0.0      # joules
        self.tokens = 0.0      # generated tokens (endpoints)


def _power_capped(st: Dict[str, Any]) -> float:
    """1 while the "power" counter runs (VIOLATION_REASONS: SwPowerCap, the only reason the
    physics changes; HwPowerBrakeSlowdown has a counter of its own)."""
    return 1.0 if any(r in st["clock_event_reasons"] for r in VIOLATION_REASONS["power"]) \
        else 0.0


def _draw(st: Dict[str, Any]) -> float:
    return min(st["power_draw"], st["power_limit"])


class SetterCorrections:
    """``has_overrides(index)`` says whether any setter value is stored for a GPU;
    ``effective(index, t, base_state)`` returns the setter values still in force at t. The
    caller holds its lock around advance* (they mutate running totals)."""

    def __init__(self, scenario: Any, has_overrides: Callable[[int], bool],
                 effective: Callable[[int, float, Dict[str, Any]], Dict[str, Any]]):
        self.scenario = scenario
        self._has = has_overrides
        self._effective = effective
        self._gpu = [_Correction() for _ in range(scenario.node.gpu_count)]
        self._ep = [_Correction() for _ in (scenario.serving.endpoints
                                            if scenario.serving else ())]

    def physics_state(self, index: int, t: float) -> Dict[str, Any]:
        """GPU `index`'s state at t with setter values and the physics they imply (the
        scenario's own shared dict when no setter value applies: do not modify it)."""
        base = self.scenario.state_ref(index, t)
        eff = self._effective(index, t, base)
        if not eff:
            return base
        st = dict(base)
        st.update(eff)
        apply_setters(st, eff, self.scenario.physics)
        return st

    def advance(self, index: int, t: float) -> _Correction:
        c = self._gpu[index]
        if t <= c.t:
            return c
        if not self._has(index):
            c.t = t
            return c
        sc = self.scenario
        points = [c.t] + sc.boundaries(index, c.t, t) + [t]
        for a, b in zip(points, points[1:]):
            if a > c.t and sc.last_reset(index, a) == a:
                c.power = 0.0           # the violation counter restarts at a GPU reset
            mid = (a + b) / 2.0
            base = sc.state_ref(index, mid)
            st = self.physics_state(index, mid)
            if st is base:
                continue
            c.power += (b - a) * (_power_capped(st) - _power_capped(base))
            c.energy += (b - a) * (_draw(st) - _draw(base))
            new, old = state_activity(st, sc.physics), state_activity(base, sc.physics)
            for j, name in enumerate(ACTIVITY_NAMES):
                c.activity[j] += (b - a) * (new[name] - old[name])
        c.t = t
        return c

    def advance_endpoint(self, endpoint: int, t: float) -> float:
        c = self._ep[endpoint]
        if t <= c.t:
            return c.tokens
        sv = self.scenario.serving
        ep = sv.endpoints[endpoint]
        if not any(self._has(i) for i in ep.gpus):
            c.t = t
            return c.tokens
        cuts = set()
        for i in ep.gpus:
            cuts.update(self.scenario.boundaries(i, c.t, t))
        points: List[float] = [c.t] + sorted(cuts) + [t]
        for a, b in zip(points, points[1:]):
            mid = (a + b) / 2.0
            rate = self.rate(ep, mid)
            c.tokens += (b - a) * (rate - self.scenario.endpoint_rate_at(endpoint, mid))
        c.t = t
        return c.tokens

    def rate(self, ep: Any, t: float) -> float:
        """Endpoint `ep`'s tokens/s at t with the setters' physics: its GPUs' rates, or, on
        MIG instances, each instance's share of its GPU's."""
        sv = self.scenario.serving
        if getattr(ep, "instances", None):
            return instance_endpoint_rate(sv, ep, self.scenario.mig,
                                          lambda i: self.physics_state(i, t), t)
        return sv.endpoint_rate(ep, [sv.state_rate(self.physics_state(i, t)) for i in ep.gpus])

    def advance_all(self, index: int, t: float) -> None:
        """Before a setter on GPU `index` at t: integrate the old value up to t."""
        self.advance(index, t)
        for k, ep in enumerate(self.scenario.serving.endpoints if self.scenario.serving else ()):
            if index in ep.gpus:
                self.advance_endpoint(k, t)


class SimulatedCounters:
    """The counters of a SimulatedNode (gpucostd.sim.nvml) as Python calls: the scenario's
    exact integrals plus what setters changed (``self._corr``, a SetterCorrections, under
    ``self._lock``)."""

    def state(self, index: int) -> Dict[str, Any]:
        """The simulated state of GPU `index` now, setter changes included."""
        t = self.now()
        st = self.scenario.gpu_state_at(index, t)
        st.update(self._corr.physics_state(index, t))
        if st["violation_seconds"] is not None:
            st["violation_seconds"]["power"] = self.violation_seconds(index, "power", t)
        st["total_energy"] = self.energy_joules(index, t)
        return st

    def energy_joules(self, index: int, t: Optional[float] = None) -> float:
        """GPU `index`'s energy counter (J) at t (default now)."""
        t = self.now() if t is None else t
        with self._lock:
            corr = self._corr.advance(index, t).energy
        return self.scenario.energy_joules_at(index, t) + corr

    def activity_integrals(self, index: int, t: Optional[float] = None) -> List[float]:
        """GPU `index`'s GPM activity integrals at t (Scenario.activity_integrals_at plus
        what setters changed)."""
        t = self.now() if t is None else t
        with self._lock:
            corr = list(self._corr.advance(index, t).activity)
        return [a + c for a, c in zip(self.scenario.activity_integrals_at(index, t), corr)]

    def violation_seconds(self, index: int, policy: str, t: Optional[float] = None) -> float:
        t = self.now() if t is None else t
        value = self.scenario.violation_seconds_at(index, t)[policy]
        if policy == "power":
            with self._lock:
                value = max(0.0, value + self._corr.advance(index, t).power)
        return value

    def endpoint_tokens(self, endpoint: int, t: Optional[float] = None) -> float:
        """Generated tokens of simulated endpoint `endpoint` at t (default now)."""
        t = self.now() if t is None else t
        with self._lock:
            corr = self._corr.advance_endpoint(endpoint, t)
        return max(0.0, self.scenario.endpoint_tokens_at(endpoint, t) + corr)

    def endpoint_rate(self, endpoint: int, t: Optional[float] = None) -> float:
        """Generated tokens/s of simulated endpoint `endpoint` at t, setter changes included."""
        t = self.now() if t is None else t
        return self._corr.rate(self.scenario.serving.endpoints[endpoint], t)

