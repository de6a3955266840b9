"""The embedder: provider policy, preprocessing from metadata, IO binding, mirror."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

from segd.core.errors import ModelError, ProviderError
from segd.media import embed
from segd.media.embed import Embedder, default_model_path
from segd.media.providers import CPU, CUDA, DID_NOT_LOAD


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 160, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def plain() -> Embedder:
    return Embedder(gpu="off")


def test_embeddings_are_unit_float32(plain: Embedder, images: np.ndarray) -> None:
    out = plain.embed(images)
    assert out.dtype == np.float32 and out.shape == (5, 1280)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert plain.embed(images[:0]).shape == (0, 1280)


def test_batching_does_not_change_results(plain: Embedder, images: np.ndarray) -> None:
    one_by_one = np.concatenate([plain.embed(images[i:i + 1]) for i in range(len(images))])
    np.testing.assert_allclose(plain.embed(images), one_by_one, atol=1e-5)


def test_io_binding_gives_identical_results(plain: Embedder, images: np.ndarray) -> None:
    bound = Embedder(gpu="off", io_binding="on")
    assert bound.io_binding and not plain.io_binding
    np.testing.assert_array_equal(bound.embed(images), plain.embed(images))
    np.testing.assert_array_equal(bound.embed(images[:2]), plain.embed(images[:2]))


def test_mirror_averages_with_the_flipped_image(plain: Embedder, images: np.ndarray) -> None:
    mirrored = Embedder(gpu="off", mirror=True)
    expected = plain.embed(images) + plain.embed(np.ascontiguousarray(images[:, :, ::-1]))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(mirrored.embed(images), expected, atol=1e-6)
    assert mirrored.identity == plain.identity + "+mirror"


def test_preprocessing_follows_the_metadata(plain: Embedder) -> None:
    pixel = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    pixel[..., 0] = 255  # pure red
    x = plain.preprocess(pixel)
    assert x.shape == (1, 3, 2, 2)  # NCHW
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, -1.0, -1.0])  # (x - 127.5) / 127.5
    bgr = Embedder(gpu="off", warmup=False)
    bgr.spec = dataclasses.replace(bgr.spec, color="BGR", layout="NHWC")
    y = bgr.preprocess(pixel)
    assert y.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(y[0, 0, 0], [-1.0, -1.0, 1.0])


def test_gpu_off_is_quiet_and_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        emb = Embedder(gpu="off", warmup=False)
    assert not emb.report.on_gpu and emb.report.fallback_reason is None
    assert "GPU NOT IN USE" not in caplog.text


def test_preferred_without_a_gpu_warns_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        emb = Embedder(gpu="preferred", warmup=False)
    if emb.report.on_gpu:
        pytest.skip("this machine has a working GPU")
    assert emb.report.fallback_reason
    assert "GPU NOT IN USE" in caplog.text and emb.report.fallback_reason in caplog.text
    assert "GPU not used" in emb.report.summary


def test_required_without_a_gpu_refuses(plain: Embedder) -> None:
    probe = Embedder(gpu="preferred", warmup=False)
    if probe.report.on_gpu:
        pytest.skip("this machine has a working GPU")
    with pytest.raises(ProviderError, match="CUDA") as info:
        Embedder(gpu="required", warmup=False)
    if CUDA not in onnxruntime.get_available_providers():
        assert f"{onnxruntime.__version__} has no CUDA provider" in str(info.value)


class AdvertisesCuda(ModuleType):
    """The real onnxruntime, except that it lists CUDA as available, as a GPU build does on a
    machine where CUDA cannot load: the session is asked for CUDA and comes up without it."""

    def __init__(self) -> None:
        super().__init__("onnxruntime")

    def __getattr__(self, name: str) -> Any:
        return getattr(onnxruntime, name)

    def get_available_providers(self) -> list[str]:
        return [CUDA, *onnxruntime.get_available_providers()]


@pytest.fixture
def cuda_that_does_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider of its own")
    monkeypatch.setattr(embed, "import_onnxruntime", AdvertisesCuda)


@pytest.mark.usefixtures("cuda_that_does_not_load")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_listed_but_not_loading_falls_back_with_the_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        emb = Embedder(gpu="preferred", warmup=False)
    assert emb.report.requested == (CUDA, CPU)
    assert emb.report.active == (CPU,)
    assert emb.report.fallback_reason == DID_NOT_LOAD
    assert "GPU NOT IN USE" in caplog.text and DID_NOT_LOAD in caplog.text


@pytest.mark.usefixtures("cuda_that_does_not_load")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_required_and_cuda_not_loading_refuses_naming_the_error() -> None:
    # CPU fallback is disabled, so onnxruntime refuses the session instead of running on the
    # CPU; the error says so.
    with pytest.raises(ProviderError, match=r"the GPU was required and the CUDA provider "
                                            r"failed: .*fallback to CPU EP has been .*disabled"):
        Embedder(gpu="required", warmup=False)


def test_missing_model_and_metadata_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        Embedder(tmp_path / "nope.onnx", gpu="off")


    model = onnx.load(str(default_model_path()))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ModelError, match=r"segd\.input_size"):
        Embedder(bare, gpu="off")
