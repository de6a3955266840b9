"""The GPU policy as pure decisions: which onnxruntime providers to ask for, and why not GPU.

Nothing here creates a session, so every branch is testable without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from segd.config import GpuPolicy

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# What counts as "on the GPU" in a session's provider list. segd only ever asks for CUDA (it is
# the provider it is built and measured on); the others are recognised so a report never calls
# a GPU session a CPU one.
GPU_PROVIDERS = (CUDA, "TensorrtExecutionProvider", "ROCMExecutionProvider")

DID_NOT_LOAD = ("the CUDA provider did not load (missing CUDA/cuDNN libraries or no usable "
                "GPU); run 'segd doctor' for details")


def on_gpu(providers: Sequence[str]) -> bool:
    return any(p in GPU_PROVIDERS for p in providers)


def choose_providers(available: Sequence[str], policy: GpuPolicy) -> list[str]:
    """The providers to ask the session for, in priority order.

    `available` is `onnxruntime.get_available_providers()`: what the build contains, which a
    GPU build lists even when CUDA cannot load, so it only decides what is worth asking for.
    `required` asks for CUDA alone: with CPU fallback disabled (see `allows_cpu_fallback`) the
    session then fails to start rather than run any node on the CPU.
    """
    if policy == "off" or CUDA not in available:
        return [CPU]
    if policy == "required":
        return [CUDA]
    return [CUDA, CPU]


def allows_cpu_fallback(policy: GpuPolicy) -> bool:
    """False: set `session.disable_cpu_ep_fallback`, so not even one node runs on the CPU."""
    return policy != "required"


def fallback_reason(policy: GpuPolicy, requested: Sequence[str], active: Sequence[str],
                    load_error: BaseException | str | None = None, *,
                    build: str = "onnxruntime") -> str | None:
    """Why a session that `policy` wanted on the GPU is not on it; None if it is, or if the
    GPU was not wanted.

    requested: what `choose_providers` asked for (no GPU provider: the build has none).
    active: `session.get_providers()` after creation, the only list to trust; () when the
    session could not be created, with the exception in `load_error`.
    build: the installed package and version, named when it lacks the CUDA provider.
    """
    if policy == "off" or on_gpu(active):
        return None
    if not on_gpu(requested):
        return (f"the installed {build} has no CUDA provider; install segd[gpu] in place of "
                "segd[cpu] on a machine with an NVIDIA GPU")
    if load_error is not None:
        return f"the CUDA provider failed: {load_error}"
    return DID_NOT_LOAD


@dataclass(frozen=True)
class ProviderReport:
    """What a session was asked to run on, what it runs on, and why that is not the GPU."""

    requested: tuple[str, ...]
    active: tuple[str, ...]
    gpu_policy: str
    fallback_reason: str | None  # why the GPU was asked for and is not in use

    @property
    def on_gpu(self) -> bool:
        return on_gpu(self.active)

    @property
    def summary(self) -> str:
        device = "GPU" if self.on_gpu else "CPU"
        text = f"{device} ({', '.join(self.active)})"
        if self.fallback_reason:
            text += f"; GPU not used: {self.fallback_reason}"
        return text
