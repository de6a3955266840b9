"""Every kind of bad input dropped into the inbox of the real daemon, in one run.

What "exists exactly once" means for each (see also tests/support/invariant.py):
- regular files (good, empty, random bytes, odd names): filed exactly once, byte-identical,
  in the library or the quarantine;
- symlinks (to a photo outside the inbox, dangling, a loop): the link itself is
  quarantined ("symbolic link (not followed)"); its target is never read, moved or changed
  (a sentinel snapshot of the target's folder must be unchanged);
- FIFOs, sockets, device nodes, directories: not files segd takes. They stay in the inbox
  untouched (same inode, same type), and the daemon keeps going: a good photo dropped
  after each of them is sorted.

decode.py's own fuzzing (tests/media/test_decode.py) covers bad bytes in depth; this is about
the daemon surviving them end to end.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import time
from pathlib import Path

import pytest
from daemon_harness import photos, status_json, wait_until
from reliability_env import Env

slow = pytest.mark.slow


def _entries(folder: Path) -> list[bytes]:
    return os.listdir(os.fsencode(folder))


def _takeable(inbox: Path) -> list[bytes]:
    """Entries of the inbox segd would take: regular files and symlinks. Polled while the
    daemon files them, so an entry listed may be gone (moved) by its lstat."""
    out = []
    for name in _entries(inbox):
        try:
            st = os.lstat(os.path.join(os.fsencode(inbox), name))
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            out.append(name)
    return out


def _filed(env: Env) -> int:
    """Regular files and symlinks (not followed) in the library's folders and the
    quarantine: what segd has filed."""
    folders = [env.tree.quarantine, *(p for p in env.tree.library.iterdir()
                                      if p.is_dir() and not p.is_symlink())]
    reasons = (env.tree.quarantine / "reasons.tsv").exists()
    return sum(len(_takeable(f)) for f in folders) - reasons


@slow
def test_every_bad_input_through_the_daemon(env: Env) -> None:
    inbox = env.tree.inbox
    binbox = os.fsencode(inbox)
    ph = photos()
    env.daemon.start(timeout=120)
    env.seed(12)
    rng = random.Random(99)
    tried: list[str] = []

    def good(name: str | bytes, n: int) -> None:
        data = ph[n].read_bytes()
        path = os.path.join(binbox, os.fsencode(name))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        env.ledger.record(path, data)
        tried.append(repr(name))

    # ---- things that are not files: they stay, and the daemon keeps going after each
    not_files: dict[str, tuple[int, int]] = {}
    (inbox / "x.jpg").mkdir()
    os.mkfifo(inbox / "y.jpg")
    good("after_fifo.jpg", 12)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(inbox / "z.png"))
    good("after_socket.jpg", 13)
    device_made = True
    try:
        os.mknod(inbox / "d.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError as exc:  # no CAP_MKNOD (a restricted container)
        device_made = False
        print(f"[bad input] no device node: {exc}")
    good("after_device.jpg", 14)
    for name in ("x.jpg", "y.jpg", "z.png") + (("d.jpg",) if device_made else ()):
        st = os.lstat(inbox / name)
        not_files[name] = (stat.S_IFMT(st.st_mode), st.st_ino)
        tried.append(name)

    # ---- symlinks: the link is quarantined, the target never touched
    outside_photo = env.root / "outside" / "photo.jpg"
    assert outside_photo.is_file()
    links = {"link_out.jpg": str(outside_photo), "dangling.jpg": "/nonexistent/nothing.jpg",
             "loop.jpg": "loop.jpg", "link_dir.jpg": str(env.root / "outside")}
    for name, target in links.items():
        os.symlink(target, inbox / name)
        env.ledger.record_symlink(inbox / name)
        tried.append(name)

    # ---- bad bytes
    env.drop_bytes("zero.jpg", b"")
    env.drop_bytes("random.jpg", rng.randbytes(20_000))
    env.drop_bytes("text.png", b"hello\n" * 100)
    env.drop_bytes("half.jpg", ph[15].read_bytes()[:3000])
    tried += ["zero.jpg", "random.jpg", "text.png", "half.jpg"]

    # ---- bad bytes under names reasons.tsv must escape (exactly as written here)
    odd_bad = {b"bad\nnewline.jpg": (b"", "bad\\nnewline.jpg"),
               b"bad\ttab.jpg": (b"hello\n" * 50, "bad\\ttab.jpg"),
               b"bad-\xff\xfe.jpg": (rng.randbytes(5000), "bad-\\xff\\xfe.jpg"),
               b"bad\\back\\n.jpg": (ph[15].read_bytes()[:2000], "bad\\\\back\\\\n.jpg")}
    for raw, (data, _) in odd_bad.items():
        path = os.path.join(binbox, raw)
        with open(path, "wb") as fh:
            fh.write(data)
        env.ledger.record(path, data)
        tried.append(repr(raw))

    # ---- odd names (good photos)
    good("new\nline.jpg", 16)
    good("tab\there.jpg", 17)
    good(b"\xff\xfe-not-utf8.jpg", 18)
    good("-rf.jpg", 19)
    good("--help.jpg", 20)
    long_name = "L" * 251 + ".jpg"
    assert len(long_name.encode()) == 255
    good(long_name, 21)
    good(" leading space.jpg", 22)
    good("ünïcødé 写真.jpg", 23)
    good("name (2).jpg", 24)  # looks like a collision suffix already

    # ---- the same file twice: same bytes under another name, and the same name again
    good("twice.jpg", 25)
    good("twice_copy.jpg", 25)
    drained = len(env.ledger)

    def settled() -> bool:
        return not _takeable(inbox) and _filed(env) >= drained

    wait_until(settled, 120, "every takeable entry to be filed",
               on_timeout=lambda: f"{_takeable(inbox)!r}\n{env.daemon.log_tail()}")
    good("twice.jpg", 25)  # again, now that the first one is filed
    good(long_name, 26)  # a 255-byte name that collides: the suffix must still fit
    wait_until(lambda: not _takeable(inbox) and _filed(env) >= len(env.ledger), 120,
               "the second round to be filed",
               on_timeout=lambda: f"{_takeable(inbox)!r}\n{env.daemon.log_tail()}")
    time.sleep(2)  # a couple of rescans pass over the things that stay

    assert env.daemon.alive()
    for name, (kind, ino) in not_files.items():
        st = os.lstat(inbox / name)
        assert (stat.S_IFMT(st.st_mode), st.st_ino) == (kind, ino), f"{name} was touched"
    for name, target in links.items():
        q = env.tree.quarantine / name
        assert q.is_symlink() and os.readlink(q) == target, name
    reasons = (env.tree.quarantine / "reasons.tsv").read_text(encoding="utf-8")
    assert "symbolic link (not followed)" in reasons
    # One line per quarantined file, three tab-separated fields, names escaped exactly.
    lines = reasons.splitlines()
    rows = [line.split("\t") for line in lines]
    assert all(len(r) == 3 for r in rows), lines
    by_name = {name: reason for _, name, reason in rows}
    assert len(by_name) == len(rows) == len(links) + 4 + len(odd_bad), lines
    for raw, (_, escaped) in odd_bad.items():
        assert os.path.isfile(os.path.join(os.fsencode(env.tree.quarantine), raw)), raw
        assert escaped in by_name, (escaped, sorted(by_name))
    assert by_name["bad\\nnewline.jpg"].startswith("empty:"), by_name
    for name in ("zero.jpg", "random.jpg", "text.png", "half.jpg"):
        assert (env.tree.quarantine / name).is_file(), name
    # `segd status` shows the latest of the same reasons, escaped the same way.
    latest = status_json(env.config)["quarantine_latest"]
    assert len(latest) == min(10, len(rows)), latest
    assert all(by_name.get(e["name"]) == e["reason"] for e in latest), (latest, by_name)
    assert any(n.startswith(b"\xff\xfe") for d in env.tree.library.iterdir()
               for n in _entries(d)), "the non-UTF-8 name was not kept byte for byte"
    summary = env.finish()
    sock.close()
    print(f"[bad input] {len(tried)} inputs tried; {summary.describe()}")
    assert summary.quarantined == len(links) + 4 + len(odd_bad)
