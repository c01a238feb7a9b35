"""The worker's Kafka clients on librdkafka (confluent-kafka), behind the part of kafka-python's interface the
worker uses: ``BERT_STREAM_KAFKA_CLIENT=confluent-kafka``. kafka-python stays the default and the design's
client; this one exists because kafka-python is the wall of a worker that feeds a GPU: consuming and
producing alone cost it ~50-90 us a message in Python, librdkafka ~4 (bench/RESULTS.md, ceiling: client floor).

The interface (what :mod:`worker.run` and :mod:`worker.delivery` call), as kafka-python defines it:

- consumer: ``subscribe(topics, listener)`` with kafka-python's rebalance listener (its async methods are run
  to completion here, on the thread that polls: librdkafka calls rebalance callbacks from inside ``poll``),
  ``poll(timeout_ms, max_records) -> {TopicPartition: [records]}`` (records with ``topic``, ``partition``,
  ``offset``, ``key``, ``value``, ``headers``), ``assignment``, ``pause``/``resume``/``paused``, ``seek``,
  ``seek_to_beginning``, ``committed``, ``commit``/``commit_async``, ``end_offsets``, ``beginning_offsets``,
  ``partitions_for_topic``, ``topics``, ``close``; partitions are kafka-python ``TopicPartition`` tuples;
- producer: ``send(...) -> future`` with ``add_callback``/``add_errback``/``add_both`` (called from ``flush``/``send``/
  ``poll`` on the caller's thread, never from another one), ``poll(timeout)`` (kafka-python has none: its
  I/O thread runs the callbacks), ``flush(timeout)`` (raises ``KafkaTimeoutError`` when
  records are left), ``partitions_for``, ``close``.

Semantics kept: no auto-commit, ``auto.offset.reset=earliest``, the eager rebalance protocol (everything is
revoked, committed and re-assigned, as with kafka-python), acks from all in-sync replicas, and per-partition
order (the idempotent producer: no reordering or duplicates across retries). Exactly-once stays on kafka-python
for now (its transactional path is kafka-python's): asking for it with this client is a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError

from bert_stream.kafka import KafkaSettings, Record
from bert_stream.logs import get_logger, register_secrets

log = get_logger("bert_stream.confluent")

METADATA_TIMEOUT_S = 10.0
POLL_PRODUCER_EVERY = 512  # sends between two producer polls (serves delivery reports, frees the queue)


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


def _run(coroutine) -> None:
    """Run a rebalance listener's coroutine to its end; it may only await calls that complete at once (this
    client's ``commit_async`` does)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a rebalance listener awaited something that does not complete synchronously")


