"""GPU Performance Monitoring (GPM) of the simulated NVML: the nvmlGpm* calls below pynvml.

A mixin of ``SimulatedNode`` (gpucostd.sim.nvml): the C symbols of nvml.h's GPM API with its
struct layouts (tests/test_nvml_header.py checks both against the real header):

- ``nvmlGpmQueryDeviceSupport(device, nvmlGpmSupport_t *)``: ``isSupportedDevice`` 1 on
  Hopper and later (the GPU's name: H100, H200, H20, GH200, B200, GB200, ...), 0 on older GPUs
  (A100, L40S, ...) or where the scenario lists ``unsupported = ["gpm"]``;
- ``nvmlGpmSampleAlloc(nvmlGpmSample_t *)`` / ``nvmlGpmSampleFree(nvmlGpmSample_t)``: an opaque
  sample buffer;
- ``nvmlGpmSampleGet(device, sample)``: records the GPU and the scenario's exact activity
  integrals at that moment (NOT_SUPPORTED where GPM is not);
- ``nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *)``: for each requested ``metricId`` the mean of
  that activity between ``sample1`` and ``sample2``, in percent as NVML gives it, with its own
  ``nvmlReturn`` (NOT_SUPPORTED for a metric the simulator does not model: PCIe, NVLink, C2C,
  video engines, integer pipe) and its ``metricInfo`` names.

The activity follows the physics (gpucostd.sim.physics: PowerModel.activity), so a GPU at 95%
GPU-Util serving decode-heavy traffic reads about 31% SM activity.
"""
from __future__ import annotations

import ctypes
import re
import threading
from ctypes import Structure, c_char_p, c_double, c_int, c_uint, c_void_p
from typing import Any, Dict, List, Optional, Tuple

from gpucostd.sim.physics import ACTIVITY_NAMES

NVML_GPM_METRIC_MAX = 477
NVML_GPM_METRICS_GET_VERSION = 1
NVML_GPM_SUPPORT_VERSION = 1
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25

# metric id (nvmlGpmMetricId_t) -> (its nvml.h name, the physics' activity, or None: modelled
# as 0 -- the simulated LLM work does no FP64 -- , short name, long name)
GPM_METRICS: Dict[int, Tuple[str, Optional[str], str, str]] = {
    1: ("NVML_GPM_METRIC_GRAPHICS_UTIL", "graphics", "gr_util", "graphics utilization"),
    2: ("NVML_GPM_METRIC_SM_UTIL", "sm", "sm_util", "SM utilization"),
    3: ("NVML_GPM_METRIC_SM_OCCUPANCY", "sm_occupancy", "sm_occupancy", "SM occupancy"),
    5: ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "tensor", "any_tensor_util",
        "any tensor utilization"),
    6: ("NVML_GPM_METRIC_DFMA_TENSOR_UTIL", None, "dfma_tensor_util", "DFMA tensor utilization"),
    7: ("NVML_GPM_METRIC_HMMA_TENSOR_UTIL", "tensor_hmma", "hmma_tensor_util",
        "HMMA tensor utilization"),
    8: ("NVML_GPM_METRIC_DMMA_TENSOR_UTIL", None, "dmma_tensor_util", "DMMA tensor utilization"),
    9: ("NVML_GPM_METRIC_IMMA_TENSOR_UTIL", "tensor_imma", "imma_tensor_util",
        "IMMA tensor utilization"),
    10: ("NVML_GPM_METRIC_DRAM_BW_UTIL", "dram", "dram_bw_util", "DRAM bandwidth utilization"),
    11: ("NVML_GPM_METRIC_FP64_UTIL", None, "fp64_util", "FP64 utilization"),
    12: ("NVML_GPM_METRIC_FP32_UTIL", "fp32", "fp32_util", "FP32 utilization"),
    13: ("NVML_GPM_METRIC_FP16_UTIL", "fp16", "fp16_util", "FP16 utilization"),
}
GPM_CONSTANTS: Dict[str, int] = dict(
    {name: mid for mid, (name, *_rest) in GPM_METRICS.items()},
    NVML_GPM_METRIC_MAX=NVML_GPM_METRIC_MAX,
    NVML_GPM_METRICS_GET_VERSION=NVML_GPM_METRICS_GET_VERSION,
    NVML_GPM_SUPPORT_VERSION=NVML_GPM_SUPPORT_VERSION,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH=NVML_ERROR_ARGUMENT_VERSION_MISMATCH)

# Hopper and later by product name (GPM exists there only).
GPM_NAME_RE = re.compile(r"\b(G?H\d{2,3}|G?B\d{2,3}|RTX PRO \d+ Blackwell)\b")


# ----------------------------------------------------------------------- nvml.h structs
class GpmMetricInfo(Structure):      # the anonymous metricInfo struct of nvmlGpmMetric_t
    _fields_ = [("shortName", c_char_p), ("longName", c_char_p), ("unit", c_char_p)]


class GpmMetric(Structure):          # nvmlGpmMetric_t
    _fields_ = [("metricId", c_uint), ("nvmlReturn", c_int), ("value", c_double),
                ("metricInfo", GpmMetricInfo)]


class GpmMetricsGet(Structure):      # nvmlGpmMetricsGet_t
    _fields_ = [("version", c_uint), ("numMetrics", c_uint), ("sample1", c_void_p),
                ("sample2", c_void_p), ("metrics", GpmMetric * NVML_GPM_METRIC_MAX)]


