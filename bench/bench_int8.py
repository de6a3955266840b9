"""int8 post-training quantization of the shipped networks: speed, drift and clustering.

    python bench/bench_int8.py [--rounds 25] [--out .cache/int8] [--seed 0]

For each variant (static QDQ per-channel int8 of MobileNetV2 160 and EfficientNet-Lite0 224,
calibrated on --calib photos of clothing10 drawn with --seed; dynamic int8 of MobileNetV2):

    speed   network-only time of one batch of 32 against fp32: rounds interleave the variants
            of one network in a rotating order in this process, and the figure is the median
            (and range) of the per-round ratios t_fp32 / t_int8, so load from other processes
            hits both sides of each pair
    cosine  of each photo's L2-normalised embedding to its fp32 one (mean, min)
    ARI@5   adjusted Rand index on clothing10's distinct five (949 photos) of
            segd.core.cluster.fit(FitParams(k=5, random_state=s)), s = 0..4: mean and range

Sessions are segd's own Embedder (CPU, its thread settings), photos go through segd's decode
path (decode_file, crop to the model's input size), and the quantized files are written
under --out, never next to the shipped models.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from benchlib import DATASET, REPO, list_images, load_average, machine
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.metrics import adjusted_rand_score

from segd.core.cluster import FitParams, fit
from segd.media.decode import DecodeOptions, decode_file
from segd.media.embed import Embedder

BATCH = 32
CALIB_BATCH = 10  # calibration keeps every intermediate tensor of a batch: keep it small
SEEDS = range(5)
NETWORKS = {"mobilenetv2": "mobilenetv2_160", "efficientnet-lite0": "efficientnet_lite0_224"}


@dataclass(frozen=True)
class Variant:
    network: str  # a key of NETWORKS
    kind: str  # fp32 | static | dynamic
    path: Path

    @property
    def label(self) -> str:
        return {"fp32": "fp32", "static": "static QDQ per-channel",
                "dynamic": "dynamic"}[self.kind]


@dataclass(frozen=True)
class Result:
    variant: Variant
    ms_per_batch: float
    ratio: float  # median of t_fp32 / t_variant, paired per round
    ratio_lo: float
    ratio_hi: float
    cos_mean: float
    cos_min: float
    ari_mean: float
    ari_lo: float
    ari_hi: float


class Photos(CalibrationDataReader):
    """Feeds preprocessed calibration batches, exactly as the Embedder would feed the network."""

    def __init__(self, embedder: Embedder, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = (
            embedder.preprocess(images[i:i + CALIB_BATCH])
            for i in range(0, len(images), CALIB_BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        return None if x is None else {"input": x}


def decode_all(paths: Sequence[Path], size: int) -> np.ndarray:
    opts = DecodeOptions(size=size, resize="crop")
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        return np.stack(list(pool.map(lambda p: decode_file(p, opts), paths)))


def with_metadata(src: Path, dst: Path) -> None:
    """Carry the source's segd.* metadata over (precision int8), so the Embedder can load it."""
    source, model = onnx.load(str(src)), onnx.load(str(dst))
    del model.metadata_props[:]
    for prop in source.metadata_props:
        value = "int8" if prop.key == "segd.precision" else prop.value
        model.metadata_props.add(key=prop.key, value=value)
    onnx.save(model, str(dst))


