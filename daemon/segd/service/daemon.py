"""`segd run`: watch the inbox, embed arrivals in micro-batches, file each into its cluster.

Threads and what they own:
- main: signals, the systemd watchdog and STATUS, refit triggers, config reloads;
- intake: the pipeline (decoding on a thread pool, the network on full or flushed batches);
- filing: assignment and the journaled moves of each embedded batch, in batch order, so the
  network never waits for the disk (at most `FILING_BACKLOG` batches wait between them);
- refit: fits off the intake path, then swaps the clusters in under `intake_lock`
  (`scheduler.RefitScheduler` decides when, and owns this thread);
- watcher and control server threads, which only enqueue work or call `handle_control`.

When the state folder cannot take commits (full, read-only, failing), the daemon pauses:
intake drops what it is handed (the files stay in the inbox), nothing is filed, refits and
undo are refused, and the main loop probes the folder every `STATE_PROBE_S`; once a probe
succeeds it settles the journaled moves the failure left open and rescans the inbox.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segd.config import Config, parse_config_file
from segd.core.arrival import ArrivalPlan, plan_arrival
from segd.core.errors import ConfigError, FileAccessError, ImageError, SegdError
from segd.core.pipeline import FLUSH, Embedded, Flush, embed_stream
from segd.core.state_health import StatePause, StateUnavailable, StateUnavailableError, classify
from segd.core.verdicts import SUSPECT_KINDS, Quarantine, Signature, Suspect, judge
from segd.core.workqueue import WorkQueue
from segd.media.decode import DecodeOptions, decode_bytes, read_image_file
from segd.media.embed import Embedder, cpu_count
from segd.service import notify
from segd.service.control import ControlServer
from segd.service.scheduler import RefitScheduler
from segd.service.state_guard import look_at_state_dir, probe_state, settle_interrupted
from segd.service.watcher import InboxWatcher
from segd.state.folders import check_folders_writable
from segd.state.lock import StateLock, acquire_state_lock
from segd.state.mover import MovePlan, SourceChangedError, journaled_moves, recover_moves
from segd.state.quarantine import quarantine_file
from segd.state.reconcile import filing_after_move, reconcile, resolve_cluster_folder
from segd.state.store import Store, open_store
from segd.state.undo import undo_last_refit

log = logging.getLogger("segd.daemon")

STATUS_EVERY_S = 10.0
# Embedded batches waiting for the filing thread: two keep the network busy while one batch
# is filed, and bound how much work a stop (or a crash) leaves unfiled in the inbox.
FILING_BACKLOG = 2
STATE_PROBE_S = 2.0  # how often a paused daemon tries the state folder again


@dataclass
class Arrival:
    """One inbox file on its way through the pipeline; filled in by the decode thread."""

    path: Path
    sha256: str = ""
    stat: os.stat_result | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Counters:
    sorted: int = 0
    pending: int = 0
    quarantined: int = 0
    refits: int = 0


class Daemon:
    def __init__(self, config: Config, embedder: Embedder, store: Store) -> None:
        self.config = config
        self.embedder = embedder
        self.store = store
        self.queue = WorkQueue()
        self.filing: queue.Queue[list[Embedded[Arrival]] | None] = queue.Queue(FILING_BACKLOG)
        self.counters = Counters()
        self.intake_lock = threading.Lock()  # assignment + move vs. the refit swap
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self.centroid_ids, self.centroids = store.centroid_matrix()
        self.started_at = time.time()
        self.watcher = InboxWatcher(config.inbox, config.watch, self._on_ready)
        # Files that failed as if still being written, and the timers that re-queue them.
        self._suspects: dict[Path, Suspect] = {}
        self._suspect_timers: dict[Path, threading.Timer] = {}
        self._suspects_lock = threading.Lock()
        self.state_pause = StatePause(STATE_PROBE_S)
        self._pause_lock = threading.Lock()
        self.refits = RefitScheduler(self)  # its lock: one refit at a time
        self.decode_opts = DecodeOptions(size=embedder.input_size, resize=config.model.resize,
                                         max_pixels=config.decode.max_pixels)

    # ---- wiring -------------------------------------------------------------------------

    def _on_ready(self, path: Path) -> None:
        self.queue.put(path)

    def clusters_swapped(self) -> None:
        """A refit's new clusters are in (called under `intake_lock`): file by them."""
        self.centroid_ids, self.centroids = self.store.centroid_matrix()
        self.counters.refits += 1

    # ---- intake -------------------------------------------------------------------------

    def _arrivals(self) -> Iterator[Arrival | Flush]:
        """Paths from the queue; FLUSH once the queue has been empty for batch_wait_ms."""
        wait = self.config.watch.batch_wait_ms / 1000.0
        flushed = True
        while True:
            path = self.queue.get(timeout=None if flushed else wait)
            if path is None:
                if self.queue.closed:
                    return
                if not flushed:
                    flushed = True
                    yield FLUSH
                continue
            if self.state_pause.paused:
                # Not read, not embedded: it stays in the inbox, and the rescan at the
                # resume hands it back.
                self.queue.done(path)
                if not flushed:
                    flushed = True
                    yield FLUSH
                continue
            flushed = False
            yield Arrival(path)

    def _load(self, arrival: Arrival) -> np.ndarray:
        data, st = read_image_file(arrival.path, self.decode_opts, follow_symlinks=False)
        arrival.stat = st
        arrival.sha256 = hashlib.sha256(data).hexdigest()
        return decode_bytes(data, self.decode_opts, name=str(arrival.path))

    def intake_loop(self) -> None:
        workers = self.config.decode.workers or cpu_count()
        try:
            for batch in embed_stream(self._arrivals(), self._load, self.embedder.embed,
                                      batch_size=self.config.model.batch_size, workers=workers):
                self.filing.put(batch)
        except Exception:  # pragma: no cover - a bug; logged, and the daemon stops cleanly
            log.exception("intake stopped by an unexpected error")
            self.stopping.set()
        finally:
            self.filing.put(None)

    def filing_loop(self) -> None:
        """File embedded batches in the order the network produced them, until intake ends."""
        while (batch := self.filing.get()) is not None:
            try:
                self._handle_batch(batch)
            except Exception:  # pragma: no cover - a bug; logged, and the daemon stops cleanly
                log.exception("filing stopped by an unexpected error")
                self.stopping.set()

    def _handle_batch(self, batch: list[Embedded[Arrival]]) -> None:
        if self.state_pause.paused:
            for result in batch:  # embedded before the pause: filed after it, by the rescan
                self.queue.done(result.item.path)
            return
        accepted = []
        for result in batch:
            if result.error is None:
                accepted.append(result)
                continue
            try:
                self._reject(result.item, result.error)
            except Exception as exc:
                self._left_in_inbox(result.item.path, exc)
            finally:
                self.queue.done(result.item.path)
        if not accepted:
            return
        try:
            self._file_batch(accepted)
        except Exception as exc:
            for result in accepted:
                self._left_in_inbox(result.item.path, exc)
        finally:
            for result in accepted:
                self.queue.done(result.item.path)

    def _left_in_inbox(self, path: Path, exc: Exception) -> None:
        """One file (or batch) must never stop the daemon: it stays in the inbox and is
        tried again when a rescan finds it (watch.rescan_interval_s)."""
        if self.state_failed(exc):
            log.debug("%s left in the inbox: the state folder cannot take commits", path)
        elif isinstance(exc, FileNotFoundError):
            log.debug("%s vanished before it could be filed", path)
        elif isinstance(exc, SourceChangedError):
            # Replaced or rewritten since it was read: the newer file is reported again
            # (the queue keeps a path reported while in flight) and read afresh.
            log.info("%s changed while being filed; will retry when it settles", path)
        elif isinstance(exc, OSError | SegdError):
            # The library is full, read-only or not ours to write: expected, not a bug.
            log.warning("%s: could not be filed: %s; left in the inbox, tried again at the "
                        "next rescan", path, exc)
        else:
            log.error("%s: unexpected error; left in the inbox", path, exc_info=exc)

    def _reject(self, arrival: Arrival, error: ImageError) -> None:
        if isinstance(error, FileAccessError) and not os.path.lexists(arrival.path):
            log.debug("%s vanished before it was read", arrival.path)
            return
        if error.kind in SUSPECT_KINDS and not self._verdict_settled(arrival.path, error):
            return
        with self.intake_lock:
            existing = self.store.find_by_path(arrival.path)
            dest = quarantine_file(self.store, self.config, arrival.path, error,
                                   existing.id if existing else None)
        if dest is not None:
            self.counters.quarantined += 1
            log.warning("quarantined %s -> %s: %s: %s", arrival.path.name, dest.name,
                        error.kind, error.reason)

    def _verdict_settled(self, path: Path, error: ImageError) -> bool:
        """A truncated, corrupt or empty file may be a writer's half-done piece (one that
        closes and reopens between pieces): quarantine it only once the same version has
        failed for quiet_s; until then it stays in the inbox and is re-queued then."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False  # gone meanwhile: nothing to quarantine
        now = time.monotonic()
        sig = Signature(st.st_size, st.st_mtime_ns, st.st_ino)
        with self._suspects_lock:
            verdict = judge(sig, self._suspects.get(path), now, self.config.watch.quiet_s)
            old = self._suspect_timers.pop(path, None)
            if old is not None:
                old.cancel()
            if isinstance(verdict, Quarantine):
                self._suspects.pop(path, None)
                return True
            self._suspects[path] = verdict.suspect

            def requeue() -> None:
                with self._suspects_lock:
                    if self._suspect_timers.get(path) is timer:
                        del self._suspect_timers[path]
                    if not os.path.lexists(path):
                        self._suspects.pop(path, None)  # filed or removed meanwhile
                        return
                if not self.stopping.is_set():
                    self.queue.put(path)

            # A daemon thread: a stop neither waits for it nor lets it queue anything.
            timer = threading.Timer(max(0.0, verdict.until - now) + 0.05, requeue)
            timer.daemon = True
            self._suspect_timers[path] = timer
            timer.start()
        log.info("%s looks %s (%s); waiting %.3g s for its writer before quarantining it",
                 path.name, error.kind, error.reason, verdict.until - now)
        return False

    def _unchanged(self, arrival: Arrival) -> bool:
        """Still the file that was read? (A refit may have filed it meanwhile, a user may
        have removed it, or a writer may still be at work on it.)"""
        try:
            now = os.lstat(arrival.path)
        except FileNotFoundError:
            log.debug("%s is gone (filed by a refit or removed)", arrival.path)
            return False
        st = arrival.stat
        assert st is not None
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
            # Its next close event (or quiet period) brings it back once it settles.
            log.info("%s changed while being read; will retry when it settles", arrival.path)
            return False
        return True

    def _file_batch(self, results: list[Embedded[Arrival]]) -> None:
        """Assign and file a network batch: rows in one commit, moves journaled together."""
        # Under the intake lock nothing else moves inbox files (refits take it too), so the
        # checks made while staging still hold when the moves start.
        with self.intake_lock:
            staged: list[tuple[Embedded[Arrival], MovePlan]] = []
            with self.store.transaction():
                for result in results:
                    try:
                        plan = self._stage(result.item, result.embedding)
                    except (OSError, SegdError) as exc:
                        self._left_in_inbox(result.item.path, exc)
                        continue
                    if plan is not None:
                        staged.append((result, plan))
            outcomes = journaled_moves(self.store, [plan for _, plan in staged])
            filed = Counter(plan.filing.cluster_id for (_, plan), outcome
                            in zip(staged, outcomes, strict=True) if isinstance(outcome, Path))
            with self.store.transaction():
                for cluster_id, count in filed.items():
                    self.store.add_to_cluster_size(cluster_id, count)
                for (_, plan), outcome in zip(staged, outcomes, strict=True):
                    if not isinstance(outcome, Path):
                        self.store.delete_image(plan.image_id)
        for (result, plan), outcome in zip(staged, outcomes, strict=True):
            if not isinstance(outcome, Path):
                self._left_in_inbox(plan.src, outcome)
                continue
            self.counters.sorted += 1
            ms = (time.perf_counter() - result.item.started) * 1000.0
            log.info("sorted %s -> %s/%s (distance %.3f, %.0f ms, decode %.0f ms)",
                     plan.src.name, plan.folder.name, outcome.name, plan.filing.distance,
                     ms, result.decode_ms)

    def _stage(self, arrival: Arrival, embedding: np.ndarray | None) -> MovePlan | None:
        """Record one arrival and plan its move; None when it is not to be moved now."""
        assert embedding is not None
        path = arrival.path
        if not self._unchanged(arrival):
            return None
        plan = plan_arrival(self.store.find_by_path(path), arrival.sha256, embedding,
                            self.centroid_ids, self.centroids)
        if plan.forget is not None:
            self.store.delete_image(plan.forget)  # a stale row for a reused name
        if plan.filing is None:
            self._keep_pending(arrival, embedding, plan)
            return None
        assert plan.filing.cluster_id is not None
        folder = resolve_cluster_folder(self.store, self.config.library, plan.filing.cluster_id)
        image_id = self._record(arrival, embedding, plan.image_id)
        return MovePlan(image_id, path, folder, path.name, plan.filing, expected=arrival.stat)

    def _record(self, arrival: Arrival, embedding: np.ndarray, image_id: int | None) -> int:
        """Store what was read: a new pending row, or the new bytes of the file's own row."""
        if image_id is None:
            return self.store.add_image(arrival.sha256, arrival.path.name, arrival.path,
                                        "pending", embedding=embedding)
        self.store.record_content(image_id, arrival.sha256, embedding)
        return image_id

    def _keep_pending(self, arrival: Arrival, embedding: np.ndarray, plan: ArrivalPlan) -> None:
        if not plan.record:
            return  # already waiting
        self._record(arrival, embedding, plan.image_id)
        self.counters.pending += 1
        log.info("pending %s (no clusters yet: %s; it waits in the inbox)", arrival.path.name,
                 self.refits.first_fit_wait())

    # ---- the state folder ---------------------------------------------------------------

    def state_failed(self, exc: BaseException) -> bool:
        """Whether `exc` says the state folder cannot take commits; the first such failure
        pauses the daemon (one warning, one STATUS=)."""
        reason = classify(exc, self.config.state_dir)
        if reason is None:
            return False
        with self._pause_lock:
            began = self.state_pause.pause(reason, time.monotonic())
        if began:
            log.warning("%s: not taking files until it can take commits again; they wait in "
                        "the inbox, refits and undo wait too; trying again every %.0f s",
                        reason.describe(self.config.state_dir), STATE_PROBE_S)
            notify.status(self.status_line())
        return True

    def refuse_while_paused(self, what: str) -> None:
        reason = self.state_pause.reason
        if reason is not None:
            raise StateUnavailableError(f"{what} refused: {reason.describe(self.config.state_dir)}"
                                        "; it works again once the folder can take commits")

    def _try_resume(self) -> None:
        """Probe the paused state folder; on success settle what the failure interrupted
        (with no filing, refit or undo under way) and hand the inbox back to intake."""
        reason: StateUnavailable | None = probe_state(self.store, self.config.state_dir)
        recovered = 0
        if reason is None:
            if not self.refits.lock.acquire(blocking=False):
                return  # a refit begun before the pause is still ending: next probe
            try:
                with self.intake_lock:
                    recovered = settle_interrupted(self.store, self.config)
                    self.centroid_ids, self.centroids = self.store.centroid_matrix()
            except Exception as exc:
                reason = classify(exc, self.config.state_dir)
                if reason is None:
                    raise
            finally:
                self.refits.lock.release()
        with self._pause_lock:
            if reason is not None:
                self.state_pause.probe_failed(reason, time.monotonic())
                return
            paused_s = self.state_pause.resume(time.monotonic())
        log.info("the state folder %s takes commits again after %.0f s: resuming; %d "
                 "interrupted move(s) settled; rescanning the inbox", self.config.state_dir,
                 paused_s, recovered)
        notify.status(self.status_line())
        self.watcher.rescan()

    # ---- control ------------------------------------------------------------------------

    def handle_control(self, message: dict[str, Any]) -> dict[str, Any]:
        if message["cmd"] == "status":
            return {"ok": True, "status": self.live_status()}
        if message["cmd"] == "refit":
            report = self.refits.refit("on demand", k=message.get("k"),
                                       dry_run=bool(message.get("dry_run")))
            return {"ok": True, "refit": report.to_dict(), "summary": report.summary()}
        if message["cmd"] == "undo":
            with self.refits.lock, self.intake_lock:  # no refit, no filing meanwhile
                self.refuse_while_paused("undo")
                try:
                    undone = undo_last_refit(self.store, self.config)
                except Exception as exc:
                    if self.state_failed(exc):
                        self.refuse_while_paused("undo")
                    raise
                finally:
                    self.centroid_ids, self.centroids = self.store.centroid_matrix()
            return {"ok": True, "summary": undone.summary()}
        return {"ok": False, "error": f"unknown command {message['cmd']!r}"}

    def live_status(self) -> dict[str, Any]:
        r = self.embedder.report
        with self._pause_lock:
            reason, since = self.state_pause.reason, self.state_pause.since
        state = None if reason is None else {
            "kind": reason.kind, "detail": reason.detail,
            "message": reason.describe(self.config.state_dir),
            "for_s": round(time.monotonic() - since, 1)}
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "providers": list(r.active),
            "on_gpu": r.on_gpu,
            "gpu_fallback_reason": r.fallback_reason,
            "watch_mode": self.watcher.mode,
            "queue_depth": len(self.queue),
            "in_flight": self.queue.in_flight,
            "refit_running": self.refits.lock.locked(),
            "clusters_waiting": self.refits.waiting,  # why no clusters yet (None: there are)
            "state_unavailable": state,  # why nothing is filed now (None: the store commits)
            "this_run": dataclasses.asdict(self.counters),
        }

    def status_line(self) -> str:
        reason = self.state_pause.reason
        paused = "" if reason is None else \
            f"PAUSED, {reason.describe(self.config.state_dir)}; files wait in the inbox; "
        try:
            return paused + self._counts_line()
        except SegdError as exc:  # a failing disk may refuse reads too
            return paused + f"store unreadable: {exc}"

    def _counts_line(self) -> str:
        counts = self.store.count_by_state()
        device = "GPU" if self.embedder.report.on_gpu else "CPU"
        waiting = self.refits.waiting
        clusters = f"{len(self.centroids)} clusters" if waiting is None else \
            f"no clusters yet ({waiting})"
        return (f"{counts['sorted']} sorted, {counts['pending']} pending, "
                f"{counts['quarantined']} quarantined, queue {len(self.queue)}, "
                f"{clusters}, on {device}")

    # ---- reload -------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply a new config, or keep the old one and say why."""
        notify.reloading()
        source = self.config.source
        try:
            if source is None:
                raise ConfigError("(file)", "segd started without a config file")
            new = parse_config_file(source)
        except SegdError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            notify.ready(f"reload failed: {exc}")
            return
        restart_needed = [key for key in ("inbox", "library", "quarantine", "state_dir",
                                          "model", "decode")
                          if getattr(new, key) != getattr(self.config, key)]
        if restart_needed:
            log.warning("config reload: %s changed; these take effect after a restart",
                        ", ".join(restart_needed))
            new = dataclasses.replace(new, **{k: getattr(self.config, k) for k in restart_needed})
        watch_changed = new.watch != self.config.watch
        self.config = new
        logging.getLogger().setLevel(new.log_level.upper())
        if watch_changed:
            self.watcher.stop()
            self.watcher = InboxWatcher(new.inbox, new.watch, self._on_ready)
            self.watcher.start()
        log.info("config reloaded from %s", source)
        notify.ready(self.status_line())

    # ---- main loop ----------------------------------------------------------------------

    def serve(self) -> int:
        intake = threading.Thread(target=self.intake_loop, name="segd-intake", daemon=True)
        filing = threading.Thread(target=self.filing_loop, name="segd-filing", daemon=True)
        filing.start()
        intake.start()
        self.watcher.start()  # start-up scan: files already in the inbox are queued now
        log.info("watching %s (%s) -> %s; %s", self.config.inbox, self.watcher.mode,
                 self.config.library, self.status_line())
        notify.ready(self.status_line())
        ping_every = notify.watchdog_interval()
        tick = min(1.0, ping_every) if ping_every else 1.0
        last_status = 0.0
        while not self.stopping.wait(tick):
            if ping_every:
                notify.watchdog_ping()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if self.state_pause.probe_due(time.monotonic()):
                self._try_resume()
            self.refits.maybe_start()
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                last_status = time.monotonic()
                notify.status(self.status_line())
        notify.stopping()
        log.info("stopping: finishing %d file(s) in flight", self.queue.in_flight)
        self.watcher.stop()
        self.queue.close()
        intake.join()
        filing.join()
        self.refits.join()
        log.info("stopped; %s", self.status_line())
        return 0


