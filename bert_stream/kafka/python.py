"""The kafka-python adapter (the default client), and the kafka-python tools every other part uses.

Tools: :func:`make_consumer`, :func:`make_producer`, :func:`make_admin`, :func:`ensure_topics`, :func:`unwritable`
(publish/tail CLIs, the trainer, tests and benchmarks use kafka-python directly).

The adapter (:class:`Consumer`, :class:`Producer`) gives the worker :mod:`bert_stream.kafka.interface`. What it
works around in kafka-python 3.0.12, each where it is done:
- a record it cannot parse raises from ``poll()`` at the same position forever (:func:`_consumer_class`);
- a header key that is not UTF-8 takes its whole batch with it (:func:`_lenient_header_keys`);
- a group join that completes between two short polls is dropped (:data:`JOIN_POLL_TIMEOUT_MS`);
- a partition given back by a later generation resumes from a stale fetch position (``_assigned``);
- an empty SyncGroup assignment cannot be decoded (``_rejoin``);
- the rebalance listener runs on the I/O thread, where a blocking commit is refused (:class:`_Listener`);
- transactional calls and ``close`` wait without a limit (:meth:`Producer._wait`, :func:`close_producer`).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

import kafka
from kafka import errors as kerrors
from kafka.structs import OffsetAndMetadata

from bert_stream.kafka import interface as i
from bert_stream.kafka.config import KafkaSettings
from bert_stream.kafka.interface import Record, TopicPartition
from bert_stream.logs import get_logger

log = get_logger("bert_stream.kafka")

UNKNOWN_TOPIC = kerrors.UnknownTopicOrPartitionError.errno

# kafka-python loses a finished group join when polls are short and spaced (the next poll sends a fresh
# JoinGroup, and the partitions the lost join gave stay unowned): from a revocation (or the start) until an
# assignment, polls wait at least this long.
JOIN_POLL_TIMEOUT_MS = 1000
MAX_REJOINS = 3  # undecodable assignments in a row before the adapter gives up (see Consumer._rejoin)


def make_consumer(settings: KafkaSettings, group_id: str | None, *topics: str, **overrides: Any):
    """A consumer that never auto-commits (the caller commits what it has published), and whose ``poll``
    never raises for one record it cannot parse (:class:`_Consumer`)."""
    config = {
        **settings.client_config(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": max(300, settings.session_timeout_ms // 4),
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        # request_timeout must exceed the session timeout for the JoinGroup request
        "request_timeout_ms": max(settings.request_timeout_ms, settings.session_timeout_ms + 5000),
        **overrides,
    }
    return _consumer_class()(*topics, **config)


_CONSUMER_CLASS = None


def _consumer_class():
    """kafka-python's KafkaConsumer, with a poll that skips a record it cannot parse (made once: the
    subclass needs kafka imported)."""
    global _CONSUMER_CLASS
    if _CONSUMER_CLASS is not None:
        return _CONSUMER_CLASS
    from kafka import KafkaConsumer

    errors = kerrors
    _lenient_header_keys()

    class _Consumer(KafkaConsumer):
        """``poll`` turns an error about one record (CRC, codec, corrupt framing) into an
        unreadable :class:`Record` at the partition's position and moves past it. kafka-python raises those
        from ``poll()`` after the records before it, and raises again at the same position forever: one
        such record would stop its partition, and the worker on every restart."""

        def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
            try:
                return super().poll(timeout_ms=timeout_ms, max_records=max_records, update_offsets=update_offsets)
            except (errors.CorruptRecordError, errors.UnsupportedCodecError, UnicodeDecodeError) as exc:
                failing = self._fetcher._next_partition_records  # the records whose parse raised
                if failing is None:
                    raise
                tp = failing.topic_partition
                offset = self.position(tp)
                self.seek(tp, offset + 1)  # also drops the fetcher's dead iterator (its offset is now stale)
                return {tp: [Record(tp.topic, tp.partition, offset, None, None, None,
                                    ("unreadable_record", f"{type(exc).__name__}: {exc}"[:500]))]}

    _CONSUMER_CLASS = _Consumer
    return _Consumer


class UndecodableKey(str):
    """A header key that is not UTF-8: its text is the bytes with backslash escapes (valid UTF-8, so any
    producer can copy it into a dead letter), ``raw`` the bytes themselves. The worker's decode rejects a
    record with one as ``invalid_header``."""

    raw: bytes

    def __new__(cls, raw: bytes) -> UndecodableKey:
        key = super().__new__(cls, raw.decode("utf-8", "backslashreplace"))
        key.raw = raw
        return key


def _lenient_header_keys() -> None:
    """kafka-python decodes header keys as strict UTF-8 while it parses a fetched batch, inside ``poll()``:
    one key that is not UTF-8 raises there, and takes every later record of its batch with it. A record
    that fails so is parsed again here with such a key as an :class:`UndecodableKey`."""
    from kafka.record import default_records as dr

    original = dr.DefaultRecordBatch._read_msg
    if getattr(original, "lenient", False):
        return

    def _read_msg(self, decode_varint=dr.decode_varint):
        try:
            return original(self, decode_varint)
        except UnicodeDecodeError:
            return _read_msg_escaping_keys(self, decode_varint)

    _read_msg.lenient = True
    dr.DefaultRecordBatch._read_msg = _read_msg


def _read_msg_escaping_keys(batch, decode_varint):
    """kafka-python 3.0's ``DefaultRecordBatch._read_msg`` (the v2 record format), with a header key that is
    not UTF-8 kept as an :class:`UndecodableKey`; only called for a record whose strict parse failed."""
    from kafka.record.default_records import DefaultRecord
    from kafka.errors import CorruptRecordError

    buffer, pos = batch._buffer, batch._pos
    length, pos = decode_varint(buffer, pos)
    start = pos
    _attributes, pos = decode_varint(buffer, pos)
    ts_delta, pos = decode_varint(buffer, pos)
    timestamp = batch.max_timestamp if batch.timestamp_type == batch.LOG_APPEND_TIME else batch.first_timestamp + ts_delta
    offset_delta, pos = decode_varint(buffer, pos)
    fields = []
    for _ in range(2):  # key, value
        size, pos = decode_varint(buffer, pos)
        fields.append(bytes(buffer[pos:pos + size]) if size >= 0 else None)
        pos += max(size, 0)
    count, pos = decode_varint(buffer, pos)
    headers = []
    for _ in range(max(count, 0)):
        size, pos = decode_varint(buffer, pos)
        raw = bytes(buffer[pos:pos + size])
        try:
            h_key = raw.decode("utf-8")
        except UnicodeDecodeError:
            h_key = UndecodableKey(raw)
        pos += size
        size, pos = decode_varint(buffer, pos)
        headers.append((h_key, bytes(buffer[pos:pos + size]) if size >= 0 else None))
        pos += max(size, 0)
    if pos - start != length:
        raise CorruptRecordError(f"Invalid record size: expected {length} bytes, read {pos - start}")
    batch._pos = pos
    return DefaultRecord(length, batch.base_offset + offset_delta, timestamp, batch.timestamp_type, *fields, headers)


def make_producer(settings: KafkaSettings, **overrides: Any):
    """A producer that waits for all in-sync replicas and retries: outputs are acknowledged before the
    input offsets that produced them are committed."""
    from kafka import KafkaProducer

    config = {
        **settings.client_config(),
        "acks": "all",
        "retries": 10,
        "linger_ms": 5,
        # batch_size stays at kafka-python's 16 KiB: a request that fails across a broker restart takes its
        # whole batch with it, so larger batches widen the duplicates at-least-once replays
        # (tests/fault/test_outages.py::test_broker_restart_mid_stream bounds them)
        "max_in_flight_requests_per_connection": 1,  # keeps per-partition order across retries
        **overrides,
    }
    return KafkaProducer(**config)


def close_producer(producer, timeout_s: float) -> None:
    """Close ``producer`` within about ``timeout_s``, for sure. kafka-python 3.0.12's ``close(timeout)``
    raises when its flush times out and then never stops the sender thread; what is still unsent is
    aborted here instead (its futures fail), as close() itself does once its flush returns."""
    from kafka.errors import KafkaTimeoutError

    try:
        producer.close(timeout=timeout_s)
    except KafkaTimeoutError:
        producer._sender.force_close()  # the sender thread aborts the incomplete batches as it stops
        producer._sender.join(max(timeout_s, 1.0))
        try:
            producer.close(timeout=0)
        except KafkaTimeoutError:
            pass  # the sender did not stop in time: it is a daemon thread, and a fenced one if transactional


def make_admin(settings: KafkaSettings, **overrides: Any):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**{**settings.client_config(), **overrides})


def ensure_topics(settings: KafkaSettings, topics: dict[str, int], replication_factor: int = -1,
                  configs: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Create the topics that do not exist yet (name -> partitions), with ``configs[name]`` as their topic
    configs (``cleanup.policy=compact``, say). Existing topics are left alone. The
    replication factor -1 is the broker's ``default.replication.factor`` (KIP-464): 1 on a one-node local
    broker, what the operators chose on a cluster, where acks=all output then survives a broker's loss."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(name, num_partitions=parts, replication_factor=replication_factor,
                     topic_configs=dict((configs or {}).get(name, {})))
            for name, parts in topics.items()
            if name not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
            _await_metadata(admin, [t.name for t in new])
    finally:
        admin.close()


def _await_metadata(admin, names: list[str], timeout_s: float = 10.0) -> None:
    """Until every broker answering metadata knows the new topics: the controller accepts a creation before
    the brokers' metadata has it, and a describe or produce in that window reads it as missing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(meta.get("error_code") != UNKNOWN_TOPIC for meta in admin.describe_topics(names)):
                return
        except Exception:  # noqa: BLE001 - the caller's next step reports what is wrong
            return
        time.sleep(0.05)


