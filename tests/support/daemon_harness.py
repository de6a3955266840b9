"""Run the real `segd run` as a subprocess against a folder tree in tmp_path.

Everything here waits by polling with a deadline; nothing sleeps a fixed time and hopes.
The daemon's stderr goes to ``<root>/daemon-<n>.log`` (one file per start), which is both
the readiness signal ("watching ... -> ...") and what a failing test prints.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "tests" / "data" / "photos"
READY = re.compile(r"INFO watching .* -> ")

# Small everything: a first fit after 10 images once the inbox has been quiet for a second,
# rescans every second.
BASE_CONFIG: dict[str, Any] = {
    "allow_root": True,  # the tests may run as root (containers, CI)
    "inbox": "inbox",
    "library": "library",
    "quarantine": "quarantine",
    "state_dir": "state",
    "log_level": "INFO",
    "model": {"gpu": "off"},
    "clustering": {"min_images": 10, "k_max": 6, "n_init": 2, "settle_s": 1.0},
    "watch": {"rescan_interval_s": 1.0, "quiet_s": 1.0},
}


def photos() -> list[Path]:
    """The 40 test photos (5 classes x 8), in a stable order."""
    found = sorted(PHOTOS.glob("*/*.jpg"))
    assert len(found) == 40, f"expected 40 test photos under {PHOTOS}, found {len(found)}"
    return found


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_config(root: Path, overrides: dict[str, Any] | None = None,
                 raw_extra: str = "") -> Path:
    """Write `root/config.yaml` (BASE_CONFIG with `overrides` merged in); return its path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    text = yaml.safe_dump(merge(BASE_CONFIG, overrides or {}), sort_keys=False)
    path.write_text(text + raw_extra, encoding="utf-8")
    return path


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1, on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll `condition` until it returns something truthy; return that, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without anything that would change how segd behaves (a
    systemd notification socket or watchdog, a config, the root policy), plus `extra`:
    the opt-in for a test about exactly those."""
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                "SEGD_CONFIG", "SEGD_ALLOW_ROOT", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def segd_cli(config: Path, *args: str, timeout: float = 120,
             run_as: tuple[int, int] | None = None,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m segd ARGS --config CONFIG` to completion (refit, status...)."""
    cmd = [*as_user(run_as), sys.executable, "-m", "segd", *args, "--config", str(config)]
    env = _env(extra_env)
    if run_as is not None:
        env["HOME"] = str(config.parent)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=config.parent)


def status_json(config: Path) -> dict[str, Any]:
    done = segd_cli(config, "status", "--json", timeout=60)
    assert done.returncode == 0, f"segd status failed ({done.returncode}):\n{done.stderr}"
    return json.loads(done.stdout)


def as_user(run_as: tuple[int, int] | None) -> list[str]:
    """A command prefix that runs the rest as (uid, gid), no supplementary groups and no
    capabilities (util-linux `setpriv`; subprocess's own user= cannot reach a Python that
    lives under root's 0700 home, as pyenv's does)."""
    if run_as is None:
        return []
    return ["setpriv", f"--reuid={run_as[0]}", f"--regid={run_as[1]}", "--clear-groups",
            "--inh-caps=-all"]


def python_as(run_as: tuple[int, int], code: str, *args: str,
              **popen: Any) -> subprocess.Popen[str]:
    """Start `python -c CODE ARGS` as (uid, gid) (see `as_user`); skip the test where this
    process cannot switch users (not root, or no `setpriv`)."""
    if os.geteuid() != 0:
        import pytest
        pytest.skip("running a process as another user needs root")
    if shutil.which("setpriv") is None:
        import pytest
        pytest.skip("util-linux setpriv is not installed")
    reason = _cannot_import_segd(run_as)
    if reason:
        import pytest
        pytest.skip(reason)
    return subprocess.Popen([*as_user(run_as), sys.executable, "-c", code, *args], text=True,
                            env=_env_as_other_user(), cwd="/", **popen)


def _env_as_other_user() -> dict[str, str]:
    env = _env()
    env["HOME"] = "/"
    return env


@functools.cache
def _cannot_import_segd(run_as: tuple[int, int]) -> str:
    """Why that user cannot import segd here ("" if it can): a checkout under a folder
    closed to other users (mktemp -d makes 0700 folders) hides the package from it."""
    done = subprocess.run([*as_user(run_as), sys.executable, "-c", "import segd"],
                          capture_output=True, text=True, env=_env_as_other_user(), cwd="/",
                          timeout=60)
    if done.returncode == 0:
        return ""
    return (f"uid {run_as[0]} cannot import segd from this checkout (a folder above it is "
            f"closed to other users?): {done.stderr.strip().splitlines()[-1:]}")


