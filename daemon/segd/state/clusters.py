"""The clusters table (centroids and folders) and the fits table (one row per refit)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from segd.core.errors import StoreError
from segd.state.db import Database, abs_path

_CLUSTER_COLS: Final = "id, folder, centroid, size, created_at, retired_at, origin"
_CLUSTER_UPDATABLE: Final = frozenset({"folder", "centroid", "size", "retired_at", "origin"})
CLUSTER_ORIGINS: Final = ("fit", "user")
_FIT_COLS: Final = ("id, at, n, k, silhouette, scores, moved, duration_s, trigger, rule, "
                    "runner_up, margin")


@dataclass(frozen=True, slots=True)
class ClusterRow:
    id: int
    folder: str
    centroid: np.ndarray = field(compare=False, repr=False)
    size: int
    created_at: float
    retired_at: float | None
    origin: str = "fit"  # "user": a folder the user made; a refit keeps it

    @property
    def active(self) -> bool:
        return self.retired_at is None


@dataclass(frozen=True, slots=True)
class FitRow:
    id: int
    at: float
    n: int
    k: int
    silhouette: float | None
    scores: dict[int, float] = field(compare=False)
    moved: int
    duration_s: float
    trigger: str
    rule: str | None = None  # what chose k: "strength", "silhouette" or "fixed" (see FitResult)
    runner_up: int | None = None  # see kselect.KChoice; None for fits before schema 4
    margin: float | None = None


class ClusterTable(Database):
    """Reading and writing clusters and fits."""

    def add_cluster(
        self, folder: str, centroid: np.ndarray, *, size: int = 0, origin: str = "fit"
    ) -> int:
        what = f"add cluster {folder!r}"
        _check_folder(folder, what)
        _check_origin(origin, what)
        blob = self._to_blob(centroid, what)
        with self._write(what) as conn:
            cur = conn.execute(
                "INSERT INTO clusters(folder, centroid, size, created_at, origin) "
                "VALUES (?, ?, ?, ?, ?)",
                (folder, blob, size, time.time(), origin),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def get_cluster(self, cluster_id: int) -> ClusterRow | None:
        with self._guard(f"read cluster {cluster_id}") as conn:
            row = conn.execute(
                f"SELECT {_CLUSTER_COLS} FROM clusters WHERE id = ?", (cluster_id,)
            ).fetchone()
        return None if row is None else self._cluster(row)

    def clusters(self, active_only: bool = True) -> list[ClusterRow]:
        where = "WHERE retired_at IS NULL " if active_only else ""
        with self._guard("list clusters") as conn:
            rows = conn.execute(
                f"SELECT {_CLUSTER_COLS} FROM clusters {where}ORDER BY id"
            ).fetchall()
        return [self._cluster(r) for r in rows]

    def update_cluster(self, cluster_id: int, **fields: Any) -> None:
        """Change some of folder, centroid, size, retired_at (None un-retires), origin.

        TypeError for other names; StoreError if the cluster does not exist or the folder name
        is taken (folder names stay unique across retired clusters too, so a retired cluster's
        folder is never silently adopted by a new one).
        """
        what = f"update cluster {cluster_id}"
        unknown = set(fields) - _CLUSTER_UPDATABLE
        if unknown:
            raise TypeError(f"update_cluster: unknown field(s) {sorted(unknown)}")
        if not fields:
            return
        values = dict(fields)
        if "folder" in values:
            _check_folder(values["folder"], what)
        if "centroid" in values:
            values["centroid"] = self._to_blob(values["centroid"], what)
        if "origin" in values:
            _check_origin(values["origin"], what)
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._write(what) as conn:
            cur = conn.execute(
                f"UPDATE clusters SET {sets} WHERE id = ?", (*values.values(), cluster_id)
            )
            if cur.rowcount != 1:
                raise StoreError(f"{what}: no such cluster")

    def centroid_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Active clusters as (ids int64 (k,), centroids float32 (k, dim)), in id order."""
        rows = self.clusters(active_only=True)
        if not rows:
            return np.empty(0, np.int64), np.empty((0, self._dim), np.float32)
        ids = np.array([c.id for c in rows], dtype=np.int64)
        return ids, np.stack([c.centroid for c in rows]).astype(np.float32, copy=False)

    def add_to_cluster_size(self, cluster_id: int, delta: int) -> None:
        """Adjust one cluster's size by delta (cheaper than a recount per sorted file)."""
        with self._write(f"resize cluster {cluster_id}") as conn:
            conn.execute("UPDATE clusters SET size = size + ? WHERE id = ?", (delta, cluster_id))

    def rename_cluster_folder(self, cluster_id: int, old_dir: Path, new_dir: Path) -> int:
        """Record that a cluster's folder was renamed (by a user): the cluster's folder name
        and the path of every image under the old folder change in one transaction.
        Returns the number of image paths rewritten."""
        what = f"rename folder of cluster {cluster_id}"
        _check_folder(new_dir.name, what)
        # A rename stays beside the old folder (in the library): `library/../x` or another
        # parent would point every image path of the cluster outside the library.
        if Path(os.path.normpath(new_dir)).parent != Path(os.path.normpath(old_dir)).parent:
            raise StoreError(f"{what}: {new_dir} is not in the same folder as {old_dir}")
        old_prefix, new_prefix = str(old_dir) + "/", str(new_dir) + "/"
        if not (isinstance(abs_path(old_dir, what), str)
                and isinstance(abs_path(new_dir, what), str)):
            raise StoreError(f"{what}: folder names must be valid UTF-8")
        with self._write(what) as conn:
            conn.execute("UPDATE clusters SET folder = ? WHERE id = ?", (new_dir.name, cluster_id))
            cur = conn.execute(
                "UPDATE images SET path = ? || substr(path, ?), updated_at = ? "
                "WHERE substr(path, 1, ?) = ?",
                (new_prefix, len(old_prefix) + 1, time.time(), len(old_prefix), old_prefix),
            )
            return cur.rowcount

    def recount_cluster_sizes(self) -> None:
        """Set every cluster's size to its number of sorted images (after a refit or repair)."""
        with self._write("recount cluster sizes") as conn:
            conn.execute(
                "UPDATE clusters SET size = (SELECT COUNT(*) FROM images "
                "WHERE images.cluster_id = clusters.id AND images.state = 'sorted')"
            )

    def _cluster(self, r: tuple[Any, ...]) -> ClusterRow:
        centroid = self._from_blob(r[2], f"cluster {r[0]} centroid")
        assert centroid is not None  # NOT NULL column
        return ClusterRow(
            id=r[0], folder=r[1], centroid=centroid, size=r[3], created_at=r[4], retired_at=r[5],
            origin=r[6],
        )

    # ---- fits

    def record_fit(
        self,
        n: int,
        k: int,
        silhouette: float | None,
        scores: dict[int, float],
        moved: int,
        duration_s: float,
        trigger: str,
        *,
        rule: str | None = None,
        runner_up: int | None = None,
        margin: float | None = None,
    ) -> int:
        sil = _finite(silhouette)
        payload = json.dumps(
            {str(int(kk)): (float(v) if math.isfinite(v) else None) for kk, v in scores.items()}
        )
        with self._write("record fit") as conn:
            cur = conn.execute(
                f"INSERT INTO fits({_FIT_COLS.removeprefix('id, ')}) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (time.time(), n, k, sil, payload, moved, duration_s, trigger, rule,
                 runner_up, _finite(margin)),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def last_fit(self) -> FitRow | None:
        with self._guard("read last fit") as conn:
            r = conn.execute(f"SELECT {_FIT_COLS} FROM fits ORDER BY id DESC LIMIT 1").fetchone()
        if r is None:
            return None
        try:
            scores = {int(kk): v for kk, v in json.loads(r[5]).items()}
        except (ValueError, AttributeError) as e:
            raise StoreError(f"{self.path}: fit {r[0]}: unreadable scores: {e}") from e
        return FitRow(
            id=r[0], at=r[1], n=r[2], k=r[3], silhouette=r[4], scores=scores,
            moved=r[6], duration_s=r[7], trigger=r[8], rule=r[9], runner_up=r[10],
            margin=r[11],
        )  # fmt: skip


def _finite(value: float | None) -> float | None:
    # NaN cannot round-trip (SQLite stores it as NULL, strict JSON rejects it): say None.
    return None if value is None or not math.isfinite(value) else float(value)


def _check_folder(folder: str, what: str) -> None:
    # A folder is a name inside the library, never a path: a separator or ".." would let a
    # cluster escape the library when the daemon joins it to the library root.
    if (
        not folder
        or folder in (".", "..")
        or "/" in folder
        or "\0" in folder
        or (os.altsep and os.altsep in folder)
    ):
        raise StoreError(f"{what}: invalid folder name {folder!r}")


def _check_origin(origin: str, what: str) -> None:
    if origin not in CLUSTER_ORIGINS:
        raise StoreError(f"{what}: invalid origin {origin!r}, expected one of {CLUSTER_ORIGINS}")
