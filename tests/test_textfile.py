"""[export] textfile_path: the exposition written atomically for node_exporter's textfile
collector, read by Debian's real prometheus-node-exporter."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import free_port, http_get, metric_value, wait_for
from gpucostd.config import ConfigError, parse
from gpucostd.views.textfile import TextfileWriter

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


def test_written_atomically_at_most_once_per_period_and_removed(tmp_path):
    body = [b"gpucostd_cycles_total 1\n"]
    w = TextfileWriter(lambda: body[0], min_period=5.0)
    path = str(tmp_path / "gpucostd.prom")
    w.update(path, now=100.0)
    assert open(path, "rb").read() == body[0]
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"     # node_exporter's user reads it
    body[0] = b"gpucostd_cycles_total 2\n"
    w.update(path, now=102.0)                                # within the period: no write
    assert open(path, "rb").read() == b"gpucostd_cycles_total 1\n"
    w.update(path, now=105.5)
    assert open(path, "rb").read() == body[0]
    assert sorted(os.listdir(tmp_path)) == ["gpucostd.prom"]    # no temporary left behind
    w.remove()
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_is_reported_once_and_never_created(tmp_path, caplog):
    w = TextfileWriter(lambda: b"x 1\n", min_period=0.0)
    path = str(tmp_path / "nope" / "gpucostd.prom")
    for t in range(5):
        w.update(path, now=float(t))
    assert not (tmp_path / "nope").exists()
    warnings = [r for r in caplog.records if "cannot write the textfile" in r.getMessage()]
    assert len(warnings) == 1 and "export.textfile_path" in warnings[0].getMessage()
    (tmp_path / "nope").mkdir()
    w.update(path, now=10.0)
    assert os.path.exists(path)


@pytest.mark.parametrize("value", ["gpucostd.prom", "/var/lib/node-exporter/gpucostd.txt"])
def test_config_refuses_a_path_node_exporter_would_not_read(value):
    with pytest.raises(ConfigError) as e:
        parse(f'[export]\ntextfile_path = "{value}"\n', "t.toml")
    assert "t.toml:2:" in str(e.value) and ".prom" in str(e.value)


@pytest.fixture
def textfile_daemon(daemon_factory, tmp_path):
    collector_dir = tmp_path / "textfile"
    collector_dir.mkdir()
    path = collector_dir / "gpucostd.prom"
    d = daemon_factory(extra_config=f'[export]\ntextfile_path = "{path}"\n').start()
    wait_for(lambda: path.exists(), 10, what="the textfile")
    return d, collector_dir, path


def test_the_daemon_writes_the_scrape_and_removes_it_at_stop(textfile_daemon):
    d, _, path = textfile_daemon
    text = path.read_text()
    assert metric_value(text, "gpucostd_gpu_info", gpu="7") == 1
    types = {line for line in text.splitlines() if line.startswith("# TYPE")}
    assert len(types) > 30     # the same exposition as /metrics (of a snapshot up to 5 s older)
    assert "# TYPE gpucostd_gpu_health gauge" in types and "gpucostd_cycles_total" in text
    assert d.stop() == 0
    assert not path.exists()


@pytest.mark.skipif(NODE_EXPORTER is None, reason="prometheus-node-exporter not installed (apt "
                                                  "install prometheus-node-exporter; dev-env.sh "
                                                  "--test does)")
def test_node_exporter_textfile_collector_serves_the_gpucostd_series(textfile_daemon, tmp_path):
    _, collector_dir, _ = textfile_daemon
    port = free_port()
    log = open(tmp_path / "node_exporter.log", "wb")
    proc = subprocess.Popen([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}",
                             "--collector.disable-defaults", "--collector.textfile",
                             f"--collector.textfile.directory={collector_dir}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def scrape():
            code, body = http_get(f"http://127.0.0.1:{port}/metrics")
            return body if code == 200 else None
        text = wait_for(scrape, 15, what="node_exporter answering")
        assert metric_value(text, "node_textfile_scrape_error") == 0, \
            (tmp_path / "node_exporter.log").read_text()
        for i in range(8):
            assert metric_value(text, "gpucostd_gpu_info", gpu=str(i)) == 1
        assert metric_value(text, "gpucostd_gpu_power_limit_watts", gpu="0") == 700
        assert metric_value(text, "gpucostd_nvml_up") == 1
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
