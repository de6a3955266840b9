"""`segd doctor` on a machine without a GPU: it must say so, and say why, and still time
the model on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from segd.commands.doctor import check_libraries, onnxruntime_distributions


def run_doctor(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text("model: {gpu: preferred}\n")
    return subprocess.run([sys.executable, "-m", "segd", "doctor", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=120, check=False)


def test_doctor_json_reports_build_providers_and_a_timed_run(tmp_path: Path) -> None:
    result = run_doctor(tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["onnxruntime"]["version"]
    assert "CPUExecutionProvider" in report["onnxruntime"]["available_providers"]
    run = report["model_runs"]["fp32"]
    assert run["images_per_s"] > 0
    assert "CPUExecutionProvider" in run["active_providers"]
    if not run["on_gpu"]:
        # The reason names the cause, never just "no GPU".
        assert run["gpu_not_used_because"]
        assert "CUDA" in run["gpu_not_used_because"]
    assert set(report["cuda_libraries"]) >= {"CUDA runtime", "cuDNN 9", "NVIDIA driver"}


def test_doctor_text_says_loudly_when_the_gpu_is_not_used(tmp_path: Path) -> None:
    result = run_doctor(tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "onnxruntime:" in out and "model fp32:" in out
    if "on CPU" in out:
        assert "GPU NOT USED" in out


def test_library_checks_name_each_missing_library() -> None:
    for what, state in check_libraries().items():
        assert state.startswith("ok (") or state.startswith("missing: tried lib"), what
    assert onnxruntime_distributions(), "pip metadata lists the installed onnxruntime build"
