"""The configuration: one dataclass tree, loaded from YAML, validated before anything runs.

Every command finds its config the same way (`find_config_path`): ``--config``, else
``$SEGD_CONFIG``, else ``./config.yaml``, else ``/etc/segd/config.yaml``. Relative paths
in the file resolve against the folder that holds the file, so the repository's own
``config.yaml`` works from a fresh clone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from segd.core.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/segd/config.yaml")

GpuPolicy = Literal["preferred", "required", "off"]
Precision = Literal["fp32", "fp16"]
ResizePolicy = Literal["crop", "squash"]
RefitAction = Literal["move", "keep"]
KRule = Literal["strength", "silhouette"]
IoBinding = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ModelConfig:
    # A network shipped with segd, by name (segd.media.embed.PACKAGED_MODELS); `path` overrides.
    name: Literal["mobilenetv2", "efficientnet-lite0"] = "mobilenetv2"
    path: Path | None = None  # None: the network `name` shipped with segd
    gpu: GpuPolicy = "preferred"
    precision: Precision = "fp32"  # fp16 only takes effect on the GPU
    batch_size: int = 32
    input_size: int | None = None  # None: the size recorded in the model's metadata
    resize: ResizePolicy = "crop"
    threads: int = 0  # onnxruntime intra-op threads on the CPU; 0 = onnxruntime's choice
    io_binding: IoBinding = "auto"  # auto = on the GPU only
    mirror: bool = False  # average with the mirror image's embedding (2x network work)


@dataclass(frozen=True)
class DecodeConfig:
    workers: int = 0  # 0 = one per CPU core
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class ClusteringConfig:
    k: int | Literal["auto"] = "auto"
    # How k = auto chooses (segd.core.kselect): "strength" = the silhouette below 64 images,
    # prediction strength above, with a no-structure test from 150 (on the projection: with
    # pca_dims 0 the silhouette decides); "silhouette" = the silhouette only.
    k_rule: KRule = "strength"
    k_min: int = 2
    k_max: int = 10
    min_images: int = 20
    random_state: int = 0
    n_init: int = 10
    silhouette_sample: int = 4000
    minibatch_above: int = 20_000
    pca_dims: int = 32  # 0 = raw embeddings; keep it >= about 2 * k_max (docs/quality.md)
    refit_interval_s: float = 6 * 3600.0  # 0 = never on a timer
    refit_growth: float = 0.25  # refit once the collection grew by this fraction; 0 = off
    settle_s: float = 10.0  # a growth refit (and the first fit) waits for the inbox this quiet
    on_refit: RefitAction = "move"
    match_max_distance: float = 0.8  # cosine distance beyond which a new cluster is new


@dataclass(frozen=True)
class WatchConfig:
    polling: bool = False  # True for NFS/SMB/SSHFS, where inotify sees nothing
    poll_interval_s: float = 2.0
    # Polling: size and mtime unchanged this long = complete; in every mode, how long a file
    # that looks empty, truncated or corrupt stays unchanged before it is quarantined.
    quiet_s: float = 2.0
    recursive: bool = False
    rescan_interval_s: float = 300.0
    batch_wait_ms: float = 20.0
    ignore: tuple[str, ...] = (
        ".*", "*.part", "*.crdownload", "*.tmp", "*.temp", "*~", "*.download", "*.partial",
        "*.swp", "~$*",
    )


@dataclass(frozen=True)
class Config:
    inbox: Path = Path("inbox")
    library: Path = Path("library")
    quarantine: Path = Path("quarantine")
    state_dir: Path = Path("state")
    log_level: str = "INFO"
    # Root: "warn" runs with a loud warning, false refuses, true runs quietly
    # (segd.commands.options.check_root says why).
    allow_root: bool | Literal["warn"] = "warn"
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    source: Path | None = None  # the file this config came from; not a key

    @property
    def db_path(self) -> Path:
        return self.state_dir / "segd.db"

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "segd.lock"


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use, or None when there is none (then the defaults apply)."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError("--config", f"no such file: {path}")
        return path
    env = os.environ.get("SEGD_CONFIG")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError("SEGD_CONFIG", f"no such file: {path}")
        return path
    for candidate in (Path("config.yaml"), SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path = find_config_path(explicit)
    if path is None:
        return resolve_paths(Config(), Path.cwd())
    return parse_config_file(path)


def parse_config_file(path: Path) -> Config:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("(file)", f"cannot read: {exc}", path) from exc
    except yaml.YAMLError as exc:
        raise ConfigError("(file)", f"not valid YAML: {exc}", path) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(file)", "the top level must be a mapping of keys", path)
    config = _build(Config, raw, prefix="", source=path)
    config = dataclasses.replace(config, source=path.resolve())
    return validate(resolve_paths(config, path.resolve().parent))


def resolve_paths(config: Config, base: Path) -> Config:
    def absolute(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p)

    model = config.model
    if model.path is not None:
        model = dataclasses.replace(model, path=absolute(model.path))
    return dataclasses.replace(
        config,
        inbox=absolute(config.inbox),
        library=absolute(config.library),
        quarantine=absolute(config.quarantine),
        state_dir=absolute(config.state_dir),
        model=model,
    )


def _build(cls: type, raw: dict[str, Any], prefix: str, source: Path) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(dotted, f"unknown key (known here: {known})", source)
        values[key] = _coerce(hints[key], value, dotted, source)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: Path) -> Any:
    if dataclasses.is_dataclass(hint):
        if value is None:  # a section whose keys are all commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, "must be a mapping", source)
        return _build(hint, value, prefix=f"{key}.", source=source)
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads unquoted on/off/yes/no as booleans: take them back as words.
            word = "on" if value else "off"
            value = word if word in args else value
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(key, f"must be one of {choices}, got {value!r}", source)
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a list of strings", source)
        return tuple(value)
    if len(args) > 1:  # Optional[X] or a Union
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, source)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(key, " or ".join(errors), source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}", source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}", source)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}", source)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}", source)
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"must be a path, got {value!r}", source)
        return Path(value)
    raise ConfigError(key, f"unsupported type {hint!r}", source)  # pragma: no cover


def validate(config: Config) -> Config:
    """Check value ranges and folder relations; raise ConfigError naming the key."""
    src = config.source
    m, c, d, w = config.model, config.clustering, config.decode, config.watch

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(key, problem, src)

    need(m.batch_size >= 1, "model.batch_size", "must be at least 1")
    need(m.input_size is None or 32 <= m.input_size <= 1024, "model.input_size",
         "must be between 32 and 1024")
    need(m.threads >= 0, "model.threads", "must be 0 (automatic) or more")
    need(d.workers >= 0, "decode.workers", "must be 0 (one per core) or more")
    need(d.max_pixels >= 1, "decode.max_pixels", "must be positive")
    need(c.k == "auto" or (isinstance(c.k, int) and c.k >= 1), "clustering.k",
         "must be 'auto' or a positive integer")
    need(c.k_min >= 2, "clustering.k_min", "must be at least 2")
    need(c.k_max >= c.k_min, "clustering.k_max", "must not be below clustering.k_min")
    need(c.min_images >= 2, "clustering.min_images", "must be at least 2")
    need(c.n_init >= 1, "clustering.n_init", "must be at least 1")
    need(c.silhouette_sample >= 100, "clustering.silhouette_sample", "must be at least 100")
    need(c.minibatch_above >= 1, "clustering.minibatch_above", "must be positive")
    need(c.pca_dims >= 0, "clustering.pca_dims", "must be 0 (off) or positive")
    need(c.refit_interval_s >= 0, "clustering.refit_interval_s", "must be 0 (off) or positive")
    need(c.refit_growth >= 0, "clustering.refit_growth", "must be 0 (off) or positive")
    need(c.settle_s >= 0, "clustering.settle_s", "must be 0 or positive")
    need(0 < c.match_max_distance <= 2, "clustering.match_max_distance",
         "must be in (0, 2] (cosine distance)")
    need(w.poll_interval_s > 0, "watch.poll_interval_s", "must be positive")
    need(w.quiet_s >= 0, "watch.quiet_s", "must be 0 or positive")
    need(w.rescan_interval_s >= 0, "watch.rescan_interval_s", "must be 0 (off) or positive")
    need(w.batch_wait_ms >= 0, "watch.batch_wait_ms", "must be 0 or positive")
    need(config.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"}, "log_level",
         "must be DEBUG, INFO, WARNING or ERROR")

    folders = {"inbox": config.inbox, "library": config.library,
               "quarantine": config.quarantine, "state_dir": config.state_dir}
    for a, pa in folders.items():
        for b, pb in folders.items():
            if a != b and (pa.resolve() == pb.resolve() or _is_inside(pa, pb)):
                rel = "the same folder as" if pa.resolve() == pb.resolve() else "inside"
                raise ConfigError(a, f"{pa} is {rel} {b} ({pb}); they must be separate", src)
    return config


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False
