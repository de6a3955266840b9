"""`segd sort` finds embeddings before computing them: the cache, and the daemon's store.

Runs in-process on copies of the 40 CC0 photos with one CPU embedder shared by the module,
and, where the command line is the point (--no-cache, two sorts at once), as subprocesses.
Every test has its own cache under tmp_path.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from segd.batch import sort as sort_mod
from segd.batch.known import ModelFile, ReuseOptions, onnx_metadata
from segd.batch.sort import SortOptions, SortResult, run_sort
from segd.config import ModelConfig
from segd.core.cluster import FitParams
from segd.media.decode import DecodeOptions, decode_file
from segd.media.embed import Embedder
from segd.state import cache as cache_mod
from segd.state.cache import CacheKey, EmbeddingCache
from segd.state.lock import acquire_state_lock
from segd.state.store import open_store

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"
N = 40


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(gpu="off")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*/*.jpg")):
        shutil.copy2(photo, folder / photo.name)
    assert len(list(folder.iterdir())) == N
    return folder


def key_of(embedder: Embedder, resize: str = "crop") -> CacheKey:
    return CacheKey(model_sha256=embedder.spec.sha256, input_size=None, resize=resize,
                    mirror=embedder.mirror, precision=embedder.spec.precision,
                    max_pixels=DecodeOptions().max_pixels)


def sort(src: Path, dest: Path, embedder: Embedder | Callable[[], Embedder], *,
         cache: Path | None = None, store: Path | None = None, k: int = 3,
         key: CacheKey | None = None) -> SortResult:
    opts = SortOptions(src=src, dest=dest, fit=FitParams(k=k), progress=False,
                       reuse=ReuseOptions(cache_path=cache, store_path=store))
    return run_sort(opts, embedder, key)


def manifest(dest: Path) -> dict[str, tuple[str, str]]:
    with (dest / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        return {Path(r["source"]).name: (r["cluster"], r["distance"])
                for r in csv.DictReader(fh)}


def fresh_vectors(embedder: Embedder, files: list[Path], batch: int = 32) -> np.ndarray:
    """The network's vectors for files, in the batches a first sort makes."""
    opts = DecodeOptions(size=embedder.input_size)
    images = np.stack([decode_file(p, opts) for p in files])
    return np.concatenate([embedder.embed(images[i:i + batch])
                           for i in range(0, len(images), batch)])


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes, the same pixels."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def settled_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """File hashes under the stat of files just written (the photos are copied moments
    before each test; by default a file must be older than cache.SETTLED_NS)."""
    monkeypatch.setattr(cache_mod, "SETTLED_NS", 0)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the lookup phase reads and hashes."""
    seen: list[Path] = []
    real = sort_mod.hash_file

    def counting(path: Path, limit: int) -> object:
        seen.append(path)
        return real(path, limit)

    monkeypatch.setattr(sort_mod, "hash_file", counting)
    return seen


def never_built() -> Embedder:
    raise AssertionError("the network was loaded, though every vector was known")


def same_size_with(jpeg: bytes, size: int, text: bytes) -> bytes:
    """`jpeg` with a comment padded so the file is exactly `size` bytes."""
    pad = size - len(jpeg) - 4 - len(text)
    assert pad >= 0
    return with_comment(jpeg, text + b" " * pad)


# --------------------------------------------------------------------------- the cache


def test_a_rerun_with_another_k_embeds_nothing_and_sorts_as_a_fresh_run(
        src: Path, tmp_path: Path, embedder: Embedder) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    first = sort(src, tmp_path / "d1", embedder, cache=cache, k=4)
    assert (first.embedded, first.cached) == (N, 0)
    calls: list[int] = []

    def factory() -> Embedder:
        calls.append(1)
        return embedder

    second = sort(src, tmp_path / "d2", factory, cache=cache, k=3, key=key_of(embedder))
    assert (second.embedded, second.cached, second.placed) == (0, N, N)
    assert calls == []  # every vector was found: the network was never loaded
    assert second.device is None
    assert len(second.sizes) == 3
    # Back to the first k: the same clusters and distances, to the last digit.
    third = sort(src, tmp_path / "d3", factory, cache=cache, k=4, key=key_of(embedder))
    assert third.cached == N
    assert manifest(tmp_path / "d3") == manifest(tmp_path / "d1")


