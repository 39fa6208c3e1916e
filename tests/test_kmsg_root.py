"""The watcher on the real /dev/kmsg: a line written there is seen within 1 s, and a restart
neither replays it nor misses a line written while the watcher was stopped. Needs root.

The lines written stay in the host's kernel log, where other tests (and a daemon started later
with an empty state dir) will read them: they use Xid 45 and 43, which the catalog rates "info",
on a bus id (0000:fe:1f.0) no GPU has, so they change no health state."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from conftest import write_kmsg
from gpucostd.probes.kernel_log import KernelLogWatcher

pytestmark = pytest.mark.root





def wait_for(watcher, token, timeout):
    """Faults until one whose raw line holds `token` shows up (or the deadline passes)."""
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        watcher.wait(max(0.0, deadline - time.monotonic()))
        got += watcher.poll()
        if any(token in f.raw for f in got):
            break
    return got


def test_kmsg_line_seen_within_a_second_and_restart_semantics(writable_kmsg, tmp_path):
    state = tmp_path / "state"
    token1 = f"gpucostd-test-{uuid.uuid4()}"
    token2 = f"gpucostd-test-{uuid.uuid4()}"
    token3 = f"gpucostd-test-{uuid.uuid4()}"

    w = KernelLogWatcher("kmsg", state)
    w.start()
    try:
        assert w.source_in_use == "kmsg", w.error
        wait_for(w, "never", 0.3)              # let it read through the existing buffer
        write_kmsg(f"NVRM: Xid (PCI:0000:fe:1f): 45, pid=1, name=test, {token1}")
        t0 = time.monotonic()
        got = wait_for(w, token1, 1.0)
        mine = [f for f in got if token1 in f.raw]
        assert mine, "the line written to /dev/kmsg was not seen within 1 s"
        assert time.monotonic() - t0 < 1.0
        (f,) = mine
        assert (f.xid, f.pci_bus_id, f.process_name) == (45, "0000:fe:1f.0", "test")
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert f.dedupe_key.startswith(f"kmsg:{boot_id}:")
        assert abs(f.time - time.time()) < 5
        w.commit()
    finally:
        w.stop()

    write_kmsg(f"NVRM: Xid (PCI:0000:fe:1f): 43, pid=1, name=test, {token2}")  # while stopped

    w = KernelLogWatcher("kmsg", state)
    w.start()
    try:
        got = wait_for(w, token2, 2.0)
        assert any(token2 in f.raw for f in got), "line written while stopped was missed"
        # records are read in sequence order, so token1 (older) would have come first
        assert not any(token1 in f.raw for f in got), "an already committed line was replayed"
        write_kmsg(f"NVRM: Xid (0000:fe:1e.0): 45, {token3}")     # legacy form, no PCI:
        got = wait_for(w, token3, 1.0)
        assert [(f.xid, f.pci_bus_id) for f in got if token3 in f.raw] == [(45, "0000:fe:1e.0")]
    finally:
        w.stop()
