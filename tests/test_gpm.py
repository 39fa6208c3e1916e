"""GPU Performance Monitoring (issue 21): the simulated nvmlGpm* calls checked against the real
nvml.h (symbols, constants, struct layouts), driven through pynvml's own wrappers, and the
gateway's one-sample-per-cycle activity reading (absent, never 0, where GPM is not supported).

A user relies on this to tell GPU-Util (time any kernel ran) from work done: a decode-heavy GPU
at 95% GPU-Util reads about 31% SM activity."""
from __future__ import annotations

import re

import pynvml
import pytest

from gpucostd.clock import VirtualClock
from gpucostd.hw.gpm import GPM_METRIC_IDS
from gpucostd.hw.nvml import NvmlError, NvmlGateway
from gpucostd.probes.gpu import GpuProbe
from gpucostd.sim import physics
from gpucostd.sim.gpm import GPM_METRICS, GpmMetric, GpmMetricsGet, GpmSupport
from gpucostd.sim.nvml import HEADER_CONSTANTS, SYMBOLS, SimulatedNode
from gpucostd.sim.scenario import load_scenario, parse_scenario

from test_nvml_header import HEADER, _strip_comments, parse_constants, parse_struct_fields

A100 = """
[node]
model = "NVIDIA A100-SXM4-80GB"
gpu_count = 2
[gpu_defaults]
utilization = 90
"""


def node_and_gateway(spec="builtin:h100x8"):
    clock = VirtualClock()
    sc = load_scenario(spec) if isinstance(spec, str) else spec
    node = SimulatedNode(sc, clock)
    gw = NvmlGateway(library=node.library, clock=clock)
    assert gw.ensure_initialized(), gw.error
    return node, gw, clock


@pytest.fixture(scope="module")
def header_text():
    if HEADER is None:
        pytest.skip("nvml.h not found: pip install nvidia-nvml-dev")
    with open(HEADER, encoding="utf-8", errors="replace") as fh:
        return fh.read()


# ---------------------------------------------------------------------- against nvml.h
def test_every_gpm_symbol_metric_id_and_constant_is_the_headers(header_text):
    for name in ("nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc", "nvmlGpmSampleFree",
                 "nvmlGpmSampleGet", "nvmlGpmMetricsGet"):
        assert name in SYMBOLS                  # arg counts: test_nvml_header checks SYMBOLS
    consts = parse_constants(header_text)
    for mid, (name, *_rest) in GPM_METRICS.items():
        assert consts.get(name) == mid == HEADER_CONSTANTS[name], name
    for name in ("NVML_GPM_METRIC_MAX", "NVML_GPM_METRICS_GET_VERSION",
                 "NVML_GPM_SUPPORT_VERSION", "NVML_ERROR_ARGUMENT_VERSION_MISMATCH"):
        assert consts.get(name) == HEADER_CONSTANTS[name], name
    # the gateway asks for the ids the header gives those names
    for _field, mid, name in GPM_METRIC_IDS:
        assert consts.get(name) == mid, name


def test_gpm_struct_layouts_match_the_header(header_text):
    assert [f[0] for f in GpmSupport._fields_] == \
        parse_struct_fields(header_text, "nvmlGpmSupport_t")
    assert [f[0] for f in GpmMetricsGet._fields_] == \
        parse_struct_fields(header_text, "nvmlGpmMetricsGet_t")
    # nvmlGpmMetric_t holds a nested struct (metricInfo): read its declarations in order
    body = _strip_comments(header_text)
    end = re.search(r"\}\s*nvmlGpmMetric_t\s*;", body)
    assert end, "nvmlGpmMetric_t not found in nvml.h"
    start = body.rfind("typedef struct", 0, end.start())
    inner = body[body.index("{", start) + 1:end.start()]
    decls = [" ".join(d.split()) for d in re.split(r"[;{}]", inner) if d.strip()]
    assert decls == ["unsigned int metricId", "nvmlReturn_t nvmlReturn", "double value",
                     "struct", "char *shortName", "char *longName", "char *unit",
                     "metricInfo"], decls
    assert [f[0] for f in GpmMetric._fields_] == ["metricId", "nvmlReturn", "value",
                                                 "metricInfo"]
    # and pynvml's own structs (what the gateway fills) have the same sizes as ours
    assert pynvml.c_nvmlGpmMetricsGet_t.metrics.offset == GpmMetricsGet.metrics.offset
    assert pynvml.c_nvmlGpmMetricsGet_t.metrics.size == GpmMetricsGet.metrics.size


