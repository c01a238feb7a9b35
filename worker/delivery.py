"""Delivery guarantees: how the worker makes what it published permanent. One class per guarantee, one shape.

The worker loop is the same in both modes (poll -> decode -> batch -> classify -> publish -> commit); only
"commit" and what a failure means differ, and they live here.

``at-least-once`` (default)
    Commit = the consumer commits the acknowledged prefix (:class:`worker.offsets.OffsetTracker`) after the
    producer was flushed. A crash re-publishes what was published after the last commit (bounded by
    ``commit_interval_ms`` / ``commit_every``); a send that cannot complete stops the worker (exit 1) so its
    supervisor restarts it from the last commit.

``exactly-once``
    The outputs and dead letters of everything published since the last commit, and the consumed offsets
    (``send_offsets_to_transaction`` with the consumer's group metadata), are one Kafka transaction. A
    consumer reading the output with ``isolation.level=read_committed`` sees each input's record exactly once,
    across crashes, rebalances and broker restarts. A transaction that fails is aborted and the worker rewinds
    its partitions to the group's committed offsets and goes on: nothing is lost, nothing shows twice.

    Fencing (which zombie is stopped, and how), the same on both clients (bert_stream/kafka/):
    - KIP-447 consumer-group fencing. The consumer's group metadata (generation, member id) goes with every
      ``TxnOffsetCommit``; the group coordinator refuses the offsets of a member whose generation is stale
      (an abortable error). So a worker that lost its partitions in a rebalance, or was presumed dead,
      cannot commit a transaction over the new owner's work.
    - A member the group already dropped (session expired, unknown member id: partitions "lost") has no
      valid generation left to send its offsets with; the worker aborts instead and commits nothing more
      of those partitions (worker/rebalance.py ``on_revoking``).
    - The new owner's consumer reads with ``read_committed``, so its OffsetFetch asks for stable offsets
      (``require_stable``): while a dead worker's transaction with offsets is still pending, the broker
      answers UNSTABLE_OFFSET_COMMIT and the client retries; the new owner starts only after that
      transaction committed or was aborted, never from an offset it would then overtake.
    - With KIP-447 the ``transactional.id`` need not be tied to partitions (the pre-2.5 scheme, one producer
      per input partition, is what KIP-447 replaced). It is ``<group_id>-<instance_id>``, unique among live
      workers. ``instance_id`` defaults to ``<hostname>-<pid>``: distinct for processes on one host, and the
      same for a container restarted in place (same pod name, the worker is PID 1), whose first
      ``init_transactions`` then aborts its predecessor's open transaction at once. Any other crashed
      worker's open transaction is aborted by the coordinator after ``transaction_timeout_ms``; until then
      read_committed readers of its output partitions wait (they never see its records). Set
      ``BERT_STREAM_INSTANCE_ID`` to a stable name (a StatefulSet's pod name) to always get the fast path;
      two live workers must never share one (the second fences the first: exit 1).

    Cost: one transaction per commit (AddOffsetsToTxn, TxnOffsetCommit, EndTxn: a few round trips), and the
    outputs become visible to read_committed readers only when their transaction commits, so the commit
    interval is added to their latency (``bench/delivery.py`` measures both modes side by side).

The Redis cache stays outside the transaction in both modes: it is keyed by model version and text, not by
offset, so a replay after an abort only reads the cache again.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from bert_stream.kafka import interface as kafka

DELIVERY_MODES = ("at-least-once", "exactly-once")
REPLACE_ATTEMPTS = 3  # exactly-once: transaction timeouts to wait for the broker when replacing the producer
FLUSH_GRACE_S = 30.0  # at-least-once: how long a flush may outlast the client's delivery timeout


class TransactionFailed(RuntimeError):
    """The transaction could not commit and was (or must be) aborted; the worker rewinds and goes on."""


class DeliveryUnsupported(RuntimeError):
    """The broker cannot do what the delivery mode needs (transactions); the worker says so and exits."""


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def transactional_id(group_id: str, instance_id: str | None) -> str:
    return f"{group_id}-{instance_id or default_instance_id()}"


def client_options(mode: str, group_id: str, instance_id: str | None,
                   transaction_timeout_ms: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(producer, consumer) keyword arguments a delivery mode gives either adapter's constructors."""
    if mode == "at-least-once":
        return {}, {}
    return ({"transactional_id": transactional_id(group_id, instance_id),
             "transaction_timeout_ms": transaction_timeout_ms},
            {"read_committed": True})


class AtLeastOnce:
    """Commit through the consumer; a failed send stops the worker (see the module docstring)."""

    name = "at-least-once"
    transactional = False

    def __init__(self):
        self.consumer = self.producer = None

    @property
    def flush_timeout_s(self) -> float:
        """A send that cannot complete fails by the producer's delivery timeout; a flush bounded a little past
        it turns a record the client never reports (kafka-python, a partition of a deleted topic) into the
        same publish failure instead of a worker that waits forever."""
        return self.producer.delivery_timeout_s + FLUSH_GRACE_S

    def mark_broken(self) -> None:
        pass  # a flush that timed out is a failed send: the worker commits what was acked and exits 1

    def start(self, consumer: kafka.Consumer, new_producer: Callable[[], kafka.Producer]) -> None:
        self.consumer, self.producer = consumer, new_producer()

    def before_send(self) -> None:
        pass

    def pending(self) -> bool:
        return False

    def commit(self, offsets: Mapping) -> None:
        if offsets:
            self.consumer.commit(offsets)

    def abort(self) -> None:
        raise AssertionError("at-least-once has no transaction to abort")


