"""Whether a file that failed to decode is quarantined now or waits for its writer."""

from __future__ import annotations

from dataclasses import dataclass

# Kinds a file still being written can show: nothing written yet (empty), cut short
# (truncated), or a piece of a format that only parses once complete (corrupt). Those wait;
# other kinds (not an image, too large, unsupported, inaccessible) do not improve with time.
SUSPECT_KINDS: frozenset[str] = frozenset({"empty", "truncated", "corrupt"})


@dataclass(frozen=True)
class Signature:
    """What identifies one version of a file: a writer changes at least one of these."""

    size: int
    mtime_ns: int
    ino: int


@dataclass(frozen=True)
class Suspect:
    """A path last seen failing with this signature, first seen so at `since` (clock s)."""

    signature: Signature
    since: float


@dataclass(frozen=True)
class Quarantine:
    """The same version failed for the whole quiet period: set it aside."""


@dataclass(frozen=True)
class Wait:
    """Leave it in the inbox and look again at `until`; `suspect` is the record to keep."""

    until: float
    suspect: Suspect


def judge(signature: Signature, previous: Suspect | None, now: float,
          quiet_s: float) -> Quarantine | Wait:
    """Quarantine only once this very signature has failed for at least `quiet_s`; a new
    or changed signature (the writer came back) starts the wait again."""
    if previous is not None and previous.signature == signature:
        if now - previous.since >= quiet_s:
            return Quarantine()
        return Wait(previous.since + quiet_s, previous)
    suspect = Suspect(signature, now)
    return Wait(now + quiet_s, suspect) if quiet_s > 0 else Quarantine()
