"""`segd status`: the daemon, the store's counts, the clusters and the last fit."""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segd.service import control
from segd.state.lock import read_lock_holder

if TYPE_CHECKING:
    from segd.config import Config

# The store (and numpy with it) is imported only when there is one to read: `segd status`
# is asked often and must answer at once (tests/commands/test_imports.py).

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="show the daemon and the clusters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--overview", type=Path, metavar="FILE",
                   help="also write a contact sheet of the clusters (PNG/JPG)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    return status_command(config, as_json=args.json, overview=args.overview)


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
    from segd.state.store import open_store
    from segd.views.quarantine_report import latest_quarantined

    store = open_store(config.db_path, readonly=True)
    try:
        with store.snapshot():
            counts = store.count_by_state()
            clusters = store.clusters(active_only=True)
            fit = store.last_fit()
            quarantined = latest_quarantined(store.iter_images(state="quarantined"))
    finally:
        store.close()
    status["counts"] = counts
    status["quarantine_latest"] = [e.to_dict() for e in quarantined]
    status["clusters"] = [{"id": c.id, "folder": c.folder, "size": c.size,
                           "path": str(config.library / c.folder)} for c in clusters]
    status["last_fit"] = None if fit is None else {
        "at": fit.at, "n": fit.n, "k": fit.k, "silhouette": fit.silhouette,
        "scores": {str(k): v for k, v in fit.scores.items()}, "moved": fit.moved,
        "duration_s": fit.duration_s, "trigger": fit.trigger, "rule": fit.rule,
        "runner_up": fit.runner_up, "margin": fit.margin}
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
        if daemon.get("state_unavailable"):
            print(f"             PAUSED: {daemon['state_unavailable']['message']}; "
                  "files wait in the inbox")
    else:
        print(f"daemon:      {status.get('daemon_note', 'not running')}")
    counts = status.get("counts")
    if counts is None:
        print(f"store:       none yet at {config.db_path}")
        return 0
    print(f"images:      {counts['sorted']} sorted, {counts['pending']} pending "
          f"(waiting in the inbox), {counts['quarantined']} quarantined")
    from segd.views.quarantine_report import quarantine_lines

    for line in quarantine_lines(status["quarantine_latest"], counts["quarantined"]):
        print(line)
    fit = status["last_fit"]
    if fit:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fit["at"]))
        sil = f"{fit['silhouette']:.3f}" if fit["silhouette"] is not None else "n/a"
        print(f"last fit:    {when} ({fit['trigger']}), n={fit['n']}, k={fit['k']}"
              f"{how_sure(fit)}, silhouette {sil}, {fit['moved']} files moved")
    else:
        print("last fit:    none yet")
    waiting = daemon.get("clusters_waiting") if daemon else None
    print(f"clusters:    {len(status['clusters'])}" + (f" ({waiting})" if waiting else ""))
    for c in status["clusters"]:
        print(f"  {c['folder']:<28} {c['size']:7d}  {c['path']}")
    if overview is not None and status.get("clusters"):
        print(f"overview:    {overview}")
    return 0


def how_sure(fit: dict[str, Any]) -> str:
    """How sure the fit's k was: " (strength, margin +0.031, runner-up k = 5)"."""
    if fit.get("rule") in (None, "fixed"):
        return " (as asked)" if fit.get("rule") == "fixed" else ""
    parts = [fit["rule"]]
    if fit.get("margin") is not None:
        parts.append(f"margin {fit['margin']:+.3f}")
    if fit.get("runner_up") is not None:
        parts.append(f"runner-up k = {fit['runner_up']}")
    return f" ({', '.join(parts)})"


def write_library_overview(config: Config, out: Path, per_cluster: int = 8) -> None:
    """Contact sheet of the library: each cluster's images closest to its centroid."""
    from segd.state.store import open_store
    from segd.views.overview import ClusterSample, write_overview  # OpenCV: only when asked

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
