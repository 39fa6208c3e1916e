"""A pip install without the [systemd] extra (no systemd-python: no libsystemd headers or C
compiler on the machine) still runs properly under systemd: READY/STATUS/WATCHDOG/STOPPING go to
$NOTIFY_SOCKET as plain datagrams, and logs and events go to stderr, the journal's stream, one
line each with the syslog priority prefix journald reads (the structured fields need the
module). The packages depend on the distribution's python3-systemd; this is the pip path."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

from conftest import free_port, wait_for

BLOCK_SYSTEMD = textwrap.dedent("""\
    import sys
    sys.modules["systemd"] = None          # as if systemd-python were not installed
    sys.modules["systemd.journal"] = None
    sys.modules["systemd.daemon"] = None
    sys.argv[0] = "gpucostd"
    from gpucostd.cli import main
    sys.exit(main())
""")


def test_logs_carry_syslog_priorities_when_the_module_is_missing(tmp_path):
    err = tmp_path / "stderr"
    code = textwrap.dedent("""\
        import logging, os, sys
        sys.modules["systemd"] = None
        st = os.fstat(2)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        from gpucostd.record import logs
        logs.setup("debug")
        log = logging.getLogger("gpucostd")
        log.debug("d"); log.info("i"); log.warning("w"); log.error("e\\nsecond line")
    """)
    with open(err, "wb") as f:
        r = subprocess.run([sys.executable, "-c", code], stderr=f, timeout=30)
    assert r.returncode == 0, err.read_text()
    assert err.read_text().splitlines() == ["<7>d", "<6>i", "<4>w", "<3>e second line"]


def test_daemon_without_systemd_python_notifies_and_logs_to_the_journal_stream(tmp_path):
    notify = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(notify))
    srv.settimeout(0.2)
    port = free_port()
    cfg = tmp_path / "gpucostd.toml"
    cfg.write_text(f'[daemon]\ninterval_seconds = 0.2\nlisten_address = "127.0.0.1:{port}"\n'
                   f'socket_path = "{tmp_path / "s.sock"}"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'kernel_log = "none"\n')
    log = tmp_path / "stderr"
    logf = open(log, "wb")
    st = os.fstat(logf.fileno())
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
               WATCHDOG_USEC="2000000", PYTHONUNBUFFERED="1")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-c", BLOCK_SYSTEMD, "run", "--config", str(cfg),
                             "--simulate", "builtin:h100x8"], stdout=logf, stderr=logf, env=env)
    got = []

    def received(word):
        def check():
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}:\n{log.read_text()}")
            try:
                got.append(srv.recv(4096).decode())
            except socket.timeout:
                pass
            return any(word in m for m in got)
        return check
    try:
        wait_for(received("READY=1"), timeout=30, what="READY=1 on $NOTIFY_SOCKET")
        ready = [m for m in got if "READY=1" in m][0]
        assert "STATUS=" in ready and "8 GPUs" in ready, ready
        wait_for(received("WATCHDOG=1"), timeout=10, what="WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        wait_for(received("STOPPING=1"), timeout=10, what="STOPPING=1")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        logf.close()
        srv.close()
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith(("<2>", "<3>", "<4>", "<6>", "<7>")) for line in lines), \
        lines
    assert any(line.startswith("<6>node OK startup: gpucostd ") for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines
