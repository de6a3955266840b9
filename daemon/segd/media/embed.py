"""The embedder: an onnxruntime session over the MobileNetV2 ONNX file.

Preprocessing is read from the model's metadata (`segd.*` keys), so another network
exported with the same keys plugs in through `model.path` alone. The GPU policy's decisions
live in `providers`; this module makes the session and judges it by what it really runs on
(`session.get_providers()`), never by the providers the build advertises.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from segd.config import GpuPolicy, ModelConfig
from segd.core.errors import ModelError, ProviderError
from segd.media.providers import (
    ProviderReport,
    allows_cpu_fallback,
    choose_providers,
    fallback_reason,
    on_gpu,
)

log = logging.getLogger(__name__)

# model.name -> the stem of the file shipped in segd.models (its fp16 twin adds "_fp16").
PACKAGED_MODELS = {"mobilenetv2": "mobilenetv2_160", "efficientnet-lite0": "efficientnet_lite0_224"}
DEFAULT_MODEL = "mobilenetv2"
INPUT_NAME = "input"


@dataclass(frozen=True)
class ModelSpec:
    """What the embedder needs to know about a model, from its ONNX metadata."""

    path: Path
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: str  # "RGB" or "BGR"
    layout: str  # "NCHW" or "NHWC"
    embedding_dim: int
    precision: str
    sha256: str

    @classmethod
    def from_metadata(cls, path: Path, meta: dict[str, str], sha256: str) -> ModelSpec:
        def get(key: str) -> str:
            try:
                return meta[f"segd.{key}"]
            except KeyError:
                raise ModelError(f"{path}: the model's metadata lacks 'segd.{key}' "
                                 "(see models/README.md for the keys segd reads)") from None

        def triple(key: str) -> tuple[float, float, float]:
            values = tuple(float(v) for v in get(key).split(","))
            if len(values) != 3:
                raise ModelError(f"{path}: 'segd.{key}' must hold three numbers")
            return values  # type: ignore[return-value]

        spec = cls(path=path, input_size=int(get("input_size")), mean=triple("mean"),
                   std=triple("std"), color=get("color").upper(), layout=get("layout").upper(),
                   embedding_dim=int(get("embedding_dim")),
                   precision=meta.get("segd.precision", "fp32"), sha256=sha256)
        if spec.color not in ("RGB", "BGR") or spec.layout not in ("NCHW", "NHWC"):
            raise ModelError(f"{path}: unsupported color {spec.color} or layout {spec.layout}")
        return spec


def default_model_path(precision: str = "fp32", name: str = DEFAULT_MODEL) -> Path:
    if name not in PACKAGED_MODELS:
        raise ModelError(f"no model named {name!r} ships with segd "
                         f"(known: {', '.join(PACKAGED_MODELS)}); use model.path for others")
    stem = PACKAGED_MODELS[name] + ("" if precision == "fp32" else "_fp16")
    return Path(str(importlib.resources.files("segd.models") / f"{stem}.onnx"))


def model_file(path: Path | None, precision: str, *, gpu: bool,
               name: str = DEFAULT_MODEL) -> Path:
    """The ONNX file to load: `model.path` when set, else the shipped network `model.name`.
    fp16 pays off only on the GPU; the CPU runs the fp32 file whatever is asked."""
    if path is not None:
        return path
    return default_model_path(precision if gpu else "fp32", name)


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError("onnxruntime is not installed: install segd with exactly one of the "
                         "extras, pip install 'segd[cpu]' or 'segd[gpu]'") from exc
    return onnxruntime


class Embedder:
    """Turns batches of uint8 RGB images (n, s, s, 3) into L2-normalised float32 embeddings."""

    def __init__(self, model_path: Path | None = None, *, gpu: GpuPolicy = "preferred",
                 precision: str = "fp32", threads: int = 0, input_size: int | None = None,
                 io_binding: str = "auto", mirror: bool = False,
                 warmup: bool = True, model_name: str = DEFAULT_MODEL) -> None:
        ort = import_onnxruntime()
        self._ort = ort
        self.report, self.session, self.spec = _create_session(
            ort, model_path, gpu=gpu, precision=precision, threads=threads, name=model_name)
        # IO binding: the input goes into a device buffer reused across batches and the
        # output is fetched once, instead of ORT allocating and copying both on every run.
        self.io_binding = io_binding == "on" or (io_binding == "auto" and self.report.on_gpu)
        self._device = "cuda" if self.report.on_gpu else "cpu"
        self._input_buffers: dict[tuple[int, ...], Any] = {}
        self.input_size = input_size or self.spec.input_size
        # Average each embedding with its mirror image's: slightly better clusters
        # (docs/quality.md) for twice the network's work.
        self.mirror = mirror
        self._scale = (1.0 / np.asarray(self.spec.std, dtype=np.float32))
        self._offset = -np.asarray(self.spec.mean, dtype=np.float32) * self._scale
        self._output_name = self.session.get_outputs()[0].name
        if warmup:
            # The first run pays for memory planning (and on the GPU for kernel selection);
            # paying it here keeps it off the first user's file.
            self.embed(np.zeros((1, self.input_size, self.input_size, 3), dtype=np.uint8))

    @classmethod
    def from_config(cls, m: ModelConfig, *, warmup: bool = True) -> Embedder:
        return cls(m.path, gpu=m.gpu, precision=m.precision, threads=m.threads,
                   input_size=m.input_size, io_binding=m.io_binding, mirror=m.mirror,
                   warmup=warmup, model_name=m.name)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) * self._scale + self._offset
        if self.spec.color == "BGR":
            x = x[..., ::-1]
        if self.spec.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"expected (n, {self.input_size}, {self.input_size}, 3) uint8, "
                             f"got {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.spec.embedding_dim), dtype=np.float32)
        n = len(images)
        if self.mirror:
            images = np.concatenate([images, images[:, :, ::-1]])
        x = self.preprocess(images)
        out = self._run_bound(x) if self.io_binding else \
            self.session.run([self._output_name], {INPUT_NAME: x})[0]
        out = _normalize(np.asarray(out, dtype=np.float32).reshape(len(images), -1))
        return _normalize(out[:n] + out[n:]) if self.mirror else out

    @property
    def identity(self) -> str:
        """What the store binds its embeddings to: the model, and whether mirrored."""
        return self.spec.sha256 + ("+mirror" if self.mirror else "")

    def _run_bound(self, x: np.ndarray) -> np.ndarray:
        buffer = self._input_buffers.get(x.shape)
        if buffer is None:
            if len(self._input_buffers) >= 4:  # partial batches vary in size: keep a few
                self._input_buffers.clear()
            buffer = self._ort.OrtValue.ortvalue_from_shape_and_type(
                x.shape, np.float32, self._device, 0)
            self._input_buffers[x.shape] = buffer
        buffer.update_inplace(x)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, buffer)
        binding.bind_output(self._output_name, self._device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _session_options(ort: ModuleType, gpu: GpuPolicy, threads: int) -> Any:
    """Every onnxruntime session setting segd makes, in one place."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads steal the cores the decoders need, and stall whenever another
    # process holds a core: off, the pipeline ran 1.3x faster (docs/benchmarks.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if not allows_cpu_fallback(gpu):
        # Fail instead of silently running a node, or the whole model, on the CPU.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return options


