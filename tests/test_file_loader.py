"""One loader for every file the daemon reads (gpucostd.statefile.read_regular / read_json):
regular files only, opened without blocking, size-capped, every parser error mapped to a clear
message. Through the real daemon: corrupt state files are set aside and started fresh (never a
crash, a hang or an ignored SIGTERM), drop-ins are capped, a scenario with an out-of-range
number is a clear error.

docs/reliability.md lists each fault with the test here that holds it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import gpucostd_cmd, wait_for
from gpucostd import statefile

STATE_FILES = ("floor.json", "cost.json", "health.json", "gpu_inventory.json",
               "kernel_log.json")


def _events(daemon, code):
    from gpucostd.views.statusapi import request
    return [e for e in request(daemon.socket, {"cmd": "events", "limit": 1000})["events"]
            if e["code"] == code]


def _deep(levels=100_000):
    return "[" * levels + "]" * levels


# ------------------------------------------------------------------ the loader itself
def test_read_json_maps_every_parser_failure_to_a_clear_error(tmp_path):
    p = tmp_path / "s.json"
    for text, words in ((_deep(), "nested too deeply"), ('{"a": 1e999}', "out of range"),
                        ('{"a": NaN}', "NaN is not a number"), ("9" * 5000, "digits"),
                        ('{"a": ', "not valid JSON")):
        p.write_text(text)
        with pytest.raises(statefile.UnreadableFile, match=words):
            statefile.read_json(str(p))
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(statefile.UnreadableFile, match="not UTF-8"):
        statefile.read_json(str(p))


def test_read_regular_refuses_fifos_directories_and_big_files_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(statefile.UnreadableFile, match="a FIFO, not a regular file"):
        statefile.read_regular(str(fifo), 100)     # returns at once: nobody writes the FIFO
    with pytest.raises(statefile.UnreadableFile, match="a directory"):
        statefile.read_regular(str(tmp_path), 100)
    big = tmp_path / "big"
    big.write_text("")
    os.truncate(big, 1 << 30)                      # sparse: refused before reading
    with pytest.raises(statefile.UnreadableFile, match="at most 100 bytes"):
        statefile.read_regular(str(big), 100)
    with pytest.raises(FileNotFoundError):
        statefile.read_regular(str(tmp_path / "absent"), 100)
    link = tmp_path / "link"
    link.symlink_to(big)
    with pytest.raises(statefile.UnreadableFile, match="symlink"):
        statefile.read_regular(str(link), 100, follow=False)


# ------------------------------------------------------------------ state files, the daemon
CORRUPTIONS = {
    "deep": lambda p: p.write_text(_deep()),
    "fifo": lambda p: os.mkfifo(p),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_state_files_are_set_aside_and_the_daemon_starts_fresh(daemon_factory, kind):
    """100k-deep JSON or a FIFO in place of each state file: the daemon starts (no crash, no
    hang), moves each aside to <name>.bad with a log line and a state_file_reset event, writes
    fresh files, and stops on SIGTERM."""
    d = daemon_factory()
    d.state_dir.mkdir(mode=0o750, parents=True)
    for name in STATE_FILES:
        CORRUPTIONS[kind](d.state_dir / name)
    d.start()
    watched = STATE_FILES
    resets = wait_for(lambda: (lambda ev: ev if len(ev) >= len(watched) else None)(
        _events(d, "state_file_reset")), 20, what="a state_file_reset event per file")
    for name in watched:
        path = d.state_dir / name
        assert (d.state_dir / (name + ".bad")).exists(), name
        assert any(f"{path}: unreadable" in e["message"] for e in resets), (name, resets)
        assert f"{path}: unreadable" in d.output(), name
    wait_for(lambda: (d.state_dir / "health.json").is_file(), 20, what="a fresh health.json")
    assert "Traceback" not in d.output()
    start = time.monotonic()
    assert d.stop(timeout=10) == 0
    assert time.monotonic() - start < 10


def test_a_floor_since_far_in_the_future_is_set_aside(daemon_factory):
    d = daemon_factory()
    d.state_dir.mkdir(mode=0o750, parents=True)
    (d.state_dir / "floor.json").write_text(json.dumps(
        {"version": 1, "inefficient": True, "since": 1e300}))
    d.start()
    ev = wait_for(lambda: _events(d, "state_file_reset"), 20, what="state_file_reset")
    assert "floor.json: unreadable floor state" in ev[0]["message"], ev
    assert (d.state_dir / "floor.json.bad").exists()
    code, status = d.status_json()
    assert "Traceback" not in d.output() and d.proc.poll() is None
    assert d.stop() == 0


# ------------------------------------------------------------------ drop-ins
def test_300_dropins_of_1_mib_are_refused_at_once_on_reload(daemon_factory):
    """300 drop-ins of 1 MiB (sparse): refused by their number before any is read; 3 of 1 MiB
    of comments: refused by the bytes in all after 2 MiB. The running config stays, the loop
    goes on, the refusal says what to do."""
    d = daemon_factory().start()
    dropins = d.config.parent / "gpucostd.d"
    dropins.mkdir()
    for i in range(300):
        p = dropins / f"{i:03d}.toml"
        p.write_text("")
        os.truncate(p, 1 << 20)
    start = time.monotonic()
    d.signal(signal.SIGHUP)
    ev = wait_for(lambda: _events(d, "config_rejected"), 15, what="config_rejected")
    assert time.monotonic() - start < 5
    assert "300 drop-ins; at most 128 are read" in ev[0]["message"], ev
    for p in dropins.iterdir():
        p.unlink()
    line = ("# " + "x" * 97 + "\n").encode()
    for i in range(3):
        (dropins / f"{i}.toml").write_bytes(line * ((1 << 20) // len(line)))
    d.signal(signal.SIGHUP)
    ev = wait_for(lambda: [e for e in _events(d, "config_rejected")
                           if "2097152 in all" in e["message"]], 15, what="refused by size")
    assert "gpucostd.d/1.toml: is 1048500 bytes; at most" in ev[0]["message"], ev
    code, st = d.status_json()
    assert d.proc.poll() is None and "Traceback" not in d.output()


def test_a_config_check_with_too_many_dropins_is_one_line(tmp_path):
    cfg = tmp_path / "gpucostd.toml"
    cfg.write_text("")
    (tmp_path / "gpucostd.d").mkdir()
    for i in range(129):
        (tmp_path / "gpucostd.d" / f"{i:03d}.toml").write_text("")
    r = subprocess.run(gpucostd_cmd() + ["config", "check", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "129 drop-ins; at most 128" in r.stderr


# ------------------------------------------------------------------ scenarios
def test_a_scenario_with_total_energy_1e308_is_a_clear_error(daemon_factory, tmp_path):
    scen = tmp_path / "energy.toml"
    scen.write_text("[node]\ngpu_count = 1\n[gpu_defaults]\ntotal_energy = 1e308\n")
    r = subprocess.run(gpucostd_cmd() + ["replay", str(scen), "--duration", "5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"{scen}:4: gpu_defaults.total_energy = 1e+308: out of range" in r.stderr
    d = daemon_factory(scenario=str(scen))
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "total_energy" in d.output() and "Traceback" not in d.output()


def test_a_scenario_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "s.toml"
    os.mkfifo(fifo)
    r = subprocess.run(gpucostd_cmd() + ["replay", str(fifo), "--duration", "5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "a FIFO, not a regular file" in r.stderr, r.stderr


def test_status_with_a_fifo_as_its_config_does_not_block(tmp_path):
    fifo = tmp_path / "gpucostd.toml"
    os.mkfifo(fifo)
    r = subprocess.run(gpucostd_cmd() + ["status", "--config", str(fifo)],
                       capture_output=True, text=True, timeout=30)   # a hang fails here
    assert "Traceback" not in r.stderr and "a FIFO, not a regular file" in r.stderr, r.stderr
