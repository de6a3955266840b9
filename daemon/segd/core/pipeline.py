"""Decode on every core, embed in batches: the streaming heart of `segd sort` and `segd run`.

For phone photos (1-3 MP) decoding costs several times what the network does; for small
images the network dominates (docs/benchmarks.md). Either way, files are decoded by a
thread pool (OpenCV releases the GIL) while the calling thread runs the network on full
batches. At most `inflight` files are decoded ahead, which bounds memory
however many files stream through.

A source may yield `FLUSH` to say "nothing more is coming for now": the partial batch is
embedded at once instead of waiting to fill, which is what keeps a single dropped file fast.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from segd.core.errors import ImageError

T = TypeVar("T")


class Flush:
    def __repr__(self) -> str:
        return "FLUSH"


FLUSH = Flush()


@dataclass
class Embedded(Generic[T]):
    """The outcome for one item: an embedding, or the error that set it aside."""

    item: T
    embedding: np.ndarray | None = None
    error: ImageError | None = None
    decode_ms: float = 0.0


def embed_stream(
    items: Iterable[T | Flush],
    decode: Callable[[T], np.ndarray],
    embed: Callable[[np.ndarray], np.ndarray],
    *,
    batch_size: int,
    workers: int,
    inflight: int | None = None,
) -> Iterator[list[Embedded[T]]]:
    """Yield results in input order, one list per network batch (failed items included).

    `decode` must raise ImageError for a bad item; any other exception is a bug and
    propagates. Results are yielded as soon as their batch is embedded.
    """
    inflight = inflight or max(2 * batch_size, 4 * workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segd-decode") as pool:
        queue: deque[tuple[T, Future[tuple[np.ndarray, float]]] | Flush] = deque()
        pending: list[Embedded[T]] = []
        images = _BatchBuffer(batch_size)

        def finish_batch() -> list[Embedded[T]]:
            ok = [r for r in pending if r.error is None]
            if images.count:
                vectors = embed(images.take())
                for result, vector in zip(ok, vectors, strict=True):
                    result.embedding = vector
            done = pending.copy()
            pending.clear()
            return done

        def take_one() -> list[Embedded[T]] | None:
            head = queue.popleft()
            if isinstance(head, Flush):
                return finish_batch() if pending else None
            item, future = head
            try:
                image, ms = future.result()
            except ImageError as exc:
                pending.append(Embedded(item, error=exc))
            else:
                pending.append(Embedded(item, decode_ms=ms))
                images.add(image)
            return finish_batch() if images.count >= batch_size else None

        for entry in items:
            if isinstance(entry, Flush):
                queue.append(entry)
            else:
                queue.append((entry, pool.submit(_timed, decode, entry)))
            # Keep the decoders busy, but no more than `inflight` ahead of the network;
            # a FLUSH is acted on at once, since the source has nothing more for now.
            while queue and (len(queue) > inflight or isinstance(entry, Flush)):
                batch = take_one()
                if batch:
                    yield batch
        while queue:
            batch = take_one()
            if batch:
                yield batch
        if pending:
            yield finish_batch()


class _BatchBuffer:
    """One (batch, h, w, 3) array reused for every batch: decoded images are copied into
    their slot, and the network reads the batch from the same memory each time instead of
    a fresh np.stack. `take` hands out a view, valid until the next `add`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.array: np.ndarray | None = None
        self.count = 0

    def add(self, image: np.ndarray) -> None:
        if self.array is None or self.array.shape[1:] != image.shape:
            if self.count:  # the decoder gives one shape; a change mid-batch is a bug
                raise ValueError(f"image shape {image.shape} differs within a batch")
            self.array = np.empty((self.size, *image.shape), dtype=image.dtype)
        self.array[self.count] = image
        self.count += 1

    def take(self) -> np.ndarray:
        assert self.array is not None
        batch, self.count = self.array[:self.count], 0
        return batch


def _timed(decode: Callable[[T], np.ndarray], item: T) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    image = decode(item)
    return image, (time.perf_counter() - start) * 1000.0
