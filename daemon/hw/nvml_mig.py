"""MIG reads of the NVML gateway (gpucostd.hw.nvml calls ``read_mig`` on a GPU's worker, inside
its device read and under its deadline, so a MIG call that hangs marks the GPU unresponsive as
any other call does). No pynvml import here: the gateway passes its pynvml module in.

Per GPU and cycle: nvmlDeviceGetMigMode (current, pending); with MIG on, every MIG device
(nvmlDeviceGetMaxMigDeviceCount, nvmlDeviceGetMigDeviceHandleByIndex) with its GPU and compute
instance ids, its "MIG-..." UUID and its memory (nvmlDeviceGetMemoryInfo on the MIG handle), its
profile from nvmlDeviceGetAttributes_v2 (slices and memory; no privilege needed, unlike
nvmlDeviceGetGpuInstanceById), and its activity from one GPM sample per GPU instance and cycle
(nvmlGpmMigSampleGet, Hopper and later; the first cycle has none).

A GPU without MIG (NOT_SUPPORTED, or a driver or nvidia-ml-py without the calls) is asked once
per NVML session and reads mig_mode None, never False.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Tuple

from gpucostd.hw.gpm import metrics_between
from gpucostd.snapshot import MigInstance

log = logging.getLogger("gpucostd.nvml")

_NEEDS = ("nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
          "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetGpuInstanceId",
          "nvmlDeviceGetComputeInstanceId")
_NOT_FOUND = 6
_FULL_PROFILES = ("NVML_GPU_INSTANCE_PROFILE_7_SLICE", "NVML_GPU_INSTANCE_PROFILE_4_SLICE")


def profile_name(gi_slices: int, ci_slices: int, memory_mib: int) -> str:
    """NVIDIA's profile name from a MIG device's attributes: "1g.10gb" (memory rounded up to
    whole GiB, as the Kubernetes device plugin names them); a compute instance smaller than
    its GPU instance is "1c.3g.40gb"."""
    name = f"{gi_slices}g.{int(math.ceil(memory_mib / 1024.0))}gb"
    return name if ci_slices in (0, gi_slices) else f"{ci_slices}c.{name}"


class MigSession:
    """One GPU's MIG state in one NVML session: supported or not, the GPU's compute slices,
    the profile of each MIG device by UUID, the previous GPM sample of each GPU instance."""

    __slots__ = ("supported", "gpu_slices", "profiles", "samples")

    def __init__(self) -> None:
        self.supported: Optional[bool] = None
        self.gpu_slices: Optional[int] = None
        self.profiles: Dict[str, Tuple[str, int, Optional[int]]] = {}
        self.samples: Dict[int, Tuple[Any, float]] = {}

    def drop(self, nv: Any, keep: Tuple[int, ...] = ()) -> None:
        """Free the held GPM samples (but those of the GPU instances in `keep`)."""
        for gi in [g for g in self.samples if g not in keep]:
            sample, _at = self.samples.pop(gi)
            try:
                nv.nvmlGpmSampleFree(sample)
            except Exception:  # noqa: BLE001 - freeing is best effort
                pass


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _gpu_slices(nv: Any, h: Any) -> int:
    """Compute slices of the whole GPU: the full profile's sliceCount (7 on A100/H100/H200,
    4 on A30); 7 where the profile cannot be read."""
    for name in _FULL_PROFILES:
        enum = getattr(nv, name, None)
        if enum is None:
            continue
        try:
            return int(nv.nvmlDeviceGetGpuInstanceProfileInfo(h, enum, 1).sliceCount)
        except Exception:  # noqa: BLE001 - NOT_SUPPORTED / NO_PERMISSION: the next one
            continue
    return 7


def read_mig(nv: Any, h: Any, index: int, ms: MigSession, absent: Tuple[int, ...],
             now: float, gpm: Optional[bool]) -> Tuple[Optional[bool], Optional[bool],
                                           Tuple[MigInstance, ...], Dict[str, Any]]:
    """(mig_mode, mig_mode_pending, instances, errors by instance key) of one GPU this cycle.
    `absent`: the return codes that mean "no MIG here"; `gpm`: whether the GPU has GPM (its
    instances' activity is read then). Raises pynvml's NVMLError for a failure of the GPU
    itself (the gateway maps it: lost and timeout end the device read); an instance's own
    reading that fails stays None."""
    if ms.supported is False:
        return None, None, (), {}
    if ms.supported is None and not all(hasattr(nv, name) for name in _NEEDS):
        ms.supported = False                    # an nvidia-ml-py older than MIG
        return None, None, (), {}
    try:
        current, pending = nv.nvmlDeviceGetMigMode(h)
    except nv.NVMLError as exc:
        if getattr(exc, "value", None) not in absent:
            raise
        ms.supported = False
        return None, None, (), {}
    ms.supported = True
    mode, later = current == 1, pending == 1
    if not mode:
        ms.drop(nv)
        return mode, later, (), {}
    if ms.gpu_slices is None:
        ms.gpu_slices = _gpu_slices(nv, h)
    out: List[MigInstance] = []
    errors: Dict[str, Any] = {}
    acts: Dict[int, Any] = {}       # GPU instance -> activity (its compute instances share it)
    for k in range(int(nv.nvmlDeviceGetMaxMigDeviceCount(h))):
        try:
            m = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, k)
        except nv.NVMLError as exc:
            if getattr(exc, "value", None) in (_NOT_FOUND,) + tuple(absent):
                continue                        # none at this index (indexes may have gaps,
                                                # as NVIDIA's device plugin allows for)
            raise
        gi = int(nv.nvmlDeviceGetGpuInstanceId(m))
        ci = int(nv.nvmlDeviceGetComputeInstanceId(m))
        key = f"{index}/{gi}/{ci}"
        uuid = _text(nv.nvmlDeviceGetUUID(m))
        prof = ms.profiles.get(uuid)
        if prof is None:
            try:
                a = nv.nvmlDeviceGetAttributes_v2(m)
                prof = (profile_name(a.gpuInstanceSliceCount, a.computeInstanceSliceCount,
                                     a.memorySizeMB),
                        int(a.computeInstanceSliceCount or a.gpuInstanceSliceCount),
                        int(a.memorySizeMB))
            except (nv.NVMLError, AttributeError) as exc:
                errors[key] = exc
                prof = ("?", 0, None)
            ms.profiles[uuid] = prof
        used = total = None
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(m)
            used, total = int(mem.used), int(mem.total)
        except nv.NVMLError as exc:
            errors[key] = exc
        if gpm and gi not in acts:
            try:
                acts[gi] = _mig_activity(nv, h, gi, ms, now)
            except nv.NVMLError as exc:
                errors[key] = exc
                acts[gi] = None
                ms.drop(nv, tuple(g for g in ms.samples if g != gi))
        out.append(MigInstance(gpu_index=index, gi_id=gi, ci_id=ci, profile=prof[0],
                               slices=prof[1], gpu_slices=ms.gpu_slices, uuid=uuid,
                               memory_used_bytes=used, memory_total_bytes=total,
                               activity=acts.get(gi)))
    ms.drop(nv, tuple(i.gi_id for i in out))   # instances gone: their samples too
    out.sort(key=lambda i: (i.gi_id, i.ci_id))
    return mode, later, tuple(out), errors


def _mig_activity(nv: Any, h: Any, gi: int, ms: MigSession, now: float) -> Any:
    """One GPM sample of GPU instance `gi`; the activity since its previous one (None on the
    first)."""
    held = ms.samples.get(gi)
    new = nv.nvmlGpmSampleAlloc()
    try:
        nv.nvmlGpmMigSampleGet(h, gi, new)
    except Exception:
        nv.nvmlGpmSampleFree(new)
        raise
    ms.samples[gi] = (new, now)
    if held is None:
        return None
    old, at = held
    try:
        return metrics_between(nv, old, new, now - at)
    finally:
        nv.nvmlGpmSampleFree(old)
