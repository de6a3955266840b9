"""A writer that closes and reopens its file between pieces (rsync --inplace, some SMB
clients), against the real daemon: each close may deliver a partial file, which must wait
for the quiet period instead of being quarantined while the writer is still at it."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from daemon_harness import BASE_CONFIG, photos, wait_until
from reliability_env import Env

slow = pytest.mark.slow
QUIET_S = float(BASE_CONFIG["watch"]["quiet_s"])

# Half the bytes, close, a pause well under the quiet period, reopen to append the rest.
WRITER = """
import sys, time
path, src, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
data = open(src, "rb").read()
half = len(data) // 2
with open(path, "wb") as fh:
    fh.write(data[:half])
time.sleep(pause)
with open(path, "ab") as fh:
    fh.write(data[half:])
"""


@slow
def test_a_reopening_writer_is_not_quarantined_and_a_cut_file_still_is(env: Env) -> None:
    ph = photos()
    env.daemon.start(timeout=120)
    reopened = env.tree.inbox / "reopened.jpg"
    data = ph[0].read_bytes()
    env.ledger.record(reopened, data)
    writer = subprocess.run([sys.executable, "-c", WRITER, str(reopened), str(ph[0]),
                             str(QUIET_S / 3)], timeout=30)
    assert writer.returncode == 0
    # The first close was seen: the half file was judged and left to wait, not quarantined.
    waited = re.compile(r"reopened\.jpg looks (truncated|corrupt)")

    def judged() -> bool:
        assert not (env.tree.quarantine / "reopened.jpg").exists(), \
            "a writer's half-done file was quarantined\n" + env.daemon.log_tail()
        return bool(waited.search(env.daemon.log()))

    wait_until(judged, 30, "the half file to be judged", on_timeout=env.daemon.log_tail)
    env.daemon.wait_for_log(r"pending reopened\.jpg", timeout=30)

    # Really cut short and never completed: quarantined, but only after the quiet period.
    dropped = time.monotonic()
    env.drop_bytes("cut.jpg", ph[1].read_bytes()[:3000])
    wait_until(lambda: (env.tree.quarantine / "cut.jpg").is_file(), 60,
               "cut.jpg to be quarantined", on_timeout=env.daemon.log_tail)
    took = time.monotonic() - dropped
    print(f"[reopening writer] cut.jpg quarantined {took:.2f} s after its drop")
    assert took >= QUIET_S, "quarantined before the quiet period"
    # cut.jpg was queued after the half of reopened.jpg, so reopened.jpg's own re-check
    # (its timer) has run by now: it is still whole in the inbox, waiting for clusters.
    assert reopened.read_bytes() == data
    assert not (env.tree.quarantine / "reopened.jpg").exists(), env.daemon.log_tail()
    summary = env.finish()
    assert summary.quarantined == 1
