"""User corrections and refits: correct 2 / 5 / 10 % of clothing10's photos, refit, count.

    .venv/bin/python bench/bench_corrections.py [--fractions 0.02,0.05,0.10] [--keep DIR]

In-process, on a real store and real files (the daemon's refit path without its threads):
all ten classes of clothing10 (1,885 photos) are embedded as the daemon embeds them (CPU,
default model; cached under .cache/bench), put in an inbox as pending photos, and filed by
a first fit (`run_refit`). Each photo's "true folder" is then the cluster folder where its
class is the majority; a class that is the majority nowhere gets a folder of its own, made
by the user, named after it. For each fraction, on a library of its own, that share
of all photos is corrected: misfiled photos chosen at random are moved (os.rename, as a file
manager would) into their true folder; `reconcile` follows the moves (it pins the photos and
makes the new folders clusters), and two refits run:

  auto     the daemon's own refit (the policy: the clusters are usually kept and updated);
  replace  a refit that replaces the clusters (`segd refit --k K`, K = the live count).

Reported: the adjusted Rand index of the library against the classes before the
corrections, after them (the corrected photos in place), and after each refit; and how many
corrected photos are still where the user put them (must be all).

Method study (--methods): the same corrections on the embedding matrix alone, for the
replacing refit: pinned rows held in Lloyd iterations from the live centroids (COP-KMeans
style, what segd does), a free fit with the pinned rows' labels forced afterwards, and
seeded starts without holding (survival by chance).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

from segd.config import ClusteringConfig, Config, ModelConfig, validate
from segd.core.cluster import FitParams, fit, normalize_rows
from segd.core.constrained import FREE, constrained_kmeans
from segd.state.folders import check_folders_writable
from segd.state.reconcile import reconcile
from segd.state.refit import RefitReport, run_refit
from segd.state.store import Store, open_store

CACHE = benchlib.REPO / ".cache" / "bench"
SEP = "__"


@dataclass
class Row:
    fraction: float
    corrected: int
    ari_before: float
    ari_corrected: float
    ari_auto: float
    auto_outcome: str
    auto_survived: int
    ari_replace: float
    replace_survived: int
    replace_moved: int


def photos() -> tuple[list[Path], list[str]]:
    files = sorted(benchlib.DATASET.glob("*/*.jpg"))
    return files, [p.parent.name for p in files]


def embed_all(files: list[Path]) -> np.ndarray:
    """The daemon's embeddings of `files` (decode as the daemon does, default model, CPU)."""
    tag = hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()[:10]
    cache = CACHE / f"corrections-{tag}.npy"
    if cache.exists():
        return np.load(cache)
    from segd.media.decode import DecodeOptions, decode_file
    from segd.media.embed import Embedder

    embedder = Embedder.from_config(ModelConfig(gpu="off"))
    opts = DecodeOptions(size=embedder.input_size, resize="crop")
    out, started = [], time.perf_counter()
    for i in range(0, len(files), 32):
        out.append(embedder.embed(np.stack([decode_file(p, opts) for p in files[i:i + 32]])))
    x = np.concatenate(out).astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    print(f"embedded {len(files)} photos in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return x


def make_config(root: Path) -> Config:
    config = validate(Config(inbox=root / "inbox", library=root / "library",
                             quarantine=root / "quarantine", state_dir=root / "state",
                             clustering=ClusteringConfig()))
    check_folders_writable(config)
    return config


def first_library(root: Path, files: list[Path], x: np.ndarray) -> Config:
    """A store and a library filed by a first fit, as the daemon leaves them."""
    config = make_config(root)
    with open_store(config.db_path) as store:
        store.bind_model("bench", x.shape[1])
        with store.transaction():
            for src, emb in zip(files, x, strict=True):
                dst = config.inbox / f"{src.parent.name}{SEP}{src.name}"
                shutil.copyfile(src, dst)
                digest = hashlib.sha256(dst.read_bytes()).hexdigest()
                store.add_image(digest, dst.name, dst, "pending", embedding=emb)
        report = refit(store, config)
        print(f"first fit: {report.summary()}", file=sys.stderr)
    return config


def refit(store: Store, config: Config, k: int | None = None) -> RefitReport:
    params = FitParams.from_config(config.clustering)
    if k is not None:
        params = dataclasses.replace(params, k=k)
    return run_refit(store, config, params, "bench", forced=k is not None)


def label_of(path: Path) -> str:
    return path.name.split(SEP, 1)[0]


def library_ari(library: Path) -> float:
    truth, pred = [], []
    for i, d in enumerate(sorted(p for p in library.iterdir() if p.is_dir())):
        for f in d.iterdir():
            if f.is_file():
                truth.append(label_of(f))
                pred.append(i)
    return float(adjusted_rand_score(truth, pred))


def true_folders(library: Path) -> dict[str, str]:
    """class -> the folder where it is the majority, or a new folder named after it."""
    best: dict[str, tuple[int, str]] = {}
    for d in sorted(p for p in library.iterdir() if p.is_dir()):
        counts = Counter(label_of(f) for f in d.iterdir() if f.is_file())
        if counts:
            label, count = counts.most_common(1)[0]
            if count > best.get(label, (0, ""))[0]:
                best[label] = (count, d.name)
    classes = {label_of(f) for f in library.glob("*/*")}
    return {c: best[c][1] if c in best else c for c in sorted(classes)}


def correct(config: Config, fraction: float, rng: np.random.Generator) -> dict[Path, Path]:
    """Move that share of all photos, misfiled ones, to their true folder; {new path: old}."""
    library = config.library
    folders = true_folders(library)
    everything = sorted(library.glob("*/*"))
    misfiled = [p for p in everything if p.parent.name != folders[label_of(p)]]
    count = min(len(misfiled), round(fraction * len(everything)))
    moved = {}
    for i in rng.choice(len(misfiled), size=count, replace=False):
        src = misfiled[int(i)]
        dst = library / folders[label_of(src)] / src.name
        dst.parent.mkdir(exist_ok=True)
        src.rename(dst)
        moved[dst] = src
    return moved


def survived(moved: dict[Path, Path]) -> int:
    return sum(1 for dst in moved if dst.is_file())


def run_fraction(files: list[Path], x: np.ndarray, work: Path, fraction: float) -> Row:
    # A library of its own (the store records absolute paths: a copy would point back).
    config = first_library(work / f"f{fraction:.2f}", files, x)
    ari_before = library_ari(config.library)
    moved = correct(config, fraction, np.random.default_rng(int(fraction * 1000)))
    ari_corrected = library_ari(config.library)
    with open_store(config.db_path) as store:
        print(f"  {fraction:.0%}: reconcile: {reconcile(store, config)}", file=sys.stderr)
        pinned = sum(1 for im in store.iter_images(state="sorted") if im.pinned)
        if pinned < len(moved):
            raise SystemExit(f"reconcile pinned {pinned} of {len(moved)} corrected photos")
        auto = refit(store, config)
        ari_auto, auto_ok = library_ari(config.library), survived(moved)
        live = len(store.clusters(active_only=True))
        replace = refit(store, config, k=live - sum(
            1 for c in store.clusters(active_only=True) if c.origin == "user"))
        print(f"    auto: {auto.summary()}\n    replace: {replace.summary()}", file=sys.stderr)
    return Row(fraction, len(moved), ari_before, ari_corrected, ari_auto, auto.outcome,
               auto_ok, library_ari(config.library), survived(moved), replace.moved)


def method_study(x: np.ndarray, labels: list[str], fractions: list[float]) -> None:
    """Replacing-refit methods on the matrix alone: ARI and how many pinned rows keep.

    On unchanged photos a free refit gives the live clustering again, so "a free fit with
    the pinned labels forced afterwards" is the live clustering plus the corrections."""
    truth = np.unique(labels, return_inverse=True)[1]
    params = FitParams.from_config(ClusteringConfig())
    with threadpool_limits(limits=1):
        live = fit(x, params)
    print(f"\nmethod study (live k={live.k}, ARI {adjusted_rand_score(truth, live.labels):.3f})")
    print("| corrected | method | ARI | pinned kept |")
    print("|---|---|---|---|")
    for fraction in fractions:
        fixed, start = _pins(x, truth, live.labels, live.centroids, fraction)
        held = fixed >= 0
        with threadpool_limits(limits=1):
            results = {
                "held in Lloyd from the live centroids (segd)":
                    constrained_kmeans(x, start, fixed).labels,
                "free fit, pinned labels forced after": np.where(held, fixed, live.labels),
                "seeded starts, pinned not held":
                    constrained_kmeans(x, start, np.full(len(x), FREE)).labels,
            }
        for name, got in results.items():
            kept = int(np.sum(got[held] == fixed[held]))
            print(f"| {fraction:.0%} ({int(held.sum())}) | {name} | "
                  f"{adjusted_rand_score(truth, got):.3f} | {kept}/{int(held.sum())} |")


def _pins(x: np.ndarray, truth: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
          fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fixed, start): that share of rows, misfiled ones, held in their class's cluster (the
    one where the class is the majority, else a new one seeded by its pinned rows)."""
    k = len(centroids)
    owner: dict[int, tuple[int, int]] = {}  # class -> (count, cluster)
    for j in range(k):
        members = truth[labels == j]
        if len(members):
            c = int(np.bincount(members).argmax())
            count = int(np.sum(members == c))
            if count > owner.get(c, (0, -1))[0]:
                owner[c] = (count, j)
    extra = {c: k + i for i, c in enumerate(sorted(set(truth.tolist()) - set(owner)))}
    target = np.array([owner[c][1] if c in owner else extra[c] for c in truth.tolist()])
    misfiled = np.flatnonzero(target != labels)
    rng = np.random.default_rng(int(fraction * 1000))
    pick = rng.choice(misfiled, size=min(len(misfiled), round(fraction * len(x))),
                      replace=False)
    fixed = np.full(len(x), FREE)
    fixed[pick] = target[pick]
    used = list(range(k)) + [j for j in sorted(extra.values()) if np.any(fixed == j)]
    remap = {j: i for i, j in enumerate(used)}
    fixed = np.array([remap[int(f)] if f >= 0 else FREE for f in fixed])
    seeds = [normalize_rows(x[fixed == remap[j]].sum(axis=0, keepdims=True))[0]
             for j in used[k:]]
    start = np.concatenate([centroids, np.array(seeds, np.float32).reshape(-1, x.shape[1])])
    return fixed, start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", default="0.02,0.05,0.10")
    ap.add_argument("--methods", action="store_true", help="also the method study")
    ap.add_argument("--keep", type=Path, help="work here and keep the folders")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    files, labels = photos()
    x = embed_all(files)
    work = args.keep or Path(tempfile.mkdtemp(prefix="segd-bench-corr-", dir="/dev/shm"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with threadpool_limits(limits=1):
            rows = [run_fraction(files, x, work, f) for f in fractions]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| corrected | photos | ARI before | corrected in place | auto refit | "
          "kept (auto) | replacing refit | kept (replace) | re-filed by replace |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.fraction:.0%} | {r.corrected} | {r.ari_before:.3f} | "
              f"{r.ari_corrected:.3f} | {r.ari_auto:.3f} ({r.auto_outcome}) | "
              f"{r.auto_survived}/{r.corrected} | {r.ari_replace:.3f} | "
              f"{r.replace_survived}/{r.corrected} | {r.replace_moved} |")
    if args.methods:
        method_study(x, labels, fractions)


if __name__ == "__main__":
    main()
