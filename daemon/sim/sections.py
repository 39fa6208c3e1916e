"""The optional sections of a scenario file: ``[physics]`` (power follows clock and load),
``[serving]`` (simulated inference servers; their tokens follow the [physics] phases) and ``[prices]`` (illustrative prices for
``gpucostd run --simulate``), each checked key by key (docs/scenarios.md). Used by
gpucostd.sim.scenario, whose validator (``v``: ``fail`` and ``loc``) they report through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from gpucostd.sim import physics as phys


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def _indexes(count: int) -> str:
    return f"allowed 0..{count - 1}" if count else "node.gpu_count = 0 means no GPUs"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _section(v: Any, where: str, data: Any, keys: Mapping[str, tuple],
             array: bool = False, occ: int = 0, sub: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """A [physics] / [serving] / [[serving.endpoint]] table checked against `keys`
    (physics.PHYSICS_KEYS and friends): unknown keys, types and ranges."""
    table = where.split("[")[0]
    if not isinstance(data, dict):
        v.fail(f"{where} must be a table", table, None, array, occ)
    out: Dict[str, Any] = {}
    for key, value in data.items():
        if key in sub:
            continue            # a sub-table, handled by the caller
        moved = phys.MOVED_KEYS.get((table, key))
        if moved:
            v.fail(f"{where}.{key}: no longer a key here; {moved}", table, key, array, occ)
        if key not in keys:
            v.fail(f"{where}.{key}: unknown key; allowed keys: " + ", ".join(sorted(keys)),
                   table, key, array, occ)
        kind, _default, _doc, lo, hi = keys[key]
        got, why = phys.check_value(kind, value, lo, hi)
        if why:
            v.fail(f"{where}.{key} = {_fmt(value)}: {why}", table, key, array, occ)
        out[key] = got
    return out


def parse_physics(v: Any, data: Mapping[str, Any], gpu_list: Sequence[Any],
                   at_list: Sequence[Any]) -> Optional[phys.PowerModel]:
    if "physics" not in data:
        return None
    d = _section(v, "physics", data["physics"], phys.PHYSICS_KEYS)
    model = phys.PowerModel(**d)
    if model.full_load_watts <= model.idle_watts:
        v.fail(f"physics.full_load_watts = {_num(model.full_load_watts)} must be above "
               f"idle_watts {_num(model.idle_watts)}", "physics", "full_load_watts")
    if model.decode_watts < model.idle_watts + model.decode_memory_watts:
        v.fail(f"physics.decode_watts = {_num(model.decode_watts)} must be at least idle_watts "
               f"+ decode_memory_watts = {_num(model.idle_watts + model.decode_memory_watts)}",
               "physics", "decode_watts")
    why = ("is computed by [physics] from sm_clock, utilization and power_limit; remove it "
           "(or remove [physics])")
    if "power_draw" in (data.get("gpu_defaults") or {}):
        v.fail(f"gpu_defaults.power_draw {why}", "gpu_defaults", "power_draw")
    for table, entries in (("gpu", gpu_list), ("at", at_list)):
        for occ, entry in enumerate(entries):
            if isinstance(entry, dict) and "power_draw" in entry:
                v.fail(f"{table}[{occ}].power_draw {why}", table, "power_draw", True, occ)
    return model


def parse_serving(v: Any, data: Mapping[str, Any], count: int
                   ) -> Optional[phys.ServingModel]:
    if "serving" not in data:
        return None
    raw = data["serving"]
    d = _section(v, "serving", raw, phys.SERVING_KEYS, sub=("endpoint",))
    eps = raw.get("endpoint", []) if isinstance(raw, dict) else []
    if not isinstance(eps, list):
        v.fail("serving.endpoint must be an array of tables: [[serving.endpoint]]", "serving")
    endpoints = []
    owner: Dict[int, int] = {}
    for occ, entry in enumerate(eps or [{}]):
        e = _section(v, f"serving.endpoint[{occ}]", entry, phys.ENDPOINT_KEYS, bool(eps), occ)
        if "instances" in e and "gpus" in e:
            v.fail(f"serving.endpoint[{occ}]: set gpus or instances (MIG), not both",
                   "serving.endpoint", "instances", True, occ)
        if "instances" in e:            # their GPUs; checked against [[mig]] by the scenario
            gpus = tuple(dict.fromkeys(int(k.split("/")[0]) for k in e["instances"]))
            for g in gpus:
                if g >= count or owner.get(g, -1) >= 0:
                    v.fail(f"serving.endpoint[{occ}].instances: GPU {g} is out of range or "
                           f"served whole by another endpoint", "serving.endpoint",
                           "instances", True, occ)
                owner[g] = -1 - occ
            endpoints.append(phys.EndpointModel(index=len(endpoints), gpus=gpus, **e))
            continue
        gpus = e.pop("gpus", tuple(range(count)))
        for g in gpus:
            if g >= count:
                v.fail(f"serving.endpoint[{occ}].gpus: GPU {g} out of range; "
                       f"{_indexes(count)}", "serving.endpoint", "gpus", True, occ)
            if g in owner:
                if owner[g] < 0:
                    v.fail(f"serving.endpoint[{occ}].gpus: GPU {g} is sliced by MIG for "
                           f"serving.endpoint[{-1 - owner[g]}]; name instances instead",
                           "serving.endpoint", "gpus", True, occ)
                v.fail(f"serving.endpoint[{occ}].gpus: GPU {g} is already served by "
                       f"serving.endpoint[{owner[g]}]", "serving.endpoint", "gpus", True, occ)
            owner[g] = occ
        if gpus:
            endpoints.append(phys.EndpointModel(index=len(endpoints), gpus=tuple(gpus), **e))
    return phys.ServingModel(endpoints=tuple(endpoints), **d)


# --------------------------------------------------------------------------- [prices]
PRICE_KEYS: Dict[str, Tuple[str, Any, str, Optional[float], Optional[float]]] = {
    "gpu_hour_usd": ("number", 0.0, "Illustrative price of one GPU-hour, USD.", 0, 1e6),
    "energy_usd_per_kwh": ("number", 0.0, "Illustrative price of one kWh, USD.", 0, 1000),
    "pue": ("number", 1.0, "Illustrative power usage effectiveness.", 1.0, 5.0),
}


@dataclass(frozen=True)
class ScenarioPrices:
    """A scenario's illustrative prices ([prices]): what `gpucostd run --simulate` prices the
    simulated node at when the config sets no price of its own."""

    gpu_hour_usd: float = 0.0
    energy_usd_per_kwh: float = 0.0
    pue: float = 1.0


def parse_prices(v: Any, data: Mapping[str, Any]) -> Optional[ScenarioPrices]:
    if "prices" not in data:
        return None
    d = _section(v, "prices", data["prices"], PRICE_KEYS)
    prices = ScenarioPrices(**d)
    if not prices.gpu_hour_usd and not prices.energy_usd_per_kwh:
        v.fail("prices: set gpu_hour_usd or energy_usd_per_kwh above 0 (or remove [prices])",
               "prices")
    return prices


def with_scenario_prices(config: Any, prices: Optional[ScenarioPrices], label: str) -> Any:
    """A config that sets no price ([cost] gpu_hour_usd, energy_usd_per_kwh and
    [cost.model_hour_usd] all unset) priced at the scenario's illustrative `prices`, a new
    Config whose price_note says so; a config with any price of its own, or a scenario
    without [prices], unchanged. The config's pue stays when it sets one."""
    cost = config.cost
    if prices is None or cost.gpu_hour_usd or cost.energy_usd_per_kwh or config.model_prices:
        return config
    pue = float(cost.pue) if float(cost.pue) != 1.0 else prices.pue
    note = (f"prices are illustrative, not yours: ${prices.gpu_hour_usd:.2f} per GPU-hour, "
            f"${prices.energy_usd_per_kwh:g} per kWh, PUE {pue:g}, from the scenario {label} "
            "([prices]); set [cost] gpu_hour_usd and energy_usd_per_kwh in the config for "
            "your own")
    return config.priced({"gpu_hour_usd": prices.gpu_hour_usd, "currency": "USD",
                          "energy_usd_per_kwh": prices.energy_usd_per_kwh, "pue": pue}, note)


# the names other modules import (the module itself keeps its short private ones)
fmt_value = _fmt
index_list = _indexes
num_text = _num
