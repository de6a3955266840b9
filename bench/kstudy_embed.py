"""Embed the labelled photo sets once, with segd's own decode + embed path, for the k study.

    python bench/kstudy_embed.py [--cache DIR]

The code path is the one `segd sort` runs: `decode_file` with DecodeOptions(size = the
embedder's input size, resize = "crop"), batched through `embed_stream` into
`Embedder.embed` (CPU, fp32, no mirror: the shipped defaults). One npz per data set:
embeddings (n, 1280) float32 L2-normalised, labels (n,) int, classes, paths. Photos are read
in place; nothing from the data sets is copied into the project.

Besides the shared photo sets, "digits": scikit-learn's bundled handwritten digits (1,797
scans of 8 x 8 pixels, 10 classes, from the UCI repository; offline, in the wheel), drawn as
dark ink on white 64 x 64 PNGs in a temporary folder and embedded by the same path. No round
of the k study chose a setting on it (docs/quality.md, "A collection no round saw").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

# The package is being split into subpackages (segd.core, segd.media); accept either layout.
try:
    from segd.core.pipeline import embed_stream  # type: ignore[import-not-found]
    from segd.media.decode import DecodeOptions, decode_file  # type: ignore[import-not-found]
    from segd.media.embed import Embedder, cpu_count  # type: ignore[import-not-found]
except ImportError:
    from segd.core.pipeline import embed_stream
    from segd.media.decode import DecodeOptions, decode_file
    from segd.media.embed import Embedder, cpu_count

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path("/work/shared/datasets")
CACHE = REPO / ".cache" / "k-study"
SETS = ("clothing10", "scenes6")
DIGITS = "digits"
DIGIT_PX = 64
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def list_photos(data: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        for f in sorted((data / c).iterdir()):
            if f.suffix.lower() in SUFFIXES:
                paths.append(f)
                labels.append(ci)
    return paths, np.asarray(labels), classes


def render_digits(dest: Path) -> Path:
    """scikit-learn's digits as PNGs, one folder per digit: ink 0..16 -> grey 255..0,
    enlarged by bicubic interpolation (a scan's blur, not the 8 x 8 blocks)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, digit) in enumerate(zip(d.images, d.target, strict=True)):
        folder = dest / f"digit {digit}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = (255 - np.round(img * (255 / 16))).astype(np.uint8)
        big = cv2.resize(grey, (DIGIT_PX, DIGIT_PX), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"{i:04d}.png"), big)
    return dest


def embed_set(name: str, cache: Path, embedder: Embedder, data: Path | None = None) -> Path:
    out = cache / f"{name}.npz"
    if out.exists():
        return out
    paths, labels, classes = list_photos(data or DATASETS / name)
    opts = DecodeOptions(size=embedder.input_size, resize="crop")
    t0 = time.perf_counter()
    vectors: list[np.ndarray] = []
    keep: list[int] = []
    for batch in embed_stream(list(range(len(paths))), lambda i: decode_file(paths[i], opts),
                              embedder.embed, batch_size=32, workers=cpu_count()):
        for r in batch:
            if r.error is not None:
                print(f"  skipped {paths[r.item]}: {r.error}", file=sys.stderr)
                continue
            vectors.append(np.asarray(r.embedding, dtype=np.float32))
            keep.append(r.item)
    x = np.stack(vectors).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    idx = np.asarray(keep)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, embeddings=x, labels=labels[idx], classes=np.asarray(classes),
             paths=np.asarray([str(paths[i]) for i in idx]))
    print(f"  {name}: {len(idx)} photos embedded in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    embedder = Embedder(gpu="off")
    for name in SETS:
        embed_set(name, args.cache, embedder)
    if not (args.cache / f"{DIGITS}.npz").exists():
        with tempfile.TemporaryDirectory() as tmp:
            embed_set(DIGITS, args.cache, embedder, render_digits(Path(tmp)))


if __name__ == "__main__":
    main()
