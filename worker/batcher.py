"""Micro-batching by padded-token budget, item cap and bounded wait. Pure logic: no Kafka, no model, no clock.

A batch closes when one more item could not fit: ``max_items`` items, or ``max_tokens`` padded tokens
(``items x longest``, what a padded forward pass costs), or once its first item has waited ``max_wait_s``.
The item that would overflow a batch starts the next one (text-embeddings-inference ``queue.rs``), so a
batch never exceeds either budget and arrival order is kept: batches leave in order, items in a batch in
the order they came. Keeping the order is what lets the worker publish each partition's outputs in input
order; sorting by length for padding happens inside the engine, within one batch.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass
class Batch(Generic[T]):
    items: list[T] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    arrivals: list[float] = dataclasses.field(default_factory=list)
    longest: int = 0  # max(lengths), kept by append (recomputing it per add was a fifth of a cached worker)

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: T, n_tokens: int, now: float) -> None:
        self.items.append(item)
        self.lengths.append(n_tokens)
        self.arrivals.append(now)
        if n_tokens > self.longest:
            self.longest = n_tokens

    @property
    def padded_tokens(self) -> int:
        return len(self.items) * self.longest

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def first_arrival(self) -> float:
        return self.arrivals[0]

    def padded_with(self, n_tokens: int) -> int:
        return (len(self.items) + 1) * max(self.longest, n_tokens)


class Batcher(Generic[T]):
    """Items in, batches out. ``now`` is any monotonic clock in seconds, passed in (testable)."""

    def __init__(self, max_items: int, max_tokens: int, max_wait_s: float):
        if max_items < 1 or max_tokens < 1 or max_wait_s < 0:
            raise ValueError("max_items and max_tokens must be >= 1, max_wait_s >= 0")
        self.max_items, self.max_tokens, self.max_wait_s = max_items, max_tokens, max_wait_s
        self._closed: collections.deque[Batch[T]] = collections.deque()
        self._open: Batch[T] = Batch()
        self._count = 0

    def __len__(self) -> int:
        """Items held (closed and open batches)."""
        return self._count

    def add(self, item: T, n_tokens: int, now: float) -> None:
        max_items, max_tokens = self.max_items, self.max_tokens
        if not 1 <= n_tokens <= max_tokens:
            raise ValueError(f"an item of {n_tokens} tokens can never fit max_tokens={max_tokens}")
        batch = self._open
        size = len(batch.items)
        # (Batch.padded_with inlined: this runs once per message)
        if size and (size >= max_items or (size + 1) * max(batch.longest, n_tokens) > max_tokens):
            self._close()
            batch, size = self._open, 0
        batch.append(item, n_tokens, now)
        self._count += 1
        # full: no further item can join (the cheapest newcomer still costs `longest` tokens)
        if size + 1 >= max_items or (size + 2) * batch.longest > max_tokens:
            self._close()

    def _close(self) -> None:
        self._closed.append(self._open)
        self._open = Batch()

    def pop_ready(self, now: float, flush: bool = False) -> Batch[T] | None:
        """The oldest batch if it is full or its first item has waited ``max_wait_s`` (any batch with
        ``flush``); else None."""
        if not self._closed and self._open.items and (
                flush or now - self._open.first_arrival >= self.max_wait_s):
            self._close()
        if not self._closed:
            return None
        batch = self._closed.popleft()
        self._count -= len(batch)
        return batch

    @property
    def full(self) -> bool:
        """A batch is closed by a budget (items or tokens) and waits to be popped."""
        return bool(self._closed)

    def seconds_until_ready(self, now: float) -> float | None:
        """0 when a batch is ready, the wait left for the open batch, or None when empty."""
        if self._closed:
            return 0.0
        if not self._open.items:
            return None
        return max(0.0, self._open.first_arrival + self.max_wait_s - now)

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove the items for which ``predicate`` holds (partitions revoked); the rest keep their order and
        arrival times and are re-batched."""
        kept: list[tuple[T, int, float]] = []
        dropped: list[T] = []
        for item, n, t in self._iter_all():
            if predicate(item):
                dropped.append(item)
            else:
                kept.append((item, n, t))
        self._closed.clear()
        self._open = Batch()
        self._count = 0
        for item, n, t in kept:
            self.add(item, n, t)
        return dropped

    def _iter_all(self) -> Iterator[tuple[T, int, float]]:
        for batch in (*self._closed, self._open):
            yield from zip(batch.items, batch.lengths, batch.arrivals)
