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

    Fencing (which zombie is stopped, and how), chosen after reading what kafka-python 3.0.12 implements:
    - KIP-447 consumer-group fencing. ``KafkaConsumer.group_metadata()`` (generation, member id) goes with
      every ``TxnOffsetCommit``; the group coordinator refuses the offsets of a member whose generation is
      stale (kafka-python turns that into an abortable ``CommitFailedError``). So a worker that lost its
      partitions in a rebalance, or was presumed dead, cannot commit a transaction over the new owner's work.
    - A member the group already dropped (session expired, unknown member id: kafka-python's
      ``on_partitions_lost``) has no valid generation left to send its offsets with; the worker aborts
      instead and commits nothing more of those partitions (worker/run.py ``_lose``).
    - The new owner's consumer reads with ``read_committed``, so its OffsetFetch asks for stable offsets
      (``require_stable``): while a dead worker's transaction with offsets is still pending, the broker
      answers UNSTABLE_OFFSET_COMMIT and kafka-python retries; the new owner starts only after that
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
    interval is added to their latency (bench/RESULTS.md measures both modes side by side).

The Redis cache stays outside the transaction in both modes: it is keyed by model version and text, not by
offset, so a replay after an abort only reads the cache again.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from bert_stream.kafka import close_producer

DELIVERY_MODES = ("at-least-once", "exactly-once")
REPLACE_ATTEMPTS = 3  # exactly-once: transaction timeouts to wait for the broker when replacing the producer


class TransactionFailed(RuntimeError):
    """The transaction could not commit and was (or must be) aborted; the worker rewinds and goes on."""


class DeliveryUnsupported(RuntimeError):
    """The broker cannot do what the delivery mode needs (transactions); the worker says so and exits."""


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def transactional_id(group_id: str, instance_id: str | None) -> str:
    return f"{group_id}-{instance_id or default_instance_id()}"


def client_overrides(mode: str, group_id: str, instance_id: str | None,
                     transaction_timeout_ms: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(producer, consumer) settings a delivery mode adds to :mod:`bert_stream.kafka`'s."""
    if mode == "at-least-once":
        return {}, {}
    producer = {"transactional_id": transactional_id(group_id, instance_id), "enable_idempotence": True,
                "transaction_timeout_ms": transaction_timeout_ms}
    # skip aborted records of transactional producers upstream, and fetch committed offsets only once no
    # transaction holds pending offsets for them (require_stable: KIP-447)
    return producer, {"isolation_level": "read_committed"}


def commit_request(offsets: dict) -> dict:
    from kafka.structs import OffsetAndMetadata

    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}


class AtLeastOnce:
    """Commit through the consumer; a failed send stops the worker (see the module docstring)."""

    name = "at-least-once"
    transactional = False
    flush_timeout_s = None  # a send that cannot complete fails by the producer's delivery timeout

    def __init__(self):
        self.consumer = self.producer = None

    def start(self, consumer, new_producer: Callable[[], Any]) -> None:
        self.consumer, self.producer = consumer, new_producer()

    def before_send(self) -> None:
        pass

    def pending(self) -> bool:
        return False

    def commit(self, offsets: dict) -> None:
        if offsets:
            self.consumer.commit(commit_request(offsets))

    def abort(self) -> None:
        raise AssertionError("at-least-once has no transaction to abort")


