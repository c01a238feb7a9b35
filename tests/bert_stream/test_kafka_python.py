"""Unit tests of the kafka-python adapter's workarounds (pure logic: a fake KafkaConsumer under the adapter,
no Kafka). What they pin is client behaviour the worker must never see: the integration side is every
worker and fault test, run on both clients."""

from __future__ import annotations

import asyncio
import struct

import pytest
from kafka import TopicPartition as KTP

from bert_stream.kafka import interface as i
from bert_stream.kafka import python
from bert_stream.kafka.interface import Record, TopicPartition

TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


class _KafkaConsumer:
    """kafka-python's KafkaConsumer as the adapter uses it. ``failures`` polls raise what kafka-python raises
    on a zero-byte group assignment; ``polled`` is what the next poll returns."""

    def __init__(self, failures: int = 0, committed=None):
        self.failures, self.calls, self.polled = failures, [], {}
        self._committed, self.seeks, self.assigned, self.timeouts = committed or {}, [], set(), []
        self.listener = None

    def assignment(self):
        return self.assigned

    def poll(self, timeout_ms, max_records):
        self.calls.append("poll")
        self.timeouts.append(timeout_ms)
        if self.failures:
            self.failures -= 1
            struct.unpack(">h", b"")  # the exact error: "unpack requires a buffer of 2 bytes"
        polled, self.polled = self.polled, {}
        return polled

    def unsubscribe(self):
        self.calls.append("unsubscribe")

    def subscribe(self, topics, listener):
        self.calls.append(("subscribe", tuple(topics)))
        self.listener = listener

    def topics(self):
        self.calls.append("topics")  # the metadata refresh that keeps the join from rebalancing again
        return {"in"}

    def committed(self, tp):
        assert isinstance(tp, KTP)  # kafka-python asserts its own type
        return self._committed.get(tp)

    def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    def seek_to_beginning(self, tp):
        self.seeks.append((tp, "beginning"))


class _Listener:
    def __init__(self):
        self.events = []

    def on_assigned(self, partitions):
        self.events.append(("assigned", partitions))

    def on_revoking(self, partitions, lost):
        self.events.append(("revoking", partitions, lost))
        return {}

    def on_revoked(self, partitions, error):
        self.events.append(("revoked", partitions, error))


def _adapter(fake: _KafkaConsumer) -> python.Consumer:
    consumer = python.Consumer.__new__(python.Consumer)
    i.Consumer.__init__(consumer)
    consumer._c, consumer._topic, consumer._listener, consumer._joining, consumer._rejoins = fake, "", None, True, 0
    consumer.subscribe("in", _Listener())
    fake.calls.clear()
    return consumer


def _assign(consumer: python.Consumer, fake: _KafkaConsumer, partitions) -> None:
    fake.assigned = {KTP(tp.topic, tp.partition) for tp in partitions}
    asyncio.run(fake.listener.on_partitions_assigned(fake.assigned))


def _record(partition: int, offset: int):
    return Record("in", partition, offset, None, b"v", [])


def test_an_undecodable_assignment_makes_the_consumer_rejoin_the_group():
    """A coordinator answers a member the group leader left out of its plan with zero assignment bytes;
    kafka-python cannot decode them and would own nothing until another member's rebalance."""
    fake = _KafkaConsumer(failures=1)
    consumer = _adapter(fake)
    assert consumer.poll(0, 10) == []
    assert fake.calls == ["poll", "unsubscribe", ("subscribe", ("in",)), "topics"]
    assert consumer.poll(0, 10) == [] and fake.calls[-1] == "poll"  # then it polls on as a member


def test_an_assignment_resets_the_count_and_a_persistent_failure_is_an_error():
    fake = _KafkaConsumer(failures=python.MAX_REJOINS)
    consumer = _adapter(fake)
    for _ in range(python.MAX_REJOINS):
        consumer.poll(0, 10)
    _assign(consumer, fake, set())  # a good (empty) assignment: the quirk passed
    fake.failures = python.MAX_REJOINS + 1
    for _ in range(python.MAX_REJOINS):
        consumer.poll(0, 10)
    with pytest.raises(i.ClientError, match="could not be decoded"):  # the worker exits 1 (worker_failed)
        consumer.poll(0, 10)
    assert fake.calls.count("unsubscribe") == 2 * python.MAX_REJOINS


