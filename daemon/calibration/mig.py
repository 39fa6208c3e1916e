"""`gpucostd calibrate` on MIG GPUs (pure, the floor of maths.py): a GPU's power limit and
clocks are the GPU's, shared by all its instances, so a step changes every instance at once and
the group's throughput is the sum of every endpoint that serves on an instance of its GPUs
(docs/tuning.md, "MIG").

- ``endpoint_groups``: the groups of GPUs and the endpoints whose tokens are theirs. An
  endpoint on whole GPUs is a group as before (the first endpoint to name a GPU has it); the
  endpoints on MIG instances (``instances = [...]``) of one GPU make one group, its tokens their
  sum.
- ``group_reading``: one cycle's token reading of a group, the endpoints' counters summed (when
  one does not answer, its reading: the calibration aborts naming it).
- ``gpu_busy`` and ``gpu_activity``: on a MIG GPU, what its instances do (their GPM activity,
  weighted by their shares) where GPU-Util and the GPU's own activity are not read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.cost.model import is_busy


@dataclass(frozen=True)
class SummedReading:
    """The token counters of a group's endpoints, summed, as one reading."""
    url: Optional[str]
    time: float
    tokens_total: float
    error: Optional[str] = None
    ok: bool = True


def endpoint_groups(snap, readings: Sequence[Any]
                    ) -> List[Tuple[Tuple[int, ...], Optional[str], Tuple[str, ...]]]:
    """(gpus, url, urls) per group: `url` the first endpoint (in config order), `urls` every
    endpoint whose tokens are the group's; then one GPU alone where no endpoint maps (url None,
    urls ())."""
    indexes = [g.index for g in snap.gpus]
    groups: List[Tuple[List[int], List[str], bool]] = []
    owner: Dict[int, int] = {}             # GPU -> its group
    for r in readings:
        if r is None:
            continue
        gpus = [i for i in (r.gpus if r.gpus is not None else indexes) if i in indexes]
        sliced = bool(getattr(r, "instances", None))
        if sliced:
            # another endpoint on instances of one of its GPUs: the same group, summed
            hit = next((owner[i] for i in gpus if i in owner and groups[owner[i]][2]), None)
            if hit is not None:
                groups[hit][1].append(r.url)
                for i in gpus:
                    if i not in owner:
                        groups[hit][0].append(i)
                        owner[i] = hit
                continue
        gpus = [i for i in gpus if i not in owner]
        if gpus:
            for i in gpus:
                owner[i] = len(groups)
            groups.append((gpus, [r.url], sliced))
    out = [(tuple(gpus), urls[0], tuple(urls)) for gpus, urls, _s in groups]
    out += [((i,), None, ()) for i in indexes if i not in owner]
    return out


def group_reading(url: Optional[str], urls: Sequence[str], readings: Mapping[str, Any]
                  ) -> Optional[Any]:
    """The group's reading this cycle: its endpoint's, or with several the sum of their token
    counters at the latest scrape time; a missing or failing endpoint's own reading (None when
    it gave none) when one does not answer."""
    if len(urls) <= 1:
        return readings.get(url) if url is not None else None
    parts = [readings.get(u) for u in urls]
    for u, r in zip(urls, parts):
        if r is None or not r.ok:
            return r
    return SummedReading(url, max(float(r.time) for r in parts),
                         sum(float(r.tokens_total) for r in parts))


def down_url(url: Optional[str], urls: Sequence[str], readings: Mapping[str, Any]
             ) -> Optional[str]:
    """The first of a group's endpoints that gave no good reading (for the abort message)."""
    for u in (urls or ((url,) if url else ())):
        r = readings.get(u)
        if r is None or not r.ok:
            return u
    return url


def _instance_work(g) -> Optional[float]:
    """A MIG GPU's work, 0..1: its instances' GPM SM activity weighted by their shares (the
    instances without a reading count as idle); None when none has one."""
    acts = [(m.share, m.activity.sm) for m in getattr(g, "mig", ()) or ()
            if m.activity is not None and m.activity.sm is not None]
    if not acts:
        return None
    return sum(share * float(sm) for share, sm in acts)


def gpu_activity(g) -> Optional[float]:
    """What a GPU does, 0..1: its SM activity (GPM), on a MIG GPU its instances', else
    GPU-Util."""
    act = getattr(g, "activity", None)
    if act is not None and getattr(act, "sm", None) is not None:
        return float(act.sm)
    work = _instance_work(g)
    if work is not None:
        return work
    u = getattr(g, "utilization_percent", None)
    return None if u is None else float(u) / 100.0


def gpu_busy(g, busy_percent: float) -> bool:
    """Busy enough to calibrate: the cost model's busy (GPU-Util at or above the threshold, or
    on a MIG GPU without it, an instance's SM activity; never while GpuIdle)."""
    return is_busy(g, busy_percent)


__all__ = ["endpoint_groups", "group_reading", "down_url", "gpu_activity", "gpu_busy",
           "SummedReading"]
