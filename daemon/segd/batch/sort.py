"""The `segd sort` job: embed every image in SRC, choose k, place each image under DEST.

Streams: embeddings go to a temporary file as they are found or computed, and the clustering
reads them back in chunks, so memory stays flat however many images SRC holds.

Found before computed: each file's sha256 (from the cache's stat index when the file's stat is
unchanged, else read and hashed) is looked up in the embedding cache, then in the daemon's
store (`known`); only the rest is decoded and embedded, and those vectors go into the
cache. Rows keep the order of the files whatever their source, so a cached run clusters
exactly as a fresh one.

Start-up order: decoding starts first. The network (onnxruntime, when the input side is known
from the model file) and then the clustering stack (scikit-learn, SciPy) load on a
background thread while the first images are decoded, so neither delays the first image and
the clustering stack adds nothing to a run that embeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import heapq
import importlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segd.batch.known import (
    ReuseOptions,
    StoreReader,
    filesystem_type,
    hash_file,
    open_cache,
    verify_store,
)
from segd.core.errors import ImageError, SegdError
from segd.core.library import UNREADABLE_FOLDER, cluster_folder_name
from segd.core.pipeline import embed_stream
from segd.media.decode import DecodeOptions, decode_bytes, read_image_file
from segd.media.embed import Embedder, cpu_count
from segd.state import fsops
from segd.state.cache import (
    CacheKey,
    EmbeddingCache,
    FileStat,
    index_path,
    keeps_change_time,
)
from segd.views.progress import Progress

if TYPE_CHECKING:
    from segd.core.cluster import FitParams, FitResult

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
SAMPLES_PER_FOLDER = 8
READ_CHUNK_ROWS = 8192
CLUSTER_MODULE = "segd.core.cluster"
# Threads placing files, each a folder at a time: the filesystem's creates in two folders
# overlap (949 copies on ext4: 0.36 s one at a time, 0.26 s with two, no better with four).
PLACERS = 2
# Files hashed and looked up at a time: small at first, so the first image is decoded at
# once, then larger, so the lookups stay few.
FIRST_CHUNK, LAST_CHUNK = 8, 512


@dataclass(frozen=True)
class SortOptions:
    src: Path
    dest: Path
    move: bool = False
    recursive: bool = False
    # FitParams, or a function giving them at fit time, so the caller need not import the
    # clustering stack before decoding starts. None: FitParams().
    fit: FitParams | Callable[[], FitParams] | None = None
    batch_size: int = 32
    workers: int = 0
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    progress: bool = True
    reuse: ReuseOptions = field(default_factory=ReuseOptions)  # default: nothing reused


@dataclass
class SortResult:
    fit: FitResult | None
    folders: list[str]  # folder name for each cluster index
    sizes: dict[str, int]
    unreadable: list[tuple[Path, ImageError]]
    placed: int
    seconds: float
    embed_seconds: float
    samples: dict[str, list[Path]] = field(default_factory=dict)  # most typical per folder
    embedded: int = 0  # images the network ran on
    cached: int = 0  # embeddings found in the cache
    from_store: int = 0  # embeddings found in the daemon's store
    device: str | None = None  # where the network ran; None when it did not run


def list_images(src: Path, recursive: bool, exclude: Path | None = None) -> list[Path]:
    """Every non-hidden entry under src that is not a folder, sorted for a repeatable run.

    FIFOs, sockets and the like are listed too: decoding refuses them with a reason, so
    they are reported as unreadable instead of silently skipped.
    """
    found: list[Path] = []
    skip = exclude.resolve() if exclude else None
    for root, dirs, files in os.walk(src):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".")
                         and (here / d).resolve() != skip)
        found.extend(here / name for name in sorted(files) if not name.startswith("."))
    return found


def run_sort(opts: SortOptions, embedder: Embedder | Callable[[], Embedder],
             key: CacheKey | None = None, input_size: int | None = None) -> SortResult:
    """Sort opts.src into opts.dest.

    `embedder` may be a function: it is then called only if some image is found neither in
    the cache nor in the store, and, when `input_size` (the network's input side) is known
    beforehand, in the background while the first images are decoded. `key` identifies the
    model and preprocessing for the cache and the store; without one it is read from the
    embedder.
    """
    started = time.perf_counter()
    if not opts.src.is_dir():
        raise SegdError(f"source folder not found: {opts.src}")
    if opts.dest.resolve() == opts.src.resolve():
        raise SegdError("SRC and DEST must be different folders")
    files = list_images(opts.src, opts.recursive, exclude=opts.dest)
    opts.dest.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="segd-sort-") as tmp, \
            _Embedding(opts, files, embedder, key, input_size, Path(tmp), started) as job:
        job.run()
        embed_seconds = time.perf_counter() - started
        log.debug("embeddings ready %.3f s after the sort started: %d embedded, %d from the "
                  "cache, %d from the daemon's store; %d files known by their stat, %d read "
                  "and hashed", embed_seconds, job.embedded, job.cached, job.from_store,
                  job.by_stat, job.hashed)
        n = int(job.ok.sum())
        readable = [files[i] for i in np.flatnonzero(job.ok)]
        fit_result: FitResult | None = None
        labels = np.zeros(n, dtype=np.int64)
        distances = np.zeros(n, dtype=np.float32)
        if n >= 2:
            job.wait_for_clustering()
            from segd.core.cluster import FitParams, fit_stream

            log.debug("clustering stack loaded %.3f s after the sort started",
                      time.perf_counter() - started)
            params = opts.fit() if callable(opts.fit) else opts.fit or FitParams()
            fit_result = fit_stream(job.rows.readable_chunks(job.ok), n, params)
            labels, distances = fit_result.labels, fit_result.distances
            log.debug("fit done %.3f s after the sort started (k = %d)",
                      time.perf_counter() - started, fit_result.k)
        job.rows.close()
        unreadable = job.unreadable

    # Number the clusters by size, largest first, so cluster-01 is the biggest group.
    k = fit_result.k if fit_result else (1 if n else 0)
    counts = np.bincount(labels, minlength=k) if n else np.zeros(0, dtype=np.int64)
    order = sorted(range(k), key=lambda c: (-counts[c], c))
    folders = [""] * k
    for rank, cluster in enumerate(order, start=1):
        folders[cluster] = cluster_folder_name(rank)

    samples: dict[str, list[tuple[float, int, Path]]] = {f: [] for f in folders}
    placed = _place_all(opts, readable, labels, distances, folders, unreadable, samples)
    log.debug("%d files placed and synced %.3f s after the sort started", placed,
              time.perf_counter() - started)
    sizes = {folders[c]: int(counts[c]) for c in order}
    return SortResult(fit=fit_result, folders=folders, sizes=sizes, unreadable=unreadable,
                      placed=placed, seconds=time.perf_counter() - started,
                      embed_seconds=embed_seconds,
                      samples={f: [p for _, _, p in sorted(samples[f], reverse=True)]
                               for f in sizes},
                      embedded=job.embedded, cached=job.cached, from_store=job.from_store,
                      device=job.device)


class _Rows:
    """The (files, dim) float32 rows on disk, one per file in file order, created once the
    first vector gives the dimension; rows of unreadable files stay unused."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = path
        self.count = count
        self.matrix: np.memmap | None = None

    def write(self, index: int, vector: np.ndarray) -> None:
        self.write_many([index], [vector])

    def write_many(self, indices: Sequence[int], vectors: Sequence[np.ndarray]) -> None:
        if not indices:
            return
        dims = {np.size(v) for v in vectors}
        if self.matrix is None:
            self.matrix = np.memmap(self.path, dtype="<f4", mode="w+",
                                    shape=(self.count, max(dims)))
        if dims != {self.matrix.shape[1]}:
            raise SegdError(f"an embedding of {sorted(dims)} values among ones of "
                            f"{self.matrix.shape[1]}: the cache or the store is inconsistent")
        self.matrix[np.asarray(indices)] = np.stack(
            [np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors])

    def readable_chunks(self, ok: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
        """The fit's chunk source: the rows of readable files, in file order."""
        matrix = self.matrix
        assert matrix is not None

        def chunks() -> Iterator[np.ndarray]:
            for lo in range(0, self.count, READ_CHUNK_ROWS):
                hi = min(lo + READ_CHUNK_ROWS, self.count)
                block = np.asarray(matrix[lo:hi])[ok[lo:hi]]
                if len(block):
                    yield block

        return chunks

    def close(self) -> None:
        if self.matrix is not None:
            self.matrix.flush()
            self.matrix = None


class _Embedding:
    """One run's embedding phase: find or compute a vector for every file.

    Slow loads run on one background thread, in the order asked, so two import chains
    never run at once: the embedder (onnxruntime), then the clustering stack.
    """

    def __init__(self, opts: SortOptions, files: list[Path],
                 embedder: Embedder | Callable[[], Embedder], key: CacheKey | None,
                 input_size: int | None, tmp: Path, started: float) -> None:
        self.opts = opts
        self.files = files
        self.started = started
        self.ok = np.zeros(len(files), dtype=bool)
        self.rows = _Rows(tmp / "embeddings.f32", len(files))
        self.unreadable: list[tuple[Path, ImageError]] = []
        self.embedded = self.cached = self.from_store = 0
        self.by_stat = self.hashed = 0  # files whose sha256 the stat index gave, or reading
        self.device: str | None = None
        self.workers = opts.workers or cpu_count()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="segd-load")
        self._clustering: Future[object] | None = None
        self._clustering_lock = threading.Lock()  # decoder threads may ask for it too
        self._make = embedder if not isinstance(embedder, Embedder) else None
        self._embedder = embedder if isinstance(embedder, Embedder) else None
        self._building: Future[Embedder] | None = None
        self._input_size = self._embedder.input_size if self._embedder else input_size
        self._decode_opts: DecodeOptions | None = None
        self._first_decoded = threading.Event()
        reuse = opts.reuse
        self.cache: EmbeddingCache | None = None
        self.store: StoreReader | None = None
        self.progress: Progress | None = None
        try:
            self.cache = open_cache(reuse)
            if (self.cache is not None or reuse.store_path is not None) and key is None:
                key = _key_of(self._get_embedder(), opts)
            self.key = key
            if reuse.store_path is not None and key is not None:
                self.store = StoreReader.open(reuse.store_path, key)
            self.progress = Progress(len(files), "embedding", enabled=opts.progress)
        except BaseException:
            self.__exit__()
            raise
        self._store_checked = False
        self._shas: dict[int, str] = {}  # file index -> sha256 of the bytes decoded

    def __enter__(self) -> _Embedding:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.cache is not None:
            self.cache.close()
        if self.store is not None:
            self.store.close()
        self._loader.shutdown(wait=True, cancel_futures=True)  # no thread outlives the run

    @property
    def reusing(self) -> bool:
        return self.cache is not None or self.store is not None

    def run(self) -> None:
        assert self.progress is not None
        for batch in embed_stream(self._misses(), self._decode, self._embed,
                                  batch_size=self.opts.batch_size, workers=self.workers):
            failed = 0
            fresh: list[tuple[str, np.ndarray]] = []
            for result in batch:
                index = result.item
                if result.error is not None:
                    self.unreadable.append((self.files[index], result.error))
                    failed += 1
                    continue
                assert result.embedding is not None
                self.rows.write(index, result.embedding)
                self.ok[index] = True
                self.embedded += 1
                sha = self._shas.pop(index, None)
                if sha is not None:
                    fresh.append((sha, result.embedding))
            if self.cache is not None and self.key is not None:
                self.cache.put_many(self.key.digest, fresh)
            self.progress.advance(len(batch), failed)
        self._load_clustering()  # every image was found: nothing started it yet

    def wait_for_clustering(self) -> None:
        """Let the background import of the clustering stack finish (a failure is left to
        the caller's own import to raise)."""
        self._load_clustering()
        assert self._clustering is not None
        with contextlib.suppress(Exception):
            self._clustering.result()

    def _load_clustering(self) -> None:
        with self._clustering_lock:
            if self._clustering is None:
                self._clustering = self._loader.submit(_import_clustering)

    # ---- the files the network must see

    def _misses(self) -> Iterator[int]:
        """File indices not found before, in order; the found ones are written meanwhile."""
        if not self.reusing:
            self._start_network()
            yield from range(len(self.files))
            return
        assert self.progress is not None
        with ThreadPoolExecutor(self.workers, thread_name_prefix="segd-hash") as pool:
            for lo, hi in _chunks(len(self.files)):
                found = self._lookup(self._shas_of(pool, lo, hi))
                hits = list(found)
                if len(hits) == hi - lo:
                    self._load_clustering()  # no decoding to start first
                self.rows.write_many(hits, [found[i] for i in hits])
                self.ok[hits] = True
                for index in range(lo, hi):
                    if index not in found:
                        self._start_network()
                        yield index
                if found:
                    self.progress.advance(len(found))

    def _shas_of(self, pool: ThreadPoolExecutor, lo: int, hi: int) -> dict[int, str | None]:
        """The sha256 of files lo..hi-1 (None: unreadable): from the stat index where the
        file's stat is the one its hash was filed under, else read and hashed (and filed)."""
        shas: dict[int, str | None] = {}
        stats: dict[int, FileStat] = {}
        if self.cache is not None:
            for index in range(lo, hi):
                with contextlib.suppress(OSError):  # hashing below reports nothing either
                    st = os.stat(self.files[index])
                    if keeps_change_time(filesystem_type(st.st_dev)):
                        stats[index] = FileStat.of(st)
            keys = {index: index_path(self.files[index]) for index in stats}
            known = self.cache.known_hashes([(keys[i], st) for i, st in stats.items()])
            shas = {i: known[keys[i]] for i in stats if keys[i] in known}
        todo = [index for index in range(lo, hi) if index not in shas]
        self.by_stat += len(shas)
        self.hashed += len(todo)
        limit = self.opts.decode.max_file_bytes
        hashed = list(pool.map(lambda i: hash_file(self.files[i], limit), todo))
        shas.update((i, h.sha256 if h else None) for i, h in zip(todo, hashed, strict=True))
        if self.cache is not None:
            self.cache.remember_hashes([h for h in hashed if h is not None and
                                        keeps_change_time(filesystem_type(h.stat.device))])
        return shas

    def _lookup(self, shas: dict[int, str | None]) -> dict[int, np.ndarray]:
        """The known vectors of one chunk's files (index -> sha256), by file index."""
        by_sha = self._lookup_shas(shas)
        return {i: by_sha[sha] for i, sha in shas.items() if sha is not None and sha in by_sha}

    def _lookup_shas(self, shas: dict[int, str | None]) -> dict[str, np.ndarray]:
        """The known vectors of one chunk's files (index -> sha256), by sha256."""
        assert self.key is not None
        wanted = [s for s in shas.values() if s is not None]
        found: dict[str, np.ndarray] = {}
        if self.cache is not None:
            found = self.cache.get_many(self.key.digest, wanted)
            self.cached += len(found)
        rest = [s for s in wanted if s not in found]
        if self.store is not None and rest:
            stored = self.store.get_many(rest)
            if stored and not self._store_checked:
                self._store_checked = True
                path_of = {sha: self.files[i] for i, sha in shas.items() if sha is not None}
                if not verify_store([(path_of[s], v) for s, v in stored.items()],
                                    self._embed_files, self.opts.decode.max_file_bytes):
                    self.store.close()
                    self.store = None
                    stored = {}
            self.from_store += len(stored)
            found.update(stored)
        return found

    # ---- the network

    def _start_network(self) -> None:
        """Before the first miss is decoded: the decoders' options, and the embedder built
        in the background when its input side is already known, else here."""
        if self._decode_opts is not None:
            return
        if self._embedder is None and self._input_size is not None:
            self._building = self._loader.submit(self._build)
        size = self._input_size or self._get_embedder().input_size
        self._decode_opts = dataclasses.replace(self.opts.decode, size=size)

    def _build(self) -> Embedder:
        assert self._make is not None
        return self._make()

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            embedder = self._building.result() if self._building else self._build()
            if self.key is not None and embedder.spec.sha256 != self.key.model_sha256:
                raise SegdError(f"the model file {embedder.spec.path} changed while segd "
                                "sort ran; run it again")
            if self._input_size is not None and embedder.input_size != self._input_size:
                raise SegdError(f"the model's input is {embedder.input_size} px, not the "
                                f"{self._input_size} px its metadata gave")
            self._embedder = embedder
        if self.device is None:
            self.device = self._embedder.report.summary
        return self._embedder

    def _decode(self, index: int) -> np.ndarray:
        assert self._decode_opts is not None
        path = self.files[index]
        data, _ = read_image_file(path, self._decode_opts)
        image = decode_bytes(data, self._decode_opts, name=str(path))
        if self.cache is not None:
            # The bytes decoded here, not those hashed for the lookup: the file may have
            # changed in between, and the cache must hold the vector of these bytes.
            self._shas[index] = hashlib.sha256(data).hexdigest()
        if not self._first_decoded.is_set():
            self._first_decoded.set()
            log.debug("first image decoded %.3f s after the sort started",
                      time.perf_counter() - self.started)
            self._load_clustering()  # queued behind the embedder, if it is being built
        return image

    def _embed(self, images: np.ndarray) -> np.ndarray:
        return self._get_embedder().embed(images)

    def _embed_files(self, paths: Sequence[Path]) -> np.ndarray | None:
        """Fresh vectors of a few files (checking the store), or None if one is unreadable."""
        self._start_network()
        embedder = self._get_embedder()
        assert self._decode_opts is not None
        try:
            images = np.stack([decode_bytes(read_image_file(p, self._decode_opts)[0],
                                            self._decode_opts, name=str(p)) for p in paths])
        except ImageError:
            return None
        return embedder.embed(images)


def _import_clustering() -> object:
    """Import the clustering stack, then, once per process, move every object alive to the
    collector's permanent generation (gc.freeze): the stack's modules live until exit, and
    unfrozen every later collection and the interpreter's exit walk them again (0.5-0.7 s
    at exit on a 2-core machine, docs/benchmarks.md).

    scikit-learn imports pandas, where installed, only to learn whether it is there
    (sklearn.utils.fixes); a sort never hands it a DataFrame, so pandas is held off for the
    import (0.15-0.4 s), and imported as usual by anything that asks for it later."""
    global _frozen
    held_off = "pandas" not in sys.modules
    if held_off:
        sys.modules["pandas"] = None  # type: ignore[assignment]  # "import pandas" fails
    try:
        module = importlib.import_module(CLUSTER_MODULE)
    except ImportError:
        if not held_off:
            raise
        sys.modules.pop("pandas", None)
        module = importlib.import_module(CLUSTER_MODULE)  # a scikit-learn that needs it
    finally:
        if held_off and sys.modules.get("pandas", False) is None:
            del sys.modules["pandas"]
    with _freeze_lock:
        if not _frozen:
            gc.freeze()
            _frozen = True
    return module


_frozen = False
_freeze_lock = threading.Lock()


def _key_of(embedder: Embedder, opts: SortOptions) -> CacheKey:
    """The cache key of an embedder built by the caller (no config at hand)."""
    size = None if embedder.input_size == embedder.spec.input_size else embedder.input_size
    return CacheKey(model_sha256=embedder.spec.sha256, input_size=size,
                    resize=opts.decode.resize, mirror=embedder.mirror,
                    precision=embedder.spec.precision, max_pixels=opts.decode.max_pixels)


def _chunks(count: int) -> Iterator[tuple[int, int]]:
    """(lo, hi) bounds of the lookup chunks: FIRST_CHUNK files, then doubling."""
    lo, size = 0, FIRST_CHUNK
    while lo < count:
        yield lo, min(lo + size, count)
        lo += size
        size = min(2 * size, LAST_CHUNK)


def _place_all(opts: SortOptions, readable: list[Path], labels: np.ndarray,
               distances: np.ndarray, folders: list[str],
               unreadable: list[tuple[Path, ImageError]],
               samples: dict[str, list[tuple[float, int, Path]]]) -> int:
    """File every image, set the unreadable ones aside, and write the manifest CSVs.
    `samples` collects the few most typical placed files of each folder."""
    # Copies leave the sources in place, so they are synced once at the end rather than
    # file by file; moves are synced one by one, as the source disappears.
    place = fsops.place_move if opts.move else functools.partial(fsops.place_copy, sync=False)
    outcomes: list[Path | OSError] = [Path()] * len(readable)

    def place_folder(members: list[int]) -> None:
        # One folder's files in file order, so a name two files share gets the same free
        # name ("x (1).jpg") whichever folder finishes first.
        for i in members:
            path = readable[i]
            try:
                outcomes[i] = place(path, opts.dest / folders[labels[i]], path.name,
                                    tag=f"{os.getpid()}-{i}")
            except OSError as exc:
                outcomes[i] = exc

    by_folder: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        by_folder.setdefault(label, []).append(i)
    with ThreadPoolExecutor(PLACERS, thread_name_prefix="segd-place") as pool:
        for done in [pool.submit(place_folder, m) for m in by_folder.values()]:
            done.result()

    rows: list[list[object]] = []
    placed = 0
    for i, (path, label) in enumerate(zip(readable, labels, strict=True)):
        final = outcomes[i]
        if isinstance(final, OSError):
            # Readable a moment ago (it vanished, or DEST is full): report it, keep going.
            unreadable.append((path, ImageError(path, f"could not be placed: {final}")))
            continue
        placed += 1
        rows.append([path, final, folders[label], f"{distances[i]:.4f}", ""])
        keep = samples[folders[label]]
        # Max-heap of the SAMPLES_PER_FOLDER smallest distances (negated for heapq).
        heapq.heappush(keep, (-float(distances[i]), i, final))
        if len(keep) > SAMPLES_PER_FOLDER:
            heapq.heappop(keep)

    if unreadable:
        bad_folder = opts.dest / UNREADABLE_FOLDER
        reasons: list[list[object]] = []
        for j, (path, err) in enumerate(unreadable):
            dest: Path | str = ""
            if path.is_file():
                try:
                    dest = place(path, bad_folder, path.name, tag=f"{os.getpid()}-bad-{j}")
                except OSError as exc:
                    log.warning("%s: left in place, could not be set aside: %s", path, exc)
            reasons.append([path, dest, err.kind, err.reason])
            rows.append([path, dest, UNREADABLE_FOLDER, "", f"{err.kind}: {err.reason}"])
        fsops.write_csv_new(bad_folder, "reasons.csv",
                            ["source", "destination", "kind", "reason"], reasons)
    fsops.write_csv_new(opts.dest, MANIFEST,
                        ["source", "destination", "cluster", "distance", "error"], rows)
    if not opts.move:
        os.sync()
    return placed
