"""Embeddings `segd sort` computed before: the cache key, the cache, the daemon's store.

The store is read as the daemon left it (read-only, without its lock). It records the model
its vectors came from but not the preprocessing, so before its vectors are used a few of them
are embedded afresh and compared (`verify_store`); one disagreement and the store is not used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from segd.config import ModelConfig
from segd.core.errors import ImageError, ModelError, SegdError, StoreError
from segd.media.embed import ModelSpec, default_model_path, import_onnxruntime, model_file
from segd.media.headers import probe_size
from segd.media.providers import choose_providers, on_gpu
from segd.media.reader import read_regular_file
from segd.state.cache import (
    DEFAULT_MAX_BYTES,
    CacheKey,
    EmbeddingCache,
    FileStat,
    HashedFile,
    index_path,
)

if TYPE_CHECKING:
    from segd.state.store import Store

log = logging.getLogger(__name__)

# Same bytes and preprocessing give the same vector up to float noise (CPU batches agree
# exactly, GPU and CPU to about 1e-4); another input size or resize mode gives 0.75-0.95.
STORE_MATCH: Final = 0.995
STORE_CHECKS: Final = 3  # store vectors embedded afresh before the store is trusted
STORE_CANDIDATES: Final = 32  # of these, the least square images are checked (crop != squash)


@dataclass(frozen=True)
class ReuseOptions:
    """Where `segd sort` may find embeddings before running the network."""

    cache_path: Path | None = None  # None: no cache (--no-cache)
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    store_path: Path | None = None  # the daemon's segd.db; None: not consulted


def model_path(m: ModelConfig) -> Path:
    """The ONNX file an Embedder built from `m` loads, found without creating a session.

    The same rule as the embedder's (`model_file`): fp16 only where the build offers CUDA.
    The embedder's own hash of what it loaded is compared with the key's (`check_embedder`).
    """
    if m.path is not None:
        return m.path
    if m.precision == "fp32" or m.gpu == "off":
        return default_model_path("fp32", m.name)
    requested = choose_providers(import_onnxruntime().get_available_providers(), m.gpu)
    return model_file(None, m.precision, gpu=on_gpu(requested), name=m.name)


@dataclass(frozen=True)
class ModelFile:
    """The ONNX file a run will load, read once: its hash, and the network's input side from
    its own metadata (None when that cannot be read without onnxruntime)."""

    path: Path
    sha256: str
    input_size: int | None

    @classmethod
    def read(cls, m: ModelConfig) -> ModelFile:
        path = model_path(m)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SegdError(f"cannot read the model file {path}: {exc}") from exc
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            spec = ModelSpec.from_metadata(path, onnx_metadata(data), sha256)
        except (ModelError, ValueError):
            return cls(path, sha256, m.input_size)
        return cls(path, sha256, m.input_size or spec.input_size)


def cache_key(m: ModelConfig, max_pixels: int, model_sha256: str) -> CacheKey:
    """The key of this run's embeddings."""
    return CacheKey(model_sha256=model_sha256, input_size=m.input_size, resize=m.resize,
                    mirror=m.mirror, precision=m.precision, max_pixels=max_pixels)


