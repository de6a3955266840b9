"""Throughput and memory of the state database at library scale.

    python bench/bench_store.py [N]        (default N = 100_000 images, ~0.5 GB database)

Prints insert rate (batched transactions), the rate of streaming all embeddings with
iter_embedding_chunks, and peak RSS, which should stay near one chunk above the baseline
whatever N is: the point of the streaming API.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segd.state.store import EMBEDDING_DIM, open_store


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(n: int) -> None:
    rng = np.random.default_rng(0)
    batch = 1000
    with tempfile.TemporaryDirectory() as d, open_store(Path(d) / "segd.db") as s:
        cid = s.add_cluster("c", np.zeros(EMBEDDING_DIM, np.float32))
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            embs = rng.standard_normal((min(batch, n - start), EMBEDDING_DIM), np.float32)
            with s.transaction():  # one fsync per batch, not per image
                for i, e in enumerate(embs, start):
                    s.add_image(f"{i:064x}", f"{i}.jpg", f"/lib/c/{i}.jpg", "sorted",
                                embedding=e, cluster_id=cid, distance=0.0)  # fmt: skip
        t_ins = time.perf_counter() - t0
        base = rss_mb()
        t0 = time.perf_counter()
        total = 0
        checksum = 0.0
        for ids, emb in s.iter_embedding_chunks(8192):
            total += len(ids)
            checksum += float(emb[:, 0].sum())
        t_read = time.perf_counter() - t0
        size_mb = (Path(d) / "segd.db").stat().st_size / 2**20
        print(f"n={n} db={size_mb:.0f} MiB")
        print(f"insert: {n / t_ins:,.0f} images/s ({t_ins:.1f} s, batches of {batch})")
        print(f"stream: {total / t_read:,.0f} rows/s ({t_read:.2f} s, chunks of 8192)")
        print(f"peak RSS: {base:.0f} MiB before streaming, {rss_mb():.0f} MiB after "
              f"(full matrix would be {n * EMBEDDING_DIM * 4 / 2**20:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
