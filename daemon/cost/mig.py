"""MIG instances priced: each instance's share of its GPU's hour, its idle and underused
capacity, its energy (an estimate), and the tokens per dollar of the endpoints that serve on
instances. Pure integration over readings, no I/O; the EfficiencyBook owns one ``MigBook``, feeds
it each GPU's interval and saves its totals in cost.json (docs/cost.md, "MIG instances").

- **Price.** An instance costs its share of its GPU's hour: ``MigInstance.share``, its compute
  slices over the GPU's (a 1g of an H100's 7 slices = 1/7), times the GPU-hour price of the GPU
  (``[cost] gpu_hour_usd`` or ``[cost.model_hour_usd]``); ``[cost.mig_profile_hour_usd]`` sets a
  profile's own price instead. Slices in no instance are the GPU's, not an instance's.
- **Idle and underused.** An instance's work is its own SM activity where GPU Performance
  Monitoring gives it per instance (``nvmlGpmMigSampleGet``, Hopper and later): idle below
  ``[cost] busy_utilization_percent``, underused by its unused share below ``[efficiency]
  target_utilization_percent``. Without it, the GPU's own state decides (idle when the GPU is
  not busy); when neither can be read the instance is neither (no loss claimed). Priced at the
  instance's price, so an idle 1g slice costs exactly 1/7 of its GPU's idle cost. The GPU's own
  idle and underused shares on a MIG GPU are the slice-weighted sums over its instances, its
  slices in no instance counted idle (``gpu_unused``).
- **Energy (an estimate).** NVML measures power per GPU only. The GPU's energy of an interval is
  shared by the instances' activity (each instance's SM activity times its share, over the sum)
  where every instance on the GPU has GPM activity and some worked, else by share.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.cost.model import MAX_SAMPLE_GAP_SECONDS, is_busy, is_finite, rounded as _r
from gpucostd.snapshot import GpuReading, MigInstance

TOTAL_KEYS = ("paid_seconds", "idle_seconds", "idle_dollars", "underused_seconds",
              "underused_dollars", "energy_joules", "energy_dollars")
MAX_STATUS_LINES = 16        # instance lines in `gpucostd status`; the rest in --json
_DIGITS = {k: 3 if k.endswith(("seconds", "joules")) else 6 for k in TOTAL_KEYS}


def _work(m: MigInstance) -> Optional[float]:
    act = m.activity
    return float(act.sm) if act is not None and is_finite(act.sm) else None


def instance_unused(m: MigInstance, g: GpuReading, busy_pct: float, target_pct: float
                    ) -> Tuple[Optional[float], float, str]:
    """(idle share, underused share, basis) of one instance, shares of the instance: basis
    "instance_activity" (its own GPM), "gpu" (the GPU's state), or "unknown" (idle None: no
    per-instance activity and no GPU-Util to tell)."""
    sm = _work(m)
    if sm is not None:
        work = 100.0 * sm
        if work < busy_pct:
            return 1.0, 0.0, "instance_activity"
        return 0.0, (1.0 - sm) if work < target_pct else 0.0, "instance_activity"
    if "GpuIdle" in (g.clock_event_reasons or ()):
        return 1.0, 0.0, "gpu"
    if g.utilization_percent is None:
        return None, 0.0, "unknown"
    return (0.0 if is_busy(g, busy_pct) else 1.0), 0.0, "gpu"


def gpu_unused(g: GpuReading, busy_pct: float, target_pct: float) -> Tuple[float, float, str]:
    """A MIG GPU's (idle share, underused share, "mig_instances"): its instances' shares
    weighted by their slices, its slices in no instance idle."""
    idle = under = used = 0.0
    for m in g.mig:
        i, u, _basis = instance_unused(m, g, busy_pct, target_pct)
        idle += m.share * (i or 0.0)
        under += m.share * u
        used += m.share
    return min(1.0, idle + max(0.0, 1.0 - used)), min(1.0, under), "mig_instances"


def energy_weights(g: GpuReading) -> Tuple[Dict[str, float], str]:
    """Instance key -> its part of the GPU's energy now, and the basis ("activity" or
    "share")."""
    works = [(m, _work(m)) for m in g.mig]
    total = sum(m.share * w for m, w in works if w is not None)
    if works and all(w is not None for _m, w in works) and total > 0:
        return {m.key: m.share * w / total for m, w in works}, "activity"
    return {m.key: m.share for m in g.mig}, "share"


class _Inst:
    __slots__ = ("m", "gpu_uuid", "t", "idle", "under", "basis", "price", "price_basis",
                 "power", "energy_basis", "totals")

    def __init__(self, m: MigInstance, gpu_uuid: Optional[str]):
        self.m = m
        self.gpu_uuid = gpu_uuid
        self.t: Optional[float] = None
        self.idle: Optional[float] = None
        self.under = 0.0
        self.basis = "unknown"
        self.price = 0.0                     # per hour, now
        self.price_basis = "share"           # "share" | "profile"
        self.power: Optional[float] = None   # estimated watts now
        self.energy_basis = "share"
        self.totals: Dict[str, float] = {k: 0.0 for k in TOTAL_KEYS}


class MigBook:
    """Every MIG instance's cost, integrated cycle by cycle (the EfficiencyBook calls
    ``update_gpu`` for each GPU read OK)."""

    def __init__(self) -> None:
        self.instances: Dict[str, _Inst] = {}      # by MigInstance.key ("gpu/gi/ci")

    def update_gpu(self, g: GpuReading, gpu_price: float, now: float,
                   joules: Optional[float], power: Optional[float], config: Any) -> None:
        """One GPU's cycle: `joules` its energy over the interval that ends `now` (None:
        unknown), `power` its draw now, `gpu_price` its price per GPU-hour."""
        cost = config.cost
        busy_pct = float(cost.busy_utilization_percent)
        target = float(config.efficiency.target_utilization_percent)
        usd_j = float(cost.energy_usd_per_kwh) * float(cost.pue) / 3.6e6
        present = {m.key for m in g.mig}
        if g.mig or g.mig_mode is not None:           # (a layout not read: nothing is gone)
            for key in [k for k, b in self.instances.items()
                        if b.m.gpu_index == g.index and k not in present]:
                del self.instances[key]               # gone from the layout
        weights, ebasis = energy_weights(g)
        for m in g.mig:
            b = self.instances.get(m.key)
            if b is None or (b.gpu_uuid and g.uuid and b.gpu_uuid != g.uuid) or \
                    b.m.profile != m.profile:
                b = self.instances[m.key] = _Inst(m, g.uuid)
            b.m = m
            own = _profile_price(config, m.profile)
            b.price, b.price_basis = (own, "profile") if own is not None else (
                gpu_price * m.share, "share")
            idle, under, b.basis = instance_unused(m, g, busy_pct, target)
            w = weights.get(m.key, 0.0)
            b.power, b.energy_basis = (power * w if power is not None else None), ebasis
            if b.t is not None and now > b.t and now - b.t <= MAX_SAMPLE_GAP_SECONDS:
                dt = now - b.t
                tot = b.totals
                tot["paid_seconds"] += dt
                if idle is not None and b.idle is not None:
                    i_s = dt * (idle + b.idle) / 2.0
                    u_s = dt * (under + b.under) / 2.0
                    tot["idle_seconds"] += i_s
                    tot["idle_dollars"] += i_s * b.price / 3600.0
                    tot["underused_seconds"] += u_s
                    tot["underused_dollars"] += u_s * b.price / 3600.0
                if joules is not None:
                    tot["energy_joules"] += joules * w
                    tot["energy_dollars"] += joules * w * usd_j
            b.t, b.idle, b.under = now, idle, under

    def forget_gpu(self, index: int) -> None:
        """A GPU not read OK: its instances' intervals are not integrated."""
        for b in self.instances.values():
            if b.m.gpu_index == index:
                b.t = None

    def cost_per_hour(self, key: str, config: Any) -> Optional[float]:
        """The instance's price per hour plus its estimated energy now."""
        b = self.instances.get(key)
        if b is None:
            return None
        return b.price + (b.power or 0.0) * _usd_per_watt_hour(config)

    # ------------------------------------------------------------------ views
    def to_json(self, endpoints: Sequence[Any], config: Any) -> List[Dict[str, Any]]:
        """One entry per instance, in key order, with its endpoint's tokens (add_tokens)."""
        out = []
        usd_w = _usd_per_watt_hour(config)
        for key in sorted(self.instances, key=_key_order):
            b = self.instances[key]
            m, tot = b.m, b.totals
            energy_h = (b.power or 0.0) * usd_w
            out.append({
                "key": key, "gpu": m.gpu_index, "gpu_uuid": b.gpu_uuid, "gpu_instance": m.gi_id,
                "compute_instance": m.ci_id, "profile": m.profile, "uuid": m.uuid,
                "share": _r(m.share), "price_per_hour": _r(b.price),
                "price_basis": b.price_basis,
                "energy_dollars_per_hour": _r(energy_h),
                "cost_dollars_per_hour": _r(b.price + energy_h),
                "power_watts_estimate": _r(b.power, 3), "energy_basis": b.energy_basis,
                "idle_now": None if b.idle is None else b.idle >= 1.0,
                "idle_basis": b.basis,
                **{k: round(v, _DIGITS[k]) for k, v in tot.items()}})     # finite floats
        self.add_tokens(out, endpoints, config)
        return out

    def add_tokens(self, entries: List[Dict[str, Any]], endpoints: Sequence[Any],
                   config: Any) -> None:
        """Fill each entry's endpoint, tokens/s (its endpoint's, split over the endpoint's
        instances by their shares) and tokens per dollar at the instance's price, in place."""
        served: Dict[str, Tuple[str, Optional[float]]] = {}
        for ep in endpoints:
            keys = [k for k in (ep.instances or ()) if k in self.instances]
            shares = sum(self.instances[k].m.share for k in keys)
            for k in keys:
                rate = (ep.rate * self.instances[k].m.share / shares
                        if ep.up and ep.rate is not None and shares > 0 else None)
                served[k] = (ep.url, rate)
        usd_w = _usd_per_watt_hour(config)
        for d in entries:
            b = self.instances.get(d["key"])
            url, rate = served.get(d["key"], (None, None))
            per_hour = b.price + (b.power or 0.0) * usd_w if b is not None else 0.0
            d.update({"endpoint": url, "tokens_per_second": _r(rate),
                      "tokens_per_dollar": _r(_tpd(rate, per_hour)),
                      "cost_per_million_tokens": _r(per_hour / (rate * 3600.0) * 1e6
                                                    if rate and per_hour > 0 else None)})

    # ------------------------------------------------------------------ persistence
    def state(self) -> Dict[str, Any]:
        return {k: {"gpu_uuid": b.gpu_uuid, "profile": b.m.profile,
                    **{t: round(v, 6) for t, v in b.totals.items()}}
                for k, b in sorted(self.instances.items())}

    def load(self, data: Any) -> None:
        """The saved totals of the instances (kept once the same instance, same profile on the
        same GPU, is read again); ValueError when malformed."""
        if not data:
            return
        if not isinstance(data, dict):
            raise ValueError("MIG instance totals are not a table")
        for key, rec in data.items():
            if not isinstance(rec, dict):
                raise ValueError(f"MIG instance {key}: not a table")
            parts = str(key).split("/")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise ValueError(f"MIG instance key {key!r} is not GPU/GI/CI")
            m = MigInstance(int(parts[0]), int(parts[1]), int(parts[2]),
                            str(rec.get("profile") or "?"), 0)
            b = _Inst(m, rec.get("gpu_uuid") if isinstance(rec.get("gpu_uuid"), str) else None)
            for t in TOTAL_KEYS:
                v = rec.get(t, 0.0)
                if not is_finite(v) or v < 0:
                    raise ValueError(f"MIG instance {key} {t} = {v!r} is not a number >= 0")
                b.totals[t] = float(v)
            self.instances[str(key)] = b