def run_daemon(config: Config) -> int:
    if not _wait_for_state_dir(config):
        return 0
    check_folders_writable(config)
    lock: StateLock = acquire_state_lock(config.lock_path, "daemon")
    store = open_store(config.db_path)
    control: ControlServer | None = None
    try:
        embedder = Embedder.from_config(config.model)
        store.bind_model(embedder.identity, embedder.spec.embedding_dim)
        recovered = recover_moves(
            store, lambda move, image: filing_after_move(store, config, move, image))
        summary = reconcile(store, config)
        if recovered or summary:
            log.info("start-up recovery: %d interrupted move(s) settled; %s", recovered,
                     summary or "store and disk agree")
        daemon = Daemon(config, embedder, store)
        last = store.last_fit()
        if last is not None:
            daemon.refits.last_fit_at, daemon.refits.last_fit_n = last.at, last.n
        control = ControlServer(config.socket_path, daemon.handle_control)
        control.start()
        _install_signals(daemon)
        return daemon.serve()
    finally:
        try:
            if control is not None:
                control.stop()
        except OSError as exc:  # a state folder turned read-only keeps the socket's name
            log.warning("could not remove the control socket: %s", exc)
        finally:
            store.close()
            lock.release()


def _wait_for_state_dir(config: Config) -> bool:
    """A state folder that cannot be written at start (read-only, full): say so and wait
    until it can, rather than exit for systemd to restart into the same wall. False when
    stopped while waiting. A folder not there yet is made (or refused) as usual after."""
    state_dir = config.state_dir
    if not state_dir.is_dir() or (reason := look_at_state_dir(state_dir)) is None:
        return True
    stop = threading.Event()
    waiting = f"PAUSED, {reason.describe(state_dir)}; waiting for it before starting"

    def reload(*_: object) -> None:
        # Nothing runs yet that a reload could change; answered, so that a `systemctl
        # reload` neither waits in vain nor kills the process (SIGHUP's default).
        notify.reloading()
        notify.ready(waiting)

    handlers = {signum: signal.signal(signum, lambda *_: stop.set())
                for signum in (signal.SIGTERM, signal.SIGINT)}
    handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        log.warning("%s: waiting for it before starting; files wait in the inbox; trying "
                    "again every %.0f s", reason.describe(state_dir), STATE_PROBE_S)
        # READY: the service is up and says why it waits (systemd would otherwise kill it
        # at TimeoutStartSec and restart it into the same folder).
        notify.ready(waiting)
        ping_every = notify.watchdog_interval()
        next_probe = time.monotonic() + STATE_PROBE_S
        while not stop.wait(min(1.0, ping_every) if ping_every else 1.0):
            if ping_every:
                notify.watchdog_ping()
            if time.monotonic() < next_probe:
                continue
            if look_at_state_dir(state_dir) is None:
                log.info("the state folder %s can be written again: starting", state_dir)
                return True
            next_probe = time.monotonic() + STATE_PROBE_S
        notify.stopping()
        log.info("stopped while waiting for the state folder %s", state_dir)
        return False
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _install_signals(daemon: Daemon) -> None:
    def stop(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())