def test_a_rerun_reads_no_file_and_sorts_exactly_as_an_uncached_run(
        src: Path, tmp_path: Path, embedder: Embedder, settled_now: None,
        reads: list[Path]) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    first = sort(src, tmp_path / "d1", embedder, cache=cache, k=3)
    assert (first.embedded, len(reads)) == (N, N)
    reads.clear()
    again = sort(src, tmp_path / "d2", never_built, cache=cache, k=3, key=key_of(embedder))
    assert reads == []  # every hash came from the stat index
    assert (again.embedded, again.cached, again.placed) == (0, N, N)
    uncached = sort(src, tmp_path / "d3", embedder, k=3)
    assert uncached.cached == 0
    assert manifest(tmp_path / "d2") == manifest(tmp_path / "d3")


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_read_again_not_given_a_stale_vector(
        src: Path, tmp_path: Path, embedder: Embedder, settled_now: None,
        reads: list[Path]) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    by_size = sorted(src.iterdir(), key=lambda f: f.stat().st_size)
    # Both get the smallest photo's pixels, padded to their own size: a stale vector shows.
    in_place, replaced, pixels = by_size[-2], by_size[-1], by_size[0].read_bytes()
    stale = fresh_vectors(embedder, [in_place, replaced])
    sort(src, tmp_path / "d1", embedder, cache=cache)
    # In place: the same inode, size and mtime; only the ctime tells.
    before = in_place.stat()
    in_place.write_bytes(same_size_with(pixels, before.st_size, b"in place"))
    os.utime(in_place, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = in_place.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns
    # Replaced by rename: the same size and mtime under a new inode.
    old = replaced.stat()
    swap = src / ".swap"
    swap.write_bytes(same_size_with(pixels, old.st_size, b"moved in"))
    os.utime(swap, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(swap, replaced)
    new = replaced.stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert new.st_ino != old.st_ino
    reads.clear()

    again = sort(src, tmp_path / "d2", embedder, cache=cache)
    assert sorted(p.name for p in reads) == sorted([in_place.name, replaced.name])
    assert (again.embedded, again.cached) == (2, N - 2)
    with EmbeddingCache.open(cache) as c:
        got = c.get_many(key_of(embedder).digest, [sha(in_place), sha(replaced)])
    fresh = fresh_vectors(embedder, [in_place, replaced])
    assert float(np.max(np.sum(fresh * stale, axis=1))) < 0.99  # other pixels, other vectors
    assert got[sha(in_place)].tobytes() == fresh[0].tobytes()
    assert got[sha(replaced)].tobytes() == fresh[1].tobytes()
    assert manifest(tmp_path / "d2") == manifest(sort_to(src, tmp_path / "d3", embedder))
    reads.clear()
    assert sort(src, tmp_path / "d4", embedder, cache=cache).cached == N
    assert reads == []  # filed again under their new stat


def test_on_a_filesystem_without_a_true_change_time_every_file_is_read_again(
        src: Path, tmp_path: Path, embedder: Embedder, settled_now: None,
        reads: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from segd.batch.known import filesystem_type

    assert filesystem_type(src.stat().st_dev)  # the real one: the index serves it below
    assert filesystem_type(os.makedev(4095, 1048575)) is None
    cache = tmp_path / "cache" / "embeddings.sqlite"
    monkeypatch.setattr(sort_mod, "filesystem_type", lambda device: "vfat")
    sort(src, tmp_path / "d1", embedder, cache=cache)
    reads.clear()
    again = sort(src, tmp_path / "d2", never_built, cache=cache, key=key_of(embedder))
    assert again.cached == N
    assert len(reads) == N  # found by content, each file read and hashed
    monkeypatch.setattr(sort_mod, "filesystem_type", filesystem_type)  # the real one again
    sort(src, tmp_path / "d3", never_built, cache=cache, key=key_of(embedder))
    assert len(reads) == 2 * N  # filed under their stat this time
    reads.clear()
    assert sort(src, tmp_path / "d4", never_built, cache=cache, key=key_of(embedder)).cached == N
    assert reads == []


def test_a_damaged_cache_is_set_aside_and_the_sort_rebuilds_it(
        src: Path, tmp_path: Path, embedder: Embedder, settled_now: None,
        caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    sort(src, tmp_path / "d1", embedder, cache=cache)
    cache.write_bytes(os.urandom(cache.stat().st_size))
    with caplog.at_level(logging.WARNING, logger="segd.state.cache"):
        rebuilt = sort(src, tmp_path / "d2", embedder, cache=cache)
    assert "damaged" in caplog.text
    assert (rebuilt.embedded, rebuilt.cached) == (N, 0)
    assert (cache.parent / "embeddings.sqlite.corrupt").exists()
    assert manifest(tmp_path / "d2") == manifest(tmp_path / "d1")
    assert sort(src, tmp_path / "d3", never_built, cache=cache, key=key_of(embedder)).cached == N


def sort_to(src: Path, dest: Path, embedder: Embedder) -> Path:
    """An uncached sort of src into dest, for comparison."""
    sort(src, dest, embedder)
    return dest


def test_cached_vectors_are_the_networks_bit_for_bit(
        src: Path, tmp_path: Path, embedder: Embedder) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    sort(src, tmp_path / "d1", embedder, cache=cache)
    files = sorted(src.iterdir())
    with EmbeddingCache.open(cache) as c:
        stored = c.get_many(key_of(embedder).digest, [sha(p) for p in files])
    fresh = fresh_vectors(embedder, files)
    for path, vector in zip(files, fresh, strict=True):
        assert stored[sha(path)].tobytes() == vector.tobytes(), path.name


def test_a_file_whose_bytes_changed_misses_even_with_its_size_and_times_kept(
        src: Path, tmp_path: Path, embedder: Embedder) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    tweaked = src / "hat_0001.jpg"
    original = tweaked.read_bytes()
    tweaked.write_bytes(with_comment(original, b"version 1"))
    sort(src, tmp_path / "d1", embedder, cache=cache)
    # Another photo's pixels under an old name, its mtime put back as it was. (Its very
    # bytes would rightly hit: src holds shoes_0005.jpg too.)
    target, other = src / "dress_0000.jpg", PHOTOS / "shoes" / "shoes_0005.jpg"
    st = target.stat()
    target.write_bytes(with_comment(other.read_bytes(), b"moved in"))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    # And one byte changed in place: same size, same mtime, other bytes.
    st2 = tweaked.stat()
    tweaked.write_bytes(with_comment(original, b"version 2"))
    os.utime(tweaked, ns=(st2.st_atime_ns, st2.st_mtime_ns))
    assert tweaked.stat().st_size == st2.st_size

    again = sort(src, tmp_path / "d2", embedder, cache=cache)
    assert (again.embedded, again.cached) == (2, N - 2)
    with EmbeddingCache.open(cache) as c:
        got = c.get_many(key_of(embedder).digest, [sha(target)])
    assert got[sha(target)].tobytes() == fresh_vectors(embedder, [other])[0].tobytes()


def test_another_model_or_other_preprocessing_misses(
        src: Path, tmp_path: Path, embedder: Embedder) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    sort(src, tmp_path / "d1", embedder, cache=cache)
    smaller = Embedder(gpu="off", input_size=128)
    by_size = sort(src, tmp_path / "d2", smaller, cache=cache)
    assert (by_size.embedded, by_size.cached) == (N, 0)
    lite = Embedder(gpu="off", model_name="efficientnet-lite0")
    by_model = sort(src, tmp_path / "d3", lite, cache=cache)
    assert (by_model.embedded, by_model.cached) == (N, 0)
    squashed = sort(src, tmp_path / "d4", embedder, cache=cache, key=key_of(embedder, "squash"))
    assert (squashed.embedded, squashed.cached) == (N, 0)
    # Each is cached under its own key: all four now hit.
    assert sort(src, tmp_path / "d5", embedder, cache=cache).cached == N
    assert sort(src, tmp_path / "d6", smaller, cache=cache).cached == N


def test_the_command_lines_default_bound_is_the_caches() -> None:
    from segd.commands.sort import CACHE_MAX_MB
    from segd.state.cache import DEFAULT_MAX_BYTES

    assert CACHE_MAX_MB * 2**20 == DEFAULT_MAX_BYTES


def test_unreadable_files_are_reported_as_before_and_never_cached(
        src: Path, tmp_path: Path, embedder: Embedder) -> None:
    cache = tmp_path / "cache" / "embeddings.sqlite"
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("not an image\n")
    for dest in ("d1", "d2"):
        result = sort(src, tmp_path / dest, embedder, cache=cache)
        assert sorted(p.name for p, _ in result.unreadable) == ["empty.jpg", "notes.jpg"]
        assert result.placed == N
    assert result.cached == N


@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet-lite0"])
def test_the_model_file_is_read_as_onnxruntime_reads_it(name: str) -> None:
    """The decoders start on the input side read from the file before onnxruntime loads."""
    model = ModelFile.read(ModelConfig(name=name))  # type: ignore[arg-type]
    loaded = Embedder(gpu="off", model_name=name, warmup=False)
    assert onnx_metadata(model.path.read_bytes()) == \
        loaded.session.get_modelmeta().custom_metadata_map
    assert (model.sha256, model.input_size) == (loaded.spec.sha256, loaded.input_size)
    sized = ModelConfig(name=name, input_size=96)  # type: ignore[arg-type]
    assert ModelFile.read(sized).input_size == 96
    with pytest.raises(ValueError):
        onnx_metadata(b"\x0a\xff\xff")  # a field longer than the bytes


# --------------------------------------------------------------------------- the daemon's store


def make_store(db: Path, files: list[Path], vectors: np.ndarray, identity: str) -> None:
    store = open_store(db)
    try:
        store.bind_model(identity, vectors.shape[1])
        for path, vector in zip(files, vectors, strict=True):
            store.add_image(sha(path), path.name, path.resolve(), "pending", embedding=vector)
    finally:
        store.close()


def test_the_daemons_store_is_read_without_its_lock(
        src: Path, tmp_path: Path, embedder: Embedder) -> None:
    files = sorted(src.iterdir())
    db = tmp_path / "state" / "segd.db"
    make_store(db, files, fresh_vectors(embedder, files), embedder.identity)
    with acquire_state_lock(tmp_path / "state" / "segd.lock", "daemon"):
        result = sort(src, tmp_path / "d1", embedder, store=db)
    assert (result.embedded, result.from_store, result.cached) == (0, N, 0)
    assert result.placed == N


def test_a_store_embedded_with_other_preprocessing_is_not_used(
        src: Path, tmp_path: Path, embedder: Embedder, caplog: pytest.LogCaptureFixture) -> None:
    files = sorted(src.iterdir())
    squash = DecodeOptions(size=embedder.input_size, resize="squash")
    wrong = embedder.embed(np.stack([decode_file(p, squash) for p in files]))
    db = tmp_path / "state" / "segd.db"
    make_store(db, files, wrong, embedder.identity)  # the same model, other preprocessing
    with caplog.at_level(logging.WARNING):
        result = sort(src, tmp_path / "d1", embedder, store=db)
    assert (result.embedded, result.from_store) == (N, 0)
    assert "other settings" in caplog.text


def test_a_store_of_another_model_or_an_unreadable_one_is_skipped(
        src: Path, tmp_path: Path, embedder: Embedder) -> None:
    files = sorted(src.iterdir())
    db = tmp_path / "state" / "segd.db"
    make_store(db, files, fresh_vectors(embedder, files), "f" * 64)
    assert sort(src, tmp_path / "d1", embedder, store=db).from_store == 0
    broken = tmp_path / "broken" / "segd.db"
    broken.parent.mkdir()
    broken.write_bytes(os.urandom(8192))
    result = sort(src, tmp_path / "d2", embedder, store=broken)
    assert (result.embedded, result.from_store, result.placed) == (N, 0, N)
    assert broken.exists()  # never touched: it is the daemon's


# --------------------------------------------------------------------------- the command line


# `segd` with hashes filed under the stat of files just written (see `settled_now`).
SEGD_SETTLED_NOW = ("import sys, segd.state.cache as c; c.SETTLED_NS = 0; "
                    "from segd.cli import main; sys.exit(main())")


def segd_sort(tmp: Path, src: Path, dest: Path, *args: str,
              settled_now: bool = False) -> subprocess.Popen[str]:
    config = tmp / "segd-config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump({"model": {"gpu": "off"},
                                          "state_dir": str(tmp / "state")}))
    env = dict(os.environ, SEGD_CONFIG=str(config), XDG_CACHE_HOME=str(tmp / "xdg"),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    segd = ["-c", SEGD_SETTLED_NOW] if settled_now else ["-m", "segd"]
    return subprocess.Popen([sys.executable, *segd, "sort", str(src), str(dest),
                             "--no-progress", "--k", "3", *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> str:
    return finish_both(proc)[0]


def finish_both(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"segd sort failed:\n{out}\n{err}"
    return out, err


def test_no_cache_creates_no_cache_file(src: Path, tmp_path: Path) -> None:
    out = finish(segd_sort(tmp_path, src, tmp_path / "d1", "--no-cache"))
    assert "images/s embedded" in out
    assert "from the cache" not in out
    # (onnxruntime keeps a file of its own under $XDG_CACHE_HOME/Microsoft: not segd's.)
    assert not (tmp_path / "xdg" / "segd").exists()


def test_two_sorts_at_once_share_the_cache_then_a_third_hits_everything(
        src: Path, tmp_path: Path) -> None:
    twin = tmp_path / "src2"
    shutil.copytree(src, twin)
    procs = [segd_sort(tmp_path, s, tmp_path / d) for s, d in ((src, "d1"), (twin, "d2"))]
    for proc in procs:
        finish(proc)
    cache = tmp_path / "xdg" / "segd" / "embeddings.sqlite"
    assert cache.stat().st_mode & 0o777 == 0o600
    out = finish(segd_sort(tmp_path, src, tmp_path / "d3"))
    assert f"{N} embeddings from the cache" in out
    assert "images/s embedded" not in out
    assert manifest(tmp_path / "d3").keys() == manifest(tmp_path / "d1").keys()


def test_two_sorts_of_one_folder_at_once_share_the_stat_index_then_a_third_reads_nothing(
        src: Path, tmp_path: Path) -> None:
    procs = [segd_sort(tmp_path, src, tmp_path / d, settled_now=True) for d in ("d1", "d2")]
    for proc in procs:
        finish(proc)
    out, err = finish_both(segd_sort(tmp_path, src, tmp_path / "d3", "-v", settled_now=True))
    assert f"{N} embeddings from the cache" in out
    assert f"{N} files known by their stat, 0 read and hashed" in err
    assert manifest(tmp_path / "d3") == manifest(tmp_path / "d1") == manifest(tmp_path / "d2")


def test_the_clustering_stack_loads_frozen_for_the_collector_and_without_pandas(
        src: Path, tmp_path: Path) -> None:
    """Frozen (gc.freeze): neither later collections nor the interpreter's exit walk the
    stack's objects again; pandas, which scikit-learn only probes for, is not imported by
    the sort, and imports as usual after it (docs/benchmarks.md, section 2b)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"gpu": "off"},
                                      "state_dir": str(tmp_path / "state")}))
    driver = textwrap.dedent("""
        import gc, importlib.util, sys
        from segd.cli import main
        code = main(sys.argv[1:])
        print("frozen", gc.get_freeze_count())
        print("pandas", "pandas" in sys.modules)
        if importlib.util.find_spec("pandas") is not None:
            import pandas
            print("imported", pandas.DataFrame is not None)
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", driver,
                           "sort", str(src), str(tmp_path / "d"),
                           "--config", str(config), "--no-progress", "--k", "3"],
                          env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines()
                 if line.split(" ", 1)[0] in ("frozen", "pandas", "imported"))
    assert int(lines["frozen"]) > 50_000  # scikit-learn and SciPy alone leave a few 100,000
    assert lines["pandas"] == "False"
    assert lines.get("imported", "True") == "True"  # where installed, it still imports
