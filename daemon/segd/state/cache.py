"""The embedding cache of `segd sort`: vectors by file content and model, in one SQLite file.

Where: ``$XDG_CACHE_HOME/segd/embeddings.sqlite`` (``~/.cache/segd/`` by default), WAL mode,
so two sorts at once share it: readers never block, writers wait on the busy timeout.

Never a wrong vector:

* A row is found by the sha256 of the file's bytes (never by name or time) and by the
  `CacheKey` digest: the ONNX file's sha256 and every setting that changes the pixels the
  network sees. A file whose bytes changed, or another model, misses.
* Each vector carries a CRC32 over its key and its bytes; a row failing it is a miss and is
  deleted, so a flipped bit on disk costs one re-embedding, not a wrong cluster.
* SQLite errors that mean a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB, a foreign file)
  set the file aside as ``embeddings.sqlite.corrupt`` and start an empty one, with a
  warning. Any other failure (disk full, read-only, unwritable folder) turns the cache off
  for the run, with a warning; a busy timeout skips that one read or write. The sort goes on.

Not read twice: a ``files`` table maps a file's path and stat (size, mtime_ns, ctime_ns, inode,
device) to the sha256 its bytes had, so a re-run stats each file instead of reading and hashing
it. Any stat change means a re-hash. A hash is filed only if the file's ctime lay at least
``SETTLED_NS`` before its bytes were read: a change within the same timestamp tick as the
recorded ctime would otherwise keep every field (mtime put back by hand, same size) and hide.
It serves only files on filesystems that keep a true change time (`keeps_change_time`):
FAT's "ctime" is the creation time, and FUSE or SMB mounts promise nothing. The vectors stay
keyed by content hash; the index only saves finding that hash again.

Bounded: the file's live pages stay under ``max_bytes``; past it the least recently used
rows are evicted (their pages are reused, so the file stops growing). Using a row touches a
small ``entries`` row only: vectors sit in their own table, so a hit never rewrites 5 KB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import numpy as np

from segd import __version__

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_FILE: Final = "embeddings.sqlite"
DEFAULT_MAX_BYTES: Final = 2 * 1024**3
FORMAT: Final = 1  # PRAGMA user_version of the layout below (tables added since: _ADDED)
APPLICATION_ID: Final = 0x73656763  # "segc": marks the file as this cache
BUSY_TIMEOUT_S: Final = 10.0
# Evict down to this fraction of max_bytes, so one eviction serves many writes.
EVICT_TO: Final = 0.9
_IN_CHUNK: Final = 500  # sha256 values per SELECT ... IN (...)
# How long before its bytes were read a file's ctime must lie for its hash to be filed under
# its stat: beyond the coarsest timestamp tick (2 s, FAT) and the kernel's coarse clock.
SETTLED_NS = 2_000_000_000
_VEC_DTYPE: Final = np.dtype("<f4")  # on-disk byte order is fixed, whatever the host's

# sqlite3 primary result codes (exc.sqlite_errorcode & 0xFF).
_BUSY_CODES: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_DAMAGED_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB

_SCHEMA: Final = (
    """CREATE TABLE entries (
           id      INTEGER PRIMARY KEY,
           model   TEXT NOT NULL,
           sha256  BLOB NOT NULL,
           used_at REAL NOT NULL,
           UNIQUE (model, sha256)
       )""",
    "CREATE INDEX entries_used ON entries(used_at)",
    """CREATE TABLE vectors (
           id     INTEGER PRIMARY KEY,
           vector BLOB NOT NULL,
           crc    INTEGER NOT NULL
       )""",
)
# Added to format 1 later, created on open where missing: a segd that predates them ignores
# them, and nothing they hold can make a vector wrong.
_ADDED: Final = {
    "files": (
        """CREATE TABLE files (
               path      BLOB PRIMARY KEY,
               size      INTEGER NOT NULL,
               mtime_ns  INTEGER NOT NULL,
               ctime_ns  INTEGER NOT NULL,
               inode     INTEGER NOT NULL,
               device    INTEGER NOT NULL,
               sha256    BLOB NOT NULL,
               hashed_at REAL NOT NULL
           )""",
        "CREATE INDEX files_hashed ON files(hashed_at)",
    ),
}


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/segd/embeddings.sqlite``; the spec says to ignore a relative value."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "segd" / CACHE_FILE


@dataclass(frozen=True)
class CacheKey:
    """What besides the file's bytes decides its embedding. Any change is another key."""

    model_sha256: str  # the ONNX file's bytes (fp16 and fp32 files differ)
    input_size: int | None  # None: the model's own, which model_sha256 already fixes
    resize: str
    mirror: bool
    precision: str
    max_pixels: int  # decides whether a file is refused, so a hit must not skip that
    decoder: str = f"segd {__version__}"  # a decoding change ships in a new version

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FileStat:
    """What the stat index compares: any change and the file is hashed again."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def row(self) -> tuple[int, int, int, int, int]:
        """As SQLite stores it: inode and device are unsigned 64-bit, SQLite's are signed."""
        return (self.size, self.mtime_ns, self.ctime_ns, _signed(self.inode),
                _signed(self.device))


