"""What the worker needs of a Kafka client, and nothing more: the one shape both adapters implement.

:mod:`bert_stream.kafka.python` (kafka-python, the default) and :mod:`bert_stream.kafka.librdkafka`
(confluent-kafka used natively) each turn their client into this. The worker loop (worker/loop.py,
worker/delivery.py) only ever sees these types, so it never asks which client it has; each client's
workarounds live in its adapter, with their reasons.

- :class:`Consumer`: join a group with a :class:`GroupListener`, ``poll`` a list of :class:`Record`, pause and
  resume partitions, commit offsets, ``rewind`` partitions to the group's committed offsets (after an aborted
  transaction), and the offsets the lag gauge reads.
- :class:`Producer`: ``send`` with a delivery callback, ``flush``, ``serve`` (run the delivery callbacks that
  have arrived), and a transaction: ``init_transactions``, ``begin_transaction``, ``send_offsets`` (with the
  consumer's group metadata: KIP-447 fencing), ``commit_transaction``, ``abort_transaction``.
- Errors: every failure a client reports reaches the worker as a :class:`ClientError`; the subclasses say
  what the worker does about it (exit, abort and rewind, retry).

Offsets are plain ints: the next offset to read, as Kafka commits them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol

from bert_stream.logs import get_logger

log = get_logger("bert_stream.kafka")


class TopicPartition(NamedTuple):
    """A partition. Equal to, and hashed as, either client's own (topic, partition) tuple."""

    topic: str
    partition: int


@functools.lru_cache(maxsize=65_536)
def topic_partition(topic: str, partition: int) -> TopicPartition:
    """The one :class:`TopicPartition` of a partition, made once: the worker needs it twice per message
    (tracked at poll, acknowledged at publish), and building a named tuple each time is the hot path's cost."""
    return TopicPartition(topic, partition)


