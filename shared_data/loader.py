"""Multi-worker, in-order, prefetching iterator over a batch function such as batches.train_batch."""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class BatchLoader(Generic[T]):
    """Yields fn(i) for each i in `indices`, in order, computing up to `prefetch` batches ahead.

    Workers are threads: batch assembly is numpy copying out of a memory map, which releases the GIL,
    and threads share the map with no pickling or process start-up. Because every batch is a pure
    function of its index, the output is identical for any worker count.
    """

    def __init__(self, fn: Callable[[int], T], indices: Iterable[int], num_workers: int = 2, prefetch: int = 4):
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"num_workers must be >= 0 (got {num_workers}) and prefetch >= 1 (got {prefetch})")
        self.fn = fn
        self.indices = list(indices)
        self.num_workers = num_workers
        self.prefetch = max(prefetch, num_workers)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[T]:
        if self.num_workers == 0:
            for i in self.indices:
                yield self.fn(i)
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="batch-loader")
        pending: collections.deque[Future] = collections.deque()
        upcoming = iter(self.indices)
        try:
            for i in upcoming:
                pending.append(pool.submit(self.fn, i))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                batch = pending.popleft().result()
                for i in upcoming:
                    pending.append(pool.submit(self.fn, i))
                    break
                yield batch
        finally:
            # Reached on normal end, on error, and when the consumer stops early (generator closed).
            pool.shutdown(wait=True, cancel_futures=True)
