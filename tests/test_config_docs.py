"""The three descriptions of the configuration agree: the dataclasses (what segd reads), the
shipped config.yaml (every key, with its default), and the README's table; and every YAML
snippet in the docs is a config segd accepts."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from segd.config import Config, parse_config_file

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def dataclass_defaults(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        if dataclasses.is_dataclass(value):
            out.update(dataclass_defaults(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def plain(value: Any) -> Any:
    """A default as YAML would spell it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def readme_table() -> dict[str, str]:
    """key -> default text, from the README's configuration table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for keys, default in re.findall(r"^\| (`[a-z_.]+`(?:, `[a-z_]+`)*) \| ([^|]+) \|", text,
                                    flags=re.M):
        names = re.findall(r"`([a-z_.]+)`", keys)
        values = [v.strip().strip("`") for v in default.split(",")] \
            if len(names) > 1 else [default.strip().strip("`")]
        section = names[0].rsplit(".", 1)[0] + "." if "." in names[0] else ""
        for i, name in enumerate(names):
            full = name if "." in name or not section else section + name
            rows[full] = values[i] if i < len(values) else values[-1]
    return rows


def test_config_yaml_lists_every_key_with_its_default() -> None:
    shipped = flatten(yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8")))
    defaults = {k: plain(v) for k, v in dataclass_defaults().items()}
    assert sorted(shipped) == sorted(defaults)
    differ = {k: (shipped[k], defaults[k]) for k in defaults if shipped[k] != defaults[k]}
    assert differ == {}


def test_readme_table_lists_every_key_with_its_default() -> None:
    table = readme_table()
    defaults = dataclass_defaults()
    assert sorted(table) == sorted(defaults)
    for key, text in table.items():
        value = defaults[key]
        if isinstance(value, tuple):
            continue  # described in words (the temporary-name patterns)
        assert yaml.safe_load(text) == plain(value), f"README default of {key}: {text!r}"


def yaml_snippets() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text("utf-8"),
                                             flags=re.S)):
            found.append((f"{doc.name}#{i + 1}", block))
    return found


@pytest.mark.parametrize(("where", "snippet"), yaml_snippets(), ids=lambda x: x)
def test_every_yaml_snippet_in_the_docs_is_a_valid_config(where: str, snippet: str,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(snippet, encoding="utf-8")
    parse_config_file(path)  # raises ConfigError naming the key otherwise


def test_the_docs_have_yaml_snippets_to_check() -> None:
    assert yaml_snippets(), "no ```yaml blocks found: the snippet test would check nothing"
