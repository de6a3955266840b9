"""The quarantine in `segd status`: the latest reasons, newest first, escaped as in
reasons.tsv, in the text output and in `--json`. A real store in tmp_path, no daemon."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from segd.commands.status import status_command
from segd.config import Config, parse_config_file
from segd.state.store import Store, open_store
from segd.views.quarantine_report import LATEST, latest_quarantined, quarantine_lines


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text("inbox: inbox\nlibrary: library\nquarantine: quarantine\n"
                    "state_dir: state\n", encoding="utf-8")
    config = parse_config_file(path)
    config.state_dir.mkdir(parents=True)
    return config


def quarantine_rows(store: Store, folder: Path, n: int) -> list[str]:
    """`n` quarantined rows (and a sorted one between them); their names, oldest first."""
    names = []
    for i in range(n):
        name = f"bad_{i:02d}.jpg" if i != n - 1 else os.fsdecode(b"new\nline\t\xff.jpg")
        store.add_image("", name, folder / name, "quarantined", reason=f"empty: case {i}")
        store.add_image(f"{i:064x}", f"ok_{i}.jpg", folder.parent / "library" / f"ok_{i}.jpg",
                        "sorted")
        names.append(name)
    return names


def test_latest_newest_first_escaped_and_only_quarantined(config: Config) -> None:
    store = open_store(config.db_path)
    try:
        names = quarantine_rows(store, config.quarantine, LATEST + 2)
        entries = latest_quarantined(store.iter_images())  # every state: sorted rows dropped
    finally:
        store.close()
    assert len(entries) == LATEST
    assert entries[0].name == "new\\nline\\t\\xff.jpg"
    assert [e.name for e in entries[1:]] == names[-2:1:-1]
    assert [e.reason for e in entries[:2]] == [f"empty: case {LATEST + 1}",
                                               f"empty: case {LATEST}"]
    assert all(a.at >= b.at for a, b in itertools.pairwise(entries))


def test_lines_say_how_many_are_shown() -> None:
    assert quarantine_lines([], 0) == []
    entry = {"name": "a.jpg", "reason": "empty: 0 bytes", "at": 0.0}
    assert quarantine_lines([entry], 1)[0].startswith("quarantine:  all ")
    lines = quarantine_lines([entry, entry], 7)
    assert lines[0].startswith("quarantine:  the latest 2 of 7 ")
    assert lines[1].endswith("  a.jpg: empty: 0 bytes") and len(lines) == 3


def test_status_prints_and_carries_the_reasons(config: Config,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(config.db_path)
    try:
        quarantine_rows(store, config.quarantine, 3)
    finally:
        store.close()
    assert status_command(config, as_json=True) == 0
    status = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in status["quarantine_latest"]] == [
        "new\\nline\\t\\xff.jpg", "bad_01.jpg", "bad_00.jpg"]
    assert [e["reason"] for e in status["quarantine_latest"]] == [
        "empty: case 2", "empty: case 1", "empty: case 0"]
    assert status_command(config, as_json=False) == 0
    text = capsys.readouterr().out.splitlines()
    at = text.index(next(line for line in text if line.startswith("quarantine:")))
    assert text[at].startswith("quarantine:  all ")
    assert text[at + 1].endswith("new\\nline\\t\\xff.jpg: empty: case 2")
    assert text[at + 3].endswith("bad_00.jpg: empty: case 0")


def test_status_without_quarantined_files_says_nothing_more(
        config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    open_store(config.db_path).close()
    assert status_command(config, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["quarantine_latest"] == []
    assert status_command(config, as_json=False) == 0
    assert "quarantine:" not in capsys.readouterr().out