class ExactlyOnce:
    """A transaction per commit interval: outputs, dead letters and consumed offsets (see the docstring).

    Every transactional call waits at most ``timeout_s`` (the transaction timeout: past it the broker aborts
    the transaction anyway). A call that times out leaves the producer in an unknown state, so the abort then
    replaces it: a new producer with the same transactional id fences the old one (its epoch) and its
    ``init_transactions`` aborts whatever transaction was open."""

    name = "exactly-once"
    transactional = True

    def __init__(self, timeout_s: float = 30.0):
        self.consumer = self.producer = None
        self.timeout_s = self.flush_timeout_s = timeout_s  # sends can wait behind a stuck transactional call
        self._new_producer: Callable[[], kafka.Producer] | None = None
        self._open = False
        self._began = 0.0     # time.monotonic() at begin_transaction
        self._broken = False  # a call timed out: abort() replaces the producer

    def start(self, consumer: kafka.Consumer, new_producer: Callable[[], kafka.Producer]) -> None:
        """Create the producer and register the transactional id (fencing any earlier producer with it; its
        open transaction is aborted). A broker without transactions: DeliveryUnsupported."""
        self.consumer, self._new_producer = consumer, new_producer
        producer = new_producer()
        try:
            producer.init_transactions(self.timeout_s)
        except BaseException as exc:
            producer.close(1.0)
            if isinstance(exc, kafka.Unsupported):
                raise DeliveryUnsupported(f"exactly-once needs a broker with transactions (Apache Kafka 2.5+): "
                                          f"init_transactions failed: {exc}") from None
            raise
        self.producer = producer

    def before_send(self) -> None:
        if not self._open:
            self.producer.begin_transaction()
            self._open, self._began = True, time.monotonic()

    def pending(self) -> bool:
        """A transaction is open (something was sent since the last commit)."""
        return self._open

    def commit(self, offsets: Mapping) -> None:
        """Offsets into the open transaction, then commit it. Raises TransactionFailed (abortable: the worker
        aborts and rewinds) or the producer's fatal error (fenced, unauthorised: the worker exits)."""
        if not self._open:
            return  # nothing was sent, so nothing was acknowledged: no offsets moved
        try:
            if offsets:
                self.producer.send_offsets(offsets, self.consumer, self.timeout_s)
            self.producer.commit_transaction(self.timeout_s)
        except kafka.FatalError as exc:
            if not self._expired():
                raise
            self._broken = True
            raise TransactionFailed(f"the transaction outlived its timeout and the broker aborted it: {exc}"[:300]) \
                from exc
        except Exception as exc:  # noqa: BLE001 - abortable: a send failed, the generation moved, a timeout
            if isinstance(exc, kafka.TransactionTimeout):
                self._broken = True
            self.raise_if_fatal()
            raise TransactionFailed(str(exc)[:300]) from exc
        self._open = False

    def raise_if_fatal(self) -> None:
        """Raise the producer's fatal error (fenced by a newer producer with this transactional id, not
        authorised), if it has one: aborting and replacing the producer then would fence the other worker in
        turn, and two workers with one instance id would take turns forever. Fatal ends the worker (exit 1)."""
        fatal = self.producer.fatal_error()
        if fatal is not None and self._expired():
            self._broken = True  # the broker's abort of our own transaction, not a twin: a new producer
            return
        if fatal is not None:
            raise fatal

    def _expired(self) -> bool:
        """The open transaction began longer than the transaction timeout ago (a broker outage held its
        commit). The coordinator then aborts it and bumps the producer's epoch, which librdkafka reports as a
        fatal error (fenced, or INVALID_TXN_STATE), as it would a newer producer's takeover. A takeover by a
        twin fences a young transaction (each lives a commit interval): only that is fatal; an expired one
        gets a new producer (whose init_transactions fails again if the cause was not the timeout: not
        authorised, say). Timed from begin_transaction, which comes before the coordinator starts its clock,
        so a transaction the coordinator timed out always counts here."""
        return self._open and time.monotonic() - self._began > self.timeout_s

    def abort(self) -> None:
        """Abort the open transaction (its records are never visible to read_committed readers); replace
        the producer when a call timed out or the abort itself fails."""
        if not self._open:
            return
        self.raise_if_fatal()
        expired, self._open = self._expired(), False
        if not self._broken:
            try:
                self.producer.abort_transaction(self.timeout_s)
                return
            except kafka.FatalError:
                if not expired:
                    raise
            except Exception:  # noqa: BLE001 - whatever it was, a new producer settles it
                pass
        self._replace_producer()

    def mark_broken(self) -> None:
        """The producer did not finish in time (a flush): the abort replaces it."""
        self._broken = True

    def _replace_producer(self) -> None:
        """A new producer with the same transactional id. The broker may still be down (a restart): retry
        until it answers, for at most REPLACE_ATTEMPTS transaction timeouts, then give up (the worker exits 1
        and is restarted; nothing is lost, its transaction is aborted by the broker)."""
        self.producer.close(1.0)  # what it could not finish is fenced by the new epoch anyway
        deadline = time.monotonic() + REPLACE_ATTEMPTS * self.timeout_s
        while True:
            try:
                self.start(self.consumer, self._new_producer)
                self._broken = False
                return
            except kafka.Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def make(mode: str, transaction_timeout_ms: int = 30_000) -> AtLeastOnce | ExactlyOnce:
    """The delivery of ``mode``; its clients come with :meth:`start` (constructors stay cheap)."""
    if mode == "exactly-once":
        return ExactlyOnce(timeout_s=transaction_timeout_ms / 1000)
    return AtLeastOnce()
