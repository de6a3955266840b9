"""embed_stream: order, per-item errors, batch sizes, FLUSH and bounded read-ahead.

Pure unit tests of the pipeline: decode and embed are fakes. An item is an int; its
"image" is a (2, 2, 3) array filled with it and its "embedding" is [item, 2 * item].
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest

from segd.core.errors import CorruptImageError, ImageError
from segd.core.pipeline import FLUSH, Embedded, Flush, embed_stream


def fake_decode(item: int) -> np.ndarray:
    return np.full((2, 2, 3), item, dtype=np.int64)


class FakeEmbed:
    """Records the size of every network batch; embeds an image as [v, 2v]."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(len(images))
        v = images[:, 0, 0, 0].astype(np.float32)
        return np.stack([v, 2 * v], axis=1)


def flat(batches: Iterable[list[Embedded[int]]]) -> list[Embedded[int]]:
    return [r for batch in batches for r in batch]


def run(items: Iterable[int | Flush], decode: Callable[[int], np.ndarray] = fake_decode, *,
        batch_size: int, workers: int,
        inflight: int | None = None) -> tuple[list[list[Embedded[int]]], FakeEmbed]:
    embed = FakeEmbed()
    batches = list(embed_stream(items, decode, embed, batch_size=batch_size, workers=workers,
                                inflight=inflight))
    return batches, embed


def test_order_preserved_when_decodes_finish_out_of_order() -> None:
    rng = random.Random(7)
    delays = {i: rng.uniform(0, 0.004) for i in range(120)}

    def slow_decode(item: int) -> np.ndarray:
        time.sleep(delays[item])
        return fake_decode(item)

    batches, _ = run(range(120), decode=slow_decode, batch_size=8, workers=4)
    results = flat(batches)
    assert [r.item for r in results] == list(range(120))
    for r in results:
        assert r.error is None and r.embedding is not None
        assert r.embedding.tolist() == [r.item, 2 * r.item]
        assert r.decode_ms >= 0


def test_errors_reported_per_item_and_not_embedded() -> None:
    bad = {3, 4, 10, 11, 12, 29}

    def decode(item: int) -> np.ndarray:
        if item in bad:
            raise CorruptImageError(f"/photos/{item}.jpg", "broken")
        return fake_decode(item)

    batches, embed = run(range(30), decode=decode, batch_size=4, workers=2)
    results = flat(batches)
    assert [r.item for r in results] == list(range(30))
    for r in results:
        if r.item in bad:
            assert r.embedding is None
            assert isinstance(r.error, ImageError) and r.error.kind == "corrupt"
            assert r.error.path == f"/photos/{r.item}.jpg"
        else:
            assert r.error is None
            assert r.embedding is not None and r.embedding[0] == r.item
    assert sum(embed.batches) == 30 - len(bad)  # failed items never reach the network


def test_only_errors_never_call_the_network() -> None:
    def decode(item: int) -> np.ndarray:
        raise ImageError(str(item), "no")

    batches, embed = run(range(5), decode=decode, batch_size=2, workers=2)
    assert [r.item for r in flat(batches)] == list(range(5))
    assert embed.batches == []


def test_other_exceptions_propagate() -> None:
    def decode(item: int) -> np.ndarray:
        if item == 5:
            raise RuntimeError("a bug, not a bad file")
        return fake_decode(item)

    with pytest.raises(RuntimeError, match="a bug"):
        run(range(20), decode=decode, batch_size=4, workers=2)


@pytest.mark.parametrize(("n", "batch_size", "workers", "inflight"), [
    (0, 4, 2, None), (1, 4, 2, None), (17, 4, 2, None), (64, 16, 3, 5), (50, 7, 1, 1),
    (33, 1, 4, 2),
])
def test_batches_never_exceed_batch_size(n: int, batch_size: int, workers: int,
                                         inflight: int | None) -> None:
    batches, embed = run(range(n), batch_size=batch_size, workers=workers, inflight=inflight)
    assert [r.item for r in flat(batches)] == list(range(n))
    assert all(0 < size <= batch_size for size in embed.batches)
    assert all(len(b) <= batch_size for b in batches)
    # Without FLUSH or errors, every batch but the last is full.
    assert all(size == batch_size for size in embed.batches[:-1])
    assert sum(embed.batches) == n


def test_flush_yields_the_partial_batch_at_once() -> None:
    released = threading.Event()
    pulled_after_release: list[int] = []

    def source() -> Iterator[int | Flush]:
        yield from (1, 2, 3)
        yield FLUSH
        # The watcher has nothing more for now: block until the test says so (with a
        # deadline, so that a broken FLUSH fails the test instead of hanging it).
        released.wait(timeout=10)
        pulled_after_release.append(4)
        yield 4

    embed = FakeEmbed()
    stream = embed_stream(source(), fake_decode, embed, batch_size=8, workers=2)
    first = next(stream)
    assert not released.is_set() and not pulled_after_release, \
        "the partial batch waited for more input"
    assert [r.item for r in first] == [1, 2, 3]
    assert [r.embedding.tolist() for r in first if r.embedding is not None] == \
        [[1, 2], [2, 4], [3, 6]]
    assert embed.batches == [3]
    released.set()
    rest = list(stream)
    assert [r.item for r in flat(rest)] == [4]
    assert pulled_after_release == [4]


def test_flush_with_nothing_pending_yields_nothing() -> None:
    batches, embed = run([FLUSH, FLUSH, 1, 2, FLUSH, FLUSH, 3], batch_size=4, workers=2)
    assert [[r.item for r in b] for b in batches] == [[1, 2], [3]]
    assert embed.batches == [2, 1]


@pytest.mark.parametrize(("batch_size", "workers", "inflight"), [
    (4, 4, 6), (8, 2, 3), (2, 3, 10), (4, 2, None),
])
def test_read_ahead_is_bounded(batch_size: int, workers: int, inflight: int | None) -> None:
    """However slow the consumer, at most `inflight` items are decoded ahead of it."""
    bound = inflight or max(2 * batch_size, 4 * workers)
    lock = threading.Lock()
    started = 0
    delivered = 0
    peak_between = 0  # while a batch is being gathered (the batch itself counts too)
    peak_at_consumer = 0  # while the consumer holds a batch

    def decode(item: int) -> np.ndarray:
        nonlocal started, peak_between
        with lock:
            started += 1
            peak_between = max(peak_between, started - delivered)
        time.sleep(0.0005)
        return fake_decode(item)

    n = 80
    for batch in embed_stream(range(n), decode, FakeEmbed(), batch_size=batch_size,
                              workers=workers, inflight=inflight):
        with lock:
            delivered += len(batch)
            peak_at_consumer = max(peak_at_consumer, started - delivered)
        time.sleep(0.003)  # a slow consumer: the decoders must not race ahead meanwhile
        with lock:
            peak_at_consumer = max(peak_at_consumer, started - delivered)
    assert delivered == n
    assert peak_at_consumer <= bound
    # While a batch is gathered: the queue (one over the bound for an instant, between
    # appending an item and taking the oldest) plus the batch being filled.
    assert peak_between <= bound + batch_size
