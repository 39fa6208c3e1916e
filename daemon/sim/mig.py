"""Multi-Instance GPU (MIG) of the simulated NVML: the scenario's ``[[mig]]`` instances and the
nvml.h calls that show them below pynvml (docs/scenarios.md, "[[mig]]").

- The profiles of each MIG-capable model (name, compute slices, memory, NVML's profile enum and
  id, how many fit) as NVIDIA's MIG user guide lists them ("Supported MIG Profiles").
- ``parse_mig``: the ``[[mig]]`` tables of a scenario, checked (the model has MIG, the profile
  exists, the instances fit on the GPU), one ``MigSpec`` per instance.
- ``MigCalls``: a mixin of ``SimulatedNode`` (gpucostd.sim.nvml) with the C symbols:
  nvmlDeviceGetMigMode, nvmlDeviceGetMaxMigDeviceCount, nvmlDeviceGetMigDeviceHandleByIndex,
  nvmlDeviceIsMigDeviceHandle, nvmlDeviceGetGpuInstanceId, nvmlDeviceGetComputeInstanceId,
  nvmlDeviceGetDeviceHandleFromMigDeviceHandle, nvmlDeviceGetMemoryInfo and
  nvmlDeviceGetAttributes_v2 (on a MIG handle), nvmlDeviceGetGpuInstanceProfileInfo(V),
  nvmlDeviceGetGpuInstanceById, nvmlGpuInstanceGetInfo and nvmlGpmMigSampleGet (per-instance
  GPM). nvmlDeviceGetUUID on a MIG handle answers its "MIG-..." UUID (gpucostd.sim.nvml).

One compute instance per GPU instance (ci 0 spanning the GPU instance), as `nvidia-smi mig
-cgi ... -C` makes them. A GPU without MIG (a model with no profile table, or `unsupported =
["mig"]`) answers NVML_ERROR_NOT_SUPPORTED, as real NVML does.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import re
import uuid as uuidlib
from ctypes import Structure, c_char, c_int, c_uint, c_ulonglong, c_void_p
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from gpucostd.sim.nvml_abi import DeviceFault

NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_DEVICE_NAME_V2_BUFFER_SIZE = 96
NVML_DEVICE_UUID_V2_BUFFER_SIZE = 96
# NVML_GPU_INSTANCE_PROFILE_* (nvml.h): the argument of nvmlDeviceGetGpuInstanceProfileInfo
GI_PROFILE_ENUM = {
    "NVML_GPU_INSTANCE_PROFILE_1_SLICE": 0x0, "NVML_GPU_INSTANCE_PROFILE_2_SLICE": 0x1,
    "NVML_GPU_INSTANCE_PROFILE_3_SLICE": 0x2, "NVML_GPU_INSTANCE_PROFILE_4_SLICE": 0x3,
    "NVML_GPU_INSTANCE_PROFILE_7_SLICE": 0x4, "NVML_GPU_INSTANCE_PROFILE_8_SLICE": 0x5,
    "NVML_GPU_INSTANCE_PROFILE_6_SLICE": 0x6, "NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1": 0x7,
    "NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1": 0x8, "NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2": 0x9,
    "NVML_GPU_INSTANCE_PROFILE_COUNT": 0x12,
}
_E = GI_PROFILE_ENUM
MIG_CONSTANTS: Dict[str, int] = dict(
    GI_PROFILE_ENUM, NVML_DEVICE_MIG_DISABLE=NVML_DEVICE_MIG_DISABLE,
    NVML_DEVICE_MIG_ENABLE=NVML_DEVICE_MIG_ENABLE,
    NVML_DEVICE_NAME_V2_BUFFER_SIZE=NVML_DEVICE_NAME_V2_BUFFER_SIZE,
    NVML_DEVICE_UUID_V2_BUFFER_SIZE=NVML_DEVICE_UUID_V2_BUFFER_SIZE)

_MIB = 1 << 20
# Handles the simulator hands out: GPU i is i + 1; MIG devices and GPU instances live above.
MIG_HANDLE_BASE = 1 << 20
GI_HANDLE_BASE = 2 << 20
_PER_GPU = 64


# ----------------------------------------------------------------------- nvml.h structs
class Memory(Structure):                     # nvmlMemory_t
    _fields_ = [("total", c_ulonglong), ("free", c_ulonglong), ("used", c_ulonglong)]


class DeviceAttributes(Structure):           # nvmlDeviceAttributes_t
    _fields_ = [("multiprocessorCount", c_uint), ("sharedCopyEngineCount", c_uint),
                ("sharedDecoderCount", c_uint), ("sharedEncoderCount", c_uint),
                ("sharedJpegCount", c_uint), ("sharedOfaCount", c_uint),
                ("gpuInstanceSliceCount", c_uint), ("computeInstanceSliceCount", c_uint),
                ("memorySizeMB", c_ulonglong)]


_PROFILE_INFO = [("id", c_uint), ("isP2pSupported", c_uint), ("sliceCount", c_uint),
                 ("instanceCount", c_uint), ("multiprocessorCount", c_uint),
                 ("copyEngineCount", c_uint), ("decoderCount", c_uint), ("encoderCount", c_uint),
                 ("jpegCount", c_uint), ("ofaCount", c_uint), ("memorySizeMB", c_ulonglong)]


class GpuInstanceProfileInfo(Structure):     # nvmlGpuInstanceProfileInfo_t
    _fields_ = list(_PROFILE_INFO)


class GpuInstanceProfileInfoV2(Structure):   # nvmlGpuInstanceProfileInfo_v2_t
    _fields_ = [("version", c_uint)] + _PROFILE_INFO + [
        ("name", c_char * NVML_DEVICE_NAME_V2_BUFFER_SIZE)]


class GpuInstancePlacement(Structure):       # nvmlGpuInstancePlacement_t
    _fields_ = [("start", c_uint), ("size", c_uint)]


class GpuInstanceInfo(Structure):            # nvmlGpuInstanceInfo_t
    _fields_ = [("device", c_void_p), ("id", c_uint), ("profileId", c_uint),
                ("placement", GpuInstancePlacement)]


# NVML_STRUCT_VERSION(GpuInstanceProfileInfo, 2): sizeof | 2 << 24
PROFILE_INFO_V2_VERSION = ctypes.sizeof(GpuInstanceProfileInfoV2) | (2 << 24)

_P, _U = c_void_p, c_uint
MIG_SYMBOLS: Dict[str, Tuple[Any, Tuple[Any, ...]]] = {
    "nvmlDeviceGetMigMode": (c_int, (_P, _P, _P)),
    "nvmlDeviceGetMaxMigDeviceCount": (c_int, (_P, _P)),
    "nvmlDeviceGetMigDeviceHandleByIndex": (c_int, (_P, _U, _P)),
    "nvmlDeviceIsMigDeviceHandle": (c_int, (_P, _P)),
    "nvmlDeviceGetGpuInstanceId": (c_int, (_P, _P)),
    "nvmlDeviceGetComputeInstanceId": (c_int, (_P, _P)),
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": (c_int, (_P, _P)),
    "nvmlDeviceGetMemoryInfo": (c_int, (_P, _P)),
    "nvmlDeviceGetAttributes_v2": (c_int, (_P, _P)),
    "nvmlDeviceGetGpuInstanceProfileInfo": (c_int, (_P, _U, _P)),
    "nvmlDeviceGetGpuInstanceProfileInfoV": (c_int, (_P, _U, _P)),
    "nvmlDeviceGetGpuInstanceById": (c_int, (_P, _U, _P)),
    "nvmlGpuInstanceGetInfo": (c_int, (_P, _P)),
    "nvmlGpmMigSampleGet": (c_int, (_P, _U, _P)),
}


# ----------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class MigProfile:
    """One GPU instance profile of a model (NVIDIA MIG user guide, "Supported MIG Profiles")."""
    name: str                 # "1g.10gb"
    slices: int               # compute slices (of `GPU_SLICES`)
    eighths: int              # memory slices of 8
    memory_mib: int           # nvmlGpuInstanceProfileInfo_t.memorySizeMB
    max_count: int            # how many fit on one GPU
    nvml_profile: int         # NVML_GPU_INSTANCE_PROFILE_*
    profile_id: int           # nvmlGpuInstanceProfileInfo_t.id (nvidia-smi mig -lgip "ID")
    gi_ids: Tuple[int, ...]   # GPU instance ids nvidia-smi gives on an empty GPU, in order


GPU_SLICES = 7
SMS_PER_SLICE = 16            # H100 SXM: 132 SMs, 16 in a 1g instance


def _table(gb1: int, gb2: int, gb4: int, gb8: int, mib: Tuple[int, int, int, int]
           ) -> Tuple[MigProfile, ...]:
    """The six profiles of an A100/H100/H200 (memory in GB as NVIDIA names them; MiB such that
    ceil(MiB / 1024) gives that name, the rule the Kubernetes device plugin names them by)."""
    m1, m2, m4, m8 = mib
    return (
        MigProfile(f"1g.{gb1}gb", 1, 1, m1, 7, _E["NVML_GPU_INSTANCE_PROFILE_1_SLICE"], 19,
                   tuple(range(7, 14))),
        MigProfile(f"1g.{gb2}gb", 1, 2, m2, 4, _E["NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2"], 15,
                   (3, 4, 5, 6)),
        MigProfile(f"2g.{gb2}gb", 2, 2, m2, 3, _E["NVML_GPU_INSTANCE_PROFILE_2_SLICE"], 14,
                   (3, 4, 5)),
        MigProfile(f"3g.{gb4}gb", 3, 4, m4, 2, _E["NVML_GPU_INSTANCE_PROFILE_3_SLICE"], 9,
                   (1, 2)),
        MigProfile(f"4g.{gb4}gb", 4, 4, m4, 1, _E["NVML_GPU_INSTANCE_PROFILE_4_SLICE"], 5, (1,)),
        MigProfile(f"7g.{gb8}gb", 7, 8, m8, 1, _E["NVML_GPU_INSTANCE_PROFILE_7_SLICE"], 0, (0,)),
    )


# product name -> (its profiles, the GPU's memory in MiB as nvmlDeviceGetMemoryInfo gives it)
PROFILE_TABLES: Tuple[Tuple[Any, Tuple[MigProfile, ...], int], ...] = (
    (re.compile(r"\bH100\b.*\b80GB\b"), _table(10, 20, 40, 80, (10112, 20224, 40448, 81152)),
     81559),
    (re.compile(r"\bH200\b"), _table(18, 35, 71, 141, (17920, 35840, 71808, 143616)), 143771),
    (re.compile(r"\bA100\b.*\b80GB\b"), _table(10, 20, 40, 80, (9856, 19968, 40192, 80896)),
     81920),
    (re.compile(r"\bA100\b"), _table(5, 10, 20, 40, (4864, 9984, 20096, 40192)), 40960),
)


def profiles_for(model: str) -> Optional[Tuple[Tuple[MigProfile, ...], int]]:
    """(profiles, memory MiB) of a product name, None: no MIG in the simulator for it."""
    for pattern, profiles, total in PROFILE_TABLES:
        if pattern.search(model or ""):
            return profiles, total
    return None


# one compute instance spanning its GPU instance: no "1c.3g.40gb" forms
PROFILE_RE = re.compile(r"^([1-7])g\.([1-9]\d{0,3})gb(?:\+me)?$")


# ----------------------------------------------------------------------- the scenario side
@dataclass(frozen=True)
class MigSpec:
    """One simulated MIG instance (a GPU instance with one compute instance)."""
    gpu: int
    gi_id: int
    profile: MigProfile
    uuid: str
    utilization: Optional[float] = None   # percent busy; None: the parent GPU's
    memory_used_mib: float = 0.0
    until: Optional[float] = None         # destroyed at this time of the cycle
    ci_id: int = 0

    @property
    def key(self) -> str:
        return f"{self.gpu}/{self.gi_id}/{self.ci_id}"

    def alive(self, t: float, period: Optional[float]) -> bool:
        if self.until is None:
            return True
        te = t % period if period else t
        return te < self.until


MIG_KEYS = {
    "gpu": ("int", "GPU index (required)."),
    "profile": ("str", "GPU instance profile, e.g. \"1g.10gb\" (required)."),
    "count": ("int", "How many instances of this profile (default 1)."),
    "gi_id": ("int", "GPU instance id (only with count = 1; default: as nvidia-smi gives)."),
    "uuid": ("str", "\"MIG-...\" (only with count = 1; default derived)."),
    "utilization": ("number", "Percent of time the instance is busy (default: the GPU's)."),
    "memory_used_mib": ("number", "Memory used in the instance, MiB (default 0)."),
    "until": ("number", "Seconds into the cycle at which the instance is destroyed."),
}


def _custom_profile(name: str) -> MigProfile:
    """A profile named in the standard form that the model's table lacks (a captured node's):
    slices and memory from its name."""
    m = PROFILE_RE.match(name)
    g, gb = int(m.group(1)), int(m.group(2))
    enum = {1: 0x0, 2: 0x1, 3: 0x2, 4: 0x3, 7: 0x4, 8: 0x5, 6: 0x6}.get(g, 0x0)
    return MigProfile(name, g, 0, gb * 1024, GPU_SLICES, enum, 100 + g, ())


def parse_mig(v: Any, data: Mapping[str, Any], gpus: List[Dict[str, Any]],
              scenario_name: str) -> Tuple[Tuple[MigSpec, ...], ...]:
    """The [[mig]] tables, per GPU. A GPU with instances gets mig_mode = true unless its
    [[gpu]] or [gpu_defaults] sets mig_mode. Errors through the validator `v` (file, line)."""
    raw = data.get("mig", [])
    out: List[List[MigSpec]] = [[] for _ in gpus]
    pending: List[Tuple[int, int, Optional[int], MigSpec]] = []
    if not isinstance(raw, list):
        v.fail("mig must be an array of tables: [[mig]]", "mig")
    for occ, entry in enumerate(raw):
        where = f"mig[{occ}]"

        def bad(msg: str, key: Optional[str] = None):
            sep = " " if msg.startswith("=") else ": "
            v.fail(f"{where}{'.' + key if key else ''}{sep}{msg}", "mig", key, True, occ)

        if not isinstance(entry, dict):
            bad("must be a table")
        for key, value in entry.items():
            if key not in MIG_KEYS:
                bad("unknown key; allowed keys: " + ", ".join(sorted(MIG_KEYS)), key)
            kind = MIG_KEYS[key][0]
            ok = (isinstance(value, str) if kind == "str" else
                  isinstance(value, int) and not isinstance(value, bool) if kind == "int" else
                  isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                bad(f"= {value!r}: wrong type; expected "
                    f"{ {'str': 'a string', 'int': 'an integer', 'number': 'a number'}[kind]}",
                    key)
        for key in ("gpu", "profile"):
            if key not in entry:
                bad(f"{key} is required")
        gpu, name = entry["gpu"], entry["profile"]
        if not 0 <= gpu < len(gpus):
            bad(f"= {gpu}: out of range; node.gpu_count is {len(gpus)}", "gpu")
        model = gpus[gpu]["name"]
        table = profiles_for(model)
        if table is None:
            bad(f"GPU {gpu} ({model}) has no MIG in the simulator; MIG models: H100 80GB, "
                "H200, A100 80GB, A100 40GB", "gpu")
        profile = next((p for p in table[0] if p.name == name), None)
        if profile is None and not PROFILE_RE.match(name if isinstance(name, str) else ""):
            bad(f"= {name!r}: not a MIG profile of {model}; allowed: "
                + ", ".join(p.name for p in table[0]), "profile")
        count = entry.get("count", 1)
        if not 1 <= count <= GPU_SLICES:
            bad(f"= {count}: out of range; allowed 1..{GPU_SLICES}", "count")
        if count > 1 and ("gi_id" in entry or "uuid" in entry):
            bad("gi_id and uuid name one instance; use count = 1", "count")
        util = entry.get("utilization")
        if util is not None and not 0 <= util <= 100:
            bad(f"= {util}: out of range; allowed 0..100", "utilization")
        until = entry.get("until")
        if until is not None and not (until > 0 and math.isfinite(until)):
            bad(f"= {until}: must be a number of seconds above 0", "until")
        gi_set = entry.get("gi_id")
        if gi_set is not None and not 0 <= gi_set <= 31:
            bad(f"= {gi_set}: out of range; allowed 0..31", "gi_id")
        uuid = entry.get("uuid")
        if uuid is not None and not uuid.startswith("MIG-"):
            bad(f"= {uuid!r}: a MIG UUID starts with \"MIG-\"", "uuid")
        for _k in range(count):
            prof = profile or _custom_profile(name)
            used = entry.get("memory_used_mib", 0.0)
            if not 0 <= used <= prof.memory_mib:
                bad(f"= {used}: out of range; a {name} instance has {prof.memory_mib} MiB",
                    "memory_used_mib")
            pending.append((gpu, occ, entry.get("gi_id"), MigSpec(
                gpu=gpu, gi_id=-1, profile=prof, utilization=util,
                memory_used_mib=float(used), until=until, uuid=uuid or "")))
    # GPU instance ids: the ones set first, then the rest as nvidia-smi gives them on an empty
    # GPU, the largest profiles first (a 4g takes GI 1, then a 3g GI 2)
    seen: Dict[Tuple[int, str], int] = {}
    for gpu, occ, _gi, spec in pending:
        n = seen[(gpu, spec.profile.name)] = seen.get((gpu, spec.profile.name), 0) + 1
        if n > spec.profile.max_count:
            v.fail(f"mig[{occ}]: GPU {gpu} would have {n} x {spec.profile.name}; at most "
                   f"{spec.profile.max_count} fit on one GPU", "mig", "profile", True, occ)
    pending.sort(key=lambda p: (p[2] is None, -p[3].profile.slices))
    for gpu, occ, gi, spec in pending:
        taken = [s.gi_id for s in out[gpu]]
        if gi is None:
            ids = spec.profile.gi_ids
            if not ids:                       # a profile from its name: any free id
                ids = tuple(range(1, 15))
            gi = next((i for i in ids if i not in taken), None)
            if gi is None:
                v.fail(f"mig[{occ}].profile: no free GPU instance id left on GPU {gpu} for "
                       f"{spec.profile.name}; set gi_id", "mig", "profile", True, occ)
        elif gi in taken:
            v.fail(f"mig[{occ}].gi_id = {gi}: GPU {gpu} already has GPU instance {gi}", "mig",
                   "gi_id", True, occ)
        out[gpu].append(dataclasses.replace(spec, gi_id=gi, uuid=spec.uuid or "MIG-" + str(
            uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"gpucostd-sim:{scenario_name}:{gpu}:{gi}"))))
    uuids: Dict[str, str] = {}
    for specs in out:
        for spec in specs:
            if spec.uuid in uuids:
                v.fail(f"mig: instances {uuids[spec.uuid]} and {spec.key} have the same uuid "
                       f"{spec.uuid}; every MIG instance needs its own", "mig", "uuid", True, 0)
            uuids[spec.uuid] = spec.key
    for gpu, specs in enumerate(out):
        if not specs:
            continue
        slices = sum(s.profile.slices for s in specs)
        eighths = sum(s.profile.eighths for s in specs)
        if slices > GPU_SLICES or eighths > 8:
            v.fail(f"mig: GPU {gpu}'s instances take {slices} of {GPU_SLICES} compute slices "
                   f"and {eighths} of 8 memory slices; they do not fit on one GPU", "mig",
                   None, True, 0)
        explicit = "mig_mode" in (data.get("gpu_defaults") or {}) or any(
            isinstance(e, dict) and e.get("index") == gpu and "mig_mode" in e
            for e in data.get("gpu") or [])
        if not explicit:
            gpus[gpu]["mig_mode"] = True
        specs.sort(key=lambda s: s.gi_id)
    return tuple(tuple(s) for s in out)


def _spec(mig: Tuple[Tuple[MigSpec, ...], ...], key: str) -> Optional[MigSpec]:
    g, gi, ci = (int(x) for x in key.split("/"))
    return next((s for s in (mig[g] if g < len(mig) else ()) if (s.gi_id, s.ci_id) == (gi, ci)),
                None)


def check_serving_instances(v: Any, serving: Any, mig: Tuple[Tuple[MigSpec, ...], ...]) -> None:
    """Every instance a [[serving.endpoint]] names is a [[mig]] instance."""
    for occ, ep in enumerate(serving.endpoints if serving is not None else ()):
        for key in ep.instances or ():
            if _spec(mig, key) is None:
                have = ", ".join(s.key for specs in mig for s in specs) or "none"
                v.fail(f"serving.endpoint[{occ}].instances: {key} is not a [[mig]] instance; "
                       f"the scenario has: {have}", "serving.endpoint", "instances", True, occ)


def instance_endpoint_rate(serving: Any, ep: Any, mig: Tuple[Tuple[MigSpec, ...], ...],
                           state_of: Any, t: float) -> float:
    """Tokens/s at time t (within a cycle) of an endpoint on MIG instances: each instance
    generates its share of its GPU's rate (slices / 7) at its own utilization and the GPU's
    clock (the physics' phases); a destroyed one (`until`) none."""
    total = 0.0
    for key in ep.instances:
        spec = _spec(mig, key)
        if spec is None or not spec.alive(t, None):
            continue
        st = dict(state_of(spec.gpu))
        if spec.utilization is not None:
            st["utilization"] = spec.utilization
        total += serving.state_rate(st) * spec.profile.slices / GPU_SLICES
    return total


# ----------------------------------------------------------------------- the NVML side
_SUCCESS, _INVALID_ARGUMENT, _NOT_SUPPORTED, _NO_PERMISSION, _NOT_FOUND = 0, 2, 3, 4, 6
_VERSION_MISMATCH = 25


def _put(addr: Optional[int], ctype: Any, value: Any) -> None:
    if not addr:
        raise DeviceFault(_INVALID_ARGUMENT)
    ctype.from_address(addr).value = value


class MigCalls:
    """The MIG symbols of SimulatedNode (``_c_<symbol>``). Needs the node's ``_dev``,
    ``_check_init``, ``_unsupported``, ``scenario``, ``_gpm_samples`` and ``_gpm_lock``."""

    # ---- helpers
    def _mig_specs(self, index: int) -> Tuple[MigSpec, ...]:
        mig = getattr(self.scenario, "mig", ())
        return mig[index] if index < len(mig) else ()

    def _mig_gpu(self, h) -> Tuple[int, float, Dict[str, Any], Tuple[MigProfile, ...], int]:
        """A GPU handle with MIG: (index, t, state, profiles, memory MiB); raises the node's
        DeviceFault NOT_SUPPORTED where the GPU has none."""
        index, t, st = self._dev(h, "mig")
        table = profiles_for(st["name"])
        if table is None:
            raise self._fault(_NOT_SUPPORTED)
        return index, t, st, table[0], table[1]

    def _fault(self, code: int) -> Exception:
        return DeviceFault(code)

    def _alive(self, index: int, t: float, st: Dict[str, Any]) -> List[MigSpec]:
        if not st.get("mig_mode"):
            return []
        period = self.scenario.repeat_every
        return [s for s in self._mig_specs(index) if s.alive(t, period)]

    @staticmethod
    def _is_mig_handle(h) -> bool:
        return bool(h) and MIG_HANDLE_BASE < h < GI_HANDLE_BASE

    def _mig(self, h) -> Tuple[int, float, Dict[str, Any], MigSpec]:
        """A MIG device handle: (GPU index, t, the GPU's state, the instance); an instance
        destroyed since (or MIG turned off) makes the handle invalid, as in NVML."""
        if not self._is_mig_handle(h):
            self._check_init()
            raise self._fault(_INVALID_ARGUMENT)
        index, k = divmod(h - MIG_HANDLE_BASE - 1, _PER_GPU)
        _i, t, st = self._dev(index + 1, "mig")
        specs = self._mig_specs(index)
        if k >= len(specs) or specs[k] not in self._alive(index, t, st):
            raise self._fault(_INVALID_ARGUMENT)
        return index, t, st, specs[k]

    # ---- the GPU's MIG mode and its MIG devices
    def _c_nvmlDeviceGetMigMode(self, h, current, pending) -> int:
        _i, _t, st, _p, _m = self._mig_gpu(h)
        mode = bool(st.get("mig_mode"))
        later = st.get("mig_mode_pending")
        _put(current, c_uint, int(mode))
        _put(pending, c_uint, int(mode if later is None else later))
        return _SUCCESS

    def _c_nvmlDeviceGetMaxMigDeviceCount(self, h, out) -> int:
        if self._is_mig_handle(h):
            self._mig(h)
            return _INVALID_ARGUMENT
        index, t, st = self._dev(h)
        on = profiles_for(st["name"]) is not None and "mig" not in self._unsupported(st) \
            and st.get("mig_mode")
        _put(out, c_uint, GPU_SLICES if on else 0)
        return _SUCCESS

    def _c_nvmlDeviceGetMigDeviceHandleByIndex(self, h, k, out) -> int:
        index, t, st, _p, _m = self._mig_gpu(h)
        if not st.get("mig_mode"):
            return _NOT_SUPPORTED
        alive = self._alive(index, t, st)
        if k >= len(alive):
            return _NOT_FOUND if k < GPU_SLICES else _INVALID_ARGUMENT
        pos = self._mig_specs(index).index(alive[k])
        _put(out, c_void_p, MIG_HANDLE_BASE + index * _PER_GPU + pos + 1)
        return _SUCCESS

    def _c_nvmlDeviceIsMigDeviceHandle(self, h, out) -> int:
        if self._is_mig_handle(h):
            self._mig(h)
            _put(out, c_uint, 1)
        else:
            self._dev(h)
            _put(out, c_uint, 0)
        return _SUCCESS

    def _c_nvmlDeviceGetGpuInstanceId(self, h, out) -> int:
        if not self._is_mig_handle(h):
            self._dev(h)
            return _NOT_SUPPORTED
        _put(out, c_uint, self._mig(h)[3].gi_id)
        return _SUCCESS

    def _c_nvmlDeviceGetComputeInstanceId(self, h, out) -> int:
        if not self._is_mig_handle(h):
            self._dev(h)
            return _NOT_SUPPORTED
        _put(out, c_uint, self._mig(h)[3].ci_id)
        return _SUCCESS

    def _c_nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h, out) -> int:
        if not self._is_mig_handle(h):
            self._dev(h)
            return _NOT_SUPPORTED
        index = self._mig(h)[0]
        _put(out, c_void_p, index + 1)
        return _SUCCESS

    def mig_uuid(self, h, buf, length) -> int:
        """nvmlDeviceGetUUID on a MIG handle (gpucostd.sim.nvml hands it here)."""
        data = self._mig(h)[3].uuid.encode() + b"\0"
        if not buf:
            return _INVALID_ARGUMENT
        if len(data) > length:
            return 7                        # NVML_ERROR_INSUFFICIENT_SIZE
        ctypes.memmove(buf, data, len(data))
        return _SUCCESS

    def _c_nvmlDeviceGetMemoryInfo(self, h, out) -> int:
        if self._is_mig_handle(h):
            _i, _t, _st, spec = self._mig(h)
            total = spec.profile.memory_mib * _MIB
            used = int(spec.memory_used_mib * _MIB)
        else:
            index, t, st, _p, memory = self._mig_gpu(h)
            total = memory * _MIB
            used = int(sum(s.memory_used_mib for s in self._alive(index, t, st)) * _MIB)
        if not out:
            return _INVALID_ARGUMENT
        mem = Memory.from_address(out)
        mem.total, mem.used, mem.free = total, used, max(0, total - used)
        return _SUCCESS

    def _c_nvmlDeviceGetAttributes_v2(self, h, out) -> int:
        if not self._is_mig_handle(h):
            self._dev(h)
            return _NOT_SUPPORTED
        _i, _t, _st, spec = self._mig(h)
        if not out:
            return _INVALID_ARGUMENT
        a, p = DeviceAttributes.from_address(out), spec.profile
        a.multiprocessorCount = p.slices * SMS_PER_SLICE
        a.sharedCopyEngineCount = p.slices
        a.sharedDecoderCount = p.slices
        a.sharedEncoderCount = 0
        a.sharedJpegCount = 1 if p.slices >= 4 else 0
        a.sharedOfaCount = 1 if p.slices >= 7 else 0
        a.gpuInstanceSliceCount = p.slices
        a.computeInstanceSliceCount = p.slices
        a.memorySizeMB = p.memory_mib
        return _SUCCESS

    # ---- profiles and GPU instances
    def _profile_info(self, h, profile: int, addr: int, v2: bool) -> int:
        index, _t, st, profiles, _m = self._mig_gpu(h)
        if not addr:
            return _INVALID_ARGUMENT
        cls = GpuInstanceProfileInfoV2 if v2 else GpuInstanceProfileInfo
        info = cls.from_address(addr)
        if v2 and info.version != PROFILE_INFO_V2_VERSION:
            return _VERSION_MISMATCH
        if profile >= GI_PROFILE_ENUM["NVML_GPU_INSTANCE_PROFILE_COUNT"]:
            return _INVALID_ARGUMENT
        p = next((p for p in profiles if p.nvml_profile == profile), None)
        if p is None:
            return _NOT_SUPPORTED
        info.id, info.isP2pSupported, info.sliceCount = p.profile_id, 0, p.slices
        info.instanceCount = p.max_count
        info.multiprocessorCount = p.slices * SMS_PER_SLICE
        info.copyEngineCount, info.decoderCount, info.encoderCount = p.slices, p.slices, 0
        info.jpegCount = 1 if p.slices >= 4 else 0
        info.ofaCount = 1 if p.slices >= 7 else 0
        info.memorySizeMB = p.memory_mib
        if v2:
            info.name = ("MIG " + p.name).encode()
        return _SUCCESS

    def _c_nvmlDeviceGetGpuInstanceProfileInfo(self, h, profile, out) -> int:
        return self._profile_info(h, profile, out, False)

    def _c_nvmlDeviceGetGpuInstanceProfileInfoV(self, h, profile, out) -> int:
        return self._profile_info(h, profile, out, True)

    def _c_nvmlDeviceGetGpuInstanceById(self, h, gi_id, out) -> int:
        index, t, st, _p, _m = self._mig_gpu(h)
        if not st.get("mig_mode"):
            return _NOT_SUPPORTED
        if not st["setters_permitted"]:        # "Requires privileged user" (nvml.h)
            return _NO_PERMISSION
        if not any(s.gi_id == gi_id for s in self._alive(index, t, st)):
            return _NOT_FOUND
        _put(out, c_void_p, GI_HANDLE_BASE + index * _PER_GPU + gi_id + 1)
        return _SUCCESS

    def _c_nvmlGpuInstanceGetInfo(self, gi, out) -> int:
        self._check_init()
        if not gi or not GI_HANDLE_BASE < gi < GI_HANDLE_BASE + _PER_GPU * 64 or not out:
            return _INVALID_ARGUMENT
        index, gi_id = divmod(gi - GI_HANDLE_BASE - 1, _PER_GPU)
        _i, t, st = self._dev(index + 1, "mig")
        spec = next((s for s in self._alive(index, t, st) if s.gi_id == gi_id), None)
        if spec is None:
            return _INVALID_ARGUMENT
        info = GpuInstanceInfo.from_address(out)
        info.device, info.id, info.profileId = index + 1, gi_id, spec.profile.profile_id
        info.placement.start = sum(s.profile.eighths for s in self._mig_specs(index)
                                   if s.gi_id < gi_id) % 8
        info.placement.size = spec.profile.eighths
        return _SUCCESS

    # ---- per-instance GPU Performance Monitoring
    def _c_nvmlGpmMigSampleGet(self, h, gi_id, sample) -> int:
        from gpucostd.sim.gpm import gpm_supported
        index, t, st, _p, _m = self._mig_gpu(h)
        if not gpm_supported(st, self._unsupported(st)):
            return _NOT_SUPPORTED
        spec = next((s for s in self._alive(index, t, st) if s.gi_id == gi_id), None)
        if spec is None:
            return _INVALID_ARGUMENT
        with self._gpm_lock:
            s = self._gpm_samples().get(sample or 0)
        if s is None:
            return _INVALID_ARGUMENT
        s.index, s.t, s.integrals = ("mig", index, gi_id), t, self.mig_activity_integrals(
            index, spec, t)
        return _SUCCESS

    def mig_activity_integrals(self, index: int, spec: MigSpec, t: float) -> List[float]:
        """The instance's GPM activity integrals at t: the physics of its parent's state with
        the instance's own utilization (its share of time busy), exact like the GPU's."""
        from gpucostd.sim import physics as phys
        cache = self.__dict__.setdefault("_mig_activity", {})
        pieces = cache.get((index, spec.gi_id))
        if pieces is None:
            sc = self.scenario
            starts, states = sc._seg_starts[index], sc._seg_states[index]
            acts = []
            for state in states:
                st = dict(state)
                if spec.utilization is not None:
                    st["utilization"] = spec.utilization
                acts.append(phys.state_activity(st, sc.physics))
            pieces = cache[(index, spec.gi_id)] = [
                phys.Piecewise(starts, [a[name] for a in acts], sc.repeat_every)
                for name in phys.ACTIVITY_NAMES]
        return [p.integral(t) for p in pieces]