class Consumer:
    def __init__(self, settings: KafkaSettings, group_id: str, **overrides: Any):
        import confluent_kafka

        self._ck = confluent_kafka
        unsupported = set(overrides) - {"isolation_level"}
        if unsupported:
            raise ValueError(f"confluent-kafka consumer: unsupported settings {sorted(unsupported)}")
        conf = {
            **_common(settings),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": max(300, settings.session_timeout_ms // 4),
            "max.poll.interval.ms": settings.max_poll_interval_ms,
            "partition.assignment.strategy": "range",  # eager, as the worker's kafka-python consumer
            "isolation.level": overrides.get("isolation_level", "read_uncommitted"),
        }
        self._c = confluent_kafka.Consumer(conf)
        self._listener = None
        self._assignment: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._tps: dict[tuple[str, int], TopicPartition] = {}

    # ---- group membership ----------------------------------------------------------------------------
    def subscribe(self, topics: Iterable[str], listener=None) -> None:
        self._listener = listener
        self._c.subscribe(list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                          on_lost=self._on_lost)

    def unsubscribe(self) -> None:
        self._c.unsubscribe()

    def _tp(self, topic: str, partition: int) -> TopicPartition:
        tp = self._tps.get((topic, partition))
        if tp is None:
            tp = self._tps[(topic, partition)] = TopicPartition(topic, partition)
        return tp

    def _on_assign(self, _consumer, partitions) -> None:
        tps = {self._tp(p.topic, p.partition) for p in partitions}
        self._assignment, self._paused = tps, set()
        if self._listener is not None:
            _run(self._listener.on_partitions_assigned(tps))
        # every partition starts at the group's committed offset (what the worker asks of any client)
        self._c.assign([self._ck.TopicPartition(tp.topic, tp.partition, self._ck.OFFSET_STORED) for tp in tps])

    def _on_revoke(self, _consumer, partitions) -> None:
        self._release(partitions, "on_partitions_revoked")

    def _on_lost(self, _consumer, partitions) -> None:
        self._release(partitions, "on_partitions_lost")

    def _release(self, partitions, listener_method: str) -> None:
        """Tell the listener (revoked, or lost), then give the whole assignment up (eager protocol)."""
        tps = {self._tp(p.topic, p.partition) for p in partitions}
        if self._listener is not None:
            _run(getattr(self._listener, listener_method)(tps))
        self._assignment, self._paused = set(), set()
        self._c.unassign()

    # ---- fetching ------------------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        """What has arrived, up to ``max_records``; waits up to ``timeout_ms`` only while nothing has (as
        kafka-python's poll: librdkafka's ``consume`` waits for all ``num_messages`` or the timeout)."""
        limit = max_records or 500
        messages = self._c.consume(num_messages=limit, timeout=0)
        if not messages and timeout_ms > 0:
            messages = self._c.consume(num_messages=1, timeout=timeout_ms / 1000)
            if messages and limit > 1:
                messages += self._c.consume(num_messages=limit - 1, timeout=0)
        out: dict[TopicPartition, list[Record]] = {}
        tps = self._tps
        for m in messages:
            error = m.error()
            if error is not None:
                if error.fatal():
                    raise self._ck.KafkaException(error)
                log.warning("consumer_error", error=str(error)[:300])  # transient: librdkafka retries itself
                continue
            topic, partition = m.topic(), m.partition()
            tp = tps.get((topic, partition)) or self._tp(topic, partition)
            records = out.get(tp)
            if records is None:
                records = out[tp] = []
            try:
                # for a header key that is not UTF-8, headers() returns with a UnicodeDecodeError still set,
                # which the next C-level call raises as a SystemError: the record is built in this try
                record = Record(topic, partition, m.offset(), m.key(), m.value(), m.headers())
            except (UnicodeDecodeError, SystemError) as exc:
                # a dead letter for this record alone (value and key kept; the headers cannot be had)
                # instead of failing the whole poll
                record = Record(topic, partition, m.offset(), m.key(), m.value(), None,
                                ("invalid_header", f"a header key is not UTF-8: {type(exc).__name__}: "
                                                   f"{exc.__cause__ or exc}"[:300]))
            records.append(record)
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps: TopicPartition) -> None:
        self._c.pause([self._ck.TopicPartition(tp.topic, tp.partition) for tp in tps])
        self._paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._c.resume([self._ck.TopicPartition(tp.topic, tp.partition) for tp in tps])
        self._paused -= set(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._c.seek(self._ck.TopicPartition(tp.topic, tp.partition, offset))

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps or self._assignment:
            self.seek(tp, self._ck.OFFSET_BEGINNING)

    # ---- offsets ---------------------------------------------------------------------------------------
    def commit(self, offsets: dict | None = None) -> None:
        """Commit ``{TopicPartition: OffsetAndMetadata or int}`` synchronously (raises on failure)."""
        self._c.commit(offsets=[self._ck.TopicPartition(tp.topic, tp.partition, getattr(o, "offset", o))
                                for tp, o in (offsets or {}).items()], asynchronous=False)

    async def commit_async(self, offsets: dict | None = None) -> None:
        """For the rebalance listener: librdkafka allows a synchronous commit inside its callbacks."""
        self.commit(offsets)

    def committed(self, tp: TopicPartition) -> int | None:
        [result] = self._c.committed([self._ck.TopicPartition(tp.topic, tp.partition)], timeout=METADATA_TIMEOUT_S)
        return result.offset if result.offset >= 0 else None

    def end_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._watermarks(tp)[1] for tp in tps}

    def beginning_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._watermarks(tp)[0] for tp in tps}

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """(log start, end) of a partition: as the last fetch response gave them (no request), else asked
        for. A request waits behind the connection's fetch long-poll (fetch.wait.max.ms): the lag gauge's
        eight of them every 10 s stalled the worker's loop for seconds."""
        ctp = self._ck.TopicPartition(tp.topic, tp.partition)
        low, high = self._c.get_watermark_offsets(ctp, cached=True)
        if low < 0 or high < 0:
            low, high = self._c.get_watermark_offsets(ctp, timeout=METADATA_TIMEOUT_S)
        return low, high

    # ---- metadata and lifecycle --------------------------------------------------------------------------
    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return _partitions(self._c, topic)

    def topics(self) -> set[str]:
        return set(self._c.list_topics(timeout=METADATA_TIMEOUT_S).topics)

    def group_metadata(self):
        return self._c.consumer_group_metadata()

    def close(self, autocommit: bool = False) -> None:
        # librdkafka's close revokes the assignment through the callbacks; the caller has finished and
        # committed by now (kafka-python's close does not call the listener either)
        self._listener = None
        self._c.close()  # leaves the group at once (no session timeout for the others to wait out)