@dataclass(frozen=True)
class HashedFile:
    """A file's sha256, the stat its bytes were read under, and when the reading began
    (time.time_ns(), taken before the stat)."""

    path: bytes  # os.fsencode of the absolute path
    stat: FileStat
    sha256: str
    read_started_ns: int


def settled(stat: FileStat, read_started_ns: int) -> bool:
    """Whether a hash may be filed under `stat`: its ctime lies far enough before the read
    that any later change to the file gets another ctime."""
    return stat.ctime_ns + SETTLED_NS <= read_started_ns


# Filesystems that set a file's ctime to the present on every change to its bytes or its
# times, and let no one set it: the only ones the stat index serves.
CHANGE_TIME_FILESYSTEMS: Final = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs", "tmpfs", "nfs", "nfs4",
})


def keeps_change_time(fstype: str | None) -> bool:
    """Whether files on a filesystem of this type (None: unknown) may be found by stat."""
    return fstype in CHANGE_TIME_FILESYSTEMS


def index_path(path: str | os.PathLike[str]) -> bytes:
    """The stat index's key of a path: absolute, as bytes (any file name can be stored)."""
    return os.fsencode(os.path.abspath(path))


@dataclass
class CacheStats:
    hits: int = 0
    written: int = 0
    indexed: int = 0  # sha256 values found by stat, the file not read
    rejected: int = 0  # rows that failed their checksum
    evicted: int = 0
    set_aside: int = 0


class CacheUnavailable(Exception):
    """Internal: the cache is off for this run (the reason was logged)."""


