"""Run a command under strace and parse its log into complete system calls, in order.

The log is written with ``-f -y -xx -s <huge>``: every string (paths, written bytes, the
paths strace prints after file descriptors) is hex-escaped byte by byte, so parsing needs
no knowledge of C escapes and a name may hold any byte. A call split by another thread
("<unfinished ...>" / "<... resumed>") is joined; its place in the order is where it
returned, and `start` keeps where it began (an fsync only covers what had returned before
it was called).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Everything that can change a file, a directory or what a descriptor refers to, plus
# process creation (threads share a descriptor table, a forked child gets a copy).
SYSCALLS = (
    "open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2", "dup3",
    "fcntl", "lseek", "write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate",
    "truncate", "fallocate", "fsync", "fdatasync", "sync", "syncfs", "sync_file_range",
    "rename", "renameat", "renameat2", "link", "linkat", "unlink", "unlinkat", "mkdir",
    "mkdirat", "rmdir", "symlink", "symlinkat", "clone", "clone3", "fork", "vfork",
    "copy_file_range", "sendfile", "splice",
)
STRSIZE = 1 << 26  # no written buffer is ever cut short (checked: a cut one is refused)


@functools.cache
def available() -> bool:
    """strace is installed and may trace here (a container may forbid ptrace)."""
    if shutil.which("strace") is None:
        return False
    done = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"],
                          capture_output=True, timeout=60)
    return done.returncode == 0


def command(log: Path) -> list[str]:
    """The strace prefix that writes `log` for a command and all its threads/children."""
    return ["strace", "-f", "-qq", "-y", "-xx", "-s", str(STRSIZE), "-o", str(log),
            "-e", "trace=" + ",".join(SYSCALLS)]


def tracee_pid(strace_pid: int) -> int | None:
    """The pid of the program strace started (signals go to it: strace itself blocks
    fatal signals while it traces a program it started)."""
    try:
        children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@dataclass(frozen=True)
class Syscall:
    seq: int  # its place in the order (where it returned)
    start: int  # where it began (== seq unless another thread's calls came in between)
    tid: int
    name: str
    args: list[str]  # top-level arguments, unparsed
    ret: str  # "0", "5<\x2f...>", "-1 ENOENT (...)"

    @property
    def failed(self) -> bool:
        return self.ret.startswith("-1") or self.ret.startswith("?")

    @property
    def retval(self) -> int:
        return int(self.ret.split("<", 1)[0].split()[0], 0)


_LINE = re.compile(r"^(\d+) +(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$", re.S)
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$", re.S)
_UNFINISHED = " <unfinished ...>"
_RESULT = re.compile(r"\)\s+= (.*)$", re.S)


def parse_log(path: Path) -> list[Syscall]:
    """Every completed call in the log, in the order the calls returned."""
    pending: dict[int, tuple[int, str, str]] = {}  # tid -> (start, name, text so far)
    out: list[Syscall] = []
    seq = 0
    with open(path, encoding="ascii", errors="strict") as fh:
        for raw in fh:
            m = _LINE.match(raw.rstrip("\n"))
            if m is None:
                continue
            tid, rest = int(m.group(1)), m.group(2)
            if rest.startswith(("---", "+++")):
                continue
            seq += 1
            resumed = _RESUMED.match(rest)
            if resumed is not None:
                begun = pending.pop(tid, None)
                if begun is None or begun[1] != resumed.group(1):
                    continue  # began before tracing did
                start, name, text = begun[0], begun[1], begun[2] + resumed.group(2)
            else:
                call = _CALL.match(rest)
                if call is None:
                    continue
                start, name, text = seq, call.group(1), call.group(2)
            if text.endswith(_UNFINISHED):
                pending[tid] = (start, name, text[: -len(_UNFINISHED)])
                continue
            result = _RESULT.search(text)
            if result is None:
                continue  # "= ?" of a call cut short by an exit, or a line strace wrapped
            args_text = text[: result.start()]
            out.append(Syscall(seq, start, tid, name, split_args(args_text),
                               result.group(1).strip()))
    return out


def split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments (strings, <paths>, {structs}, [arrays] intact)."""
    args: list[str] = []
    depth = 0
    in_str = False
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if in_str:
            if ch == "\\":
                cur.append(text[i:i + 2])
                i += 2
                continue
            if ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    if cur or args:
        args.append("".join(cur).strip())
    return args


def unhex(s: str) -> bytes:
    """A -xx string body (\\x41\\x42...) as bytes."""
    return bytes.fromhex(s.replace("\\x", ""))


def string_arg(arg: str) -> bytes:
    """A quoted string argument as bytes; refuses one strace cut short."""
    if not (arg.startswith('"') and arg.endswith('"')):
        raise ValueError(f"not a complete string argument: {arg[:60]!r}")
    return unhex(arg[1:-1])


_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<([^>]*)>(?:\(deleted\))?)?$")


def fd_arg(arg: str) -> tuple[int | None, bytes | None]:
    """`5<\\x2f...>` -> (5, b"/..."); AT_FDCWD<cwd> -> (None, cwd); a file already
    unlinked is printed as `5<...>(deleted)`."""
    m = _FD.match(arg)
    if m is None:
        raise ValueError(f"not a descriptor: {arg[:60]!r}")
    fd = None if m.group(1) == "AT_FDCWD" else int(m.group(1))
    path = m.group(2)
    return fd, (unhex(path) if path is not None and path.startswith("\\x") else None)


def run_traced(cmd: list[str], log: Path, **popen: object) -> subprocess.Popen[bytes]:
    """Start `cmd` under strace writing `log` (the caller signals `tracee_pid`)."""
    return subprocess.Popen([*command(log), *cmd], **popen)  # type: ignore[call-overload]