def _partitions(client, topic: str) -> set[int] | None:
    meta = client.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None:
        return None
    return set(meta.partitions)


class _Future:
    """kafka-python's future, as the worker uses it: callbacks for the delivery report, called with the extra
    arguments given, then the record's metadata (``add_callback``) or the exception (``add_errback``). It is
    itself librdkafka's delivery callback. The common case, one ``add_both``, stores no list: the wrapper's
    cost per send was 3-5 us beside librdkafka's ~1."""

    __slots__ = ("_both", "_callbacks", "_errbacks")

    def __init__(self):
        self._both = None
        self._callbacks = self._errbacks = ()

    def add_callback(self, fn, *args) -> _Future:
        self._callbacks += ((fn, args),)
        return self

    def add_errback(self, fn, *args) -> _Future:
        self._errbacks += ((fn, args),)
        return self

    def add_both(self, fn, *args) -> _Future:
        if self._both is None:
            self._both = (fn, args)
        else:
            self._callbacks += ((fn, args),)
            self._errbacks += ((fn, args),)
        return self

    def __call__(self, error, message) -> None:  # librdkafka's on_delivery
        result = message if error is None else DeliveryFailed(str(error))
        if self._both is not None:
            fn, args = self._both
            fn(*args, result)
        for fn, args in (self._callbacks if error is None else self._errbacks):
            fn(*args, result)


class DeliveryFailed(Exception):
    """A record the broker did not acknowledge (librdkafka gave up: delivery timeout, fatal error)."""


class Producer:
    def __init__(self, settings: KafkaSettings, **overrides: Any):
        import confluent_kafka

        if overrides:
            raise ValueError(f"confluent-kafka producer: unsupported settings {sorted(overrides)}")
        self._p = confluent_kafka.Producer({
            **_common(settings),
            "acks": "all",
            "enable.idempotence": True,  # per-partition order and no duplicates across retries
            "linger.ms": 5,
            "compression.type": "none",
        })
        self._sends = 0

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers=None,
             partition: int | None = None) -> _Future:
        future = _Future()
        partition = -1 if partition is None else partition  # -1: librdkafka's partitioner decides
        while True:
            try:
                if headers:
                    self._p.produce(topic, value, key, partition, future, headers=headers)
                else:
                    self._p.produce(topic, value, key, partition, future)
                break
            except BufferError:  # the local queue is full: let librdkafka send, then try again
                self._p.poll(0.05)
        self._sends += 1
        if not self._sends % POLL_PRODUCER_EVERY:
            self._p.poll(0)
        return future

    def poll(self, timeout: float = 0) -> None:
        """Run the delivery reports that have arrived (their callbacks), waiting up to ``timeout`` s for one."""
        self._p.poll(timeout)

    def flush(self, timeout: float | None = None) -> None:
        left = self._p.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records not delivered within {timeout} s")

    def partitions_for(self, topic: str) -> set[int] | None:
        return _partitions(self._p, topic)

    def close(self, timeout: float | None = None) -> None:
        if self._p is not None:
            self._p.flush(5.0 if timeout is None else timeout)  # what is left is re-delivered after a restart
            self._p = None  # librdkafka's handle (and its threads) go with the last reference
