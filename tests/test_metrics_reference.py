"""docs/metrics.md and the code keep in step: every family the views can export is in the
reference with its type, and every family in the reference exists; the series count of an
8-GPU node with 4 NICs stays under 1,500 at its worst.

Run as a script to print the figures quoted in docs/metrics.md."""
from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO  # noqa: E402

REFERENCE = REPO / "docs" / "metrics.md"
VIEWS = REPO / "daemon" / "views"


def declared_families():
    """{family name as scraped: type} from the metric modules' source."""
    out = {}
    # the views' metric modules and every other module with metric lines of its own (a room
    # such as calibration/ keeps its families beside its code)
    paths = set(VIEWS.glob("metrics*.py")) | {
        p for p in (REPO / "daemon").rglob("*.py") if "def metric_families(" in p.read_text()}
    for path in sorted(paths):
        src = path.read_text()
        # MetricFamily constructors and helpers called with the family name first
        for func, name in re.findall(r'(\w+)\(\s*"(gpucostd_[a-z0-9_]+)"', src):
            if func == "CounterMetricFamily":
                out[name + "_total"] = "counter"
            else:
                out.setdefault(name, "gauge")
        # tables of (name, help, ...) tuples rendered as gauges in a loop
        for name in re.findall(r'^\s*\(\s*"(gpucostd_[a-z0-9_]+)",', src, re.M):
            out.setdefault(name, "gauge")
    return out


def documented_families():
    """{family: type} from the reference's tables (a row may name several families)."""
    out = {}
    for line in REFERENCE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not cells[0].startswith("`gpucostd_"):
            continue
        for name in re.findall(r"`(gpucostd_[a-z0-9_]+)`", cells[0]):
            out[name] = cells[1]
    return out


def test_every_family_in_the_code_is_documented_with_its_type_and_back():
    code, docs = declared_families(), documented_families()
    assert len(code) > 40
    assert sorted(set(code) - set(docs)) == [], "families exported but not in docs/metrics.md"
    assert sorted(set(docs) - set(code)) == [], "docs/metrics.md documents families not exported"
    wrong = {n: (code[n], docs[n]) for n in code if code[n] != docs[n]}
    assert wrong == {}, "type in docs/metrics.md differs from the code"


def test_families_follow_the_conventions():
    for name, kind in declared_families().items():
        assert name.startswith("gpucostd_")
        assert (kind == "counter") == name.endswith("_total"), name
        assert not re.search(r"_(milliseconds|megahertz|mhz|kilobytes|percent)($|_)", name), name


def worst_case_series(scrape: str):
    """(measured series, worst case with every reason, 5 Xids per GPU and 4 tuned NICs)."""
    from gpucostd.snapshot import CLOCK_EVENT_REASONS
    samples = [ln for ln in scrape.splitlines() if ln and not ln.startswith("#")]
    gpus = len({m for m in re.findall(r'^gpucostd_gpu_info\{.*?gpu="(\d+)"', scrape, re.M)})
    by_reason = ("gpucostd_gpu_throttled_seconds_total",
                 "gpucostd_gpu_throttle_capacity_lost_seconds_total",
                 "gpucostd_gpu_throttle_cost_dollars_total")
    other = [s for s in samples if not s.startswith(by_reason + ("gpucostd_gpu_xid_errors_total",
                                                                 "gpucostd_nic_ring_entries"))]
    reasons = len(CLOCK_EVENT_REASONS)
    nics, queues = 4, 4
    nic_series = nics * (queues * 2           # ring entries, current and max
                         + queues * 4)        # desired, actual, in_sync, drift per ring setting
    worst = len(other) + gpus * reasons * len(by_reason) + gpus * 5 + nic_series
    return len(samples), worst, gpus


@pytest.fixture(scope="module")
def throttled_scrape(tmp_path_factory):
    from conftest import DaemonProcess, builtin_throttled_from, wait_for
    tmp = tmp_path_factory.mktemp("ref")
    # the builtin with GPU 0's throttle from t = 1 s (not 20 s): the by-reason cost families
    # appear then
    (tmp / "throttle-soon.toml").write_text(builtin_throttled_from(1.0))
    d = DaemonProcess(tmp, scenario=str(tmp / "throttle-soon.toml"),
                      extra_config="[tuning.gpu]\npower_limit_watts = 600\n"
                                   "[cost]\ngpu_hour_usd = 2.0\n")
    d.start()
    try:
        wait_for(lambda: "gpucostd_gpu_throttle_cost_dollars_total{" in d.metrics(), 60,
                 interval=0.5, what="GPU 0 throttled and priced")
        yield d.metrics()
    finally:
        d.stop()


def test_every_family_of_a_real_scrape_is_documented(throttled_scrape):
    families = set(re.findall(r"^# TYPE (\S+) ", throttled_scrape, re.M))
    documented = set(documented_families())
    assert sorted(families - documented) == []


def test_series_of_an_8_gpu_node_with_4_nics_stay_under_1500(throttled_scrape):
    measured, worst, gpus = worst_case_series(throttled_scrape)
    assert gpus == 8
    assert measured < worst < 1500, (measured, worst)


def main():  # pragma: no cover - prints the figures of docs/metrics.md
    import tempfile
    from conftest import DaemonProcess, wait_for
    d = DaemonProcess(Path(tempfile.mkdtemp()),
                      extra_config="[tuning.gpu]\npower_limit_watts = 600\n"
                                   "[cost]\ngpu_hour_usd = 2.0\n")
    d.start()
    try:
        wait_for(lambda: "gpucostd_gpu_throttle_cost_dollars_total{" in d.metrics(), 60,
                 interval=0.5)
        text = d.metrics()
    finally:
        d.stop()
    measured, worst, gpus = worst_case_series(text)
    raw = text.encode()
    print(f"GPUs {gpus}; series measured {measured}, worst case {worst}; "
          f"bytes per scrape {len(raw)}, gzip {len(gzip.compress(raw))}")


if __name__ == "__main__":
    main()