def _create_session(ort: ModuleType, model_path: Path | None, *, gpu: GpuPolicy,
                    precision: str, threads: int,
                    name: str = DEFAULT_MODEL) -> tuple[ProviderReport, Any, ModelSpec]:
    requested = choose_providers(ort.get_available_providers(), gpu)
    build = _build_name(ort)
    if gpu == "required" and not on_gpu(requested):
        raise ProviderError(str(fallback_reason(gpu, requested, (), build=build)))
    path = model_file(model_path, precision, gpu=on_gpu(requested), name=name)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    data = path.read_bytes()
    if on_gpu(requested) and hasattr(ort, "preload_dlls"):
        try:  # loads CUDA and cuDNN from the nvidia-* wheels when they are installed
            ort.preload_dlls()
        except Exception as exc:  # pragma: no cover - depends on the GPU stack
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    try:
        session = ort.InferenceSession(data, sess_options=_session_options(ort, gpu, threads),
                                       providers=requested)
    except Exception as exc:
        if gpu == "required":
            reason = fallback_reason(gpu, requested, (), exc, build=build)
            raise ProviderError(f"the GPU was required and {reason}") from exc
        raise ModelError(f"{path}: onnxruntime cannot load the model: {exc}") from exc

    meta = session.get_modelmeta().custom_metadata_map
    spec = ModelSpec.from_metadata(path, meta, hashlib.sha256(data).hexdigest())
    active = tuple(session.get_providers())
    reason = fallback_reason(gpu, requested, active, build=build)
    if reason is not None:
        if gpu == "required":
            raise ProviderError(f"gpu: required, but the session runs on {', '.join(active)}: "
                                f"{reason}")
        log.warning("GPU NOT IN USE: embedding on the CPU, which is many times slower. Reason: "
                    "%s. Set 'model.gpu: off' to silence this, or 'required' to refuse to run.",
                    reason)
    report = ProviderReport(requested=tuple(requested), active=active, gpu_policy=gpu,
                            fallback_reason=reason)
    log.info("model %s (%s, %d px, sha256 %s...) on %s", path.name, spec.precision,
             spec.input_size, spec.sha256[:12], report.summary)
    return report, session, spec


def _build_name(ort: ModuleType) -> str:
    package = "onnxruntime-gpu" if ort.get_device() == "GPU" else "onnxruntime (CPU build)"
    return f"{package} {ort.__version__}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
