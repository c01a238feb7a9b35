"""The librdkafka adapter: confluent-kafka's own ``Consumer`` and ``Producer`` as the worker's interface
(:mod:`bert_stream.kafka.interface`), selected with ``BERT_STREAM_KAFKA_CLIENT=confluent-kafka``.

It exists because kafka-python is the wall of a worker that feeds a GPU: it consumes and produces each
record in Python, librdkafka in C (``bench/ceiling.py`` measures both clients' floor). Everything the worker
does runs on it, exactly-once included (librdkafka's transactional producer, KIP-447 offsets with the
consumer's group metadata, ``read_committed``).

How librdkafka differs, and what is done about it here:
- rebalance callbacks run inside ``consume``/``close`` on the caller's thread, where a synchronous commit is
  allowed: the revocation commit is a plain ``commit``;
- partitions are assigned incrementally (cooperative-sticky on the classic protocol, or the KIP-848 consumer
  protocol): a rebalance revokes and assigns only the partitions that move, and confluent-kafka assigns or
  unassigns them itself after the callback, each starting at the group's committed offset;
- delivery reports run only inside ``poll``/``flush``, on the caller's thread: :meth:`Producer.serve`;
- a header key that is not UTF-8 leaves a UnicodeDecodeError set inside ``Message.headers()`` (a
  SystemError at the next C call): the record is built inside one ``try``;
- ``consume(n, timeout)`` waits for all n messages or the timeout: :meth:`Consumer._poll` asks for what has
  arrived first, and waits only while nothing has;
- a retriable error of a transactional call means "call it again": :meth:`Producer._call` does, until its
  deadline;
- a transactional call can wait past its own timeout, for good: after a broker restart,
  ``send_offsets_to_transaction`` can block in ``rd_kafka_txn_op_req`` (an untimed condition wait)
  with librdkafka's threads idle. Each runs on a helper thread, waited for up to its timeout plus a margin
  (:meth:`Producer._bounded`); past that the worker replaces the producer, as after any timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import confluent_kafka as ck

from bert_stream.kafka import interface as i
from bert_stream.kafka.config import KafkaSettings
from bert_stream.kafka.interface import Record, TopicPartition
from bert_stream.logs import get_logger, register_secrets

log = get_logger("bert_stream.kafka")

METADATA_TIMEOUT_S = 10.0
POLL_PRODUCER_EVERY = 512  # sends between two producer polls (serves delivery reports, frees the queue)
RETRY_BACKOFF_S = 0.1      # between two tries of a transactional call that failed retriably
CALL_MARGIN_S = 5.0        # how much longer than its own timeout a transactional call may take
_FENCED = {ck.KafkaError._FENCED, ck.KafkaError.PRODUCER_FENCED, ck.KafkaError.INVALID_PRODUCER_EPOCH}
_UNSUPPORTED = {ck.KafkaError._UNSUPPORTED_FEATURE, ck.KafkaError.UNSUPPORTED_VERSION}


def _common(settings: KafkaSettings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "logger": logging.getLogger("kafka.librdkafka"),  # held at WARNING like kafka-python's (bert_stream.logs)
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.security_protocol,
        "topic.metadata.refresh.interval.ms": settings.metadata_max_age_ms,
        "socket.timeout.ms": settings.request_timeout_ms,
    }
    register_secrets(settings.sasl_password)  # librdkafka's debug logs can show its config
    if settings.sasl_mechanism:
        conf.update({"sasl.mechanism": settings.sasl_mechanism, "sasl.username": settings.sasl_username,
                     "sasl.password": settings.sasl_password})
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        conf["ssl.endpoint.identification.algorithm"] = "https"
        for key, value in (("ssl.ca.location", settings.ssl_cafile),
                           ("ssl.certificate.location", settings.ssl_certfile),
                           ("ssl.key.location", settings.ssl_keyfile)):
            if value:
                conf[key] = value
    return conf


def _error(exc: BaseException, cls: type[i.ClientError] = i.ClientError) -> i.ClientError:
    """The interface's error for a confluent-kafka exception (one line, the original as its cause)."""
    err = exc.args[0] if isinstance(exc, ck.KafkaException) and exc.args else None
    if isinstance(err, ck.KafkaError):
        if err.code() in _FENCED:
            cls = i.Fenced
        elif err.fatal():
            cls = i.FatalError
        elif err.code() in _UNSUPPORTED:
            cls = i.Unsupported
        text = f"{err.name()}: {err.str()}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    error = cls(text[:1000])
    error.__cause__ = exc
    return error