class ExactlyOnce:
    """A transaction per commit interval: outputs, dead letters and consumed offsets (see the docstring).

    Every transactional call waits at most ``timeout_s`` (the transaction timeout: past it the broker aborts
    the transaction anyway). kafka-python 3.0.12's own calls wait without a limit, and were seen to wait
    forever after a broker restart. A call that times out leaves the producer in an unknown state, so the
    abort then replaces it: a new producer with the same transactional id fences the old one (its epoch) and
    its ``init_transactions`` aborts whatever transaction was open."""

    name = "exactly-once"
    transactional = True

    def __init__(self, timeout_s: float = 30.0):
        self.consumer = self.producer = None
        self.timeout_s = self.flush_timeout_s = timeout_s  # sends can wait behind a stuck transactional call
        self._new_producer: Callable[[], Any] | None = None
        self._open = False
        self._broken = False  # a call timed out: abort() replaces the producer

    def start(self, consumer, new_producer: Callable[[], Any]) -> None:
        """Create the producer and register the transactional id (fencing any earlier producer with it; its
        open transaction is aborted). A broker without transactions: DeliveryUnsupported."""
        from kafka import errors

        self.consumer, self._new_producer = consumer, new_producer
        producer = new_producer()
        try:
            producer.init_transactions()
        except BaseException as exc:
            close_producer(producer, 1.0)
            if isinstance(exc, (errors.UnsupportedVersionError, errors.IncompatibleBrokerVersion)):
                raise DeliveryUnsupported(f"exactly-once needs a broker with transactions (Apache Kafka 2.5+): "
                                          f"init_transactions failed: {type(exc).__name__}: {exc}") from None
            raise
        self.producer = producer

    def before_send(self) -> None:
        if not self._open:
            self.producer.begin_transaction()
            self._open = True

    def pending(self) -> bool:
        """A transaction is open (something was sent since the last commit)."""
        return self._open

    def commit(self, offsets: dict) -> None:
        """Offsets into the open transaction, then commit it. Raises TransactionFailed (abortable: the worker
        aborts and rewinds) or the producer's fatal error (fenced, unauthorised: the worker exits)."""
        if not self._open:
            return  # nothing was sent, so nothing was acknowledged: no offsets moved
        from kafka import errors

        manager = self.producer._transaction_manager  # what KafkaProducer's own methods call, minus the wait
        try:
            if offsets:
                group = self.consumer.group_metadata()
                self._wait(lambda: manager.send_offsets_to_transaction(commit_request(offsets), group),
                           "send_offsets_to_transaction")
            self._wait(manager.begin_commit, "commit_transaction")
        except (errors.ProducerFencedError, errors.TransactionalIdAuthorizationFailedError):
            raise
        except Exception as exc:  # noqa: BLE001 - abortable: a send failed, the generation moved, a timeout
            self.raise_if_fatal()
            raise TransactionFailed(f"{type(exc).__name__}: {exc}"[:300]) from exc
        self._open = False

    def raise_if_fatal(self) -> None:
        """Raise the producer's fatal error (fenced by a newer producer with this transactional id, not
        authorised), if it has one. After the first, kafka-python raises a plain KafkaError ("in an error
        state") from every call: aborting and replacing the producer then would fence the other worker in
        turn, and two workers with one instance id would take turns forever. Fatal ends the worker (exit 1)."""
        manager = self.producer._transaction_manager
        if manager.has_fatal_error():
            raise manager.last_error()

    def abort(self) -> None:
        """Abort the open transaction (its records are never visible to read_committed readers); replace
        the producer when a call timed out or the abort itself fails."""
        if not self._open:
            return
        self._open = False
        self.raise_if_fatal()
        if not self._broken:
            try:
                self._wait(self.producer._transaction_manager.begin_abort, "abort_transaction")
                return
            except Exception:  # noqa: BLE001 - whatever it was, a new producer settles it
                pass
        self._replace_producer()

    def mark_broken(self) -> None:
        """The producer did not finish in time (a flush): the abort replaces it."""
        self._broken = True

    def _wait(self, begin: Callable[[], Any], what: str) -> None:
        result = begin()
        self.producer._sender.wakeup()
        if not result.wait(timeout_ms=self.timeout_s * 1000):
            self._broken = True
            raise TransactionFailed(f"{what} did not complete within {self.timeout_s:.0f} s")

    def _replace_producer(self) -> None:
        """A new producer with the same transactional id. The broker may still be down (a restart): retry
        until it answers, for at most REPLACE_ATTEMPTS transaction timeouts, then give up (the worker exits 1
        and is restarted; nothing is lost, its transaction is aborted by the broker)."""
        from kafka import errors

        close_producer(self.producer, 1.0)  # what it could not finish is fenced by the new epoch anyway
        deadline = time.monotonic() + REPLACE_ATTEMPTS * self.timeout_s
        while True:
            try:
                self.start(self.consumer, self._new_producer)
                self._broken = False
                return
            except (errors.NoBrokersAvailable, errors.KafkaTimeoutError, errors.KafkaConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def make(mode: str, transaction_timeout_ms: int = 30_000) -> AtLeastOnce | ExactlyOnce:
    """The delivery of ``mode``; its clients come with :meth:`start` (constructors stay cheap)."""
    if mode == "exactly-once":
        return ExactlyOnce(timeout_s=transaction_timeout_ms / 1000)
    return AtLeastOnce()
