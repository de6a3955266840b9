"""`segd sort --engine ray`: embed shards on a Ray cluster, cluster on the driver, place safely.

What runs where (docs/scale.md):
  * driver: lists SRC once, cuts it into shards (batch.shards), starts one Ray Data actor
    pool; each actor loads the model once and runs segd's decode-and-embed pipeline on one
    shard at a time, writing a shard file under DEST. Shards already on disk for the same
    model and input are skipped, so a killed driver resumes where it stopped.
  * driver: streams the shard files into core.cluster.fit_stream (projection and k chosen on
    a sample; above 100,000 rows the whole fit is decided on a sample and applied in one
    more pass), then decides every destination name and journals the plan (batch.placement).
  * Ray tasks: place slices of the plan; a retried slice duplicates nothing.

Every node must see SRC and DEST at the same paths (a shared filesystem), and have segd
installed with the `ray` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from segd.batch import placement, shards
from segd.batch.placement import Outcome, PlanEntry
from segd.batch.shards import Entry, Shard
from segd.batch.sort import SortOptions, SortResult, list_images
from segd.config import GpuPolicy, ModelConfig
from segd.core.cluster import FitParams, FitResult, fit_stream
from segd.core.errors import SegdError, StoreError
from segd.core.library import UNREADABLE_FOLDER, cluster_folder_name
from segd.media.decode import DecodeOptions
from segd.media.embed import Embedder, model_file
from segd.state.lock import acquire_state_lock
from segd.views.progress import Progress

log = logging.getLogger(__name__)

RAY_MISSING = ("--engine ray needs Ray: install segd with the `ray` extra, "
               "pip install 'segd[ray]' (on the driver and on every node)")
DEFAULT_ACTOR_CPUS = 4  # per actor on CPU nodes: one model, this many decoders and ORT threads
PLACE_SLICE = 2000  # plan entries per placement task
JOB_FILE, PLAN_FILE, FIT_FILE = "job.json", "plan.csv", "fit.npz"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # HOST:PORT of a running cluster; None: start one here
    shard_size: int = shards.DEFAULT_SHARD_SIZE
    actor_cpus: int = 0  # CPUs per actor on CPU nodes; 0: min(4, the smallest node's)
    max_actors: int = 0  # 0: as many as the cluster's resources hold
    place_slice: int = PLACE_SLICE


@dataclass(frozen=True)
class NodeResources:
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class ActorShape:
    """The resources of each embedding actor, and how many of them the cluster holds."""

    cpus: int
    gpus: int
    actors: int

    def describe(self, nodes: int) -> str:
        each = f"1 GPU + {self.cpus} CPU" if self.gpus else f"{self.cpus} CPU"
        return f"Ray, {self.actors} actors of {each} on {nodes} node{'s' * (nodes != 1)}"


@dataclass(frozen=True)
class EmbedJob:
    """What each actor needs: small, so actors restart cheaply (never the model's bytes)."""

    dest: Path
    model: ModelConfig  # its path set to the one file every actor loads
    identity: str  # Embedder.identity that file must give
    decode: DecodeOptions  # size set to the model's input
    batch_size: int
    workers: int  # decoding threads per actor


def ray_options(args: argparse.Namespace) -> RayOptions:
    """The command line's --address, --shard-size and --actor-cpus (segd.commands.sort)."""
    if (args.shard_size is not None and args.shard_size < 1) or (
            args.actor_cpus is not None and args.actor_cpus < 1):
        raise SegdError("--shard-size and --actor-cpus must be at least 1")
    return RayOptions(address=args.address,
                      shard_size=args.shard_size or shards.DEFAULT_SHARD_SIZE,
                      actor_cpus=args.actor_cpus or 0)


def actor_shape(nodes: Sequence[NodeResources], gpu: GpuPolicy, actor_cpus: int = 0,
                max_actors: int = 0) -> ActorShape:
    """One actor per GPU, with its node's CPUs per GPU decoding, when the cluster has GPUs
    and the policy allows; otherwise CPU actors of `actor_cpus` each."""
    if not nodes:
        raise SegdError("the Ray cluster has no live node")
    gpu_nodes = [n for n in nodes if n.gpus >= 1]
    if gpu == "required" and not gpu_nodes:
        raise SegdError("model.gpu is 'required' but no node of the Ray cluster has a GPU")
    if gpu != "off" and gpu_nodes:
        cpus = max(1, min(int(n.cpus // n.gpus) for n in gpu_nodes))
        count = sum(int(n.gpus) for n in gpu_nodes)
        return ActorShape(cpus, 1, min(count, max_actors) if max_actors else count)
    cpus = actor_cpus or max(1, min(DEFAULT_ACTOR_CPUS, int(min(n.cpus for n in nodes))))
    count = sum(int(n.cpus // cpus) for n in nodes)
    if count < 1:
        raise SegdError(f"no node of the Ray cluster has {cpus} CPUs for an actor")
    return ActorShape(cpus, 0, min(count, max_actors) if max_actors else count)


def import_ray() -> ModuleType:
    try:
        import ray
        import ray.data  # the extra installs both: say so if only half is there
    except ImportError as exc:
        raise SegdError(RAY_MISSING) from exc
    return ray


class ShardWorker:
    """A Ray Data actor: loads the model once, then embeds whole shards."""

    def __init__(self, job: EmbedJob) -> None:
        self.job = job
        self.embedder = Embedder.from_config(job.model)
        if self.embedder.identity != job.identity:
            raise SegdError(f"this node's model {job.model.path} is not the driver's "
                            f"({self.embedder.identity[:12]} vs {job.identity[:12]})")
        self.host = socket.gethostname()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        for i in range(len(batch["key"])):
            shard = Shard(int(batch["index"][i]), str(batch["key"][i]), int(batch["offset"][i]),
                          int(batch["length"][i]), int(batch["count"][i]))
            done.append(shards.embed_shard(
                self.job.dest, shard, identity=self.job.identity, decode=self.job.decode,
                embed=self.embedder.embed, dim=self.embedder.spec.embedding_dim,
                batch_size=self.job.batch_size, workers=self.job.workers, host=self.host))
        return {"key": np.array([s.key for s in done]),
                "count": np.array([s.count for s in done]),
                "failed": np.array([s.failed for s in done]),
                "seconds": np.array([s.seconds for s in done])}


class JobProgress(Progress):
    """The embedding progress over images (rate, ETA), with the shards done in its label."""

    def shards(self, done: int, total: int) -> None:
        self.label = f"embedding, shard {done}/{total}"
        if self._bar is not None:
            self._bar.set_description(self.label, refresh=False)


def run_sort_ray(opts: SortOptions, model: ModelConfig, ray_opts: RayOptions) -> SortResult:
    """`segd sort` on Ray: the local engine's result, manifest and folders (see module doc)."""
    started = time.perf_counter()
    explicit = ray_opts.address or os.environ.get("RAY_ADDRESS")
    if explicit and ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys()):
        # Ray enables token authentication by itself only for a cluster it finds locally;
        # a token given for an explicit address means the cluster wants it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray = import_ray()
    if not opts.src.is_dir():
        raise SegdError(f"source folder not found: {opts.src}")
    if opts.dest.resolve() == opts.src.resolve():
        raise SegdError("SRC and DEST must be different folders")
    if ray_opts.shard_size < 1:
        raise SegdError("the shard size must be at least 1")
    root = shards.shard_root(opts.dest)
    root.mkdir(parents=True, exist_ok=True)
    params = _fit_params(opts)
    with _job_lock(root), _connected(ray, ray_opts.address):
        shards.remove_temporaries(opts.dest)  # we hold the lock: no worker of ours writes
        nodes = _nodes(ray)
        shape = actor_shape(nodes, model.gpu, ray_opts.actor_cpus, ray_opts.max_actors)
        device = shape.describe(len(nodes))
        job_dir = root / "job"
        fingerprint = _fingerprint(opts, model, params)
        stats = _Stats()
        if (job_dir / JOB_FILE).is_file():
            fit, plan = _resume(job_dir, fingerprint)
            log.info("resuming the placement planned in %s", job_dir)
            embed_seconds = 0.0
        else:
            listing = time.perf_counter()  # Ray is up: from here, as the local engine
            fit, plan = _embed_and_plan(ray, opts, model, ray_opts, params, shape, stats)
            embed_seconds = stats.embed_seconds - listing
            _write_job(job_dir, fingerprint, fit, plan)
        outcomes = _place(ray, opts, plan, job_dir, ray_opts.place_slice, shape)
        manifest = placement.write_manifest(opts.dest, plan, outcomes)
        _remove_job(job_dir)
    folders, sizes = _folders_and_sizes(plan, fit)
    # Shard files of an earlier run count as the cache: they spared the network.
    return SortResult(fit=fit, folders=folders, sizes=sizes, unreadable=manifest.unreadable,
                      placed=manifest.placed, seconds=time.perf_counter() - started,
                      embed_seconds=embed_seconds, samples=manifest.samples,
                      embedded=stats.embedded, cached=stats.resumed,
                      device=device if stats.embedded else None)


@dataclass
class _Stats:
    embedded: int = 0  # readable images embedded by this run
    resumed: int = 0  # readable images found in shard files of an earlier run
    embed_seconds: float = 0.0  # perf_counter at the end of the embedding


def _embed_and_plan(ray: ModuleType, opts: SortOptions, model: ModelConfig,
                    ray_opts: RayOptions, params: FitParams, shape: ActorShape,
                    stats: _Stats) -> tuple[FitResult | None, list[PlanEntry]]:
    paths = list_images(opts.src, opts.recursive, exclude=opts.dest)
    entries = shards.stat_entries(paths)
    job = _embed_job(opts, model, shape)
    listed = shards.write_listing(opts.dest, entries, ray_opts.shard_size, job.identity,
                                  job.decode)
    pending = [s for s in listed if not shards.is_done(opts.dest, s)]
    resumed = len(listed) - len(pending)
    if resumed:
        log.info("%d of %d shards were embedded by an earlier run; %d to go", resumed,
                 len(listed), len(pending))
    _embed(ray, pending, job, shape, opts.progress, len(listed), resumed)
    stats.embed_seconds = time.perf_counter()

    contents = [shards.read_shard(opts.dest, s) for s in listed]
    pending_keys = {s.key for s in pending}
    readable: list[Entry] = []
    unreadable: list[tuple[Entry, str, str]] = []
    for shard, got in zip(listed, contents, strict=True):
        ok = int(got.ok.sum())
        if shard.key in pending_keys:
            stats.embedded += ok
        else:
            stats.resumed += ok
        for i, entry in enumerate(got.entries):
            if got.ok[i]:
                readable.append(entry)
            else:
                err = got.errors[i]
                unreadable.append((entry, err.kind, err.reason))

    n = len(readable)
    fit: FitResult | None = None
    labels = np.zeros(n, dtype=np.int64)
    distances = np.zeros(n, dtype=np.float32)
    if n >= 2:
        with_rows = [s for s, c in zip(listed, contents, strict=True) if c.ok.any()]
        fit = fit_stream(shards.embedding_chunks(opts.dest, with_rows), n, params)
        labels, distances = fit.labels, fit.distances
    k = fit.k if fit else (1 if n else 0)
    return fit, _plan(opts.dest, readable, labels, distances, k, unreadable)


def _plan(dest: Path, readable: Sequence[Entry], labels: np.ndarray, distances: np.ndarray,
          k: int, unreadable: Sequence[tuple[Entry, str, str]]) -> list[PlanEntry]:
    """Every destination, decided now: clusters numbered by size (cluster-01 the largest),
    names suffixed past what DEST holds and past each other, as the local engine does."""
    counts = np.bincount(labels, minlength=k) if len(readable) else np.zeros(0, dtype=np.int64)
    order = sorted(range(k), key=lambda c: (-counts[c], c))
    folders = [""] * k
    for rank, cluster in enumerate(order, start=1):
        folders[cluster] = cluster_folder_name(rank)
    # An unreadable entry that is no regular file stays where it is: it takes no name.
    aside = [e.path.is_file() for e, _, _ in unreadable]
    wanted = [(folders[label], e.path.name) for e, label in zip(readable, labels, strict=True)]
    wanted += [(UNREADABLE_FOLDER, e.path.name)
               for (e, _, _), moved in zip(unreadable, aside, strict=True) if moved]
    slots = iter(placement.decide_slots(dest, wanted))
    plan = [PlanEntry(i, e.path, e.size, e.mtime_ns, folders[label], e.path.name, next(slots),
                      int(label), float(dist))
            for i, (e, label, dist) in enumerate(zip(readable, labels, distances, strict=True))]
    for (e, kind, reason), moved in zip(unreadable, aside, strict=True):
        plan.append(PlanEntry(len(plan), e.path, e.size, e.mtime_ns, UNREADABLE_FOLDER,
                              e.path.name, next(slots) if moved else 0, kind=kind,
                              reason=reason))
    return plan


def _embed(ray: ModuleType, pending: Sequence[Shard], job: EmbedJob, shape: ActorShape,
           show: bool, total_shards: int, done_before: int) -> None:
    if not pending:
        return
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's own bar covers the job
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    actors = min(shape.actors, len(pending))
    items = [{"index": s.index, "key": s.key, "offset": s.offset, "length": s.length,
              "count": s.count} for s in pending]
    # A path shard per block, handed to the actors as is: Ray never lists or reads the
    # images itself (read_images spends hours on metadata for 1e8 paths).
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ShardWorker, fn_constructor_kwargs={"job": job}, batch_size=1,
                        batch_format="numpy",
                        compute=ActorPoolStrategy(min_size=1, max_size=actors,
                                                  initial_size=actors),
                        num_cpus=shape.cpus, num_gpus=shape.gpus or None)
    images = sum(s.count for s in pending)
    done = done_before
    with JobProgress(images, "embedding", enabled=show) as progress:
        progress.shards(done, total_shards)
        try:
            for row in ds.iter_rows():
                done += 1
                progress.shards(done, total_shards)
                progress.advance(int(row["count"]), int(row["failed"]))
        except Exception as exc:
            raise SegdError(f"embedding on Ray failed: {_last_line(exc)}") from exc


def _place(ray: ModuleType, opts: SortOptions, plan: Sequence[PlanEntry], job_dir: Path,
           slice_size: int, shape: ActorShape) -> dict[int, Outcome]:
    """Place the plan's slices as Ray tasks, a bounded number in flight; retried on a lost
    worker (the journals make a retry harmless)."""
    task = ray.remote(num_cpus=1, max_retries=3)(placement.place_slice)
    parts = list(placement.slices(plan, slice_size))
    window = max(2, 2 * shape.actors)
    outcomes: dict[int, Outcome] = {}
    running: dict[Any, int] = {}
    todo = iter(enumerate(parts))
    with Progress(len(plan), "placing", enabled=opts.progress) as progress:
        while True:
            for i, part in todo:
                ref = task.remote(opts.dest, part, job_dir / f"placed-{i:06d}.jsonl",
                                  move=opts.move)
                running[ref] = len(part)
                if len(running) >= window:
                    break
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                for outcome in ray.get(ref):
                    outcomes[outcome.index] = outcome
                progress.advance(running.pop(ref))
    return outcomes


def _embed_job(opts: SortOptions, model: ModelConfig, shape: ActorShape) -> EmbedJob:
    """Resolve the one model file every actor loads, and what it must embed to."""
    path = model_file(model.path, model.precision, gpu=shape.gpus > 0, name=model.name)
    probe = Embedder(path, gpu="off", warmup=False, input_size=model.input_size,
                     mirror=model.mirror, model_name=model.name)
    threads = model.threads or shape.cpus  # ORT threads: the actor's own CPUs, no more
    return EmbedJob(dest=opts.dest, model=dataclasses.replace(model, path=path, threads=threads),
                    identity=probe.identity,
                    decode=dataclasses.replace(opts.decode, size=probe.input_size),
                    batch_size=opts.batch_size, workers=opts.workers or shape.cpus)


def _fit_params(opts: SortOptions) -> FitParams:
    fit: Any = opts.fit
    if callable(fit):
        fit = fit()
    return fit if isinstance(fit, FitParams) else FitParams()


def _fingerprint(opts: SortOptions, model: ModelConfig, params: FitParams) -> dict[str, Any]:
    """What a pending plan was made for: a re-run must ask for the same to resume it."""
    return json.loads(json.dumps({
        "src": str(opts.src.resolve()), "move": opts.move, "recursive": opts.recursive,
        "fit": dataclasses.asdict(params), "model": dataclasses.asdict(model),
        "decode": dataclasses.asdict(opts.decode)}, default=str))


def _write_job(job_dir: Path, fingerprint: dict[str, Any], fit: FitResult | None,
               plan: Sequence[PlanEntry]) -> None:
    """The fit, then the plan, then job.json: job.json present means the plan is whole."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in job_dir.glob("placed-*.jsonl"):  # journals of a plan never written whole
        stale.unlink()
    if fit is not None:
        scores = sorted(fit.scores.items())
        with (job_dir / FIT_FILE).open("wb") as fh:
            np.savez(fh, k=fit.k, centroids=fit.centroids,
                     score_k=np.array([k for k, _ in scores], dtype=np.int64),
                     score_v=np.array([v for _, v in scores], dtype=np.float64),
                     silhouette=np.nan if fit.silhouette is None else fit.silhouette,
                     duration_s=fit.duration_s)
            fh.flush()
            os.fsync(fh.fileno())
    placement.write_plan(job_dir / PLAN_FILE, plan)
    tmp = job_dir / f".tmp-{JOB_FILE}"
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump({"fingerprint": fingerprint, "fit": fit is not None}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(job_dir / JOB_FILE)


def _resume(job_dir: Path,
            fingerprint: dict[str, Any]) -> tuple[FitResult | None, list[PlanEntry]]:
    job = json.loads((job_dir / JOB_FILE).read_text())
    if job["fingerprint"] != fingerprint:
        raise SegdError(f"{job_dir} holds an unfinished sort with other options or another "
                        "SRC: run it again as it was started, or delete that folder")
    plan = placement.read_plan(job_dir / PLAN_FILE)
    fit = None
    if job["fit"]:
        readable = [e for e in plan if e.readable]
        with np.load(job_dir / FIT_FILE) as data:
            sil = float(data["silhouette"])
            fit = FitResult(k=int(data["k"]),
                            labels=np.array([e.cluster for e in readable], dtype=np.int64),
                            distances=np.array([e.distance for e in readable], dtype=np.float32),
                            centroids=np.asarray(data["centroids"]),
                            scores={int(k): float(v) for k, v in zip(data["score_k"],
                                                                     data["score_v"],
                                                                     strict=True)},
                            silhouette=None if math.isnan(sil) else sil,
                            duration_s=float(data["duration_s"]))
    return fit, plan


def _remove_job(job_dir: Path) -> None:
    """The manifest is written: the plan and its journals are done with. job.json goes
    first, so a crash halfway leaves no plan that looks pending."""
    (job_dir / JOB_FILE).unlink(missing_ok=True)
    for p in job_dir.iterdir():
        p.unlink()
    job_dir.rmdir()


def _folders_and_sizes(plan: Sequence[PlanEntry],
                       fit: FitResult | None) -> tuple[list[str], dict[str, int]]:
    readable = [e for e in plan if e.readable]
    k = fit.k if fit else (1 if readable else 0)
    folders = [""] * k
    counts = [0] * k
    for e in readable:
        folders[e.cluster] = e.folder
        counts[e.cluster] += 1
    order = sorted(range(k), key=lambda c: (-counts[c], c))
    return folders, {folders[c]: counts[c] for c in order}


def _nodes(ray: ModuleType) -> list[NodeResources]:
    return [NodeResources(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


@contextlib.contextmanager
def _connected(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Use the Ray session this process already has, else connect (and disconnect after):
    to `address`, else $RAY_ADDRESS, else a new local instance."""
    if ray.is_initialized():
        yield
        return
    try:
        # "local", never a bare init: that would attach to whatever cluster a stale
        # /tmp/ray/ray_current_cluster names, dead or not.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local",
                 include_dashboard=False,
                 logging_level=logging.WARNING)
    except Exception as exc:
        hint = (" (a token-authenticated cluster: set RAY_AUTH_TOKEN to the head's token, "
                "which `ray get-auth-token` prints there; docs/scale.md)"
                if "auth" in str(exc).lower() else "")
        raise SegdError(f"cannot reach the Ray cluster at {address or 'a new local one'}: "
                        f"{_last_line(exc)}{hint}") from exc
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _job_lock(root: Path) -> Iterator[None]:
    try:
        lock = acquire_state_lock(root / "lock", role="sort")
    except StoreError as exc:
        raise SegdError(f"another segd sort is running into {root.parent}: {exc}") from exc
    with lock:
        yield


def _last_line(exc: BaseException) -> str:
    """Ray's errors carry the remote traceback; their last line is the error itself."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
