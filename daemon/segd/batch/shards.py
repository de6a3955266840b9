"""The Ray engine's units of work: the listing cut into shards, shard files, resuming.

The driver lists SRC once (sorted, as the local engine lists it), stats every file and cuts
the list into shards of a few thousand paths. A shard's key is the sha256 of what its
embeddings depend on: the model's identity, the decode options and each file's path, size
and mtime. A worker embeds one shard and writes DEST/.segd-shards/shards/<key>.npz by a
temporary name, fsync, rename; a file under that name is therefore complete, and a later
run (after a killed driver, or to cluster again) skips every shard whose file exists.

The shards' file lists travel through one listing file on the shared filesystem, not
through the object store: a worker reads its shard's bytes at an offset the driver gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from segd.core.errors import ImageError, SegdError
from segd.core.pipeline import embed_stream
from segd.media.decode import DecodeOptions, decode_file
from segd.state.fsops import fsync_dir

SHARD_DIR = ".segd-shards"  # under DEST; hidden, so no listing of DEST picks it up
FORMAT = 1
DEFAULT_SHARD_SIZE = 2000
_TMP = ".tmp-"
_INT = np.dtype("<i8")


@dataclass(frozen=True)
class Entry:
    """One listed file, as it was when listed."""

    path: Path
    size: int  # -1 when it could not be stat'ed (decoding then says why)
    mtime_ns: int


@dataclass(frozen=True)
class Shard:
    """A slice of the listing: where its bytes lie in the listing file, and its key."""

    index: int
    key: str
    offset: int
    length: int
    count: int


@dataclass(frozen=True)
class ShardSummary:
    """What a worker reports for one shard it embedded."""

    key: str
    count: int
    failed: int
    seconds: float
    host: str


@dataclass(frozen=True)
class ShardContents:
    """A shard file read back: per file, its path and outcome; embeddings of the readable."""

    entries: list[Entry]
    ok: np.ndarray  # (count,) bool
    errors: dict[int, ImageError]  # position in the shard -> why it was set aside
    path: Path  # the shard file, for reading its embeddings when needed


def shard_root(dest: Path) -> Path:
    return dest / SHARD_DIR


def shards_folder(dest: Path) -> Path:
    return shard_root(dest) / "shards"


def listing_path(dest: Path) -> Path:
    return shard_root(dest) / "listing.bin"


def shard_path(dest: Path, key: str) -> Path:
    return shards_folder(dest) / f"{key}.npz"


# ---- listing


def stat_entries(paths: Sequence[Path]) -> list[Entry]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append(Entry(path, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(Entry(path, -1, -1))
    return out


def encode_entries(entries: Sequence[Entry]) -> bytes:
    """Entries as bytes: a count, sizes and mtimes (int64), then NUL-separated paths (no
    path holds a NUL; bytes, so names that are not UTF-8 survive)."""
    sizes = np.array([e.size for e in entries], dtype=_INT)
    mtimes = np.array([e.mtime_ns for e in entries], dtype=_INT)
    names = b"\0".join(os.fsencode(e.path) for e in entries)
    return len(entries).to_bytes(8, "little") + sizes.tobytes() + mtimes.tobytes() + names


def decode_entries(data: bytes) -> list[Entry]:
    count = int.from_bytes(data[:8], "little")
    sizes = np.frombuffer(data, dtype=_INT, count=count, offset=8)
    mtimes = np.frombuffer(data, dtype=_INT, count=count, offset=8 + 8 * count)
    names = data[8 + 16 * count:].split(b"\0") if count else []
    if len(names) != count:
        raise SegdError(f"a shard listing holds {len(names)} paths, expected {count}")
    return [Entry(Path(os.fsdecode(n)), int(s), int(m))
            for n, s, m in zip(names, sizes, mtimes, strict=True)]


def shard_key(encoded: bytes, identity: str, decode: DecodeOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "identity": identity,
                         "decode": dataclasses.asdict(decode)}, sort_keys=True).encode())
    h.update(encoded)
    return h.hexdigest()


def write_listing(dest: Path, entries: Sequence[Entry], shard_size: int, identity: str,
                  decode: DecodeOptions) -> list[Shard]:
    """Cut the entries into shards, write the listing file atomically, return the shards."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    target = listing_path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    shards: list[Shard] = []
    offset = 0

    def write(fh: BinaryIO) -> None:
        nonlocal offset
        for index, lo in enumerate(range(0, len(entries), shard_size)):
            part = entries[lo:lo + shard_size]
            blob = encode_entries(part)
            shards.append(Shard(index, shard_key(blob, identity, decode), offset, len(blob),
                                len(part)))
            fh.write(blob)
            offset += len(blob)

    _write_atomically(target, write)
    return shards