class DaemonProcess:
    """One `segd run` subprocess, restartable: each start appends a fresh log file.

    `run_as=(uid, gid)` runs it as that user (the tests run as root; a real service runs
    as its own user), with HOME pointed at the config's folder. `extra_env` is added to
    the environment after the variables `_env` removes (NOTIFY_SOCKET, WATCHDOG_USEC,
    SEGD_ALLOW_ROOT...), for the tests about those."""

    def __init__(self, config: Path, run_as: tuple[int, int] | None = None,
                 extra_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None) -> None:
        self.run_as = run_as
        self.extra_args = extra_args
        self.extra_env = dict(extra_env or {})
        self.config = config
        self.root = config.parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self._log_fh: Any = None

    # ---- lifecycle

    def start(self, wait: bool = True, timeout: float = 60) -> DaemonProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.root / f"daemon-{len(self.logs) + 1}.log"
        self.logs.append(log)
        self._log_fh = open(log, "wb")  # noqa: SIM115 - closed in _reap
        cmd = [*as_user(self.run_as), sys.executable, "-m", "segd", "run", "--config",
               str(self.config), *self.extra_args]
        env = _env(self.extra_env)
        if self.run_as is not None:
            env["HOME"] = str(self.root)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.root)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"segd run exited with {self.proc.returncode} before it "
                                     f"was ready:\n{self.log_tail()}")
            return bool(READY.search(self.log()))

        wait_until(ready, timeout, "the daemon to start watching", on_timeout=self.log_tail)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM; assert it exits 0 within `timeout` seconds; return how long it took."""
        assert self.proc is not None and self.alive(), "not running"
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reap()
            raise AssertionError(f"segd run did not exit within {timeout:g} s of SIGTERM:\n"
                                 f"{self.log_tail()}") from None
        elapsed = time.monotonic() - started
        self._reap()
        assert rc == 0, f"segd run exited with {rc} after SIGTERM:\n{self.log_tail()}"
        return elapsed

    def kill(self) -> None:
        """SIGKILL, no questions asked (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._reap()

    def _reap(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def cleanup(self) -> None:
        """Fixture teardown: never leave a daemon behind."""
        self.kill()

    # ---- the log

    def log(self, which: int = -1) -> str:
        if not self.logs:
            return ""
        try:
            return self.logs[which].read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        return "".join(self.log(i) for i in range(len(self.logs)))

    def log_tail(self, lines: int = 60) -> str:
        text = self.log().splitlines()
        return "---- daemon log (last lines) ----\n" + "\n".join(text[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match[str]:
        """Wait for `pattern` (a regex) in the current log, from character `start` on."""
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log(), start), timeout,
                          f"log line /{pattern}/", on_timeout=self.log_tail)

    def errors_in_log(self) -> list[str]:
        """Lines at ERROR level or tracebacks in every log so far."""
        return [line for line in self.all_logs().splitlines()
                if " ERROR " in line or line.startswith("Traceback")]


# ---- the folder tree


class Tree:
    """The folders of one test's config, and ways to look at them."""

    def __init__(self, config: Path) -> None:
        from invariant import Folders

        self.config = config
        self.folders = Folders.from_config_file(config)
        for folder in (self.inbox, self.library, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def inbox(self) -> Path:
        return self.folders.inbox

    @property
    def library(self) -> Path:
        return self.folders.library

    @property
    def quarantine(self) -> Path:
        return self.folders.quarantine

    def inbox_files(self) -> list[Path]:
        return sorted(p for p in self.inbox.iterdir() if p.is_file())

    def library_files(self) -> list[Path]:
        if not self.library.is_dir():
            return []
        return sorted(p for p in self.library.glob("*/*") if p.is_file())

    def quarantine_files(self) -> list[Path]:
        return sorted(p for p in self.quarantine.iterdir()
                      if p.is_file() and p.name != "reasons.tsv")

    def where(self, name: str) -> list[Path]:
        """Every place a file of this name is now (inbox, library/*, quarantine)."""
        found = [p for p in (self.inbox / name, self.quarantine / name) if p.exists()]
        found += [p for p in self.library.glob(f"*/{name}") if p.is_file()]
        return found

    def counts(self) -> tuple[int, int, int]:
        """(inbox, library, quarantine) file counts."""
        return len(self.inbox_files()), len(self.library_files()), len(self.quarantine_files())

    def describe(self) -> str:
        i, lib, q = self.counts()
        return f"inbox={i} library={lib} quarantine={q}"

    def wait_drained(self, expect_filed: int, timeout: float, daemon: DaemonProcess | None = None
                     ) -> float:
        """Wait until the inbox is empty and `expect_filed` files are in the library plus the
        quarantine; return the seconds it took."""
        started = time.monotonic()

        def done() -> bool:
            if daemon is not None and not daemon.alive():
                raise AssertionError(f"the daemon died:\n{daemon.log_tail()}")
            i, lib, q = self.counts()
            return i == 0 and lib + q >= expect_filed

        def explain() -> str:
            return self.describe() + ("\n" + daemon.log_tail() if daemon else "")

        wait_until(done, timeout, f"an empty inbox and {expect_filed} files filed",
                   interval=0.1, on_timeout=explain)
        return time.monotonic() - started


def copy_photos(sources: Iterable[Path], inbox: Path, prefix: str,
                ledger: Any) -> list[Path]:
    """Copy each source into the inbox as `<prefix><source name>`, recording each drop."""
    out = []
    for src in sources:
        dst = inbox / f"{prefix}{src.name}"
        shutil.copy(src, dst)
        ledger.record(dst, src.read_bytes())
        out.append(dst)
    return out
