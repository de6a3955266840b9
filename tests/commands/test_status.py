"""`segd status` shows how sure the last fit's k was, and why there are no clusters yet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from segd.commands.status import status_command
from segd.config import Config, parse_config_file
from segd.service.control import ControlServer
from segd.state.store import open_store

DAEMON = {"pid": 1, "uptime_s": 5.0, "watch_mode": "inotify", "on_gpu": False,
          "providers": ["CPUExecutionProvider"], "gpu_fallback_reason": None,
          "queue_depth": 0, "in_flight": 0, "refit_running": False}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"inbox": str(tmp_path / "inbox"),
                                    "library": str(tmp_path / "library"),
                                    "state_dir": str(tmp_path / "state"),
                                    "model": {"gpu": "off"}}))
    (tmp_path / "state").mkdir()
    return parse_config_file(path)


def status_text(config: Config, capsys: pytest.CaptureFixture[str], daemon: dict[str, Any] | None,
                *, as_json: bool = False) -> str:
    answer = {"ok": True, "status": daemon}
    if daemon is None:
        status_command(config, as_json=as_json)
    else:
        with ControlServer(config.socket_path, lambda _: answer):
            status_command(config, as_json=as_json)
    return capsys.readouterr().out


def test_the_last_fit_shows_its_rule_margin_and_runner_up(
        config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    with open_store(config.db_path) as store:
        store.add_cluster("cluster-01", np.ones(1280, np.float32))
        store.record_fit(600, 6, 0.21, {5: 0.91, 6: 0.83, 7: 0.62}, 0, 1.5, "startup",
                         rule="strength", runner_up=5, margin=0.031)
    out = status_text(config, capsys, None)
    assert "n=600, k=6 (strength, margin +0.031, runner-up k = 5), silhouette 0.210" in out
    fit = json.loads(status_text(config, capsys, None, as_json=True))["last_fit"]
    assert (fit["rule"], fit["runner_up"], fit["margin"]) == ("strength", 5, 0.031)


def test_a_fit_at_a_given_k_says_so_and_an_old_fit_says_nothing_it_does_not_know(
        config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    with open_store(config.db_path) as store:
        store.record_fit(50, 3, 0.3, {}, 0, 0.1, "on demand", rule="fixed")
    assert "k=3 (as asked), silhouette" in status_text(config, capsys, None)
    with open_store(config.db_path) as store:
        store.record_fit(50, 3, 0.3, {3: 0.3}, 0, 0.1, "startup")  # as before schema 4
    assert "k=3, silhouette" in status_text(config, capsys, None)


def test_no_clusters_yet_says_why(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    open_store(config.db_path).close()
    why = "no structure found in 40 images; they wait in the inbox"
    out = status_text(config, capsys, dict(DAEMON, clusters_waiting=why))
    assert f"clusters:    0 ({why})" in out
    assert "clusters:    0\n" in status_text(config, capsys, dict(DAEMON, clusters_waiting=None))
