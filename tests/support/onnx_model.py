"""What the tests of a shipped ONNX model share: the reference crop, a plain CPU session,
fixed synthetic inputs, and loading a build script from models/ as a module."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import onnxruntime as ort


def load_crop(path: Path, size: int) -> np.ndarray:
    """RGB uint8 HWC: shorter side resized to ``size`` with INTER_AREA, centre crop."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    y, x = (nh - size) // 2, (nw - size) // 2
    return rgb[y : y + size, x : x + size]


def synthetic_inputs(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "random": rng.uniform(-1.0, 1.0, (2, 3, size, size)).astype(np.float32),
        "constant": np.full((1, 3, size, size), 0.25, np.float32),
    }


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(["embedding"], {"input": x})[0]


def load_script(path: Path) -> ModuleType:
    """A script from models/ imported as a module of its own name."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
