"""What a scenario's GPUs are like at time t, answered analytically: a mixin of
gpucostd.sim.scenario.Scenario over its precomputed piecewise-constant segments (``_build``):
states, the exact integrals (violation counters, energy, GPM activity, endpoint tokens),
boundaries, hangs, resets and kernel log lines, across repeating cycles."""
from __future__ import annotations

import bisect
import math
from typing import Any, Dict, List, Optional, Tuple

from gpucostd.snapshot import VIOLATION_POLICIES


class ScenarioTimeQueries:
    """Needs the attributes Scenario._build sets (``_seg_starts``, ``_seg_states``, ...)."""

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.node.gpu_count:
            raise IndexError(f"GPU index {index} out of range 0..{self.node.gpu_count - 1}")

    def _cycle_pos(self, t: float) -> Tuple[int, float]:
        if self.repeat_every:
            k = int(t // self.repeat_every)
            return k, t - k * self.repeat_every
        return 0, t

    def _segment(self, index: int, t: float) -> int:
        _k, te = self._cycle_pos(t)
        return bisect.bisect_right(self._seg_starts[index], te) - 1

    def state_ref(self, index: int, t: float) -> Dict[str, Any]:
        """The (shared, do-not-modify) state dict of GPU `index` at time t, without the
        violation counters. For the simulator's hot path."""
        return self._seg_states[index][self._segment(index, max(0.0, t))]

    def state_span(self, index: int, t: float) -> Optional[Tuple[float, float, Dict[str, Any]]]:
        """(from, until, state_ref) : the absolute interval around t in which GPU `index`'s
        state dict stays the same and no hang or driver change happens, for the simulator's
        cache; None where the GPU has hangs or the node driver changes (no caching)."""
        if self._hangs[index] or len(self._node_starts) > 1:
            return None
        t = max(0.0, t)
        k, te = self._cycle_pos(t)
        starts = self._seg_starts[index]
        i = bisect.bisect_right(starts, te) - 1
        base = k * (self.repeat_every or 0.0)
        if i + 1 < len(starts):
            end = starts[i + 1]
        else:
            end = self.repeat_every if self.repeat_every else math.inf
        return base + starts[i], base + end, self._seg_states[index][i]

    def _integral(self, index: int, t: float, policy: str) -> float:
        """Seconds in [0, t) during which `policy`'s reasons were active (no resets)."""
        if t <= 0:
            return 0.0
        k, te = self._cycle_pos(t)
        starts = self._seg_starts[index]
        i = bisect.bisect_right(starts, te) - 1
        part = self._seg_cum[index][i][policy] + \
            self._seg_viol_rate[index][i][policy] * (te - starts[i])
        if k:
            part += k * self._cycle_total[index][policy]
        return part

    def last_reset(self, index: int, t: float) -> Optional[float]:
        """Absolute time of the latest reset at or before t (None if none)."""
        return self._last_occurrence(self._resets[index], t)

    def last_change_time(self, index: int, key: str, t: float) -> Optional[float]:
        """Absolute time of the latest timeline entry at or before t that set `key` on GPU
        `index` (None if none). A repeating scenario also restores the initial state at
        every cycle start, which counts as a change."""
        times = self._field_changes[index].get(key)
        if not times:
            return None
        last = self._last_occurrence(times, t)
        if self.repeat_every and t >= self.repeat_every:
            cycle_start = (t // self.repeat_every) * self.repeat_every
            if last is None or last < cycle_start:
                last = cycle_start
        return last

    def _last_occurrence(self, resets: List[float], t: float) -> Optional[float]:
        if not resets:
            return None
        k, te = self._cycle_pos(t)
        i = bisect.bisect_right(resets, te) - 1
        if i >= 0:
            return k * (self.repeat_every or 0.0) + resets[i]
        if self.repeat_every and k > 0:
            return (k - 1) * self.repeat_every + resets[-1]
        return None

    def violation_seconds_at(self, index: int, t: float) -> Dict[str, float]:
        """Violation-time counter per policy (seconds) at time t, since start or last reset."""
        self._check_index(index)
        t = max(0.0, t)
        base_t = self.last_reset(index, t)
        out = {}
        for policy, _ in VIOLATION_POLICIES:
            v = self._integral(index, t, policy)
            if base_t is not None:
                v -= self._integral(index, base_t, policy)
            out[policy] = max(0.0, v)
        return out

    def energy_joules_at(self, index: int, t: float) -> float:
        """The energy counter of GPU `index` at time t (J): its `total_energy` plus the exact
        integral of the power it reports (power_draw, at most power_limit)."""
        self._check_index(index)
        return self.initial[index]["total_energy"] + self._energy[index].integral(t)

    def activity_integrals_at(self, index: int, t: float) -> List[float]:
        """The integrals from 0 to t (seconds x ratio) of GPU `index`'s activity readings
        (physics.ACTIVITY_NAMES order): what GPM's counters hold; the mean between two
        samples is their difference over the time between them."""
        return [p.integral(t) for p in self._activity[index]]

    def endpoint_tokens_at(self, endpoint: int, t: float) -> float:
        """Generated tokens of simulated endpoint `endpoint` from 0 to t (exact integral)."""
        return self._tokens[endpoint].integral(t)

    def endpoint_rate_at(self, endpoint: int, t: float) -> float:
        """Generated tokens/s of simulated endpoint `endpoint` at time t."""
        return self._tokens[endpoint].rate_at(t)

    def boundaries(self, index: int, t0: float, t1: float) -> List[float]:
        """Absolute times in (t0, t1) where GPU `index`'s state may change (segment starts,
        cycle starts): between two of them the state is constant."""
        starts = self._seg_starts[index]
        if not self.repeat_every:
            return [s for s in starts if t0 < s < t1]
        r = self.repeat_every
        out: List[float] = []
        k = max(0, int(t0 // r))
        while k * r < t1:
            out.extend(k * r + s for s in starts if t0 < k * r + s < t1)
            k += 1
        return out

    def hang_until(self, index: int, t: float) -> Optional[float]:
        """If GPU `index` is hung at time t, the absolute time its calls unblock."""
        latest = None
        for th, n in self._hangs[index]:
            if self.repeat_every:
                k = math.floor((t - th) / self.repeat_every)
                if k < 0:
                    continue
                start = th + k * self.repeat_every
            else:
                start = th
            if start <= t < start + n:
                end = start + n
                latest = end if latest is None else max(latest, end)
        return latest

    def driver_loaded_at(self, t: float) -> bool:
        _k, te = self._cycle_pos(max(0.0, t))
        i = bisect.bisect_right(self._node_starts, te) - 1
        return self._node_loaded[i]

    # ---- public ground truth
    def gpu_state_at(self, index: int, t: float) -> Dict[str, Any]:
        """Every field of GPU `index` at scenario time t (seconds), as a new dict, plus
        `violation_seconds` ({policy: seconds}, or None when violation_counters is false) and
        `hung` (True while a hang_seconds window is open)."""
        self._check_index(index)
        state = dict(self.state_ref(index, t))
        state["violation_seconds"] = (self.violation_seconds_at(index, t)
                                      if state["violation_counters"] else None)
        state["hung"] = self.hang_until(index, t) is not None
        return state

    def change_times(self, index: int, until: Optional[float] = None) -> List[float]:
        """Sorted times of the timeline entries for GPU `index`. Without `until`: within one
        cycle (add k * repeat_every for later cycles). With `until`: every absolute time
        <= until (all cycles)."""
        self._check_index(index)
        base = sorted({e.t for e in self.timeline if e.gpu == index})
        if until is None:
            return base
        if not self.repeat_every:
            return [t for t in base if t <= until]
        out: List[float] = []
        k = 0
        while k * self.repeat_every <= until:
            out.extend(k * self.repeat_every + t for t in base
                       if k * self.repeat_every + t <= until)
            k += 1
        return out

    def kernel_lines_between(self, t0: float, t1: float) -> List[Tuple[float, Optional[int], str]]:
        """(absolute t, gpu, line) of kernel_log entries with t0 < t <= t1, in time order."""
        if t1 <= t0 or not self._kernel:
            return []
        out: List[Tuple[float, Optional[int], str]] = []
        if not self.repeat_every:
            return [(t, g, line) for t, g, line in self._kernel if t0 < t <= t1]
        r = self.repeat_every
        k = max(0, int(t0 // r))
        while k * r <= t1:
            for t, g, line in self._kernel:
                at = k * r + t
                if t0 < at <= t1:
                    out.append((at, g, line))
            k += 1
        return out