def test_polls_wait_for_a_join_in_flight():
    """kafka-python drops a join that completes between two short polls: from a revocation to the next
    assignment, a poll waits at least JOIN_POLL_TIMEOUT_MS, whatever the worker asked."""
    fake = _KafkaConsumer()
    consumer = _adapter(fake)
    consumer.poll(0, 10)
    _assign(consumer, fake, {TP0})
    consumer.poll(0, 10)
    asyncio.run(fake.listener.on_partitions_revoked(fake.assigned))
    consumer.poll(0.005, 10)
    assert fake.timeouts == [python.JOIN_POLL_TIMEOUT_MS, 0, python.JOIN_POLL_TIMEOUT_MS]


def test_every_assigned_partition_starts_at_the_committed_offset():
    """kafka-python keeps the fetch position of a partition in both its previous and its new assignment, and
    drops a join that completes between two polls: a worker can get back, a generation later, a partition
    that another member processed and committed meanwhile. It must start at that commit, not at its own
    kept position (seen: 41 and 125 duplicates under exactly-once in a rebalance test)."""
    fake = _KafkaConsumer(committed={KTP("in", 0): 40})
    consumer = _adapter(fake)
    fake.polled = {KTP("in", 0): [_record(0, 7)]}
    assert [r.offset for r in consumer.poll(0, 10)] == [7] and fake.seeks == []  # no I/O of ours mid-join
    _assign(consumer, fake, {TP0, TP1})  # the assignment of a later generation: the same partitions
    fake.polled = {KTP("in", 0): [_record(0, 8)]}
    assert consumer.poll(0, 10) == []  # fetched from the kept position: dropped, read again from the commit
    assert sorted(fake.seeks, key=str) == sorted([(TP0, 40), (TP1, "beginning")], key=str)
    fake.polled = {KTP("in", 0): [_record(0, 40)]}
    assert [r.offset for r in consumer.poll(0, 10)] == [40]


def test_a_rewind_waits_until_the_rebalance_is_over_and_skips_what_was_fetched_before():
    fake = _KafkaConsumer(committed={KTP("in", 0): 2})
    consumer = _adapter(fake)
    _assign(consumer, fake, {TP0})
    consumer.poll(0, 10)  # the assignment's own rewind
    fake.seeks.clear()
    consumer.rewind({TP0})  # an aborted transaction
    asyncio.run(fake.listener.on_partitions_revoked(fake.assigned))  # a rebalance starts meanwhile
    fake.polled = {KTP("in", 0): [_record(0, 5)]}
    assert consumer.poll(0, 10) == [] and fake.seeks == []
    _assign(consumer, fake, {TP0})
    assert consumer.poll(0, 10) == [] and fake.seeks == [(TP0, 2)]


def test_the_revocation_commit_is_awaited_and_its_outcome_reported():
    committed = []

    class Listener(_Listener):
        def on_revoking(self, partitions, lost):
            super().on_revoking(partitions, lost)
            return {TP0: 12}

    async def commit_async(offsets):
        committed.append({tp: m.offset for tp, m in offsets.items()})

    fake = _KafkaConsumer()
    consumer = _adapter(fake)
    listener = Listener()
    consumer.subscribe("in", listener)
    fake.commit_async = commit_async
    asyncio.run(fake.listener.on_partitions_lost({KTP("in", 0)}))
    assert committed == [{TP0: 12}]
    assert listener.events == [("revoking", {TP0}, True), ("revoked", {TP0}, None)]


@pytest.mark.parametrize("exc, expected", [
    ("ProducerFencedError", i.Fenced),
    ("TransactionalIdAuthorizationFailedError", i.FatalError),
    ("UnsupportedVersionError", i.Unsupported),
    ("KafkaConnectionError", i.Unavailable),
    ("CommitFailedError", i.ClientError),
])
def test_kafka_python_errors_map_to_what_the_worker_does(exc, expected):
    from kafka import errors

    original = getattr(errors, exc)("test")
    mapped = python._error(original)
    assert type(mapped) is expected and mapped.__cause__ is original and exc in str(mapped)
