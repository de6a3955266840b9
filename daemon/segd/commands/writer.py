"""How a command that changes the library runs: through the running daemon when there is
one, else itself, as the store's single writer (under the lock, with the root policy)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from segd.commands.options import check_root
from segd.core.errors import SegdError
from segd.service import control

if TYPE_CHECKING:
    from segd.config import Config
    from segd.state.store import Store


def ask_daemon(config: Config, request: dict[str, Any]) -> dict[str, Any] | None:
    """The running daemon's answer to `request`, or None when no daemon runs."""
    try:
        return control.request(config.socket_path, request)
    except control.DaemonNotRunning:
        return None


class NoStore(SegdError):
    """There is no store to change yet."""


@contextmanager
def writing_store(config: Config, role: str, what: str,
                  allow_root: bool | str) -> Iterator[Store]:
    """The store opened under the single-writer lock, for `role` (the lock's label)."""
    check_root(allow_root, what)
    if not config.db_path.exists():
        raise NoStore(f"nothing to {role}: no store at {config.db_path}")
    # Only a direct change needs the store (and numpy with it).
    from segd.state.lock import acquire_state_lock
    from segd.state.store import open_store

    with acquire_state_lock(config.lock_path, role):
        store = open_store(config.db_path)
        try:
            yield store
        finally:
            store.close()
