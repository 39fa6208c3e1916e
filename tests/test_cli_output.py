"""What people read from the CLI: lines cut at 100 columns say so, wrapped text keeps words and
commands whole (copy-paste), `plan` without NVML says NVML is unavailable, `check` says it once,
a starting daemon is not also told to be started, and `status --help` explains the cost lines."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from conftest import gpucostd_cmd, nvidia_driver_loaded
from gpucostd import wrap
from gpucostd.health.checks import format_checks
from gpucostd.record.events import EventStore
from gpucostd.snapshot import CheckResult, Event, Severity

PERSISTENCED = ("nvidia-persistenced is not running",
                "systemctl enable --now nvidia-persistenced (NVIDIA recommends the daemon; "
                "legacy persistence mode, nvidia-smi -pm 1, is near end of life)")


def _run(*argv, timeout=60):
    return subprocess.run(gpucostd_cmd() + list(argv), capture_output=True, text=True,
                          timeout=timeout)


def test_events_cut_at_100_columns_end_with_an_ellipsis(tmp_path):
    store = EventStore(str(tmp_path))
    store.append(Event(time.time(), "node", "simulated", Severity.OK, "none",
                       "simulating builtin:h100x8 with a message much longer than any terminal "
                       "line: " + "x" * 120))
    store.append(Event(time.time(), "node", "short", Severity.OK, "none", "fits"))
    store.close()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\nsocket_path = "{tmp_path}/none.sock"\n')
    r = _run("events", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(len(line) <= 100 for line in lines), lines
    long, short = sorted(lines, key=len, reverse=True)
    assert len(long) == 100 and long.endswith("…") and "simulating builtin:h100x8" in long
    assert short.endswith(" fits")


@pytest.mark.parametrize("width", [100, 90, 80, 72])
def test_wrapped_text_never_breaks_a_word_or_a_command(width):
    head = "WARN  persistenced "
    text = format_checks([CheckResult("persistenced", "warn", *PERSISTENCED)], width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), lines
    assert "systemctl enable --now nvidia-persistenced" in text      # on one line
    assert "nvidia-persistenced" in lines[0] and lines[0].startswith(head)
    words = set(" ".join(("WARN persistenced",) + PERSISTENCED).replace("(", " ")
                .replace(")", " ").split())
    for line in lines:
        for word in line.replace("fix:", " ").replace("(", " ").replace(")", " ").split():
            assert word in words, f"{word!r} is part of a word cut at the line end: {lines}"


def test_wrap_keeps_a_backticked_command_whole_and_lines_within_the_width():
    text = ("the daemon is not running here; start it with `sudo systemctl start gpucostd` "
            "or ask `gpucostd status --direct` for a reading without it")
    for width in range(40, 101, 3):
        lines = wrap(text, width, "  ", "    ")
        assert all(len(line) <= width for line in lines), (width, lines)
        joined = "\n".join(lines)
        assert "`sudo systemctl start gpucostd`" in joined, (width, lines)
        assert "`gpucostd status --direct`" in joined, (width, lines)


@pytest.fixture
def no_nvml():
    reason = nvidia_driver_loaded()
    if reason:
        pytest.skip("an NVIDIA driver is loaded: NVML is available here")


def test_plan_without_nvml_says_so_and_fails_when_gpu_settings_are_configured(tmp_path, no_nvml):
    cfg = tmp_path / "tune.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\n'
                   '[tuning.gpu]\npower_limit_watts = 500\npersistence_mode = true\n')
    r = _run("plan", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no settings configured" not in r.stdout
    assert ("cannot plan the GPU settings (persistence_mode, power_limit_watts) without NVML"
            in r.stdout), r.stdout
    assert r.stderr.count("NVML unavailable") == 1, r.stderr
    assert "retrying" not in r.stderr, r.stderr           # a one-shot command retries nothing


def test_check_without_nvml_says_so_once(tmp_path, no_nvml):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\n')
    r = _run("check", "--config", str(cfg))
    assert r.stderr.count("libnvidia-ml.so.1") == 1, r.stderr
    assert "retrying" not in r.stderr, r.stderr
    assert all(len(line) <= 100 for line in r.stdout.splitlines()), r.stdout


def test_a_starting_daemon_is_not_also_told_to_start(tmp_path):
    """A daemon that answers "starting" runs: status says what it answered, not how to start
    it."""
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    stop = threading.Event()

    def answer():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(json.dumps({"ok": False, "error": "the daemon is starting; no "
                                         "snapshot yet, try again in a few seconds"}).encode()
                             + b"\n")
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        r = _run("status", "--socket", path)
    finally:
        stop.set()
        t.join(5)
        server.close()
    assert r.returncode == 3
    assert "the daemon is starting" in r.stdout, r.stdout
    assert "systemctl start" not in r.stdout and "cannot reach" not in r.stdout, r.stdout
    unreachable = _run("status", "--socket", str(tmp_path / "none.sock"))
    assert unreachable.returncode == 3 and "systemctl start gpucostd" in unreachable.stdout


def test_status_help_explains_the_measured_tokens_figure():
    r = _run("status", "--help")
    assert r.returncode == 0
    assert "measured N/s now (R2 x)" in r.stdout and "least-squares fit" in r.stdout
    assert all(len(line) <= 100 for line in r.stdout.splitlines())
    doc = (os.path.join(os.path.dirname(__file__), "..", "docs", "cost.md"))
    assert "measured 715/s now\n(R2 0.94)" in open(doc).read() or \
        "measured 715/s now (R2 0.94)" in open(doc).read()