def _ck(tp, offset: int = ck.OFFSET_INVALID) -> ck.TopicPartition:
    return ck.TopicPartition(tp.topic, tp.partition, offset)


class Consumer(i.Consumer):
    def __init__(self, settings: KafkaSettings, group_id: str, *, read_committed: bool = False):
        super().__init__()
        conf = {
            **_common(settings),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": settings.max_poll_interval_ms,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
        if settings.group_protocol == "consumer":  # KIP-848: the broker assigns and times sessions
            conf["group.protocol"] = "consumer"
        else:
            conf.update({"session.timeout.ms": settings.session_timeout_ms,
                         "heartbeat.interval.ms": max(300, settings.session_timeout_ms // 4),
                         "partition.assignment.strategy": "cooperative-sticky"})
        self._c = ck.Consumer(conf)
        self._listener: i.GroupListener | None = None
        self._assignment: set[TopicPartition] = set()  # kept here: asked once per loop, a C call each time
        self._paused: set[TopicPartition] = set()

    # ---- group membership ----------------------------------------------------------------------------
    def subscribe(self, topic: str, listener: i.GroupListener) -> None:
        self._listener = listener
        self._c.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _on_assign(self, _consumer, partitions) -> None:
        tps = {TopicPartition(p.topic, p.partition) for p in partitions}
        self._assignment |= tps
        self.forget_rewinds(self._assignment)
        if self._listener is not None:
            self._listener.on_assigned(tps)

    def _on_revoke(self, _consumer, partitions) -> None:
        self._release(partitions, lost=False)

    def _on_lost(self, _consumer, partitions) -> None:
        self._release(partitions, lost=True)

    def _release(self, partitions, lost: bool) -> None:
        tps = {TopicPartition(p.topic, p.partition) for p in partitions}
        self._released()
        if self._listener is not None:
            offsets = self._listener.on_revoking(tps, lost)
            error = None
            if offsets:
                try:
                    self.commit(offsets)
                except i.ClientError as exc:  # the next owner re-reads from the last commit
                    error = exc
            self._listener.on_revoked(tps, error)
        self._assignment -= tps
        self._paused -= tps

    # ---- fetching ------------------------------------------------------------------------------------
    def _poll(self, timeout_s: float, max_records: int) -> list[Record]:
        messages = self._c.consume(num_messages=max_records, timeout=0)
        if not messages and timeout_s > 0:
            messages = self._c.consume(num_messages=1, timeout=timeout_s)
            if messages and max_records > 1:
                messages += self._c.consume(num_messages=max_records - 1, timeout=0)
        out = []
        for m in messages:
            error = m.error()
            if error is not None:
                if error.fatal():
                    raise _error(ck.KafkaException(error), i.FatalError)
                log.warning("consumer_error", error=str(error)[:300])  # transient: librdkafka retries itself
                continue
            topic, partition = m.topic(), m.partition()
            try:
                # for a header key that is not UTF-8, headers() returns with a UnicodeDecodeError still set,
                # which the next C-level call raises as a SystemError: the record is built in this try
                record = Record(topic, partition, m.offset(), m.key(), m.value(), m.headers(),
                                timestamp=m.timestamp()[1])
            except (UnicodeDecodeError, SystemError) as exc:
                # a dead letter for this record alone (value and key kept; the headers cannot be had)
                record = Record(topic, partition, m.offset(), m.key(), m.value(), None,
                                ("invalid_header", f"a header key is not UTF-8: {type(exc).__name__}: "
                                                   f"{exc.__cause__ or exc}"[:300]))
            out.append(record)
        return out

    def _settled(self) -> bool:
        return True  # rebalances happen inside consume(), never between two calls

    def _seek_committed(self, partitions: set[TopicPartition]) -> None:
        try:
            found = self._c.committed([_ck(tp) for tp in partitions], timeout=METADATA_TIMEOUT_S)
            for p in found:
                self._c.seek(ck.TopicPartition(p.topic, p.partition, p.offset if p.offset >= 0 else ck.OFFSET_BEGINNING))
        except ck.KafkaException as exc:
            raise _error(exc, i.Unavailable) from exc

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        tps = set(partitions)
        self._c.pause([_ck(tp) for tp in tps])
        self._paused |= tps

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        tps = set(partitions)
        self._c.resume([_ck(tp) for tp in tps])
        self._paused -= tps

    # ---- offsets ---------------------------------------------------------------------------------------
    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            result = self._c.commit(offsets=[_ck(tp, o) for tp, o in offsets.items()], asynchronous=False)
        except ck.KafkaException as exc:
            raise _error(exc) from exc
        failed = [p for p in result or () if p.error is not None]
        if failed:
            raise i.ClientError(f"commit refused for {len(failed)} partitions: {failed[0].error}"[:300])

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        found = self._c.committed([_ck(tp) for tp in partitions], timeout=METADATA_TIMEOUT_S)
        return {TopicPartition(p.topic, p.partition): (p.offset if p.offset >= 0 else None) for p in found}

    def watermarks(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """As the last fetch response gave them (no request), else asked for: a request waits behind the
        connection's fetch long-poll (fetch.wait.max.ms), and the lag gauge's requests every 10 s stalled
        the loop for seconds."""
        out = {}
        for tp in partitions:
            low, high = self._c.get_watermark_offsets(_ck(tp), cached=True)
            if low < 0 or high < 0:
                low, high = self._c.get_watermark_offsets(_ck(tp), timeout=METADATA_TIMEOUT_S)
            out[tp] = (low, high)
        return out

    def partitions_for(self, topic: str) -> set[int] | None:
        return _partitions(self._c, topic)

    def group_metadata(self):
        return self._c.consumer_group_metadata()

    def close(self) -> None:
        # librdkafka's close revokes the assignment through the callbacks; the worker has finished and
        # committed by now
        self._listener = None
        self._c.close()  # leaves the group at once (no session timeout for the others to wait out)


def _partitions(client, topic: str) -> set[int] | None:
    meta = client.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None:
        return None
    return set(meta.partitions)


class DeliveryFailed(i.ClientError):
    """A record the broker did not acknowledge (librdkafka gave up: delivery timeout, fatal error)."""


class _Report:
    """librdkafka's delivery callback for one send: the worker's callback with its arguments, then None or the
    error. A slotted object rather than a closure: the wrapper's cost per send is ~1 us beside librdkafka's."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., None], args: tuple):
        self.fn, self.args = fn, args

    def __call__(self, error, _message) -> None:
        self.fn(*self.args, None if error is None else DeliveryFailed(f"{error.name()}: {error.str()}"[:500]))


class Producer:
    """confluent-kafka's producer as the interface's. Delivery callbacks run inside send/serve/flush."""

    # commits between forced ones take the acks that have come in without waiting for the rest: a flush
    # every commit_every messages stalls the loop for a round trip each time. The
    # price, at-least-once only: a crash re-delivers also what was unacknowledged at the last commit (at most
    # one commit's worth: worker/loop.py _acknowledged flushes when the broker falls a commit behind).
    lazy_commits = True
    delivery_timeout_s = 300.0  # librdkafka's message.timeout.ms default

    def __init__(self, settings: KafkaSettings, *, transactional_id: str | None = None,
                 transaction_timeout_ms: int = 60_000):
        conf = {
            **_common(settings),
            "acks": "all",
            "enable.idempotence": True,  # per-partition order and no duplicates across retries
            "linger.ms": 5,
            "compression.type": "none",
            "error_cb": self._on_error,
        }
        if transactional_id is not None:
            conf.update({"transactional.id": transactional_id, "transaction.timeout.ms": transaction_timeout_ms,
                         # a request may not outlive the transaction it belongs to
                         "socket.timeout.ms": min(settings.request_timeout_ms, transaction_timeout_ms - 100)})
        self._p = ck.Producer(conf)
        self._fatal: ck.KafkaError | None = None
        self._sends = 0

    def _on_error(self, error: ck.KafkaError) -> None:
        if error.fatal():  # fenced, not authorised: every later call fails with it
            self._fatal = error

    def send(self, topic: str, partition: int, value, key, headers, on_delivery, *args) -> None:
        report = _Report(on_delivery, args)
        while True:
            try:
                if headers:
                    self._p.produce(topic, value, key, partition, report, headers=headers)
                else:
                    self._p.produce(topic, value, key, partition, report)
                break
            except BufferError:  # the local queue is full: let librdkafka send, then try again
                self._reporting(self._p.poll, 0.05)
            except (ck.KafkaException, ValueError, TypeError) as exc:
                raise _error(exc, i.SendRefused) from exc
        self._sends += 1
        if not self._sends % POLL_PRODUCER_EVERY:
            self._reporting(self._p.poll, 0)

    def serve(self) -> None:
        self._reporting(self._p.poll, 0)

    def flush(self, timeout_s: float | None) -> None:
        left = self._reporting(self._p.flush, -1 if timeout_s is None else timeout_s)
        if left:
            raise i.FlushTimeout(f"{left} records not delivered within {timeout_s} s")

    def partitions_for(self, topic: str) -> set[int] | None:
        return _partitions(self._p, topic)

    def _reporting(self, call: Callable[[float], int], timeout: float) -> int:
        """poll or flush, which run the callbacks. A fatal error (fenced) raises from inside them, and the
        exception it leaves set makes the next C call of a callback a SystemError: either is the error."""
        try:
            return call(timeout)
        except Exception as exc:  # noqa: BLE001 - SystemError or AttributeError from a callback run with it set
            cause = exc if isinstance(exc, ck.KafkaException) else exc.__cause__
            if isinstance(cause, ck.KafkaException):
                raise _error(cause) from exc
            if self._fatal is not None:
                raise _error(ck.KafkaException(self._fatal), i.FatalError) from exc
            raise

    # ---- transactions ----------------------------------------------------------------------------------
    def init_transactions(self, timeout_s: float) -> None:
        self._call(self._p.init_transactions, timeout_s, "init_transactions", i.Unavailable)

    def begin_transaction(self) -> None:
        try:
            self._p.begin_transaction()
        except ck.KafkaException as exc:
            raise _error(exc, i.SendRefused) from exc

    def send_offsets(self, offsets: Mapping[TopicPartition, int], consumer: Consumer, timeout_s: float) -> None:
        # the consumer's group metadata (generation, member id): the coordinator refuses a stale member's
        # offsets (KIP-447), so a worker that lost its partitions cannot commit over the new owner's work
        group = consumer.group_metadata()
        listed = [_ck(tp, o) for tp, o in offsets.items()]
        self._call(lambda t: self._p.send_offsets_to_transaction(listed, group, t), timeout_s,
                   "send_offsets_to_transaction")

    def commit_transaction(self, timeout_s: float) -> None:
        self._call(self._p.commit_transaction, timeout_s, "commit_transaction")

    def abort_transaction(self, timeout_s: float) -> None:
        self._call(self._p.abort_transaction, timeout_s, "abort_transaction")

    def _call(self, call: Callable[[float], Any], timeout_s: float, what: str,
              otherwise: type[i.ClientError] = i.TransactionAbortable) -> None:
        """``call(timeout)`` until it succeeds or ``timeout_s`` has passed; a retriable error (a timeout, the
        coordinator moving) means calling it again, by librdkafka's transactional API's rules."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                self._bounded(call, max(left, 0.1), what)
                return
            except ck.KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, ck.KafkaError) and (err.fatal() or err.code() in _FENCED):
                    raise _error(exc) from exc
                if isinstance(err, ck.KafkaError) and err.code() in _UNSUPPORTED:
                    raise _error(exc) from exc
                retriable = isinstance(err, ck.KafkaError) and err.retriable() and not err.txn_requires_abort()
                if not retriable:
                    raise _error(exc, otherwise) from exc
                if time.monotonic() >= deadline:
                    if otherwise is i.TransactionAbortable:
                        raise i.TransactionTimeout(f"{what} did not complete within {timeout_s:.0f} s: "
                                                   f"{err.name()}") from exc
                    raise _error(exc, otherwise) from exc
                time.sleep(RETRY_BACKOFF_S)  # a retriable error can come back at once (no coordinator yet)

    @staticmethod
    def _bounded(call: Callable[[float], Any], timeout_s: float, what: str) -> None:
        """``call(timeout_s)`` on a helper thread, waited for at most ``timeout_s + CALL_MARGIN_S``: a call
        that does not return by then raises TransactionTimeout and is left behind (a daemon thread holding
        the old handle; the producer that replaces this one fences it)."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call(timeout_s)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.append(exc)

        helper = threading.Thread(target=run, name=f"librdkafka-{what}", daemon=True)
        helper.start()
        helper.join(timeout_s + CALL_MARGIN_S)
        if not outcome:
            raise i.TransactionTimeout(f"{what} did not return within {timeout_s + CALL_MARGIN_S:.0f} s "
                                       "(librdkafka's wait has no limit of its own)")
        if outcome[0] is not None:
            raise outcome[0]

    def fatal_error(self) -> i.FatalError | None:
        self._p.poll(0)  # runs error_cb for what has arrived
        if self._fatal is None:
            return None
        error = _error(ck.KafkaException(self._fatal), i.FatalError)
        return error if isinstance(error, i.FatalError) else i.FatalError(str(error))

    def close(self, timeout_s: float) -> None:
        if self._p is not None:
            try:
                self._p.flush(timeout_s)  # what is left is re-delivered after a restart
            except Exception:  # noqa: BLE001 - a fatal error (fenced) raises from inside flush's callbacks;
                pass           # nothing more can be sent then, and the open transaction is aborted anyway
            self._p = None  # librdkafka's handle (and its threads) go with the last reference
