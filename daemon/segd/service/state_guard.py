"""Probing the state folder while the daemon is paused for it, and settling what the
failure interrupted once it can take commits again."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Final

from segd.config import Config
from segd.core.state_health import StateUnavailable, classify, space_verdict
from segd.state.mover import recover_moves
from segd.state.reconcile import filing_after_move
from segd.state.store import Store

PROBE_NAME: Final = ".segd-probe"
# The probe writes this much and fsyncs it: a single tiny write can still fit where a
# batch of embeddings would not, and the daemon would pause again at once.
PROBE_BYTES: Final = 1 << 20
PROBE_META: Final = "state:probe"


def probe_state_dir(state_dir: Path) -> StateUnavailable | None:
    """Write PROBE_BYTES to a file in the state folder and fsync it; None when that works."""
    path = state_dir / PROBE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            block = b"\0" * 65536
            for _ in range(PROBE_BYTES // len(block)):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)  # os.write and fsync name no file; this one is ours
        return _reason(exc, state_dir)
    finally:
        with contextlib.suppress(OSError):  # refused too on a read-only filesystem
            path.unlink()
    return None


def look_at_state_dir(state_dir: Path) -> StateUnavailable | None:
    """The state folder's filesystem by its figures alone (read-only flag, free space),
    writing nothing: the check at every start, where a probe's writes would be noise."""
    try:
        st = os.statvfs(state_dir)
    except OSError as exc:
        return _reason(exc, state_dir)
    return space_verdict(bool(st.f_flag & os.ST_RDONLY), st.f_bavail * st.f_frsize,
                         PROBE_BYTES)


def probe_state(store: Store, state_dir: Path) -> StateUnavailable | None:
    """The file probe, then a real commit in the store; None when both succeed."""
    reason = probe_state_dir(state_dir)
    if reason is not None:
        return reason
    try:
        store.set_meta(PROBE_META, f"{time.time():.3f}")
    except Exception as exc:
        return _reason(exc, state_dir)
    return None


def settle_interrupted(store: Store, config: Config) -> int:
    """Complete or roll back the journaled moves a failed commit left open (the files were
    placed, the commit that closes their rows failed), and recount the clusters, whose
    size updates may have failed alike. Run with no filing, refit or undo under way.
    Returns how many moves were settled."""
    recovered = recover_moves(store, lambda move, image: filing_after_move(store, config,
                                                                           move, image))
    store.recount_cluster_sizes()
    return recovered


def _reason(exc: BaseException, state_dir: Path) -> StateUnavailable:
    # Anything else that stops the probe still means the folder cannot take commits.
    return classify(exc, state_dir) or StateUnavailable("not writable", str(exc))
