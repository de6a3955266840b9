"""Running as root: refused unless asked for explicitly, with the reason."""

from __future__ import annotations

import os

from segd.core.errors import SegdError


def refuse_root(allowed: bool, what: str) -> None:
    if os.geteuid() == 0 and not allowed and os.environ.get("SEGD_ALLOW_ROOT") != "1":
        raise SegdError(
            f"refusing to {what} as root: segd moves files and parses untrusted images, so a "
            "bug or a malicious file would act with full rights, and files it creates would "
            "belong to root. Run it as a dedicated user (see systemd/segd.service), or pass "
            "--allow-root (or set allow_root: true, or SEGD_ALLOW_ROOT=1) if you must.")
