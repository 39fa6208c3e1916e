"""GPU Performance Monitoring reads of the NVML gateway (gpucostd.hw.nvml calls these on a GPU's
worker, inside its device read and under its deadline). No pynvml import here: the gateway
passes its pynvml module in.

One GPM sample per GPU per cycle: the metrics of a cycle come from the previous cycle's sample
and this one (nvmlGpmMetricsGet over the two), so the first cycle after a start or a re-init
has none. Two sample buffers per GPU are allocated once per session and taken in turn (the
older one is filled again), and the nvmlGpmMetricsGet_t request is built once: two NVML calls
per GPU per cycle (sample, metrics), not four. A GPU without GPM (before Hopper; nvmlGpmQueryDeviceSupport says so, or the driver
lacks the calls) is asked once per NVML session and reads None, never 0.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from gpucostd.snapshot import GpuActivity

# GpuActivity field -> nvmlGpmMetricId_t (nvml.h; tests/test_nvml_header.py checks the ids)
GPM_METRIC_IDS: Tuple[Tuple[str, int, str], ...] = (
    ("sm", 2, "NVML_GPM_METRIC_SM_UTIL"),
    ("sm_occupancy", 3, "NVML_GPM_METRIC_SM_OCCUPANCY"),
    ("tensor", 5, "NVML_GPM_METRIC_ANY_TENSOR_UTIL"),
    ("tensor_hmma", 7, "NVML_GPM_METRIC_HMMA_TENSOR_UTIL"),
    ("tensor_imma", 9, "NVML_GPM_METRIC_IMMA_TENSOR_UTIL"),
    ("dram", 10, "NVML_GPM_METRIC_DRAM_BW_UTIL"),
    ("fp16", 13, "NVML_GPM_METRIC_FP16_UTIL"),
    ("fp32", 12, "NVML_GPM_METRIC_FP32_UTIL"),
)


_NEEDS = ("nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc", "nvmlGpmSampleGet",
          "nvmlGpmSampleFree", "nvmlGpmMetricsGet", "c_nvmlGpmMetricsGet_t",
          "NVML_GPM_METRICS_GET_VERSION")


class GpmSession:
    """One GPU's GPM state in one NVML session: supported or not, the previous sample."""

    __slots__ = ("supported", "sample", "spare", "at", "request")

    def __init__(self) -> None:
        self.supported: Optional[bool] = None
        self.sample: Any = None       # the previous cycle's sample
        self.spare: Any = None        # the other buffer, filled next
        self.at = 0.0
        self.request: Any = None      # the prepared nvmlGpmMetricsGet_t

    def drop(self, nv: Any) -> None:
        """Free the held samples (errors ignored: the session may be gone)."""
        for sample in (self.sample, self.spare):
            if sample is not None:
                try:
                    nv.nvmlGpmSampleFree(sample)
                except Exception:  # noqa: BLE001 - freeing is best effort
                    pass
        self.sample = self.spare = None


def read_activity(nv: Any, h: Any, gs: GpmSession, absent: Tuple[int, ...], now: float
                  ) -> Tuple[Optional[bool], Optional[GpuActivity]]:
    """(supported, activity) of one GPU this cycle; `now` the gateway clock's monotonic time
    (the span between samples). `absent`: the NVML return codes that mean
    "no GPM here" (NOT_SUPPORTED, FUNCTION_NOT_FOUND, ...). Raises pynvml's NVMLError for
    anything else (the gateway maps it: lost and timeout end the device read)."""
    if gs.supported is None:
        if not all(hasattr(nv, name) for name in _NEEDS):
            gs.supported = False              # an nvidia-ml-py older than GPM
            return False, None
        try:
            gs.supported = bool(nv.nvmlGpmQueryDeviceSupport(h).isSupportedDevice)
        except nv.NVMLError as exc:
            if getattr(exc, "value", None) not in absent:
                raise
            gs.supported = False
        except (AttributeError, nv.NVMLLibraryMismatchError):
            gs.supported = False              # an nvidia-ml-py or driver without GPM
    if not gs.supported:
        return False, None
    new, gs.spare = gs.spare, None
    if new is None:
        new = nv.nvmlGpmSampleAlloc()
    try:
        nv.nvmlGpmSampleGet(h, new)
    except Exception:
        nv.nvmlGpmSampleFree(new)
        raise
    old, gs.sample = gs.sample, new
    span, gs.at = now - gs.at, now
    if old is None:
        return True, None
    if gs.request is None:
        gs.request = metrics_request(nv)
    try:
        activity = metrics_between(nv, old, new, span, gs.request)
    except Exception:
        nv.nvmlGpmSampleFree(old)
        raise
    gs.spare = old                  # filled again next cycle
    return True, activity


def metrics_request(nv: Any) -> Any:
    """A prepared nvmlGpmMetricsGet_t asking for GPM_METRIC_IDS (reused cycle after cycle)."""
    mg = nv.c_nvmlGpmMetricsGet_t()
    mg.version = nv.NVML_GPM_METRICS_GET_VERSION
    mg.numMetrics = len(GPM_METRIC_IDS)
    for k, (_name, mid, _c) in enumerate(GPM_METRIC_IDS):
        mg.metrics[k].metricId = mid
    return mg


def metrics_between(nv: Any, old: Any, new: Any, span: float, mg: Any = None) -> GpuActivity:
    """The activity between two GPM samples (of a GPU, or of one MIG GPU instance:
    nvmlGpmMigSampleGet), into the prepared request `mg` (a new one when None); the caller
    frees the samples. Raises pynvml's NVMLError."""
    if mg is None:
        mg = metrics_request(nv)
    mg.sample1, mg.sample2 = old, new
    nv.nvmlGpmMetricsGet(mg)
    values = {}
    for k, (name, _mid, _c) in enumerate(GPM_METRIC_IDS):
        m = mg.metrics[k]
        values[name] = (min(1.0, max(0.0, m.value / 100.0)) if m.nvmlReturn == 0 else None)
    return GpuActivity(seconds=span, **values)
