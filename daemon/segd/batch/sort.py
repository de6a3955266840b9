"""The `segd sort` job: embed every image in SRC, choose k, place each image under DEST.

Streams: embeddings go to a temporary file as they are computed and the clustering reads
them back in chunks, so memory stays flat however many images SRC holds.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segd.core.cluster import FitParams, FitResult, chunked, fit_stream
from segd.core.errors import ImageError, SegdError
from segd.core.library import UNREADABLE_FOLDER, cluster_folder_name
from segd.core.pipeline import embed_stream
from segd.media.decode import DecodeOptions, decode_file
from segd.media.embed import Embedder, cpu_count
from segd.state import fsops
from segd.views.progress import Progress

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
SAMPLES_PER_FOLDER = 8
READ_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class SortOptions:
    src: Path
    dest: Path
    move: bool = False
    recursive: bool = False
    fit: FitParams = field(default_factory=FitParams)
    batch_size: int = 32
    workers: int = 0
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    progress: bool = True


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


def run_sort(opts: SortOptions, embedder: Embedder) -> SortResult:
    started = time.perf_counter()
    if not opts.src.is_dir():
        raise SegdError(f"source folder not found: {opts.src}")
    if opts.dest.resolve() == opts.src.resolve():
        raise SegdError("SRC and DEST must be different folders")
    files = list_images(opts.src, opts.recursive, exclude=opts.dest)
    opts.dest.mkdir(parents=True, exist_ok=True)
    workers = opts.workers or cpu_count()
    decode_opts = dataclasses.replace(opts.decode, size=embedder.input_size)

    unreadable: list[tuple[Path, ImageError]] = []
    readable: list[Path] = []
    progress = Progress(len(files), "embedding", enabled=opts.progress)
    with tempfile.TemporaryDirectory(prefix="segd-sort-") as tmp:
        store = Path(tmp) / "embeddings.f32"
        dim = embedder.spec.embedding_dim
        with store.open("wb") as out:
            for batch in embed_stream(files, lambda p: decode_file(p, decode_opts),
                                      embedder.embed, batch_size=opts.batch_size,
                                      workers=workers):
                failed = 0
                for result in batch:
                    if result.error is not None:
                        unreadable.append((result.item, result.error))
                        failed += 1
                    else:
                        readable.append(result.item)
                        out.write(np.asarray(result.embedding, dtype="<f4").tobytes())
                progress.advance(len(batch), failed)
        progress.close()
        embed_seconds = time.perf_counter() - started

        n = len(readable)
        fit_result: FitResult | None = None
        labels = np.zeros(n, dtype=np.int64)
        distances = np.zeros(n, dtype=np.float32)
        if n >= 2:
            matrix = np.memmap(store, dtype="<f4", mode="r", shape=(n, dim))
            fit_result = fit_stream(lambda: chunked(matrix, READ_CHUNK_ROWS), n, opts.fit)
            labels, distances = fit_result.labels, fit_result.distances
            del matrix

    # Number the clusters by size, largest first, so cluster-01 is the biggest group.
    k = fit_result.k if fit_result else (1 if n else 0)
    counts = np.bincount(labels, minlength=k) if n else np.zeros(0, dtype=np.int64)
    order = sorted(range(k), key=lambda c: (-counts[c], c))
    folders = [""] * k
    for rank, cluster in enumerate(order, start=1):
        folders[cluster] = cluster_folder_name(rank)

    samples: dict[str, list[tuple[float, int, Path]]] = {f: [] for f in folders}
    placed = _place_all(opts, readable, labels, distances, folders, unreadable, samples)
    sizes = {folders[c]: int(counts[c]) for c in order}
    return SortResult(fit=fit_result, folders=folders, sizes=sizes, unreadable=unreadable,
                      placed=placed, seconds=time.perf_counter() - started,
                      embed_seconds=embed_seconds,
                      samples={f: [p for _, _, p in sorted(samples[f], reverse=True)]
                               for f in sizes})


def _place_all(opts: SortOptions, readable: list[Path], labels: np.ndarray,
               distances: np.ndarray, folders: list[str],
               unreadable: list[tuple[Path, ImageError]],
               samples: dict[str, list[tuple[float, int, Path]]]) -> int:
    """File every image, set the unreadable ones aside, and write the manifest CSVs.
    `samples` collects the few most typical placed files of each folder."""
    # Copies leave the sources in place, so they are synced once at the end rather than
    # file by file; moves are synced one by one, as the source disappears.
    place = fsops.place_move if opts.move else functools.partial(fsops.place_copy, sync=False)
    rows: list[list[object]] = []
    placed = 0
    for i, (path, label) in enumerate(zip(readable, labels, strict=True)):
        try:
            final = place(path, opts.dest / folders[label], path.name, tag=f"{os.getpid()}-{i}")
        except OSError as exc:
            # Readable a moment ago (it vanished, or DEST is full): report it, keep going.
            unreadable.append((path, ImageError(path, f"could not be placed: {exc}")))
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
