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
        image_id = store.add_image("", escape_field(path.name), path, "pending", reason=reason)
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
    line = "\t".join((time.strftime("%Y-%m-%d %H:%M:%S"), escape_field(name),
                      escape_field(reason))) + "\n"
    try:
        fd = os.open(folder / REASONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | getattr(os, "O_NOFOLLOW", 0), 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError as exc:  # the store holds the reason anyway
        log.warning("could not write %s: %s", folder / REASONS_FILE, exc)


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def escape_field(text: str) -> str:
    """One TSV field, one line per file, reversible: backslash, newline, tab and CR as
    ``\\\\ \\n \\t \\r``; other control characters, and the bytes of a name that is not UTF-8
    (read with surrogateescape), as ``\\xNN``; any other lone surrogate as ``\\uNNNN``."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)
