"""The small commands load nothing heavy they do not use: `python -X importtime` says what."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segd.service.control import ControlServer
from segd.state.store import open_store

HEAVY = ("sklearn", "scipy", "onnxruntime", "cv2")


def imported(tmp_path: Path, *args: str) -> tuple[set[str], str]:
    """The top-level packages `segd ARGS` imports, and its stdout."""
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"),
                                          "model": {"gpu": "off"}}))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "segd", *args],
                          cwd=tmp_path, env=dict(os.environ, SEGD_CONFIG=str(config)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 2), done.stderr[-2000:]
    names = {line.rsplit("|", 1)[1].strip().split(".")[0]
             for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "segd" in names  # the report was read
    return names, done.stdout


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in HEAVY if n in names)


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    names, out = imported(tmp_path, "--help")
    assert "status" in out
    assert heavy(names) == []
    assert "numpy" not in names


def test_status_without_a_store_imports_nothing_heavy(tmp_path: Path) -> None:
    names, out = imported(tmp_path, "status")
    assert "daemon:" in out
    assert heavy(names) == []
    assert "numpy" not in names


def test_status_with_a_store_and_a_daemon_imports_nothing_heavy(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    open_store(tmp_path / "state" / "segd.db").close()
    answer = {"ok": True, "status": {"pid": 1, "uptime_s": 5.0, "watch_mode": "inotify",
                                     "on_gpu": False, "providers": ["CPUExecutionProvider"],
                                     "gpu_fallback_reason": None, "queue_depth": 0,
                                     "in_flight": 0, "refit_running": False}}
    with ControlServer(tmp_path / "state" / "control.sock", lambda _: answer):
        names, out = imported(tmp_path, "status")
    assert "running (pid 1" in out
    assert heavy(names) == []


def test_refit_through_a_running_daemon_imports_nothing_heavy(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    answer = {"ok": True, "summary": "k=3, 0 files moved", "refit": {"dry_run": False}}
    with ControlServer(tmp_path / "state" / "control.sock", lambda _: answer):
        names, out = imported(tmp_path, "refit")
    assert "(asked the running daemon) k=3" in out
    assert heavy(names) == []


@pytest.mark.slow
def test_doctor_loads_onnxruntime_but_not_the_clustering_or_imaging_stack(
        tmp_path: Path) -> None:
    names, out = imported(tmp_path, "doctor", "--json")
    assert "onnxruntime" in names and '"model_runs"' in out
    assert heavy(names) == ["onnxruntime"]


def test_sort_decodes_its_first_image_before_the_clustering_stack_loads(
        tmp_path: Path) -> None:
    """-X importtime reports each import as it completes, on the stderr the log also goes to:
    the order of the lines is the order of the events."""
    photos = Path(__file__).resolve().parents[1] / "data" / "photos"
    src = tmp_path / "src"
    src.mkdir()
    for photo in sorted(photos.glob("*/*.jpg"))[:12]:
        (src / photo.name).write_bytes(photo.read_bytes())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"gpu": "off"}}))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "segd", "sort", str(src),
                           str(tmp_path / "dest"), "--no-progress", "-v", "--k", "2"],
                          cwd=tmp_path, env=dict(os.environ, SEGD_CONFIG=str(config),
                                                 OMP_NUM_THREADS="1",
                                                 # Its own cache: a hit decodes nothing.
                                                 XDG_CACHE_HOME=str(tmp_path / "xdg")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if "first image decoded" in line)
    before = {line.rsplit("|", 1)[1].strip().split(".")[0]
              for line in lines[:first] if line.startswith("import time:")}
    assert "cv2" in before  # the decoders ran
    assert not {"sklearn", "scipy"} & before
