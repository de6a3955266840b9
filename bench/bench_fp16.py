"""fp16 against fp32: how far the half-precision model's embeddings drift, and whether the
clustering notices. Runs on the CPU (slowly: fp16 is for the GPU) or the GPU alike.

    python bench/bench_fp16.py [--data ../shared/datasets/clothing10] [--classes five|ten]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from segd.core.cluster import FitParams, fit
from segd.media.decode import DecodeOptions, decode_file
from segd.media.embed import Embedder, cpu_count, default_model_path

FIVE = ("dress", "hat", "pants", "shoes", "t-shirt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/datasets/clothing10")
    parser.add_argument("--classes", choices=("five", "ten"), default="five")
    args = parser.parse_args()
    classes = FIVE if args.classes == "five" else sorted(p.name for p in args.data.iterdir()
                                                         if p.is_dir())
    files = [(f, c) for c in classes for f in sorted((args.data / c).glob("*.jpg"))]
    labels = [c for _, c in files]
    opts = DecodeOptions()
    with ThreadPoolExecutor(cpu_count()) as pool:
        images = np.stack(list(pool.map(lambda fc: decode_file(fc[0], opts), files)))

    gpu = "preferred"
    e32 = Embedder(default_model_path("fp32"), gpu=gpu)
    e16 = Embedder(default_model_path("fp16"), gpu=gpu)
    v32 = np.concatenate([e32.embed(images[i:i + 64]) for i in range(0, len(images), 64)])
    v16 = np.concatenate([e16.embed(images[i:i + 64]) for i in range(0, len(images), 64)])
    cos = np.sum(v32 * v16, axis=1)
    print(f"{len(files)} photos ({args.classes}), on {e32.report.summary}")
    print(f"embedding difference fp16 vs fp32 (L2-normalised): max abs "
          f"{np.abs(v32 - v16).max():.2e}, min cosine {cos.min():.6f}, mean cosine "
          f"{cos.mean():.6f}")
    true_k = len(classes)
    for k in ("auto", true_k):
        r32, r16 = fit(v32, FitParams(k=k)), fit(v16, FitParams(k=k))
        print(f"k={k!s:>4}: fp32 chose k={r32.k} ARI {adjusted_rand_score(labels, r32.labels):.4f}"
              f" | fp16 chose k={r16.k} ARI {adjusted_rand_score(labels, r16.labels):.4f}"
              f" | fp16 vs fp32 labels ARI {adjusted_rand_score(r32.labels, r16.labels):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
