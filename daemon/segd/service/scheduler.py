"""The daemon's refits: when one is due, its thread, its retry after a failure, its waits."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Protocol

import numpy as np

from segd.config import Config
from segd.core.cluster import FitParams
from segd.core.errors import SegdError
from segd.core.refit_policy import Schedule, next_try_at, refit_due
from segd.core.state_health import StatePause, StateUnavailableError
from segd.core.workqueue import WorkQueue
from segd.service import notify
from segd.state.refit import RefitReport, run_refit
from segd.state.store import Store

log = logging.getLogger("segd.daemon")  # the daemon's own lines, under the daemon's name

REFIT_RETRY_S = 60.0


class RefitHost(Protocol):
    """What the scheduler reads from the daemon that holds it, and asks of it."""

    config: Config
    store: Store
    queue: WorkQueue
    stopping: threading.Event
    intake_lock: threading.Lock
    state_pause: StatePause
    centroids: np.ndarray

    def clusters_swapped(self) -> None: ...
    def state_failed(self, exc: BaseException) -> bool: ...
    def refuse_while_paused(self, what: str) -> None: ...
    def status_line(self) -> str: ...


class RefitScheduler:
    """Starts refits when they are due (on the main loop's tick) and runs them, on demand too.

    `lock` lets one refit run at a time; undo and the resume from a state pause take it (then
    the host's `intake_lock`, the order a refit takes them in) to keep refits off."""

    def __init__(self, host: RefitHost) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.last_fit_at = time.time()
        self.last_fit_n = 0
        self.thread: threading.Thread | None = None
        self.retry_at = 0.0  # monotonic time before which a failed refit is not retried
        # Whether a burst has settled: when images last arrived, and since when the inbox
        # has not been quiet for settle_s (monotonic); the image count seen at the last tick.
        self.activity_at = self.unsettled_since = time.monotonic()
        self.seen_images = -1
        self.unstructured_n = 0  # n at the last first fit that found no structure (0: none)
        self.waiting: str | None = None  # why there are no clusters yet, for the status

    def fit_params(self, k: int | str | None = None) -> FitParams:
        params = FitParams.from_config(self.host.config.clustering)
        return params if k is None else dataclasses.replace(params, k=k)

    def refit(self, trigger: str, k: int | str | None = None,
              dry_run: bool = False) -> RefitReport:
        """Fit off the intake path, then swap in under the intake lock. Blocks until done.

        `k` (on demand): a fixed k the user asked for; the fit then replaces the clusters."""
        host = self.host

        def swapped() -> None:
            host.clusters_swapped()
            self.last_fit_at = time.time()
            self.last_fit_n = sum(host.store.count_by_state()[s] for s in ("sorted", "pending"))
            self.unstructured_n, self.waiting = 0, None

        with self.lock:
            host.refuse_while_paused(f"refit ({trigger})")
            notify.status(f"refitting ({trigger})")
            try:
                report = run_refit(host.store, host.config, self.fit_params(k), trigger,
                                   dry_run=dry_run, swap_lock=host.intake_lock,
                                   on_swapped=swapped, cancel=host.stopping,
                                   forced=k is not None)
            except Exception as exc:
                if host.state_failed(exc):
                    host.refuse_while_paused(f"refit ({trigger})")
                raise
        log.info("%s", report.summary())
        if report.outcome == "waiting" and not dry_run:
            # No structure yet: the photos stay pending; try again after some growth.
            self.unstructured_n = report.n
            self.waiting = (f"no structure found in {report.n} images; they wait in the "
                            f"inbox, next try at {next_try_at(report.n)} images "
                            "(`segd refit --k N` files them now)")
            log.info("no clusters yet: %s", self.waiting)
            notify.status(host.status_line())
        return report

    def first_fit_wait(self) -> str:
        """What the first fit waits for, said when a photo is kept pending."""
        counts = self.host.store.count_by_state()
        c = self.host.config.clustering
        return (self.waiting or f"the first fit waits for the inbox to be quiet for "
                f"{c.settle_s:g} s") if counts["pending"] >= c.min_images else \
            f"{counts['pending']} of {c.min_images} images needed for the first fit"

    def _note_activity(self, counts: dict[str, int]) -> None:
        """Track whether the inbox is busy: images being added, or more work queued than
        the pending photos a rescan hands back (those wait; they are not new)."""
        now = time.monotonic()
        total = sum(counts.values())
        queued = len(self.host.queue) + self.host.queue.in_flight
        if total != self.seen_images or queued > counts["pending"]:
            if now - self.activity_at >= self.host.config.clustering.settle_s:
                self.unsettled_since = now  # a new burst begins
            self.activity_at = now
        self.seen_images = total

    def _refit_due(self) -> str | None:
        counts = self.host.store.count_by_state()
        self._note_activity(counts)
        now = time.monotonic()
        idle = now - self.activity_at
        settle = self.host.config.clustering.settle_s
        return refit_due(Schedule(
            n=counts["sorted"] + counts["pending"], live_k=len(self.host.centroids),
            last_fit_n=self.last_fit_n, since_fit_s=time.time() - self.last_fit_at,
            unstructured_n=self.unstructured_n, idle_s=idle,
            busy_s=now - self.unsettled_since if idle < settle else 0.0),
            self.host.config.clustering)

    def maybe_start(self) -> None:
        """On the main loop's tick: start a refit on its own thread when one is due."""
        if self.host.state_pause.paused:
            return
        if self.thread is not None and self.thread.is_alive():
            return
        if time.monotonic() < self.retry_at:
            return
        trigger = self._refit_due()
        if trigger is None:
            return

        def run() -> None:
            try:
                self.refit(trigger)
                return
            except StateUnavailableError:
                return  # said once when the pause began; refits wait for the resume
            except (OSError, SegdError) as exc:
                # The library is full, read-only or otherwise unwritable: expected.
                log.warning("refit (%s) could not be applied: %s; the old clusters stay in "
                            "use, retrying in %.0f s", trigger, exc, REFIT_RETRY_S)
            except Exception:
                log.exception("refit (%s) failed; the old clusters stay in use", trigger)
            self.retry_at = time.monotonic() + REFIT_RETRY_S  # no tight retry loop

        self.thread = threading.Thread(target=run, name="segd-refit", daemon=True)
        self.thread.start()

    def join(self) -> None:
        """At a stop: a fit polls `stopping` between its steps and gives up, so this waits
        for one step; an apply already under way finishes (its moves are journaled)."""
        if self.thread is not None:
            self.thread.join()
