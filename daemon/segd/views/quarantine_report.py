"""The latest quarantined files and the reason for each, as `segd status` shows them."""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from segd.state.images import ImageRow
from segd.state.quarantine import escape_field

LATEST = 10  # how many `segd status` lists; the rest are in quarantine/reasons.tsv


@dataclass(frozen=True)
class QuarantineEntry:
    name: str  # as it lies in the quarantine folder, escaped as in reasons.tsv
    reason: str
    at: float  # when it was set aside (epoch seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latest_quarantined(rows: Iterable[ImageRow], limit: int = LATEST) -> list[QuarantineEntry]:
    """The `limit` most recently quarantined of `rows`, newest first (streamed: any number
    of rows in, `limit` kept)."""
    newest = heapq.nlargest(limit, (r for r in rows if r.state == "quarantined"),
                            key=lambda r: (r.updated_at, r.id))
    return [QuarantineEntry(escape_field(r.path.name), escape_field(r.reason or "unknown"),
                            r.updated_at) for r in newest]


def quarantine_lines(entries: list[dict[str, Any]], total: int) -> list[str]:
    """Text lines for `segd status`: a heading and one line per entry (`to_dict` form)."""
    if not entries:
        return []
    shown = f"the latest {len(entries)} of {total}" if total > len(entries) else "all"
    lines = [f"quarantine:  {shown} (every reason: quarantine/reasons.tsv)"]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        lines.append(f"  {when}  {e['name']}: {e['reason']}")
    return lines
