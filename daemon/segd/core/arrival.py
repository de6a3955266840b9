"""What becomes of a photo that arrived in the inbox: the decision as data, made from what the
store knows of its path and the current clusters; the daemon carries it out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from segd.core.cluster import assign
from segd.core.filing import Filing


class KnownImage(Protocol):
    """What the decision reads of the row the store holds for the arrival's path."""

    @property
    def id(self) -> int: ...

    @property
    def state(self) -> str: ...

    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ArrivalPlan:
    """The steps for one arrival, in the order the daemon takes them."""

    forget: int | None = None  # a row left by an earlier file of this name: delete it first
    image_id: int | None = None  # the file's own pending row; None: add a new one
    record: bool = True  # write its hash and embedding (False: it waits already, unchanged)
    filing: Filing | None = None  # move it and file it so; None: it waits in the inbox

    @property
    def waits(self) -> bool:
        """It stays in the inbox as pending until a clustering exists."""
        return self.filing is None


def plan_arrival(existing: KnownImage | None, sha256: str, embedding: np.ndarray,
                 centroid_ids: np.ndarray, centroids: np.ndarray) -> ArrivalPlan:
    """Decide for one arrival at a path the store knows as `existing` (or not at all).

    A pending row is the file's own (it waited, or a filing failed and left it in the
    inbox); any other row is stale, left for an earlier file of the same name, and goes.
    With no clusters yet the file waits, and one already waiting with the same bytes needs
    nothing written. Otherwise it is filed into the nearest cluster (cosine distance);
    `centroid_ids[i]` is the cluster id of `centroids[i]`.
    """
    forget = None
    if existing is not None and existing.state != "pending":
        forget, existing = existing.id, None
    image_id = None if existing is None else existing.id
    if len(centroids) == 0:
        unchanged = existing is not None and existing.sha256 == sha256
        return ArrivalPlan(forget, image_id, record=not unchanged)
    labels, dists = assign(embedding[None, :], centroids)
    filing = Filing.sorted_into(int(centroid_ids[labels[0]]), float(dists[0]))
    return ArrivalPlan(forget, image_id, filing=filing)
