"""Offset bookkeeping: which input offsets may be committed. Pure logic, no Kafka.

At-least-once means an input offset is committed only when every message before it in its partition has
had its output (or dead-letter) record acknowledged by the broker. Acks can arrive out of order (the
output and DLQ topics are different topics; a retry is slower), so each partition keeps its received
offsets in order and the commit position is the first offset not yet acknowledged: the contiguous
acknowledged prefix. Offsets need not be contiguous numbers (compacted topics, transaction markers).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable

TP = Hashable  # a TopicPartition in the worker; anything hashable in tests


class _Partition:
    __slots__ = ("order", "acked", "position", "committed")

    def __init__(self) -> None:
        self.order: collections.deque[int] = collections.deque()  # received, not yet in the acked prefix
        self.acked: set[int] = set()
        self.position: int | None = None  # next offset to commit (all before it are acked)
        self.committed: int | None = None  # the position last committed


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}

    def track(self, tp: TP, offset: int) -> None:
        """A message was received; its offset is outstanding until :meth:`ack`."""
        part = self._parts.get(tp)
        if part is None:  # (setdefault would build a _Partition on every call: a cached worker's hot path)
            part = self._parts[tp] = _Partition()
        last = part.order[-1] if part.order else (part.position - 1 if part.position is not None else -1)
        if offset <= last:
            raise ValueError(f"{tp}: offset {offset} received after {last}; offsets must increase")
        part.order.append(offset)

    def ack(self, tp: TP, offset: int) -> None:
        """The output or DLQ record for this offset is acknowledged by the broker."""
        part = self._parts.get(tp)
        if part is None:
            return  # the partition was revoked meanwhile: its new owner re-reads from the committed offset
        part.acked.add(offset)
        while part.order and part.order[0] in part.acked:
            done = part.order.popleft()
            part.acked.discard(done)
            part.position = done + 1

    def committable(self) -> dict[TP, int]:
        """Partition -> offset to commit, for partitions whose acked prefix moved since the last commit."""
        return {tp: p.position for tp, p in self._parts.items()
                if p.position is not None and p.position != p.committed}

    def mark_committed(self, offsets: dict[TP, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._parts:
                self._parts[tp].committed = offset

    def committed(self, tp: TP) -> int | None:
        part = self._parts.get(tp)
        return part.committed if part else None

    def outstanding(self, tp: TP | None = None) -> int:
        """Messages received but not yet in the acked prefix (one partition, or all)."""
        parts = self._parts.values() if tp is None else [self._parts[tp]] if tp in self._parts else []
        return sum(len(p.order) for p in parts)

    def revoke(self, tps: Iterable[TP]) -> None:
        """Forget partitions this worker no longer owns (after committing what it could)."""
        for tp in tps:
            self._parts.pop(tp, None)

    def partitions(self) -> list[TP]:
        return list(self._parts)