# ---------------------------------------------------------------------- through pynvml
def _metrics(gw, index, clock, seconds, ids):
    def run(h):
        a, b = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
        try:
            pynvml.nvmlGpmSampleGet(h, a)
            clock.advance(seconds)
            pynvml.nvmlGpmSampleGet(h, b)
            mg = pynvml.c_nvmlGpmMetricsGet_t()
            mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = len(ids)
            mg.sample1, mg.sample2 = a, b
            for k, mid in enumerate(ids):
                mg.metrics[k].metricId = mid
            pynvml.nvmlGpmMetricsGet(mg)
            return [(mg.metrics[k].nvmlReturn, mg.metrics[k].value,
                     mg.metrics[k].metricInfo.shortName) for k in range(len(ids))]
        finally:
            pynvml.nvmlGpmSampleFree(a)
            pynvml.nvmlGpmSampleFree(b)
    return gw.call(index, "gpm", run)


def test_simulated_gpm_reads_the_physics_between_two_samples():
    node, gw, clock = node_and_gateway()
    sc = node.scenario
    assert gw.call(1, "q", lambda h: pynvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice) == 1
    got = _metrics(gw, 1, clock, 10.0, [2, 3, 5, 7, 9, 10, 12, 13, 1, 20])
    want = sc.physics.activity(1980, 1980, 95, 0.95)
    names = ["sm", "sm_occupancy", "tensor", "tensor_hmma", "tensor_imma", "dram", "fp32",
             "fp16", "graphics"]
    for (code, value, short), name in zip(got, names):
        assert code == 0 and short
        assert value == pytest.approx(100 * want[name])
    assert got[0][1] == pytest.approx(31.35)         # 95% GPU-Util, 31% of the SMs busy
    assert got[-1][0] == 3                            # PCIe: not modelled, NOT_SUPPORTED
    # across GPU 0's thermal slowdown (1410 MHz from t = 20): the exact mean of both
    clock.advance(15.0 - node.now())
    (code, value, _s), = _metrics(gw, 0, clock, 10.0, [10])     # 15..25 s
    hot = sc.physics.activity(1410, 1980, 95, 0.95)["dram"]
    assert value == pytest.approx(100 * (5 * want["dram"] + 5 * hot) / 10)


def test_a_power_cap_set_through_nvml_moves_the_activity_exactly():
    node, gw, clock = node_and_gateway()
    clock.advance(100.0)
    gw.set_power_limit(3, 250)                      # below the decode draw: binds
    (code, value, _s), = _metrics(gw, 3, clock, 10.0, [10])
    st = node.state(3)
    assert st["sm_clock"] < 1980
    want = node.scenario.physics.activity(st["sm_clock"], 1980, 95, 0.95)["dram"]
    assert value == pytest.approx(100 * want, rel=1e-6)


