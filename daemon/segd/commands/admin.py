"""`segd refit` and `segd status`: ask the running daemon, or do the work directly."""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import time
from pathlib import Path
from typing import Any

from segd.config import Config
from segd.core.cluster import FitParams
from segd.service import control
from segd.service.privileges import refuse_root
from segd.state.lock import acquire_state_lock, read_lock_holder
from segd.state.refit import run_refit
from segd.state.store import open_store
from segd.views.overview import ClusterSample, write_overview

log = logging.getLogger(__name__)


def refit_command(config: Config, *, k: int | str, dry_run: bool, allow_root: bool) -> int:
    k_arg = k if isinstance(k, int) else None
    try:
        answer = control.request(config.socket_path,
                                 {"cmd": "refit", "k": k_arg, "dry_run": dry_run})
    except control.DaemonNotRunning:
        answer = None
    if answer is not None:
        if not answer.get("ok"):
            print(f"segd: the daemon refused the refit: {answer.get('error')}")
            return 1
        print(f"(asked the running daemon) {answer['summary']}")
        return 0

    refuse_root(allow_root, "refit the store")
    if not config.db_path.exists():
        print(f"segd: nothing to refit: no store at {config.db_path}")
        return 1
    with acquire_state_lock(config.lock_path, "refit"):
        store = open_store(config.db_path)
        try:
            params = FitParams.from_config(config.clustering)
            if isinstance(k, int):
                params = dataclasses.replace(params, k=k)
            report = run_refit(store, config, params, "segd refit", dry_run=dry_run)
        finally:
            store.close()
    print(report.summary())
    return 0


def collect_status(config: Config) -> dict[str, Any]:
    status: dict[str, Any] = {"config": str(config.source) if config.source else None,
                              "inbox": str(config.inbox), "library": str(config.library),
                              "quarantine": str(config.quarantine),
                              "state_dir": str(config.state_dir)}
    try:
        answer = control.request(config.socket_path, {"cmd": "status"}, timeout=10)
        status["daemon"] = answer.get("status") if answer.get("ok") else None
    except control.ControlError as exc:
        status["daemon"] = None
        holder = read_lock_holder(config.lock_path) if config.lock_path.exists() else None
        status["daemon_note"] = (f"store held by pid {holder[0]} ({holder[1]})" if holder
                                 else "not running" if isinstance(exc, control.DaemonNotRunning)
                                 else str(exc))
    if not config.db_path.exists():
        status["store"] = None
        return status
    store = open_store(config.db_path, readonly=True)
    try:
        with store.snapshot():
            counts = store.count_by_state()
            clusters = store.clusters(active_only=True)
            fit = store.last_fit()
    finally:
        store.close()
    status["counts"] = counts
    status["clusters"] = [{"id": c.id, "folder": c.folder, "size": c.size,
                           "path": str(config.library / c.folder)} for c in clusters]
    status["last_fit"] = None if fit is None else {
        "at": fit.at, "n": fit.n, "k": fit.k, "silhouette": fit.silhouette,
        "scores": {str(k): v for k, v in fit.scores.items()}, "moved": fit.moved,
        "duration_s": fit.duration_s, "trigger": fit.trigger}
    return status


def status_command(config: Config, *, as_json: bool, overview: Path | None = None) -> int:
    status = collect_status(config)
    if overview is not None and status.get("clusters"):
        write_library_overview(config, overview)
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    daemon = status.get("daemon")
    if daemon:
        device = "GPU" if daemon["on_gpu"] else "CPU"
        print(f"daemon:      running (pid {daemon['pid']}, up {daemon['uptime_s']:.0f} s, "
              f"watching {status['inbox']} by {daemon['watch_mode']})")
        print(f"providers:   {device}: {', '.join(daemon['providers'])}")
        if daemon.get("gpu_fallback_reason"):
            print(f"             GPU NOT IN USE: {daemon['gpu_fallback_reason']}")
        print(f"queue:       {daemon['queue_depth']} waiting, {daemon['in_flight']} in flight"
              + (", refit running" if daemon["refit_running"] else ""))
    else:
        print(f"daemon:      {status.get('daemon_note', 'not running')}")
    counts = status.get("counts")
    if counts is None:
        print(f"store:       none yet at {config.db_path}")
        return 0
    print(f"images:      {counts['sorted']} sorted, {counts['pending']} pending "
          f"(waiting in the inbox), {counts['quarantined']} quarantined")
    fit = status["last_fit"]
    if fit:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fit["at"]))
        sil = f"{fit['silhouette']:.3f}" if fit["silhouette"] is not None else "n/a"
        print(f"last fit:    {when} ({fit['trigger']}), n={fit['n']}, k={fit['k']}, "
              f"silhouette {sil}, {fit['moved']} files moved")
    else:
        print("last fit:    none yet")
    print(f"clusters:    {len(status['clusters'])}")
    for c in status["clusters"]:
        print(f"  {c['folder']:<28} {c['size']:7d}  {c['path']}")
    if overview is not None and status.get("clusters"):
        print(f"overview:    {overview}")
    return 0


def write_library_overview(config: Config, out: Path, per_cluster: int = 8) -> None:
    """Contact sheet of the library: each cluster's images closest to its centroid."""
    store = open_store(config.db_path, readonly=True)
    try:
        with store.snapshot():
            clusters = store.clusters(active_only=True)
            best: dict[int, list[tuple[float, int, Path]]] = {c.id: [] for c in clusters}
            for image in store.iter_images(state="sorted"):
                heap = best.get(image.cluster_id or -1)
                if heap is None:
                    continue
                heapq.heappush(heap, (-(image.distance or 0.0), image.id, image.path))
                if len(heap) > per_cluster:
                    heapq.heappop(heap)
    finally:
        store.close()
    write_overview([ClusterSample(c.folder, c.size,
                                  [p for _, _, p in sorted(best[c.id], reverse=True)])
                    for c in clusters], out)
