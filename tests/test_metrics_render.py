"""The exposition writer: byte for byte what prometheus_client's generate_latest writes (so
`promtool check metrics` and every scraper see the same text), for a real simulated node and
for the awkward cases (label values with quotes, backslashes and newlines, help text with
them, -0.0, NaN, infinities, large numbers); families outside its plain case fall back to
generate_latest itself."""
from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,  # noqa: E402
                                    HistogramMetricFamily)

from gpucostd import config  # noqa: E402
from gpucostd.loop import Daemon  # noqa: E402
from gpucostd.views import metrics  # noqa: E402


def reference(families):
    return metrics._slow(list(families))


def test_a_real_snapshot_renders_exactly_as_generate_latest(tmp_path):
    cfg = config.parse(f'[daemon]\nstate_dir = "{tmp_path}/state"\nkernel_log = "none"\n'
                       f'socket_path = "{tmp_path}/s.sock"\n[cost]\ngpu_hour_usd = 4.0\n')
    d = Daemon(cfg, simulate="builtin:h100x8", journal=False)
    d.start()
    try:
        for _ in range(25):
            snap = d.step()
    finally:
        d.shutdown()
    families = list(metrics.core_families(snap)) + metrics._part_families(snap)
    text = metrics.render(snap)
    assert text == reference(families)
    assert text.count(b"\ngpucostd_gpu_temperature_celsius{") == 8


def test_awkward_values_render_exactly_as_generate_latest():
    g = GaugeMetricFamily("gpucostd_x", 'help with \\ backslash\nand "quotes"',
                          labels=["gpu", "uuid", "model"])
    for i, v in enumerate((0.0, -0.0, 1.0, -2.5, float("nan"), float("inf"), float("-inf"),
                           1234567.0, 1e21, 0.1, 3, True)):
        g.add_metric([str(i), 'a"b\\c\nd', "NVIDIA H100 80GB HBM3"], v)
    c = CounterMetricFamily("gpucostd_y", "a counter", labels=["gpu"])
    c.add_metric(["0"], 5)
    c.add_metric(["1"], 0)
    empty = GaugeMetricFamily("gpucostd_empty", "no samples")
    plain = CounterMetricFamily("gpucostd_cycles", "Poll cycles.", value=7)
    families = [g, c, empty, plain]
    assert metrics.exposition(families) == reference(families)


def test_other_families_fall_back_to_generate_latest():
    h = HistogramMetricFamily("gpucostd_h", "a histogram", buckets=[("1.0", 1), ("+Inf", 2)],
                              sum_value=3)
    t = GaugeMetricFamily("gpucostd_t", "with a timestamp")
    t.add_metric([], 1, timestamp=1000)
    c = CounterMetricFamily("gpucostd_c", "with created", labels=["gpu"])
    c.add_metric(["0"], 1, created=123.0)
    for families in ([h], [t], [c]):
        assert metrics.exposition(families) == reference(families)
