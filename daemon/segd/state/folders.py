"""The daemon's folders on disk: made durably where missing, and proven writable."""

from __future__ import annotations

import os
from pathlib import Path

from segd.config import Config
from segd.core.errors import ConfigError
from segd.state.fsops import make_dirs


def check_folders_writable(config: Config) -> None:
    """Create the working folders and prove each one is writable; name the key if not."""
    for key in ("inbox", "library", "quarantine", "state_dir"):
        folder: Path = getattr(config, key)
        try:
            # Synced into its parent: a journal or a cluster folder whose own name a power
            # cut can take away would take the files in it along.
            make_dirs(folder)
        except OSError as exc:
            problem = f"cannot create {folder}: {exc.strerror}"
            raise ConfigError(key, problem, config.source) from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(key, f"{folder} is not writable by this user", config.source)