class GpmSupport(Structure):         # nvmlGpmSupport_t
    _fields_ = [("version", c_uint), ("isSupportedDevice", c_uint)]


_P, _U = c_void_p, c_uint
GPM_SYMBOLS: Dict[str, Tuple[Any, Tuple[Any, ...]]] = {
    "nvmlGpmQueryDeviceSupport": (c_int, (_P, _P)),
    "nvmlGpmSampleAlloc": (c_int, (_P,)),
    "nvmlGpmSampleFree": (c_int, (_P,)),
    "nvmlGpmSampleGet": (c_int, (_P, _P)),
    "nvmlGpmMetricsGet": (c_int, (_P,)),
}

_SUCCESS, _INVALID_ARGUMENT, _NOT_SUPPORTED = 0, 2, 3
_UNIT = ctypes.create_string_buffer(b"%")
_NAMES = {mid: (ctypes.create_string_buffer(short.encode()),
                ctypes.create_string_buffer(long_.encode()))
          for mid, (_n, _a, short, long_) in GPM_METRICS.items()}


def gpm_supported(state: Dict[str, Any], unsupported: Any) -> bool:
    """Whether a simulated GPU has GPM: Hopper or later by name, and not listed
    unsupported."""
    return "gpm" not in unsupported and bool(GPM_NAME_RE.search(state.get("name") or ""))


class _Sample:
    __slots__ = ("buffer", "index", "t", "integrals")

    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(16)   # what the handle points at
        self.index: Optional[int] = None
        self.t = 0.0
        self.integrals: List[float] = []


class GpmCalls:
    """The GPM symbols of SimulatedNode (``_c_<symbol>``). Needs the node's ``_dev``,
    ``_unsupported``, ``_check_init`` and ``activity_integrals``."""

    _gpm_lock = threading.Lock()

    def _gpm_samples(self) -> Dict[int, _Sample]:
        samples = self.__dict__.get("_gpm_sample_map")
        if samples is None:
            samples = self.__dict__["_gpm_sample_map"] = {}
        return samples

    def _c_nvmlGpmQueryDeviceSupport(self, h, out) -> int:
        _index, _t, st = self._dev(h)
        if not out:
            return _INVALID_ARGUMENT
        sup = GpmSupport.from_address(out)
        if sup.version != NVML_GPM_SUPPORT_VERSION:
            return NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        sup.isSupportedDevice = 1 if gpm_supported(st, self._unsupported(st)) else 0
        return _SUCCESS

    def _c_nvmlGpmSampleAlloc(self, out) -> int:
        if not out:
            return _INVALID_ARGUMENT
        sample = _Sample()
        addr = ctypes.addressof(sample.buffer)
        with self._gpm_lock:
            self._gpm_samples()[addr] = sample
        c_void_p.from_address(out).value = addr
        return _SUCCESS

    def _c_nvmlGpmSampleFree(self, sample) -> int:
        with self._gpm_lock:
            gone = self._gpm_samples().pop(sample or 0, None)
        return _SUCCESS if gone is not None else _INVALID_ARGUMENT

    def _c_nvmlGpmSampleGet(self, h, sample) -> int:
        index, t, st = self._dev(h)
        if not gpm_supported(st, self._unsupported(st)):
            return _NOT_SUPPORTED
        with self._gpm_lock:
            s = self._gpm_samples().get(sample or 0)
        if s is None:
            return _INVALID_ARGUMENT
        s.index, s.t, s.integrals = index, t, self.activity_integrals(index, t)
        return _SUCCESS

    def _c_nvmlGpmMetricsGet(self, addr) -> int:
        self._check_init()
        if not addr:
            return _INVALID_ARGUMENT
        mg = GpmMetricsGet.from_address(addr)
        if mg.version != NVML_GPM_METRICS_GET_VERSION:
            return NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        if mg.numMetrics > NVML_GPM_METRIC_MAX:
            return _INVALID_ARGUMENT
        with self._gpm_lock:
            s1 = self._gpm_samples().get(mg.sample1 or 0)
            s2 = self._gpm_samples().get(mg.sample2 or 0)
        if s1 is None or s2 is None or s1.index is None or s2.index is None \
                or s1.index != s2.index or s2.t <= s1.t:
            return _INVALID_ARGUMENT      # two samples of one GPU, the second one later
        span = s2.t - s1.t
        for k in range(mg.numMetrics):
            m = mg.metrics[k]
            spec = GPM_METRICS.get(m.metricId)
            if spec is None:
                m.nvmlReturn = _NOT_SUPPORTED if 0 < m.metricId < NVML_GPM_METRIC_MAX \
                    else _INVALID_ARGUMENT
                m.value = 0.0
                continue
            name = spec[1]
            if name is None:
                value = 0.0
            else:
                j = ACTIVITY_NAMES.index(name)
                value = (s2.integrals[j] - s1.integrals[j]) / span * 100.0
            m.nvmlReturn = _SUCCESS
            m.value = min(100.0, max(0.0, value))
            short, long_ = _NAMES[m.metricId]
            m.metricInfo.shortName = ctypes.addressof(short)
            m.metricInfo.longName = ctypes.addressof(long_)
            m.metricInfo.unit = ctypes.addressof(_UNIT)
        return _SUCCESS