def _profile_price(config: Any, profile: str) -> Optional[float]:
    fn = getattr(config, "price_for_mig", None)
    try:
        price = fn(profile) if fn is not None else None
    except Exception:   # noqa: BLE001 - a bad price never breaks accounting
        return None
    return float(price) if price is not None and is_finite(price) else None


def _usd_per_watt_hour(config: Any) -> float:
    """Money per watt drawn for an hour (x PUE)."""
    cost = config.cost
    return float(cost.pue) * float(cost.energy_usd_per_kwh) / 1000.0


def _tpd(rate: Optional[float], per_hour: float) -> Optional[float]:
    if rate is None or per_hour <= 0:
        return None
    v = rate * 3600.0 / per_hour
    return v if math.isfinite(v) else None


def _key_order(key: str) -> Tuple[int, ...]:
    try:
        return tuple(int(p) for p in key.split("/"))
    except ValueError:
        return (1 << 30,)


# --------------------------------------------------------------------------- status lines
def status_lines(instances: Sequence[Mapping[str, Any]], money, big) -> List[str]:
    """The MIG part of the cost section of `gpucostd status`: one line per instance (at most
    MAX_STATUS_LINES; the rest counted), within 100 columns. `money(x)` and `big(x)` format."""
    lines = []
    for d in list(instances)[:MAX_STATUS_LINES]:
        head = f"  MIG {d['key']} {d.get('profile') or '?'}"
        price = f"{money(d.get('cost_dollars_per_hour'))}/h"
        share = d.get("share")
        if d.get("price_basis") == "share" and share:
            price += f" ({_fraction(share)} of the GPU)"
        words = [price]
        if d.get("tokens_per_second") is not None:
            words.append(f"{big(d['tokens_per_second'])} tok/s")
            if d.get("tokens_per_dollar") is not None:
                words.append(f"{big(d['tokens_per_dollar'])} per $")
        elif d.get("endpoint"):
            words.append("endpoint: no tokens/s")
        if d.get("idle_now"):
            words.append("idle")
        if d.get("idle_dollars"):
            words.append(f"idle cost {money(d['idle_dollars'])}")
        line = head + ": " + "; ".join(words)
        lines.append(line if len(line) <= 100 else line[:99] + "…")
    more = len(instances) - MAX_STATUS_LINES
    if more > 0:
        lines.append(f"  MIG: {more} more instance(s) in `gpucostd status --json` (cost.mig)")
    return lines


def _fraction(share: float) -> str:
    for den in (7, 2, 3, 4, 8):
        num = share * den
        if abs(num - round(num)) < 1e-4:        # (the JSON keeps 6 decimals)
            return f"{int(round(num))}/{den}"
    return f"{share * 100:.0f}%"


__all__ = ["MigBook", "gpu_unused", "instance_unused", "energy_weights", "status_lines"]
