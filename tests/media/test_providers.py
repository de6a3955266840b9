"""The GPU policy's pure decisions, every branch, without a GPU or an onnxruntime session."""

from __future__ import annotations

import pytest

from segd.config import GpuPolicy
from segd.media.providers import (
    CPU,
    CUDA,
    DID_NOT_LOAD,
    ProviderReport,
    allows_cpu_fallback,
    choose_providers,
    fallback_reason,
)

TENSORRT = "TensorrtExecutionProvider"
ROCM = "ROCMExecutionProvider"
CPU_BUILD = ["AzureExecutionProvider", CPU]
GPU_BUILD = [TENSORRT, CUDA, CPU]  # what onnxruntime-gpu lists, whether CUDA loads or not
BUILD = "onnxruntime (CPU build) 1.0"


@pytest.mark.parametrize(
    ("available", "policy", "expected"),
    [
        (GPU_BUILD, "preferred", [CUDA, CPU]),
        (GPU_BUILD, "required", [CUDA]),  # nothing on the CPU, not even one node
        (GPU_BUILD, "off", [CPU]),
        (CPU_BUILD, "preferred", [CPU]),
        (CPU_BUILD, "required", [CPU]),  # the caller refuses before making a session
        (CPU_BUILD, "off", [CPU]),
        ([ROCM, CPU], "preferred", [CPU]),  # only CUDA is ever asked for
        ([TENSORRT, CPU], "required", [CPU]),
    ],
)
def test_choose_providers(available: list[str], policy: GpuPolicy, expected: list[str]) -> None:
    assert choose_providers(available, policy) == expected


def test_tensorrt_is_never_asked_for() -> None:
    for policy in ("preferred", "required", "off"):
        assert TENSORRT not in choose_providers(GPU_BUILD, policy)


def test_only_required_disables_cpu_fallback() -> None:
    assert not allows_cpu_fallback("required")
    assert allows_cpu_fallback("preferred") and allows_cpu_fallback("off")


def test_cuda_listed_and_loading_needs_no_reason() -> None:
    for policy in ("preferred", "required"):
        requested = choose_providers(GPU_BUILD, policy)
        assert fallback_reason(policy, requested, requested, build=BUILD) is None
    # any GPU provider in the session counts as on the GPU
    assert fallback_reason("preferred", [CUDA, CPU], [TENSORRT, CUDA, CPU]) is None
    assert fallback_reason("preferred", [CUDA, CPU], [ROCM, CPU]) is None


def test_cuda_listed_but_not_loading() -> None:
    # The session was asked for CUDA and came up on the CPU: the build's list lied.
    requested = choose_providers(GPU_BUILD, "preferred")
    assert fallback_reason("preferred", requested, [CPU], build=BUILD) == DID_NOT_LOAD
    assert "segd doctor" in DID_NOT_LOAD


def test_required_and_cuda_failing_names_the_error() -> None:
    requested = choose_providers(GPU_BUILD, "required")
    error = RuntimeError("libcudnn.so.9: cannot open shared object file")
    reason = fallback_reason("required", requested, (), error, build=BUILD)
    assert reason == "the CUDA provider failed: libcudnn.so.9: cannot open shared object file"


def test_no_cuda_in_the_build_names_the_build_and_the_fix() -> None:
    for policy in ("preferred", "required"):
        reason = fallback_reason(policy, choose_providers(CPU_BUILD, policy), [CPU], build=BUILD)
        assert reason is not None
        assert BUILD in reason and "segd[gpu]" in reason
    # ROCm alone is not CUDA: the reason is the same
    rocm = fallback_reason("preferred", choose_providers([ROCM, CPU], "preferred"), [CPU])
    assert rocm is not None and "no CUDA provider" in rocm


def test_off_never_has_a_reason() -> None:
    for available in (CPU_BUILD, GPU_BUILD):
        requested = choose_providers(available, "off")
        assert fallback_reason("off", requested, [CPU], RuntimeError("x"), build=BUILD) is None


def test_report_summary() -> None:
    gpu = ProviderReport((CUDA, CPU), (CUDA, CPU), "preferred", None)
    assert gpu.on_gpu and gpu.summary == f"GPU ({CUDA}, {CPU})"
    cpu = ProviderReport((CUDA, CPU), (CPU,), "preferred", DID_NOT_LOAD)
    assert not cpu.on_gpu
    assert cpu.summary == f"CPU ({CPU}); GPU not used: {DID_NOT_LOAD}"