def onnx_metadata(data: bytes) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, read from its protobuf bytes without onnxruntime
    (which takes longer to import than the decoders need to start). ValueError if the bytes
    are not a protobuf message.

    ModelProto field 14 is ``repeated StringStringEntryProto`` (key = 1, value = 2); every
    other field, the graph included, is skipped by its length.
    """
    view = memoryview(data)
    found: dict[str, str] = {}
    for number, value in _fields(view):
        if number == 14 and isinstance(value, memoryview):
            entry = {n: bytes(v).decode() for n, v in _fields(value)
                     if isinstance(v, memoryview)}
            if 1 in entry:
                found[entry[1]] = entry.get(2, "")
    return found


def _fields(view: memoryview) -> Iterator[tuple[int, memoryview | int]]:
    """(field number, bytes or integer) of each field of one protobuf message."""
    pos = 0
    while pos < len(view):
        tag, pos = _varint(view, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(view, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(view, pos)
            if pos + size > len(view):
                raise ValueError("a protobuf field runs past the end")
            yield number, view[pos:pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not expected here")
    if pos != len(view):
        raise ValueError("a protobuf field runs past the end")


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("a protobuf varint runs past the end")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def store_identity(key: CacheKey) -> str:
    """What the daemon binds its store to (`Embedder.identity`) for the model of `key`."""
    return key.model_sha256 + ("+mirror" if key.mirror else "")


def hash_file(path: Path, limit: int) -> HashedFile | None:
    """The sha256 of a regular file's bytes and the stat they were read under; None when it
    cannot be read (decoding then reports why)."""
    started = time.time_ns()  # before the stat: see cache.settled
    try:
        data, st = read_regular_file(path, limit)
    except ImageError:
        return None
    return HashedFile(index_path(path), FileStat.of(st), hashlib.sha256(data).hexdigest(),
                      started)


@functools.cache
def filesystem_type(device: int) -> str | None:
    """The type of the mounted filesystem a file with this st_dev lies on, from
    /proc/self/mountinfo; None where that cannot be told (not Linux, a btrfs subvolume
    mounted only through its parent)."""
    try:
        text = Path("/proc/self/mountinfo").read_text(errors="replace")
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == wanted and " - " in line:
            return line.split(" - ", 1)[1].split(maxsplit=1)[0]
    return None


class StoreReader:
    """The daemon's store, opened read-only: vectors of the same content and model."""

    def __init__(self, store: Store) -> None:
        self._store: Store | None = store

    @classmethod
    def open(cls, path: Path, key: CacheKey) -> StoreReader | None:
        """None (with the reason logged) when there is no usable store for this model."""
        if not path.is_file():
            return None
        try:
            from segd.state.store import META_MODEL, open_store

            store = open_store(path, readonly=True)
        except (StoreError, sqlite3.Error, OSError) as exc:
            log.info("the daemon's store %s is not read: %s", path, exc)
            return None
        try:
            bound = store.get_meta(META_MODEL)
        except (StoreError, sqlite3.Error) as exc:
            log.info("the daemon's store %s is not read: %s", path, exc)
            store.close()
            return None
        if bound != store_identity(key):
            log.info("the daemon's store %s holds another model's embeddings; not used", path)
            store.close()
            return None
        return cls(store)

    def get_many(self, shas: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        if self._store is None:
            return found
        try:
            with self._store.snapshot():
                for sha in dict.fromkeys(shas):
                    for row in self._store.find_by_sha256(sha):
                        if row.embedding is not None:
                            found[sha] = row.embedding
                            break
        except (StoreError, sqlite3.Error) as exc:
            log.warning("the daemon's store could not be read, so it is not used: %s", exc)
            self.close()
            return {}
        return found

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()


def verify_store(candidates: Sequence[tuple[Path, np.ndarray]],
                 embed_files: Callable[[Sequence[Path]], np.ndarray | None],
                 limit: int) -> bool:
    """Embed the least square few of `candidates` (path, store vector) afresh and compare.

    `embed_files` returns the fresh vectors, or None when a file could not be read (then
    nothing is proven and the store is not used).
    """
    def squareness(path: Path) -> float:
        try:
            data, _ = read_regular_file(path, limit)
        except ImageError:
            return 1.0
        probed = probe_size(data)
        if probed is None or min(probed[1:]) <= 0:
            return 1.0
        return min(probed[1:]) / max(probed[1:])

    pool = list(candidates[:STORE_CANDIDATES])
    chosen = sorted(pool, key=lambda c: squareness(c[0]))[:STORE_CHECKS]
    fresh = embed_files([p for p, _ in chosen])
    if fresh is None:
        return False
    stored = np.stack([v for _, v in chosen]).astype(np.float32)
    agreement = float(np.min(np.sum(fresh * stored, axis=1)))
    if agreement < STORE_MATCH:
        log.warning("the daemon's store was embedded with other settings (agreement %.3f "
                    "< %.3f); its embeddings are not used", agreement, STORE_MATCH)
        return False
    log.info("reusing the daemon's store embeddings (checked %d afresh, agreement %.4f)",
             len(chosen), agreement)
    return True


def open_cache(opts: ReuseOptions) -> EmbeddingCache | None:
    if opts.cache_path is None:
        return None
    cache = EmbeddingCache.open(opts.cache_path, max_bytes=opts.cache_max_bytes)
    return cache if cache.enabled else None
