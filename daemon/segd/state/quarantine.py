"""Setting bad files aside: into the quarantine folder, with the reason in the store and in
`reasons.tsv` beside them, so a person looking at the folder sees why each file is there."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from segd.config import Config
from segd.core.errors import ImageError
from segd.core.filing import Filing
from segd.state.mover import MovePlan, journaled_move
from segd.state.store import Store

log = logging.getLogger(__name__)

REASONS_FILE = "reasons.tsv"


def quarantine_file(store: Store, config: Config, path: Path, error: ImageError,
                    image_id: int | None) -> Path | None:
    """Move `path` into the quarantine folder; None if it vanished first."""
    reason = f"{error.kind}: {error.reason}"
    created = image_id is None
    if image_id is None:
        image_id = store.add_image("", _printable(path.name), path, "pending", reason=reason)
    try:
        dest = journaled_move(store, MovePlan(image_id, path, config.quarantine, path.name,
                                              Filing.quarantined(reason)))
    except FileNotFoundError:
        store.delete_image(image_id)
        return None
    except BaseException:
        # Not moved (quarantine full or read-only...): the file stays in the inbox, so the
        # placeholder row made above must not stay behind as a hash-less pending row.
        if created:
            store.delete_image(image_id)
        raise
    _append_reason(config.quarantine, dest.name, reason)
    return dest


def _append_reason(folder: Path, name: str, reason: str) -> None:
    line = "\t".join((time.strftime("%Y-%m-%d %H:%M:%S"), _printable(name),
                      _printable(reason))) + "\n"
    try:
        fd = os.open(folder / REASONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | getattr(os, "O_NOFOLLOW", 0), 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError as exc:  # the store holds the reason anyway
        log.warning("could not write %s: %s", folder / REASONS_FILE, exc)


def _printable(text: str) -> str:
    """Names may hold newlines, tabs or undecodable bytes; keep the TSV one line per file."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").translate(
        {ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})
