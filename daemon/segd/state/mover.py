"""Journaled file moves: every move survives `kill -9` at any instant.

Protocol (the store's `moves` table is the write-ahead journal):
1. choose a free destination name and commit a journal row (src, dst[, tmp]);
2. place the file at exactly dst: a hard link on one filesystem, or a copy to tmp,
   fsync, `mark_move_copied`, link tmp -> dst across filesystems; never an overwrite;
3. unlink src (only if it is still the same file), fsync both folders;
4. `finish_move`: the journal row disappears and the image row moves, in one commit.

`recover_moves` replays what a crash interrupted; it decides from the disk alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segd.core.filing import Filing
from segd.state import fsops
from segd.state.store import ImageRow, MoveRow, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MovePlan:
    image_id: int
    src: Path
    folder: Path
    name: str
    filing: Filing  # what the image becomes once the file is at its new path
    # The stat of the file the caller read: src must still be that file, else the move is
    # refused (SourceChangedError) rather than filing another file under this image's row.
    expected: os.stat_result | None = None


class SourceChangedError(Exception):
    """src is no longer the file the move was planned for (replaced or rewritten)."""



def journaled_moves(store: Store, plans: list[MovePlan]) -> list[Path | Exception]:
    """journaled_move for a batch: the new path of each file, or the error that kept it.

    Same protocol, amortised: one commit journals every move, one fsync per folder makes
    the links and unlinks durable, one commit closes the journal. A burst of arrivals then
    costs a few syncs per batch instead of several per file. Moves across filesystems (a
    copy each) and names taken in a race go through journaled_move one by one.
    """
    results: list[Path | Exception | None] = [None] * len(plans)
    batch: list[tuple[int, MovePlan, os.stat_result, Path]] = []
    chosen: set[Path] = set()
    for i, plan in enumerate(plans):
        try:
            fsops.make_dirs(plan.folder)
            before = os.lstat(plan.src)
            if plan.expected is not None and not fsops.same_version(before, plan.expected):
                raise SourceChangedError(plan.src)
            if before.st_dev != os.stat(plan.folder).st_dev:
                results[i] = journaled_move(store, plan)
                continue
            dst = next(d for d in (plan.folder / c for c in fsops.candidate_names(plan.name))
                       if d not in chosen and _free(store, d))
        except Exception as exc:
            results[i] = exc
            continue
        chosen.add(dst)
        batch.append((i, plan, before, dst))
    if batch:
        move_ids = store.begin_moves([(p.image_id, p.src, dst, None) for _, p, _, dst in batch])
        linked, finished = [], []
        for (i, plan, before, dst), move_id in zip(batch, move_ids, strict=True):
            try:
                _link_exact(plan.src, dst)
                if plan.expected is not None:
                    _check_linked(plan.src, dst, plan.expected)
            except Exception as exc:
                results[i] = exc
                finished.append((move_id, None))  # nothing happened: close the row
                continue
            linked.append((i, plan, before, dst, move_id))
        for folder in {dst.parent for _, _, _, dst, _ in linked}:
            fsops.fsync_dir(folder)
        for _, plan, before, _, _ in linked:
            fsops.remove_if_unchanged(plan.src, before, sync=False)
        for folder in {plan.src.parent for _, plan, _, _, _ in linked}:
            fsops.fsync_dir(folder)
        finished += [(move_id, plan.filing) for _, plan, _, _, move_id in linked]
        store.finish_moves(finished)
        for i, _, _, dst, _ in linked:
            results[i] = dst
    for i, result in enumerate(results):
        if isinstance(result, FileExistsError):  # the name was taken in a race: next name
            try:
                results[i] = journaled_move(store, plans[i])
            except Exception as exc:
                results[i] = exc
    return results  # type: ignore[return-value] - every slot is filled by now


def _free(store: Store, dst: Path) -> bool:
    # A name still held by a row whose file a user deleted would make the final commit
    # violate the store's unique paths: skip it like a taken name.
    return not os.path.lexists(dst) and store.find_by_path(dst) is None


def journaled_move(store: Store, plan: MovePlan) -> Path:
    """Move plan.src into plan.folder under plan.name or a free suffixed name."""
    fsops.make_dirs(plan.folder)
    before = os.lstat(plan.src)
    expected = plan.expected
    if expected is not None and not fsops.same_version(before, expected):
        raise SourceChangedError(plan.src)
    cross_fs = before.st_dev != os.stat(plan.folder).st_dev
    for candidate in fsops.candidate_names(plan.name):
        dst = plan.folder / candidate
        if not _free(store, dst):
            continue
        tmp = plan.folder / f"{fsops.TMP_PREFIX}{plan.image_id}" if cross_fs else None
        move_id = store.begin_move(plan.image_id, plan.src, dst, tmp)
        try:
            if tmp is not None:
                tmp.unlink(missing_ok=True)  # a leftover of an earlier, rolled-back attempt
                fsops.copy_to_temp(plan.src, plan.folder, tmp.name.removeprefix(
                    fsops.TMP_PREFIX))
                if expected is not None and not fsops.same_version(os.lstat(plan.src), expected):
                    raise SourceChangedError(plan.src)  # the copy may hold the newer file
                store.mark_move_copied(move_id)
                _link_exact(tmp, dst)
                tmp.unlink()
            else:
                _link_exact(plan.src, dst)
                if expected is not None:
                    _check_linked(plan.src, dst, expected)
        except FileExistsError:
            # Someone took the name between the check and the link: roll back, next name.
            if _discard(tmp):
                store.finish_move(move_id)
            continue
        except BaseException:
            # Roll back. If a temporary copy cannot be removed (the library just became
            # read-only), the journal row stays open: start-up recovery removes it later.
            if _discard(tmp):
                store.finish_move(move_id)
            raise
        fsops.fsync_dir(plan.folder)
        fsops.remove_if_unchanged(plan.src, before)
        store.finish_move(move_id, plan.filing)
        return dst
    raise FileExistsError(f"no free name for {plan.name} in {plan.folder}")


def _discard(tmp: Path | None) -> bool:
    """Remove a temporary copy; True when none is left (an unlink on a read-only
    filesystem fails even for a name that is not there, so look before deciding)."""
    if tmp is None:
        return True
    try:
        tmp.unlink(missing_ok=True)
        return True
    except OSError as exc:
        if os.path.lexists(tmp):
            log.warning("could not remove the temporary copy %s: %s", tmp, exc)
            return False
        return True


def _check_linked(src: Path, dst: Path, expected: os.stat_result) -> None:
    """The link is made by name: if src was replaced since it was checked, dst is now a
    second name of the newer file. Take that name away again (src keeps the file)."""
    placed = os.lstat(dst)
    if fsops.same_version(placed, expected):
        return
    try:
        second_name = os.path.samestat(os.lstat(src), placed)
    except FileNotFoundError:
        second_name = False
    if second_name:
        os.unlink(dst)
        raise SourceChangedError(src)
    # Not a second link (a filesystem without hard links renamed it): keep it filed.


def _link_exact(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in fsops.NO_HARDLINKS:
            raise
        if os.path.lexists(dst):
            raise FileExistsError(dst) from exc
        os.rename(src, dst)




FilingFor = Callable[[MoveRow, ImageRow], Filing]


def recover_moves(store: Store, filing_for: FilingFor) -> int:
    """Complete or roll back every journaled move a crash left open; return how many.

    `filing_for(move, image)` gives the filing a completed move implies (state, cluster),
    derived by the caller from where dst lies and from the image as it was before the move.
    """
    moves = store.pending_moves()
    for move in moves:
        outcome = _recover_one(store, move, filing_for)
        log.warning("recovered interrupted move %s -> %s: %s", move.src, move.dst, outcome)
    # A quarantine cut short between its placeholder row and its journal row leaves a
    # pending row without a content hash. No move names it any more, and its file is still
    # in the inbox, where the start-up scan examines it again.
    for image in list(store.iter_images(state="pending")):
        if not image.sha256:
            log.warning("forgetting the unfinished quarantine of %s; it is examined again",
                        image.path)
            store.delete_image(image.id)
    return len(moves)


def _recover_one(store: Store, move: MoveRow, filing_for: FilingFor) -> str:
    image = store.get_image(move.image_id) if move.image_id is not None else None
    src_there = os.path.lexists(move.src)
    dst_there = os.path.lexists(move.dst)
    if move.tmp is not None and os.path.lexists(move.tmp):
        if move.state == "copied" and not dst_there:
            _link_exact(move.tmp, move.dst)
            dst_there = True
        move.tmp.unlink(missing_ok=True)
    hidden = fsops.hidden_name(move.src)
    if os.path.lexists(hidden):
        # The source's name was taken away under a private one, not yet unlinked: ours
        # goes once it is placed; anything else (a file that had replaced the source, or
        # ours not placed) gets the source's name back.
        ours = dst_there and (
            os.path.samestat(os.lstat(hidden), os.lstat(move.dst))
            or (image is not None and fsops.file_sha256(hidden) == image.sha256))
        if ours:
            os.unlink(hidden)
        else:
            fsops.give_back(hidden, move.src)
        fsops.fsync_dir(move.src.parent)
        src_there = os.path.lexists(move.src)
    if dst_there and src_there:
        same = os.path.samestat(os.lstat(move.src), os.lstat(move.dst))
        if not same and (image is None or fsops.file_sha256(move.dst) != image.sha256):
            # dst is someone else's file that took the name: ours never got there.
            store.finish_move(move.id)
            return "rolled back (destination name taken by another file)"
        if same or image is None or fsops.file_sha256(move.src) == image.sha256:
            os.unlink(move.src)
            fsops.fsync_dir(move.src.parent)
            src_there = False
        # else: a newer file under the source's name; it stays for the inbox scan.
    if dst_there:
        fsops.fsync_dir(move.dst.parent)
        stale = store.find_by_path(move.dst)
        if stale is not None and stale.id != move.image_id:
            store.delete_image(stale.id)  # a row left by a file the user deleted
        store.finish_move(move.id, None if image is None else filing_for(move, image))
        return "completed"
    if src_there:
        store.finish_move(move.id)
        return "rolled back (file left at its source)"
    store.finish_move(move.id)
    if image is not None:
        store.delete_image(image.id)
    return "file gone from both places (removed by a user); forgotten"
