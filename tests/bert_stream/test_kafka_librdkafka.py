"""Unit tests of the librdkafka adapter's error rules (pure logic: librdkafka's own error objects, no broker).
The integration side is every worker and fault test, run on both clients."""

from __future__ import annotations

import pytest

ck = pytest.importorskip("confluent_kafka")

from bert_stream.kafka import interface as i  # noqa: E402
from bert_stream.kafka import librdkafka  # noqa: E402


def _exc(code, **flags) -> ck.KafkaException:
    return ck.KafkaException(ck.KafkaError(code, "test", **flags))


@pytest.mark.parametrize("error, expected", [
    (_exc(ck.KafkaError._FENCED, fatal=True), i.Fenced),
    (_exc(ck.KafkaError.PRODUCER_FENCED), i.Fenced),
    (_exc(ck.KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, fatal=True), i.FatalError),
    (_exc(ck.KafkaError.UNSUPPORTED_VERSION), i.Unsupported),
    (_exc(ck.KafkaError._TRANSPORT), i.ClientError),
])
def test_errors_map_to_what_the_worker_does(error, expected):
    mapped = librdkafka._error(error)
    assert type(mapped) is expected and mapped.__cause__ is error
    assert "test" in str(mapped)


def _producer() -> librdkafka.Producer:
    return librdkafka.Producer.__new__(librdkafka.Producer)


def test_a_retriable_transactional_error_is_retried_until_it_succeeds():
    calls = []

    def commit(timeout):
        calls.append(timeout)
        if len(calls) < 3:
            raise _exc(ck.KafkaError._TIMED_OUT, retriable=True)

    _producer()._call(commit, 5.0, "commit_transaction")
    assert len(calls) == 3 and all(0 < t <= 5.0 for t in calls)


def test_an_abortable_error_aborts_and_a_retriable_one_times_out():
    def abortable(_timeout):
        raise _exc(ck.KafkaError._STATE, txn_requires_abort=True)

    with pytest.raises(i.TransactionAbortable):
        _producer()._call(abortable, 5.0, "commit_transaction")

    def stuck(_timeout):
        raise _exc(ck.KafkaError._TIMED_OUT, retriable=True)

    with pytest.raises(i.TransactionTimeout, match="did not complete within"):
        _producer()._call(stuck, 0.2, "commit_transaction")


def test_a_fatal_transactional_error_is_fatal():
    def fenced(_timeout):
        raise _exc(ck.KafkaError._FENCED, fatal=True)

    with pytest.raises(i.Fenced):
        _producer()._call(fenced, 5.0, "commit_transaction")


def test_a_transactional_call_that_never_returns_is_bounded(monkeypatch):
    """librdkafka was seen waiting for good inside send_offsets_to_transaction after a broker restart: the
    adapter gives up after the call's timeout plus a margin, as after any transactional timeout."""
    import threading

    monkeypatch.setattr(librdkafka, "CALL_MARGIN_S", 0.2)
    release = threading.Event()
    with pytest.raises(i.TransactionTimeout, match="did not return"):
        _producer()._call(lambda _timeout: release.wait(30), 0.1, "send_offsets_to_transaction")
    release.set()


class _Message:
    def __init__(self, partition: int, offset: int):
        self._p, self._o = partition, offset

    def error(self):
        return None

    def topic(self):
        return "in"

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return None

    def value(self):
        return b"x"

    def headers(self):
        return None

    def timestamp(self):
        return (0, 0)


class _Revoking:
    """librdkafka's consumer as the adapter calls it in one poll: the first consume() hands out a message of
    partition 1, and the next one serves the group's revocation of partition 1 before it returns."""

    def __init__(self, consumer):
        self.consumer, self.calls = consumer, 0

    def consume(self, num_messages, timeout):
        self.calls += 1
        if self.calls == 1:
            return []
        if self.calls == 2:
            return [_Message(1, 309)]
        self.consumer._on_revoke(None, [ck.TopicPartition("in", 1)])
        return [_Message(0, 7)]


def test_records_of_a_partition_revoked_inside_the_same_poll_are_not_returned():
    """One poll is up to three consume() calls; a revocation in a later one must not let a record of the
    revoked partition through: the worker would publish it after its revocation commit, and the new owner
    would publish it again (a duplicate even under exactly-once)."""
    consumer = librdkafka.Consumer.__new__(librdkafka.Consumer)
    i.Consumer.__init__(consumer)
    consumer._assignment = {i.TopicPartition("in", 0), i.TopicPartition("in", 1)}
    consumer._paused = set()
    revoked = []

    class Listener:
        def on_revoking(self, partitions, lost):
            revoked.append(partitions)
            return {}

        def on_revoked(self, partitions, error):
            pass

    consumer._listener = Listener()
    consumer._c = _Revoking(consumer)
    records = consumer.poll(0.1, 10)
    assert revoked == [{i.TopicPartition("in", 1)}]
    assert [(r.partition, r.offset) for r in records] == [(0, 7)]
    assert consumer._c.calls == 3