def unwritable(settings: KafkaSettings, topics: list[str]) -> dict[str, str]:
    """Why each of ``topics`` that cannot be written cannot (it does not exist, or this client is not
    authorised to write it, as the broker's authoriser reports through Metadata); the writable ones are
    left out. One metadata request for all of them."""
    from kafka.errors import for_code

    admin = make_admin(settings)
    try:
        described = admin.describe_topics(list(topics))
    except Exception as exc:  # noqa: BLE001 - e.g. authorisation refused for the whole request
        return dict.fromkeys(topics, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        admin.close()
    problems = {}
    for meta in described:
        allowed = meta.get("authorized_operations")
        if meta.get("error_code"):
            problems[meta["name"]] = for_code(meta["error_code"]).__name__
        elif allowed and "WRITE" not in allowed and "ALL" not in allowed:
            problems[meta["name"]] = f"not authorised to write (allowed: {', '.join(allowed)})"
    return problems


# ---- the adapter ---------------------------------------------------------------------------------------------
def _ktp(tp) -> kafka.TopicPartition:
    return tp if isinstance(tp, kafka.TopicPartition) else kafka.TopicPartition(tp.topic, tp.partition)


def _request(offsets: Mapping) -> dict:
    return {_ktp(tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}


def _error(exc: BaseException, cls: type[i.ClientError] = i.ClientError) -> i.ClientError:
    """The interface's error for a kafka-python exception (one line, the original as its cause)."""
    if isinstance(exc, i.ClientError):
        return exc
    if isinstance(exc, kerrors.ProducerFencedError):
        cls = i.Fenced
    elif isinstance(exc, (kerrors.TransactionalIdAuthorizationFailedError, kerrors.AuthorizationError)):
        cls = i.FatalError
    elif isinstance(exc, (kerrors.UnsupportedVersionError, kerrors.IncompatibleBrokerVersion)):
        cls = i.Unsupported
    elif isinstance(exc, (kerrors.KafkaConnectionError, kerrors.NodeNotReadyError, kerrors.BrokerNotAvailableError)):
        cls = i.Unavailable
    error = cls(f"{type(exc).__name__}: {exc}"[:1000])
    error.__cause__ = exc
    return error


class Consumer(i.Consumer):
    """kafka-python's consumer as :class:`bert_stream.kafka.interface.Consumer`. kafka-python's TopicPartition is
    a named tuple equal to the interface's, so its assignment is returned as it is (no copy per poll)."""

    def __init__(self, settings: KafkaSettings, group_id: str, *, read_committed: bool = False):
        super().__init__()
        if settings.group_protocol != "classic":
            raise i.Unsupported("kafka-python speaks only the classic group protocol (KAFKA_GROUP_PROTOCOL=classic)")
        # read_committed skips aborted records of transactional producers upstream, and fetches committed
        # offsets only once no transaction holds pending offsets for them (require_stable: KIP-447)
        self._c = make_consumer(settings, group_id,
                                isolation_level="read_committed" if read_committed else "read_uncommitted")
        self._topic = ""
        self._listener: i.GroupListener | None = None
        self._joining = True   # from a revocation (or the start) to the next assignment: a join in flight
        self._rejoins = 0      # undecodable assignments since the last good one

    def subscribe(self, topic: str, listener: i.GroupListener) -> None:
        self._topic, self._listener, self._joining = topic, listener, True
        self._c.subscribe([topic], listener=_Listener(self, listener))
        # One metadata round trip now, so the coordinator's snapshot of the subscribed topic's partitions is
        # taken before the join: without it kafka-python joins with an empty snapshot and rebalances again at
        # once (on Apache Kafka: a revoke ~0.1-0.5 s after every first assignment, once a join lost for good).
        self._c.topics()

    def _poll(self, timeout_s: float, max_records: int) -> list:
        timeout_ms = int(timeout_s * 1000)
        if self._joining or not self._c.assignment():
            # an eager rebalance keeps the old assignment until the join completes: assignment() alone does
            # not tell whether one is in flight
            timeout_ms = max(timeout_ms, JOIN_POLL_TIMEOUT_MS)
        try:
            polled = self._c.poll(timeout_ms=timeout_ms, max_records=max_records)
        except struct.error as exc:  # a group assignment kafka-python cannot decode
            self._rejoin(exc)
            return []
        except kerrors.KafkaError as exc:
            raise _error(exc) from exc
        if len(polled) == 1:
            return next(iter(polled.values()))
        return [r for records in polled.values() for r in records]

    def _settled(self) -> bool:
        return not self._joining

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        """kafka-python keeps the fetch position of a partition that is in both its previous and its new
        assignment, and its previous assignment is not always the last generation's (a join that completes
        between two polls is dropped, and the next poll joins afresh): a partition can come back, a
        generation later, after another member processed and committed it. Every assigned partition is
        therefore rewound to the committed offset before its first record is returned (one OffsetFetch
        per partition and rebalance; without it a rebalance re-publishes, exactly-once included)."""
        self.forget_rewinds(partitions)
        self.rewind(partitions)
        self._joining, self._rejoins = False, 0

    def _rejoin(self, exc: struct.error) -> None:
        """A coordinator may end a rebalance with zero assignment bytes for a member the leader did not
        include; kafka-python cannot decode that, after it has marked itself a stable member, so it would own
        nothing until another member's rebalance. Leaving and rejoining starts a rebalance the leader sees it
        in. Still failing after MAX_REJOINS attempts is not that quirk: the worker exits 1 (it owns nothing)."""
        self._rejoins += 1
        log.warning("assignment_undecodable", error=f"struct.error: {exc}"[:300], attempt=self._rejoins,
                    action="leaving and rejoining the group" if self._rejoins <= MAX_REJOINS else "exiting")
        if self._rejoins > MAX_REJOINS:
            raise i.ClientError(f"the group's assignment could not be decoded {self._rejoins} times: {exc}")
        self._c.unsubscribe()
        self.subscribe(self._topic, self._listener)

    def _seek_committed(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            ktp = _ktp(tp)
            try:
                committed = self._c.committed(ktp)
            except kerrors.KafkaError as exc:
                raise _error(exc, i.Unavailable) from exc
            if committed is None:
                self._c.seek_to_beginning(ktp)
            else:
                self._c.seek(ktp, committed)

    def assignment(self) -> set:
        return self._c.assignment()

    def paused(self) -> set:
        return self._c.paused()

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self._c.pause(*map(_ktp, partitions))

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self._c.resume(*map(_ktp, partitions))

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            self._c.commit(_request(offsets))
        except kerrors.KafkaError as exc:
            raise _error(exc) from exc

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        return {tp: self._c.committed(_ktp(tp)) for tp in partitions}

    def watermarks(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        tps = [_ktp(tp) for tp in partitions]
        low, high = self._c.beginning_offsets(tps), self._c.end_offsets(tps)
        return {tp: (low[tp], high[tp]) for tp in tps}

    def partitions_for(self, topic: str) -> set[int] | None:
        return self._c.partitions_for_topic(topic)

    def group_metadata(self):
        return self._c.group_metadata()

    def close(self) -> None:
        self._c.close(autocommit=False)


class _Listener(kafka.AsyncConsumerRebalanceListener):
    """The worker's listener on kafka-python: its listeners run on the I/O thread (the polling thread waits
    inside poll meanwhile), where a blocking commit is refused, so the revocation commit is awaited here."""

    def __init__(self, consumer: Consumer, listener: i.GroupListener):
        self.consumer, self.listener = consumer, listener

    async def on_partitions_revoked(self, revoked):
        await self._release(revoked, lost=False)

    async def on_partitions_lost(self, lost):
        await self._release(lost, lost=True)

    async def on_partitions_assigned(self, assigned):
        partitions = {TopicPartition(tp.topic, tp.partition) for tp in assigned}
        self.consumer._assigned(partitions)
        self.listener.on_assigned(partitions)

    async def _release(self, partitions, lost: bool) -> None:
        self.consumer._joining = True  # a revocation opens a rebalance: the join follows in the next polls
        self.consumer._released()
        partitions = {TopicPartition(tp.topic, tp.partition) for tp in partitions}
        offsets = self.listener.on_revoking(partitions, lost)
        error = None
        if offsets:
            try:
                await self.consumer._c.commit_async(_request(offsets))
            except Exception as exc:  # noqa: BLE001 - membership already lost: the next owner re-reads
                error = _error(exc)
        self.listener.on_revoked(partitions, error)


def _report(on_delivery, args: tuple, result) -> None:
    on_delivery(*args, result if isinstance(result, BaseException) else None)


class Producer:
    """kafka-python's producer as the interface's. Delivery callbacks run on kafka-python's I/O thread."""

    # Each commit flushes: kafka-python's own Python, not the flush's round trip, is its ceiling, and a crash
    # then re-delivers at most what was published since the last commit (without the flush, a broker killed
    # mid-stream re-delivered more than commit_every + the batches in flight).
    lazy_commits = False
    delivery_timeout_s = 120.0  # kafka-python's delivery_timeout_ms default

    def __init__(self, settings: KafkaSettings, *, transactional_id: str | None = None,
                 transaction_timeout_ms: int = 60_000):
        overrides: dict[str, Any] = {}
        if transactional_id is not None:
            overrides = {"transactional_id": transactional_id, "enable_idempotence": True,
                         "transaction_timeout_ms": transaction_timeout_ms}
        try:
            self._p = make_producer(settings, **overrides)
        except kerrors.KafkaError as exc:
            raise _error(exc, i.Unavailable) from exc

    def send(self, topic: str, partition: int, value, key, headers, on_delivery, *args) -> None:
        try:
            future = self._p.send(topic, value=value, key=key, headers=headers, partition=partition)
        except (kerrors.KafkaError, ValueError) as exc:  # ValueError: a partition the topic no longer has
            raise _error(exc, i.SendRefused) from exc
        future.add_both(_report, on_delivery, args)  # one callback for both outcomes: no closure per send

    def serve(self) -> None:
        pass  # the I/O thread runs the delivery callbacks as the acks arrive

    def flush(self, timeout_s: float | None) -> None:
        try:
            self._p.flush(timeout=timeout_s)
        except kerrors.KafkaTimeoutError as exc:
            raise i.FlushTimeout(str(exc)) from exc

    def partitions_for(self, topic: str) -> set[int] | None:
        return self._p.partitions_for(topic)

    # -- transactions: kafka-python's own methods wait without a limit (seen forever after a broker restart);
    #    these call what they call, minus the wait, and wait at most timeout_s
    def init_transactions(self, timeout_s: float) -> None:
        try:
            self._p.init_transactions()  # bounded by max_block_ms
        except kerrors.KafkaError as exc:
            raise _error(exc, i.Unavailable if isinstance(exc, kerrors.KafkaTimeoutError) else i.ClientError) \
                from exc

    def begin_transaction(self) -> None:
        try:
            self._p.begin_transaction()
        except kerrors.KafkaError as exc:
            raise _error(exc, i.SendRefused) from exc

    def send_offsets(self, offsets: Mapping[TopicPartition, int], consumer: Consumer, timeout_s: float) -> None:
        group = consumer.group_metadata()  # generation and member id: KIP-447 fencing of stale members
        manager = self._p._transaction_manager
        self._wait(lambda: manager.send_offsets_to_transaction(_request(offsets), group), timeout_s,
                   "send_offsets_to_transaction")

    def commit_transaction(self, timeout_s: float) -> None:
        self._wait(self._p._transaction_manager.begin_commit, timeout_s, "commit_transaction")

    def abort_transaction(self, timeout_s: float) -> None:
        self._wait(self._p._transaction_manager.begin_abort, timeout_s, "abort_transaction")

    def fatal_error(self) -> i.FatalError | None:
        """The producer's fatal error (fenced, not authorised), if it has one. After the first, kafka-python
        raises a plain KafkaError ("in an error state") from every call: this tells what it was."""
        manager = self._p._transaction_manager
        if manager is not None and manager.has_fatal_error():
            last = manager.last_error  # an exception, or its class
            error = _error(last() if isinstance(last, type) else last, i.FatalError)
            return error if isinstance(error, i.FatalError) else i.FatalError(str(error))
        return None

    def _wait(self, begin, timeout_s: float, what: str) -> None:
        try:
            result = begin()
            self._p._sender.wakeup()
            done = result.wait(timeout_ms=timeout_s * 1000)
        except kerrors.KafkaError as exc:
            if (fatal := self.fatal_error()) is not None:
                raise fatal from exc
            raise _error(exc, i.TransactionAbortable) from exc
        if not done:
            raise i.TransactionTimeout(f"{what} did not complete within {timeout_s:.0f} s")

    def close(self, timeout_s: float) -> None:
        close_producer(self._p, timeout_s)
