"""reasons.tsv: one line per quarantined file, three tab-separated fields, names escaped so
that any name (newlines, tabs, backslashes, bytes that are not UTF-8) reads back exactly."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from segd.state import quarantine


def unescape(field: str) -> str:
    """The inverse of the writer's escaping, as a reader of reasons.tsv would write it."""
    simple = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}

    def one(m: re.Match[str]) -> str:
        body = m.group(1)
        if body in simple:
            return simple[body]
        code = int(body[1:], 16)
        if body[0] == "x" and code >= 0x80:
            return chr(0xDC00 + code)  # a raw byte of a non-UTF-8 name (surrogateescape)
        return chr(code)

    return re.sub(r"\\(\\|n|t|r|x[0-9a-f]{2}|u[0-9a-f]{4})", one, field)


def name_of(raw: bytes) -> str:
    """A file name as os.listdir gives it for these bytes."""
    return os.fsdecode(raw)


@pytest.mark.parametrize(("raw", "written"), [
    (b"plain.jpg", "plain.jpg"),
    (b"new\nline.jpg", "new\\nline.jpg"),
    (b"tab\there.jpg", "tab\\there.jpg"),
    (b"cr\rhere.jpg", "cr\\rhere.jpg"),
    (b"back\\slash.jpg", "back\\\\slash.jpg"),
    (b"lit\\nnot-a-newline.jpg", "lit\\\\nnot-a-newline.jpg"),
    (b"bad-\xff\xfe.jpg", "bad-\\xff\\xfe.jpg"),
    (b"bell\x07.jpg", "bell\\x07.jpg"),
    (b"del\x7f.jpg", "del\\x7f.jpg"),
    ("ünïcødé 写真.jpg".encode(), "ünïcødé 写真.jpg"),
])
def test_names_are_escaped_exactly(raw: bytes, written: str) -> None:
    assert quarantine.escape_field(name_of(raw)) == written
    assert os.fsencode(unescape(written)) == raw


def test_a_lone_surrogate_is_written_as_u_escape() -> None:
    assert quarantine.escape_field("x\ud800y") == "x\\ud800y"


def test_append_reason_writes_one_three_field_line_per_file(tmp_path: Path) -> None:
    names = [name_of(b"new\nline.jpg"), name_of(b"tab\there.jpg"), name_of(b"bad-\xff.jpg"),
             name_of(b"back\\slash.jpg")]
    reasons = ["empty: 0 bytes", "corrupt: bad\tmarker\nat 12", "not an image: text",
               "truncated: C:\\photos\\x"]
    for name, reason in zip(names, reasons, strict=True):
        quarantine._append_reason(tmp_path, name, reason)
    text = (tmp_path / quarantine.REASONS_FILE).read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == len(names) + 1
    for line, name, reason in zip(lines[:-1], names, reasons, strict=True):
        stamp, got_name, got_reason = line.split("\t")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp), stamp
        assert unescape(got_name) == name
        assert unescape(got_reason) == reason
    assert lines[0].split("\t")[1:] == ["new\\nline.jpg", "empty: 0 bytes"]
    assert lines[2].split("\t")[1] == "bad-\\xff.jpg"


def test_append_reason_appends_and_never_follows_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.tsv"
    elsewhere.write_text("untouched\n")
    folder = tmp_path / "quarantine"
    folder.mkdir()
    (folder / quarantine.REASONS_FILE).symlink_to(elsewhere)
    quarantine._append_reason(folder, "a.jpg", "empty: 0 bytes")  # logged, not raised
    assert elsewhere.read_text() == "untouched\n"