class Record:
    """One consumed record, as the worker reads it. Where an adapter could not read a record whole it returns
    one with ``unreadable`` = (DLQ reason, detail) at its offset: the worker dead-letters it like bad input,
    so its partition moves on and nothing is skipped silently."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "headers", "unreadable", "timestamp")

    def __init__(self, topic: str, partition: int, offset: int, key, value, headers, unreadable=None,
                 timestamp: int | None = None):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value, self.headers = key, value, headers or []
        self.unreadable = unreadable
        self.timestamp = timestamp  # ms since the epoch (the producer's, or the broker's log-append time)


# ---- errors ----------------------------------------------------------------------------------------------
class ClientError(Exception):
    """What a Kafka client reported, as one line (the client's own exception is the ``__cause__``)."""


class FatalError(ClientError):
    """The producer can never go on (not authorised, or fenced): the worker exits 1."""


class Fenced(FatalError):
    """A newer producer with this transactional id took over: this one is a zombie and must stop."""


class TransactionAbortable(ClientError):
    """The open transaction cannot commit (a send failed, the group moved on, a call timed out): abort it,
    rewind, go on."""


class TransactionTimeout(TransactionAbortable):
    """A transactional call did not complete in time: the producer's state is unknown, so the abort replaces
    it (a new producer with the same transactional id fences the old one)."""


class Unsupported(ClientError):
    """The broker cannot do what was asked (transactions on a broker without them)."""


class Unavailable(ClientError):
    """No broker answered in time (a restart): try again later."""


class SendRefused(ClientError):
    """A record refused before it was queued (too large, a transaction in error, the topic changed)."""


class FlushTimeout(ClientError):
    """``flush`` returned with records neither acknowledged nor failed."""


# ---- the shapes --------------------------------------------------------------------------------------------
class GroupListener(Protocol):
    """Assignment events, called on the thread that polls, from inside ``poll`` (or ``close``).

    A revocation is two calls: ``on_revoking`` finishes what the worker holds and returns the offsets the
    consumer must commit before the partitions go (the adapter commits them the one way its client allows
    inside a rebalance), then ``on_revoked`` says how that commit went. ``lost`` = the group already dropped
    this member (KIP-429): the partitions may have a new owner, so a transaction must not commit over them."""

    def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    def on_revoking(self, partitions: set[TopicPartition], lost: bool) -> Mapping[TopicPartition, int]: ...

    def on_revoked(self, partitions: set[TopicPartition], commit_error: Exception | None) -> None: ...


DeliveryCallback = Callable[..., None]  # called with (*args, error): error None when the broker acknowledged


class Producer(Protocol):
    lazy_commits: bool  # True: commits between forced ones may take the acks so far without a flush
    delivery_timeout_s: float  # a send not acknowledged by then is reported failed (the client's own limit)

    def send(self, topic: str, partition: int, value: bytes | None, key: bytes | None, headers,
             on_delivery: DeliveryCallback, *args) -> None: ...

    def serve(self) -> None: ...

    def flush(self, timeout_s: float | None) -> None: ...

    def partitions_for(self, topic: str) -> set[int] | None: ...

    def init_transactions(self, timeout_s: float) -> None: ...

    def begin_transaction(self) -> None: ...

    def send_offsets(self, offsets: Mapping[TopicPartition, int], consumer: Consumer, timeout_s: float) -> None: ...

    def commit_transaction(self, timeout_s: float) -> None: ...

    def abort_transaction(self, timeout_s: float) -> None: ...

    def fatal_error(self) -> FatalError | None: ...

    def close(self, timeout_s: float) -> None: ...


class Consumer:
    """The consumer's shape, with the one piece both adapters share: rewinding to the committed offsets.

    ``rewind`` only marks partitions (it is allowed inside a listener, where neither client may do I/O of
    the consumer's); the next ``poll`` that is not part of a rebalance seeks each marked partition it owns to
    the group's committed offset (the log start if none) and drops what it had fetched of them before."""

    def __init__(self):
        self._needs_rewind: set[TopicPartition] = set()
        self._releases = 0  # +1 per revocation or loss (the adapter's listener): see poll

    def _released(self) -> None:
        """The adapter's listener gave partitions up (revoked or lost)."""
        self._releases += 1

    # -- to implement --
    def subscribe(self, topic: str, listener: GroupListener) -> None:
        raise NotImplementedError

    def _poll(self, timeout_s: float, max_records: int) -> list[Record]:
        raise NotImplementedError

    def _settled(self) -> bool:
        """No rebalance in progress: I/O of the caller's own is allowed."""
        raise NotImplementedError

    def _seek_committed(self, partitions: set[TopicPartition]) -> None:
        """Seek each partition to its committed offset, else its log start; raises :class:`Unavailable`."""
        raise NotImplementedError

    def assignment(self) -> set[TopicPartition]:
        raise NotImplementedError

    def paused(self) -> set[TopicPartition]:
        raise NotImplementedError

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        raise NotImplementedError

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        raise NotImplementedError

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        raise NotImplementedError

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        raise NotImplementedError

    def watermarks(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """(log start, end) per partition."""
        raise NotImplementedError

    def partitions_for(self, topic: str) -> set[int] | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- shared --
    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Records of owned partitions only. A revocation inside this call (one poll can be several client
        calls, the rebalance in a later one) must not leave records of a partition given up in the result:
        the worker would publish them after its revocation commit, and the new owner would too (a duplicate,
        also under exactly-once: this member's later transactions still commit). Checked only after a
        revocation: one comparison per poll otherwise."""
        releases = self._releases
        records = self._poll(timeout_s, max_records)
        if self._releases != releases and records:
            owned = {(tp.topic, tp.partition) for tp in self.assignment()}
            records = [r for r in records if (r.topic, r.partition) in owned]
        if self._needs_rewind:
            marked = self._needs_rewind
            records = [r for r in records if (r.topic, r.partition) not in marked]
            if self._settled():
                self._rewind_owned()
        return records

    def rewind(self, partitions: Iterable[TopicPartition]) -> None:
        self._needs_rewind.update(partitions)

    def forget_rewinds(self, keep: Iterable[TopicPartition]) -> None:
        """A new assignment: only its partitions may still need a rewind."""
        self._needs_rewind &= set(keep)

    def _rewind_owned(self) -> None:
        owned = self._needs_rewind & self.assignment()
        if not owned:
            return
        try:
            self._seek_committed(owned)
        except Unavailable as exc:  # the coordinator is moving (a broker restart): the next poll retries
            log.warning("rewind_deferred", partitions=len(owned), error=str(exc)[:300])
            return
        self._needs_rewind -= owned

