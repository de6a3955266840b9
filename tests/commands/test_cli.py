"""The command line: global options on either side of the command, the root policy, and the
README's main command run exactly as a newcomer runs it."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import REPO, as_user, photos, wait_until
from reliability_env import chown_tree, shared_root, unprivileged_user

from segd.cli import build_parser
from segd.commands.options import check_root, root_policy
from segd.core.errors import SegdError

README = REPO / "README.md"


@pytest.mark.parametrize("argv", [
    ["--config", "a.yaml", "sort", "src", "dest"],
    ["sort", "src", "dest", "--config", "a.yaml"],
    ["--config", "b.yaml", "sort", "src", "dest", "--config", "a.yaml"],
])
def test_config_is_accepted_before_and_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.config == "a.yaml"
    assert args.command == "sort"


def test_verbose_before_the_command_is_not_reset_by_the_subcommand() -> None:
    assert build_parser().parse_args(["-v", "status"]).verbose is True
    assert build_parser().parse_args(["status", "-v"]).verbose is True
    args = build_parser().parse_args(["status"])
    assert args.verbose is False and args.config is None


def test_global_config_option_reaches_the_command(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.yaml"
    config.write_text(f"state_dir: {tmp_path / 'st'}\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "segd", "--config", str(config), "status",
                           "--json"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "st") in done.stdout


# ---- the root policy (pure: the euid is a parameter)


def test_root_refused_when_policy_is_false() -> None:
    with pytest.raises(SegdError, match=r"refusing to run the daemon as root.*--allow-root"):
        check_root(False, "run the daemon", euid=0)


def test_root_warns_loudly_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="segd"):
        check_root("warn", "run the daemon", euid=0)
    assert "running as ROOT" in caplog.text


def test_root_allowed_quietly_and_non_root_never_checked(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="segd"):
        check_root(True, "run the daemon", euid=0)
        check_root(False, "run the daemon", euid=1000)
    assert caplog.text == ""


@pytest.mark.parametrize(("configured", "flag", "env", "expected"), [
    ("warn", False, None, "warn"),
    (False, False, None, False),
    (False, True, None, True),  # --allow-root wins
    ("warn", False, "0", False),  # the unit's SEGD_ALLOW_ROOT=0 makes root an error
    (False, False, "1", True),
    (True, False, "warn", "warn"),
    (False, True, "0", True),
])
def test_root_policy_precedence(monkeypatch: pytest.MonkeyPatch, configured: bool | str,
                                flag: bool, env: str | None, expected: bool | str) -> None:
    if env is None:
        monkeypatch.delenv("SEGD_ALLOW_ROOT", raising=False)
    else:
        monkeypatch.setenv("SEGD_ALLOW_ROOT", env)
    assert root_policy(configured, flag) == expected


def test_bad_root_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGD_ALLOW_ROOT", "maybe")
    with pytest.raises(SegdError, match=r"SEGD_ALLOW_ROOT.*'maybe'"):
        root_policy("warn", False)


# ---- the README's main command, as written


def readme_main_command() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines()
                if line and not line.startswith("#")]
    return next(line for line in commands if "segd run" in line)


def test_readme_main_command_runs_the_daemon_on_the_default_config() -> None:
    command = readme_main_command()
    assert command.endswith(".venv/bin/segd run"), command
    assert "--allow-root" not in command  # it must work as written, for root too


def _run_readme_daemon(folder: Path, run_as: tuple[int, int] | None) -> str:
    """`segd run` with the repository's own config.yaml, from its folder, as a newcomer
    does; three photos dropped in wait as pending (fewer than min_images). Returns the log."""
    shutil.copy(REPO / "config.yaml", folder / "config.yaml")
    if run_as is not None:
        chown_tree(folder, *run_as)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SEGD_CONFIG", "SEGD_ALLOW_ROOT", "NOTIFY_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    if run_as is not None:
        env["HOME"] = str(folder)
    log_path = folder / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*as_user(run_as), sys.executable, "-m", "segd", "run"],
                                cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            def text() -> str:
                return log_path.read_text(encoding="utf-8", errors="replace")

            def watching() -> bool:
                assert proc.poll() is None, f"segd run exited early:\n{text()}"
                return "INFO watching" in text()

            wait_until(watching, 90, "the daemon to start watching", on_timeout=text)
            for photo in photos()[:3]:
                shutil.copy(photo, folder / "inbox" / photo.name)
            wait_until(lambda: text().count("pending") >= 3, 60, "three pending photos",
                       on_timeout=text)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(p.name for p in (folder / "inbox").iterdir()) == sorted(
        p.name for p in photos()[:3])
    return log_path.read_text(encoding="utf-8", errors="replace")


def test_readme_main_command_as_the_current_user(tmp_path: Path) -> None:
    log = _run_readme_daemon(tmp_path, run_as=None)
    if os.geteuid() == 0:
        assert "running as ROOT" in log
    else:
        assert "running as ROOT" not in log


def test_readme_main_command_as_an_unprivileged_user() -> None:
    ids = unprivileged_user()
    with shared_root("segd-readme-") as folder:
        log = _run_readme_daemon(folder, run_as=ids)
    assert "running as ROOT" not in log