def read_shard_entries(dest: Path, shard: Shard, identity: str,
                       decode: DecodeOptions) -> list[Entry]:
    """A shard's entries from the listing file, checked against its key."""
    with listing_path(dest).open("rb") as fh:
        fh.seek(shard.offset)
        blob = fh.read(shard.length)
    if shard_key(blob, identity, decode) != shard.key:
        raise SegdError(f"the listing in {listing_path(dest)} changed under shard "
                        f"{shard.index}: was another segd sort started on this DEST?")
    return decode_entries(blob)


# ---- shard files


def is_done(dest: Path, shard: Shard) -> bool:
    """Whether a complete shard file exists for this shard (same model and input)."""
    path = shard_path(dest, shard.key)
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False  # missing, or not a whole shard file
    return meta.get("key") == shard.key and meta.get("count") == shard.count


def embed_shard(dest: Path, shard: Shard, *, identity: str, decode: DecodeOptions,
                embed: Callable[[np.ndarray], np.ndarray], dim: int, batch_size: int,
                workers: int, host: str = "") -> ShardSummary:
    """Decode and embed one shard with segd's pipeline and write its shard file."""
    started = time.perf_counter()
    entries = read_shard_entries(dest, shard, identity, decode)
    vectors: list[np.ndarray] = []
    ok = np.zeros(len(entries), dtype=bool)
    failures: list[list[object]] = []
    for batch in embed_stream(range(len(entries)), lambda i: decode_file(entries[i].path, decode),
                              embed, batch_size=batch_size, workers=workers):
        for result in batch:
            i = result.item
            if result.error is not None:
                failures.append([i, result.error.kind, result.error.reason])
            else:
                ok[i] = True
                vectors.append(np.asarray(result.embedding, dtype=np.float32))
    embeddings = np.stack(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    meta = {"format": FORMAT, "key": shard.key, "identity": identity, "count": len(entries),
            "dim": dim}
    write_shard_file(shard_path(dest, shard.key), meta, encode_entries(entries), ok,
                     embeddings, failures)
    return ShardSummary(shard.key, len(entries), len(failures),
                        time.perf_counter() - started, host)


def write_shard_file(path: Path, meta: dict[str, object], entries: bytes, ok: np.ndarray,
                     embeddings: np.ndarray, failures: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(fh: BinaryIO) -> None:
        np.savez(fh, meta=_bytes_array(json.dumps(meta).encode()),
                 entries=_bytes_array(entries), ok=ok,
                 embeddings=np.ascontiguousarray(embeddings, dtype="<f4"),
                 errors=_bytes_array(json.dumps(failures).encode()))

    _write_atomically(path, write)


def read_shard(dest: Path, shard: Shard) -> ShardContents:
    path = shard_path(dest, shard.key)
    with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]))
        if meta.get("key") != shard.key:
            raise SegdError(f"{path} does not hold shard {shard.index}")
        entries = decode_entries(bytes(data["entries"]))
        ok = np.asarray(data["ok"], dtype=bool)
        failures = json.loads(bytes(data["errors"]))
    found = {int(i): image_error(entries[int(i)].path, kind, reason)
             for i, kind, reason in failures}
    return ShardContents(entries, ok, found, path)


def read_embeddings(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return np.asarray(data["embeddings"], dtype=np.float32)


def embedding_chunks(dest: Path, shards: Sequence[Shard]) -> Callable[[], Iterator[np.ndarray]]:
    """The fit's chunk source: each shard's embeddings of readable files, in listing order."""
    paths = [shard_path(dest, s.key) for s in shards]

    def chunks() -> Iterator[np.ndarray]:
        for path in paths:
            block = read_embeddings(path)
            if len(block):
                yield block

    return chunks


def remove_temporaries(dest: Path) -> int:
    """Delete shard files a killed worker left half-written; call with no worker running."""
    removed = 0
    for folder in (shards_folder(dest), shard_root(dest)):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(_TMP):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        removed += 1
    return removed


def image_error(path: Path, kind: str, reason: str) -> ImageError:
    """The ImageError subclass of `kind` (shard files keep only the kind and the reason)."""
    cls = _ERROR_KINDS.get(kind, ImageError)
    return cls(path, reason)


def _error_kinds() -> dict[str, type[ImageError]]:
    found: dict[str, type[ImageError]] = {}
    todo: list[type[ImageError]] = [ImageError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.kind, cls)
        todo.extend(cls.__subclasses__())
    return found


_ERROR_KINDS = _error_kinds()


def _bytes_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _write_atomically(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write by a temporary name beside `target`, fsync, rename, fsync the folder: the
    name `target` only ever holds a complete file."""
    tmp = target.with_name(f"{_TMP}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