@dataclass
class EmbeddingCache:
    """One connection to the cache file. Create it with `open`; every method is safe to call
    after a failure (it then finds nothing and stores nothing)."""

    path: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    busy_timeout_s: float = BUSY_TIMEOUT_S
    stats: CacheStats = field(default_factory=CacheStats)
    _conn: sqlite3.Connection | None = field(default=None, repr=False)
    _inode: int | None = field(default=None, repr=False)
    _off: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, path: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
             busy_timeout_s: float = BUSY_TIMEOUT_S) -> EmbeddingCache:
        """Open or create the cache; never raises for a bad file (see the module notes)."""
        cache = cls(path or default_cache_path(), max_bytes=max_bytes,
                    busy_timeout_s=busy_timeout_s)
        cache._connect_or_rebuild()
        return cache

    @property
    def enabled(self) -> bool:
        return self._conn is not None and not self._off

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading and writing

    def get_many(self, key: str, shas: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vector of each sha256 (hex) that has one under `key`."""
        found: dict[str, np.ndarray] = {}
        if not self.enabled or not shas:
            return found
        model = key.encode()
        try:
            conn = self._connection()
            bad: list[int] = []
            hit_ids: list[int] = []
            for part in _chunks(list(dict.fromkeys(shas)), _IN_CHUNK):
                marks = ",".join("?" * len(part))
                rows = conn.execute(
                    "SELECT e.id, e.sha256, v.vector, v.crc FROM entries e "
                    f"JOIN vectors v ON v.id = e.id WHERE e.model = ? AND e.sha256 IN ({marks})",
                    (key, *(bytes.fromhex(s) for s in part))).fetchall()
                for row_id, sha, blob, crc in rows:
                    if len(blob) % 4 or _crc(model, sha, blob) != crc:
                        bad.append(row_id)
                        continue
                    found[sha.hex()] = np.frombuffer(blob, dtype=_VEC_DTYPE).astype(np.float32)
                    hit_ids.append(row_id)
            if bad:
                log.warning("embedding cache %s: %d rows failed their checksum; they will be "
                            "embedded again", self.path, len(bad))
                self.stats.rejected += len(bad)
            if bad or hit_ids:
                with _Transaction(conn):
                    _delete(conn, bad)
                    now = time.time()
                    for part in _chunks(hit_ids, _IN_CHUNK):
                        conn.execute(f"UPDATE entries SET used_at = ? WHERE id IN "
                                     f"({','.join('?' * len(part))})", (now, *part))
        except sqlite3.Error as exc:
            self._failed(exc, "read")
            # A damaged file may have given some rows before failing: each passed its
            # checksum, so they stand.
        except CacheUnavailable:
            pass
        self.stats.hits += len(found)
        return found

    def put_many(self, key: str, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Store vectors under `key` and each sha256 (hex), then evict past the bound."""
        if not self.enabled or not items:
            return
        model = key.encode()
        now = time.time()
        try:
            conn = self._connection()
            with _Transaction(conn):
                for sha_hex, vector in items:
                    sha = bytes.fromhex(sha_hex)
                    blob = np.asarray(vector, dtype=_VEC_DTYPE).reshape(-1).tobytes()
                    cur = conn.execute("INSERT OR IGNORE INTO entries(model, sha256, used_at) "
                                       "VALUES (?, ?, ?)", (key, sha, now))
                    if cur.rowcount == 1:
                        row_id = cur.lastrowid
                    else:
                        row_id = conn.execute(
                            "SELECT id FROM entries WHERE model = ? AND sha256 = ?",
                            (key, sha)).fetchone()[0]
                        conn.execute("UPDATE entries SET used_at = ? WHERE id = ?", (now, row_id))
                    conn.execute("INSERT OR REPLACE INTO vectors(id, vector, crc) VALUES (?, ?, ?)",
                                 (row_id, blob, _crc(model, sha, blob)))
            self.stats.written += len(items)
            self._evict(conn)
        except sqlite3.Error as exc:
            self._failed(exc, "write")
        except CacheUnavailable:
            pass

    def known_hashes(self, files: Sequence[tuple[bytes, FileStat]]) -> dict[bytes, str]:
        """The sha256 (hex) of each (index_path, stat) whose stat is the one its hash was
        filed under."""
        found: dict[bytes, str] = {}
        if not self.enabled or not files:
            return found
        wanted = dict(files)
        try:
            conn = self._connection()
            for part in _chunks(list(wanted), _IN_CHUNK):
                rows = conn.execute(
                    "SELECT path, size, mtime_ns, ctime_ns, inode, device, sha256 FROM files "
                    f"WHERE path IN ({','.join('?' * len(part))})", part).fetchall()
                for path, *recorded, sha in rows:
                    if tuple(recorded) == wanted[path].row():
                        found[path] = sha.hex()
        except sqlite3.Error as exc:
            self._failed(exc, "read")
        except CacheUnavailable:
            pass
        self.stats.indexed += len(found)
        return found

    def remember_hashes(self, files: Sequence[HashedFile]) -> None:
        """File each sha256 under its path and stat, where the read was `settled`."""
        rows = [(f.path, *f.stat.row(), bytes.fromhex(f.sha256), f.read_started_ns / 1e9)
                for f in files if settled(f.stat, f.read_started_ns)]
        if not self.enabled or not rows:
            return
        try:
            conn = self._connection()
            with _Transaction(conn):
                conn.executemany("INSERT OR REPLACE INTO files(path, size, mtime_ns, ctime_ns, "
                                 "inode, device, sha256, hashed_at) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            self._failed(exc, "write")
        except CacheUnavailable:
            pass

    def live_bytes(self) -> int:
        """Bytes of the file in use (pages not on the free list)."""
        conn = self._connection()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _evict(self, conn: sqlite3.Connection) -> None:
        for _ in range(4):  # the estimate below is close; a few rounds always get under
            live = self.live_bytes()
            if live <= self.max_bytes:
                return
            rows = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            if not rows:
                return
            per_row = live / rows
            n = max(1, int((live - EVICT_TO * self.max_bytes) / per_row) + 1)
            files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            with _Transaction(conn):
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM entries ORDER BY used_at, id LIMIT ?", (n,))]
                _delete(conn, ids)
                # The stat index shrinks in the same proportion, oldest hashes first.
                conn.execute("DELETE FROM files WHERE rowid IN (SELECT rowid FROM files "
                             "ORDER BY hashed_at LIMIT ?)", (files * n // rows + 1,))
            self.stats.evicted += len(ids)
            log.debug("embedding cache %s: evicted %d least recently used rows", self.path,
                      len(ids))

    # ---- the connection and its failures

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._off:
            raise CacheUnavailable
        return self._conn

    def _failed(self, exc: sqlite3.Error, what: str) -> None:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code in _BUSY_CODES:
            log.info("embedding cache %s busy (another segd sort?): %s skipped: %s",
                     self.path, what, exc)
            return
        if code in _DAMAGED_CODES:
            self._set_aside(f"{what} failed: {exc}")
            return
        self._disable(f"{what} failed: {exc}")

    def _disable(self, reason: str) -> None:
        log.warning("embedding cache %s is off for this run: %s", self.path, reason)
        self._off = True
        self.close()

    def _connect_or_rebuild(self) -> None:
        try:
            self._connect()
        except _Damaged as exc:
            self._set_aside(str(exc))
        except (OSError, sqlite3.Error) as exc:
            self._disable(f"cannot open: {exc}")

    def _set_aside(self, reason: str) -> None:
        """Move the damaged file (and its -wal, -shm) to *.corrupt and start an empty one."""
        self.close()
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            # Another sort may have set it aside already and made a fresh one: leave that.
            same = self._inode is None or os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            same = False
        try:
            if same:
                for suffix in ("", "-wal", "-shm"):
                    src = Path(f"{self.path}{suffix}")
                    if src.exists():
                        os.replace(src, Path(f"{aside}{suffix}"))
        except OSError as exc:
            self._disable(f"damaged ({reason}) and cannot be set aside: {exc}")
            return
        self.stats.set_aside += 1
        log.warning("embedding cache %s was damaged (%s); set aside as %s, starting an empty "
                    "one", self.path, reason, aside.name)
        try:
            self._connect()
        except (OSError, sqlite3.Error, _Damaged) as exc:
            self._disable(f"cannot start a new one: {exc}")

    def _connect(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # 0600 before SQLite sees it: -wal and -shm then get the same bits.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_s)
        try:
            self._inode = os.stat(self.path).st_ino
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                # A cache needs no durability against power loss; WAL keeps it consistent.
                conn.execute("PRAGMA synchronous = NORMAL")
                _check_or_create(conn)
            except sqlite3.DatabaseError as exc:
                code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
                if code in _DAMAGED_CODES:
                    raise _Damaged(str(exc)) from exc
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn


class _Damaged(Exception):
    """The file is not a sound cache of this format."""


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: the write lock up front, so a
    read-then-write never fails on the upgrade, which the busy timeout cannot resolve."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _check_or_create(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == FORMAT:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        if app != APPLICATION_ID:
            raise _Damaged("an SQLite file that is not a segd embedding cache")
        _add_missing_tables(conn)
        return
    if version > FORMAT:
        # Written by a newer segd: leave it to that one.
        raise sqlite3.OperationalError(f"cache format {version} is newer than this segd's "
                                       f"({FORMAT})")
    with _Transaction(conn):
        # Re-read under the write lock: another sort may have created it meanwhile.
        if conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT:
            return
        if conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None:
            raise _Damaged("an SQLite file that is not a segd embedding cache")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        for sql in (*_SCHEMA, *(sql for added in _ADDED.values() for sql in added)):
            conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {FORMAT}")


def _add_missing_tables(conn: sqlite3.Connection) -> None:
    """Create the tables of `_ADDED` a file made by an older segd lacks."""
    def missing() -> list[str]:
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return [name for name in _ADDED if name not in have]

    if not missing():
        return
    with _Transaction(conn):
        for name in missing():  # again under the write lock: another sort may have added it
            for sql in _ADDED[name]:
                conn.execute(sql)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _crc(model: bytes, sha: bytes, blob: bytes) -> int:
    return zlib.crc32(blob, zlib.crc32(sha, zlib.crc32(model)))


def _delete(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    for part in _chunks(list(ids), _IN_CHUNK):
        marks = ",".join("?" * len(part))
        conn.execute(f"DELETE FROM vectors WHERE id IN ({marks})", part)
        conn.execute(f"DELETE FROM entries WHERE id IN ({marks})", part)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
