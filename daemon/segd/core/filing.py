"""Where a photo stands and why: the typed value a filing decision hands to the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

IMAGE_STATES: Final = ("pending", "sorted", "quarantined")


@dataclass(frozen=True, slots=True)
class Filing:
    """The image fields that change together when a file is filed, set aside or re-filed.

    The store writes every field, so no value from the file's previous place survives by
    accident; a caller that knows only part of it (recovery, a user's move) starts from the
    image's current filing (``ImageRow.filing``) and replaces what it knows. A new field
    (a default here, and an ``images`` column of the same name) is written with the others
    without any change to the store's code.
    """

    state: str
    cluster_id: int | None = None
    distance: float | None = None  # to the cluster's centroid, when it was assigned
    reason: str | None = None  # why a file was set aside
    # Placed by the user (moved into this cluster's folder, or into a folder the user made):
    # the cluster is the user's choice and no refit moves the file again.
    pinned: bool = False

    def __post_init__(self) -> None:
        if self.state not in IMAGE_STATES:
            raise ValueError(f"invalid state {self.state!r}, expected one of {IMAGE_STATES}")
        if self.pinned and (self.state != "sorted" or self.cluster_id is None):
            raise ValueError("only a file sorted into a cluster can be pinned")

    @classmethod
    def pending(cls) -> Filing:
        """Waiting in the inbox for a clustering to exist."""
        return cls("pending")

    @classmethod
    def sorted_into(cls, cluster_id: int, distance: float) -> Filing:
        """Filed into a cluster's folder, at ``distance`` from its centroid."""
        return cls("sorted", cluster_id, distance)

    @classmethod
    def pinned_to(cls, cluster_id: int, distance: float | None) -> Filing:
        """Placed in a cluster's folder by the user: it stays there whatever a refit finds."""
        return cls("sorted", cluster_id, distance, pinned=True)

    @classmethod
    def quarantined(cls, reason: str) -> Filing:
        """Set aside in the quarantine folder (it belongs to no cluster)."""
        return cls("quarantined", reason=reason)