def quantize(network: str, calib: np.ndarray, out: Path) -> list[Variant]:
    stem = NETWORKS[network]
    src = REPO / "models" / f"{stem}.onnx"
    out.mkdir(parents=True, exist_ok=True)
    prep, static = out / f"{stem}_prep.onnx", out / f"{stem}_int8_qdq.onnx"
    quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)  # CNNs: onnx shapes suffice
    t0 = time.perf_counter()
    fp32 = Embedder(src, gpu="off", warmup=False)
    # x86 with VNNI: uint8 activations, int8 weights, full 8-bit range (onnxruntime's advice).
    quantize_static(str(prep), str(static), Photos(fp32, calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    with_metadata(src, static)
    print(f"  {network}: static int8 calibrated on {len(calib)} photos in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    variants = [Variant(network, "fp32", src), Variant(network, "static", static)]
    if network == "mobilenetv2":
        dynamic = out / f"{stem}_int8_dynamic.onnx"
        quantize_dynamic(str(prep), str(dynamic), weight_type=QuantType.QInt8)
        with_metadata(src, dynamic)
        variants.append(Variant(network, "dynamic", dynamic))
    return variants


def embed_all(embedder: Embedder, images: np.ndarray) -> np.ndarray:
    return np.concatenate([embedder.embed(images[i:i + BATCH])
                           for i in range(0, len(images), BATCH)])


def paired_times(embedders: Sequence[Embedder], x: np.ndarray,
                 rounds: int) -> list[list[float]]:
    """Seconds per network call of each embedder, round by round, in a rotating order."""
    feeds = [({"input": x}, [e.session.get_outputs()[0].name]) for e in embedders]
    for e, (feed, names) in zip(embedders, feeds, strict=True):
        for _ in range(2):  # warm-up
            e.session.run(names, feed)
    times = [[0.0] * len(embedders) for _ in range(rounds)]
    for r in range(rounds):
        for j in range(len(embedders)):
            i = (j + r) % len(embedders)
            feed, names = feeds[i]
            t0 = time.perf_counter()
            embedders[i].session.run(names, feed)
            times[r][i] = time.perf_counter() - t0
    return times


def aris(x: np.ndarray, labels: Sequence[str]) -> list[float]:
    return [adjusted_rand_score(labels, fit(x, FitParams(k=5, random_state=s)).labels)
            for s in SEEDS]


def measure(variants: Sequence[Variant], images: np.ndarray, labels: Sequence[str],
            rounds: int) -> list[Result]:
    embedders = [Embedder(v.path, gpu="off") for v in variants]
    x = embedders[0].preprocess(images[:BATCH])
    times = paired_times(embedders, x, rounds)
    ref = embed_all(embedders[0], images)
    results = []
    for i, (v, e) in enumerate(zip(variants, embedders, strict=True)):
        ratios = [t[0] / t[i] for t in times]
        emb = ref if i == 0 else embed_all(e, images)
        cos = np.sum(ref * emb, axis=1)
        ari = aris(emb, labels)
        results.append(Result(v, 1000 * statistics.median(t[i] for t in times),
                              statistics.median(ratios), min(ratios), max(ratios),
                              float(cos.mean()), float(cos.min()),
                              statistics.mean(ari), min(ari), max(ari)))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds")
    ap.add_argument("--calib", type=int, default=100, help="calibration photos")
    ap.add_argument("--seed", type=int, default=0, help="draw of the calibration photos")
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "int8")
    args = ap.parse_args()

    five = list_images(None)
    labels = [p.parent.name for p in five]
    everything = list_images(DATASET)
    rng = np.random.default_rng(args.seed)
    calib = [everything[i] for i in rng.choice(len(everything), args.calib, replace=False)]
    print(f"{machine()}; load average {load_average()}")
    print(f"{len(five)} photos (distinct five); calibration: {len(calib)} of clothing10's "
          f"{len(everything)} (seed {args.seed}, {sum(p in set(five) for p in calib)} of them "
          f"among the five)")

    rows: list[Result] = []
    for network, stem in NETWORKS.items():
        size = int(stem.rsplit("_", 1)[1])
        variants = quantize(network, decode_all(calib, size), args.out)
        rows += measure(variants, decode_all(five, size), labels, args.rounds)
    print(f"load average after: {load_average()}; {args.rounds} rounds, batch {BATCH}")
    print("| network | variant | ms / batch 32 | speed vs fp32 (median, range) | cosine mean | "
          "cosine min | five ARI@5 (mean, range) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.variant.network} | {r.variant.label} | {r.ms_per_batch:.0f} | "
              f"{r.ratio:.2f}x ({r.ratio_lo:.2f}-{r.ratio_hi:.2f}) | {r.cos_mean:.3f} | "
              f"{r.cos_min:.3f} | {r.ari_mean:.3f} ({r.ari_lo:.3f}-{r.ari_hi:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