def test_an_a100_has_no_gpm_and_bad_arguments_are_refused():
    node, gw, clock = node_and_gateway(parse_scenario(A100))
    assert gw.call(0, "q", lambda h: pynvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice) == 0
    sample = pynvml.nvmlGpmSampleAlloc()
    with pytest.raises(NvmlError) as e:
        gw.call(0, "s", lambda h: pynvml.nvmlGpmSampleGet(h, sample))
    assert e.value.kind == "not_supported"
    pynvml.nvmlGpmSampleFree(sample)
    # a Hopper GPU listed unsupported says so too
    node, gw, clock = node_and_gateway(parse_scenario(
        '[node]\ngpu_count = 1\n[gpu_defaults]\nunsupported = ["gpm"]\n'))
    assert gw.call(0, "q", lambda h: pynvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice) == 0
    # two samples of different GPUs, or in the wrong order: INVALID_ARGUMENT
    node, gw, clock = node_and_gateway()
    a, b = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    gw.call(0, "s", lambda h: pynvml.nvmlGpmSampleGet(h, a))
    clock.advance(1.0)
    gw.call(1, "s", lambda h: pynvml.nvmlGpmSampleGet(h, b))
    mg = pynvml.c_nvmlGpmMetricsGet_t()
    mg.version, mg.numMetrics, mg.sample1, mg.sample2 = 1, 1, a, b
    mg.metrics[0].metricId = 2
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpmMetricsGet(mg)
    mg.version = 2
    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlGpmMetricsGet(mg)
    pynvml.nvmlGpmSampleFree(a)
    pynvml.nvmlGpmSampleFree(b)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpmSampleFree(a)                 # freed twice


# ---------------------------------------------------------------------- the gateway
def test_the_gateway_reads_activity_from_one_sample_per_cycle():
    node, gw, clock = node_and_gateway()
    probe = GpuProbe(gw)
    first = probe.read()[2]
    assert first.gpm_supported is True and first.activity is None   # one sample so far
    clock.advance(10.0)
    g = probe.read()[2]
    assert g.utilization_percent == 95
    assert g.activity.sm == pytest.approx(0.3135)
    assert g.activity.dram == pytest.approx(0.73625)
    assert g.activity.tensor == pytest.approx(0.11875)
    assert g.activity.tensor_imma == 0.0 and g.activity.seconds == pytest.approx(10.0)
    calls = node.calls["nvmlGpmSampleGet"]
    clock.advance(10.0)
    probe.read()
    assert node.calls["nvmlGpmSampleGet"] == calls + 8      # one sample per GPU per cycle
    assert node.calls["nvmlGpmQueryDeviceSupport"] == 8     # asked once per session
    # two sample buffers per GPU, allocated once per session and filled in turn: no alloc
    # or free per cycle
    clock.advance(10.0)
    assert probe.read()[2].activity.sm == pytest.approx(0.3135)
    assert node.calls["nvmlGpmSampleAlloc"] == 16 and "nvmlGpmSampleFree" not in node.calls


def test_without_gpm_the_activity_is_absent_never_zero():
    node, gw, clock = node_and_gateway(parse_scenario(A100))
    probe = GpuProbe(gw)
    for _ in range(3):
        g = probe.read()[0]
        assert g.gpm_supported is False and g.activity is None
        assert g.utilization_percent == 90          # GPU-Util still there: the fallback
        clock.advance(5.0)
    assert "nvmlGpmSampleGet" not in node.calls


def test_a_lost_gpu_ends_the_read_as_before():
    text = load_scenario("builtin:h100x8").path
    sc = parse_scenario(open(text).read() + "\n[[at]]\nt = 15\ngpu = 5\nlost = true\n")
    node, gw, clock = node_and_gateway(sc)
    probe = GpuProbe(gw)
    probe.read()
    clock.advance(20.0)
    g = probe.read()[5]
    assert g.state.value == "lost" and g.activity is None
    clock.advance(10.0)
    assert probe.read()[4].activity.sm == pytest.approx(0.3135)


def test_an_nvidia_ml_py_without_gpm_reads_everything_else(monkeypatch):
    """An older nvidia-ml-py (no nvmlGpm* wrappers): no activity, the rest of the read as
    before, no error."""
    monkeypatch.delattr(pynvml, "c_nvmlGpmMetricsGet_t")
    node, gw, clock = node_and_gateway()
    probe = GpuProbe(gw)
    for _ in range(2):
        g = probe.read()[1]
        assert g.state.value == "ok" and g.error is None and g.power_draw_watts is not None
        assert g.gpm_supported is False and g.activity is None
        clock.advance(5.0)
    assert "nvmlGpmSampleGet" not in node.calls

