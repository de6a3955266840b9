"""The configuration: the repository's file, lookup order, type and range errors, folders."""

from __future__ import annotations

import dataclasses
import os
import shutil
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import yaml

from segd import config as cfg
from segd.config import (
    ClusteringConfig,
    Config,
    ModelConfig,
    find_config_path,
    load_config,
    parse_config_file,
    resolve_paths,
    validate,
)
from segd.core.errors import ConfigError
from segd.state.folders import check_folders_writable

ROOT = Path(__file__).resolve().parents[1]
REPO_CONFIG = ROOT / "config.yaml"
FOLDER_KEYS = ("inbox", "library", "quarantine", "state_dir")
REPO_FOLDERS = {"inbox": "inbox", "library": "library", "quarantine": "quarantine",
                "state_dir": "state"}  # as written in config.yaml


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the system-wide config at a path under tmp (absent until a test writes it)."""
    fake = tmp_path / "etc" / "segd" / "config.yaml"
    monkeypatch.setattr(cfg, "SYSTEM_CONFIG", fake)
    monkeypatch.delenv("SEGD_CONFIG", raising=False)
    return fake


# --------------------------------------------------------------------------- the repo's file


def test_repo_config_loads_and_paths_resolve_against_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: the file's folder must win over cwd
    config = parse_config_file(REPO_CONFIG)
    assert config.source == REPO_CONFIG
    for key, name in REPO_FOLDERS.items():
        assert getattr(config, key) == ROOT / name
    assert config.model.path is None  # the shipped model


def test_repo_config_is_the_embedded_default() -> None:
    # The file documents every key with its default value: the two must not drift apart.
    config = parse_config_file(REPO_CONFIG)
    assert dataclasses.replace(config, source=None) == resolve_paths(Config(), ROOT)


def test_copied_config_resolves_against_its_new_folder(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "config.yaml"
    copy.parent.mkdir()
    shutil.copy(REPO_CONFIG, copy)
    config = parse_config_file(copy)
    for key, name in REPO_FOLDERS.items():
        assert getattr(config, key) == copy.parent / name


def test_relative_absolute_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_yaml(tmp_path / "conf" / "config.yaml", {
        "inbox": "../drop", "library": str(tmp_path / "abs-lib"), "quarantine": "~/q",
        "state_dir": "state/sub", "model": {"path": "models/net.onnx"}})
    config = parse_config_file(path)
    base = path.parent
    assert config.inbox == base / "../drop"
    assert config.library == tmp_path / "abs-lib"
    assert config.quarantine == tmp_path / "home" / "q"
    assert config.state_dir == base / "state" / "sub"
    assert config.model.path == base / "models" / "net.onnx"
    assert config.db_path == base / "state" / "sub" / "segd.db"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "---\n"):
        path = write_yaml(tmp_path / "config.yaml", text)
        config = parse_config_file(path)
        assert config == dataclasses.replace(resolve_paths(Config(), tmp_path),
                                             source=path.resolve())


# --------------------------------------------------------------------------- lookup order


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      no_system_config: Path) -> None:
    work = tmp_path / "work"
    explicit = write_yaml(tmp_path / "explicit.yaml", {"log_level": "DEBUG"})
    env = write_yaml(tmp_path / "env.yaml", {"log_level": "WARNING"})
    local = write_yaml(work / "config.yaml", {"log_level": "ERROR"})
    system = write_yaml(no_system_config, {"log_level": "INFO"})
    monkeypatch.chdir(work)
    monkeypatch.setenv("SEGD_CONFIG", str(env))

    assert find_config_path(explicit) == explicit
    assert load_config(explicit).log_level == "DEBUG"
    assert find_config_path(None) == env
    assert load_config(None).log_level == "WARNING"
    monkeypatch.setenv("SEGD_CONFIG", "")  # empty counts as unset
    assert find_config_path(None) == Path("config.yaml")
    assert load_config(None).source == local
    local.unlink()
    assert find_config_path(None) == system
    assert load_config(None).source == system
    system.unlink()
    assert find_config_path(None) is None


def test_no_config_anywhere_gives_defaults_relative_to_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_config: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.source is None
    assert config == resolve_paths(Config(), tmp_path)


def test_missing_explicit_or_env_file_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_config: Path) -> None:
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "config.yaml", {})  # present, and still not used instead
    with pytest.raises(ConfigError) as exc:
        find_config_path(tmp_path / "nope.yaml")
    assert exc.value.key == "--config" and "nope.yaml" in str(exc.value)
    monkeypatch.setenv("SEGD_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError) as exc:
        load_config(None)
    assert exc.value.key == "SEGD_CONFIG" and "gone.yaml" in str(exc.value)


def test_a_folder_named_config_yaml_is_not_a_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_config: Path) -> None:
    (tmp_path / "config.yaml").mkdir()
    monkeypatch.chdir(tmp_path)
    assert find_config_path(None) is None


# --------------------------------------------------------------------------- wrong values


def _wrong_values(hint: Any) -> list[Any]:
    """Values of the wrong type for a field annotated `hint` (never a valid one)."""
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return ["not a mapping", [1, 2], 3]
    if origin is Literal:
        return ["no-such-choice", 1, None]
    if origin is tuple:
        return ["*.tmp", [1, "x"], {"a": 1}]
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        wrong = [v for a in options for v in _wrong_values(a)]
        # Keep only values no option accepts (e.g. a string is fine for int | "auto" if "auto").
        wrong = [v for v in wrong if not any(_accepts(a, v) for a in options)]
        return [v for v in wrong if v is not None] if type(None) in args else wrong
    return {
        bool: ["yes please", 1, None],
        int: ["3", 2.5, True, None],
        float: ["fast", True, None, [1.0]],
        str: [5, True, None, ["INFO"]],
        Path: [5, "", None, ["a"]],
    }[hint]


def _accepts(hint: Any, value: Any) -> bool:
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        hint = get_type_hints(cls)[f.name]
        out.append((f"{prefix}{f.name}", hint))
        if dataclasses.is_dataclass(hint):
            out.extend(_fields(hint, f"{prefix}{f.name}."))
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


WRONG = [(key, value) for key, hint in _fields(Config)
         for value in {repr(v): v for v in _wrong_values(hint)}.values()]
SECTIONS = [""] + [f"{name}." for name, hint in _fields(Config) if dataclasses.is_dataclass(hint)]


def test_every_key_is_covered() -> None:
    keys = {key for key, _ in WRONG}
    assert len(keys) == len(_fields(Config)) >= 40
    assert {"model.gpu", "clustering.k", "watch.ignore", "decode.max_pixels"} <= keys


@pytest.mark.parametrize(("key", "value"), WRONG, ids=[f"{k}={v!r}" for k, v in WRONG])
def test_wrong_type_names_the_key(tmp_path: Path, key: str, value: Any) -> None:
    path = write_yaml(tmp_path / "config.yaml", _nest(key, value))
    with pytest.raises(ConfigError) as exc:
        parse_config_file(path)
    assert exc.value.key == key
    assert f"'{key}'" in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_names_the_key(tmp_path: Path, section: str) -> None:
    key = f"{section}colour"
    path = write_yaml(tmp_path / "config.yaml", _nest(key, "blue"))
    with pytest.raises(ConfigError) as exc:
        parse_config_file(path)
    assert exc.value.key == key
    assert f"'{key}'" in str(exc.value) and "unknown key" in str(exc.value)


def test_source_is_not_a_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", {"source": "/elsewhere.yaml"})
    with pytest.raises(ConfigError, match="unknown key") as exc:
        parse_config_file(path)
    assert exc.value.key == "source"


@pytest.mark.parametrize(("text", "problem"), [
    ("- a\n- b\n", "mapping"), ("just a string\n", "mapping"), ("inbox: [unclosed\n", "YAML"),
])
def test_file_level_errors(tmp_path: Path, text: str, problem: str) -> None:
    path = write_yaml(tmp_path / "config.yaml", text)
    with pytest.raises(ConfigError, match=problem) as exc:
        parse_config_file(path)
    assert exc.value.key == "(file)"


def test_unreadable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"inbox: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read") as exc:
        parse_config_file(path)
    assert exc.value.key == "(file)"


@pytest.mark.parametrize(("key", "value"), [
    ("model.batch_size", 0), ("model.input_size", 16), ("model.input_size", 2048),
    ("model.threads", -1), ("decode.workers", -1), ("decode.max_pixels", 0),
    ("clustering.k", 0), ("clustering.k_min", 1), ("clustering.min_images", 1),
    ("clustering.n_init", 0), ("clustering.silhouette_sample", 99),
    ("clustering.minibatch_above", 0), ("clustering.pca_dims", -1),
    ("clustering.refit_interval_s", -1), ("clustering.refit_growth", -0.1),
    ("clustering.match_max_distance", 0), ("clustering.match_max_distance", 2.5),
    ("watch.poll_interval_s", 0), ("watch.quiet_s", -1), ("watch.rescan_interval_s", -1),
    ("watch.batch_wait_ms", -1), ("log_level", "LOUD"),
])
def test_out_of_range_names_the_key(tmp_path: Path, key: str, value: Any) -> None:
    path = write_yaml(tmp_path / "config.yaml", _nest(key, value))
    with pytest.raises(ConfigError) as exc:
        parse_config_file(path)
    assert exc.value.key == key and f"'{key}'" in str(exc.value)


def test_k_max_below_k_min(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", {"clustering": {"k_min": 5, "k_max": 4}})
    with pytest.raises(ConfigError) as exc:
        parse_config_file(path)
    assert exc.value.key == "clustering.k_max"


def test_valid_non_default_values(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", {
        "log_level": "debug", "allow_root": True,
        "model": {"gpu": "required", "precision": "fp16", "input_size": 224, "resize": "squash",
                  "path": None},
        "clustering": {"k": 7, "refit_interval_s": 60, "on_refit": "keep"},
        "watch": {"ignore": ["*.xmp"], "poll_interval_s": 1}})
    config = parse_config_file(path)
    assert config.model == ModelConfig(gpu="required", precision="fp16", input_size=224,
                                       resize="squash")
    assert config.clustering == ClusteringConfig(k=7, refit_interval_s=60.0, on_refit="keep")
    assert isinstance(config.clustering.refit_interval_s, float)
    assert config.watch.ignore == ("*.xmp",)
    assert config.allow_root is True


def test_gpu_off_unquoted(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", "model:\n  gpu: off\n")
    assert parse_config_file(path).model.gpu == "off"


def test_gpu_off_quoted(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", "model:\n  gpu: 'off'\n")
    assert parse_config_file(path).model.gpu == "off"


# --------------------------------------------------------------------------- folder relations


def folders(tmp_path: Path, **over: Path) -> Config:
    paths = {key: tmp_path / key for key in FOLDER_KEYS} | over
    return Config(**paths)  # type: ignore[arg-type]


@pytest.mark.parametrize(("inner", "outer"), [
    ("inbox", "library"), ("library", "inbox"), ("quarantine", "library"),
    ("state_dir", "inbox"), ("inbox", "state_dir"),
])
def test_folder_inside_another_names_both(tmp_path: Path, inner: str, outer: str) -> None:
    config = folders(tmp_path, **{inner: tmp_path / outer / "sub"})
    with pytest.raises(ConfigError) as exc:
        validate(config)
    assert exc.value.key == inner
    assert "inside" in exc.value.problem and outer in exc.value.problem


def test_inbox_inside_library_from_a_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", {"library": "photos", "inbox": "photos/new"})
    with pytest.raises(ConfigError) as exc:
        parse_config_file(path)
    assert exc.value.key == "inbox"
    assert "library" in str(exc.value) and str(tmp_path / "photos") in str(exc.value)


def test_same_folder_twice(tmp_path: Path) -> None:
    config = folders(tmp_path, quarantine=tmp_path / "library")
    with pytest.raises(ConfigError, match="the same folder as") as exc:
        validate(config)
    assert exc.value.key in ("library", "quarantine")


def test_same_folder_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "library").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "library")
    with pytest.raises(ConfigError):
        validate(folders(tmp_path, inbox=tmp_path / "alias" / "in"))


def test_siblings_with_a_common_prefix_are_separate(tmp_path: Path) -> None:
    config = folders(tmp_path, inbox=tmp_path / "lib-inbox", library=tmp_path / "lib")
    assert validate(config) is config


# --------------------------------------------------------------------------- writable folders


def test_check_folders_writable_creates_them(tmp_path: Path) -> None:
    config = folders(tmp_path, library=tmp_path / "deep" / "er" / "library")
    check_folders_writable(config)
    for key in FOLDER_KEYS:
        assert getattr(config, key).is_dir()


@pytest.mark.parametrize("key", FOLDER_KEYS)
def test_check_folders_writable_names_the_key(tmp_path: Path, key: str) -> None:
    # Running as root, permissions do not stop mkdir; a regular file in the way does.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = folders(tmp_path, **{key: blocker / "sub"})
    with pytest.raises(ConfigError) as exc:
        check_folders_writable(config)
    assert exc.value.key == key
    assert "cannot create" in exc.value.problem and str(blocker / "sub") in exc.value.problem


def test_check_folders_writable_reports_an_unwritable_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = folders(tmp_path)
    denied = str(config.quarantine)
    real_access = os.access
    monkeypatch.setattr(cfg.os, "access",
                        lambda p, mode: False if str(p) == denied else real_access(p, mode))
    with pytest.raises(ConfigError, match="not writable") as exc:
        check_folders_writable(config)
    assert exc.value.key == "quarantine"
