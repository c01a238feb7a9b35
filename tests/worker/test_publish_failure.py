"""Unit test of the worker's policy after a send fails (pure logic: a fake producer, no Kafka, no model).

A send can fail for good: a broker that loses the idempotent producer's sequence state across a restart
answers OutOfOrderSequenceNumber, a topic can be deleted, a record refused. This pins the bookkeeping behind
the duplicate bound when it does: after a failed send the worker publishes nothing more of that input
partition, commits the acknowledged prefix, and stops with status 1.
"""

from __future__ import annotations

from bert_stream.kafka import TopicPartition
from bert_stream.kafka.interface import FlushTimeout
from worker.messages import Source
from worker.loop import Worker
from worker.settings import WorkerSettings


class _Producer:
    """The interface's producer: completes each send at flush(); partitions in ``failing`` fail, the rest are
    acknowledged."""

    lazy_commits = False
    delivery_timeout_s = 120.0

    def __init__(self, failing: set[int], never_reported: bool = False):
        self.failing, self.pending, self.sent = failing, [], []
        self.never_reported = never_reported  # a send the client neither acks nor fails: flush times out
        self.flush_timeouts = []

    def partitions_for(self, _topic):
        return {0, 1}

    def send(self, topic, partition, value, key, headers, on_delivery, *args):
        self.pending.append((partition, on_delivery, args))
        self.sent.append((topic, partition, value))

    def flush(self, timeout_s=None):
        self.flush_timeouts.append(timeout_s)
        if self.never_reported and self.pending:
            raise FlushTimeout(f"{len(self.pending)} records not delivered within {timeout_s} s")
        for partition, fn, args in self.pending:
            fn(*args, RuntimeError("OutOfOrderSequenceNumber") if partition in self.failing else None)
        self.pending.clear()


class _Consumer:
    def __init__(self):
        self.commits = []

    def commit(self, offsets):
        self.commits.append(dict(offsets))


def _worker(producer) -> Worker:
    worker = Worker(WorkerSettings(input_topic="in", output_topic="out"))
    worker.producer, worker.consumer = producer, _Consumer()
    worker.delivery.start(worker.consumer, lambda: producer)
    return worker


def _send(worker: Worker, partition: int, offset: int) -> bool:
    worker.tracker.track(_tp(partition), offset)
    return worker._send("out", Source("in", partition, offset), b"v", None, [])


def _tp(partition: int) -> TopicPartition:
    return TopicPartition("in", partition)


def test_after_a_failed_send_nothing_more_of_that_partition_is_published():
    producer = _Producer(failing={1})
    worker = _worker(producer)
    for offset in range(3):
        assert _send(worker, 0, offset) and _send(worker, 1, offset)
    committable = worker._acknowledged()  # flush: partition 1's sends fail
    worker._commit(committable)
    assert worker.stop.is_set() and worker.exit_code == 1
    assert committable == {_tp(0): 3}  # partition 1 has no acked prefix: re-read from its committed offset
    assert worker.consumer.commits == [{_tp(0): 3}]  # what was acknowledged is committed on the way out

    sent_before = len(producer.sent)
    assert not _send(worker, 1, 3)  # would be re-delivered after the restart anyway: only a duplicate
    assert _send(worker, 0, 3)  # healthy partitions still publish (and commit) while the worker drains
    assert [p for _t, p, _v in producer.sent[sent_before:]] == [0]
    assert worker._acknowledged() == {_tp(0): 4}


def test_no_failure_publishes_everything():
    producer = _Producer(failing=set())
    worker = _worker(producer)
    assert all(_send(worker, p, o) for o in range(4) for p in (0, 1))
    assert worker._acknowledged() == {_tp(0): 4, _tp(1): 4}
    assert not worker.stop.is_set() and worker.exit_code == 0


def test_a_send_never_reported_ends_the_worker_within_a_bounded_flush():
    """A record the client keeps past its own delivery timeout (kafka-python, to a deleted topic's partition)
    must not hold the worker in flush forever: the flush is bounded a little past the delivery timeout, and
    its timeout is a publish failure like any other (commit the acked prefix, exit 1)."""
    producer = _Producer(failing=set(), never_reported=True)
    worker = _worker(producer)
    assert _send(worker, 0, 0)
    worker._commit(worker._acknowledged())
    assert producer.flush_timeouts[0] is not None and producer.flush_timeouts[0] > producer.delivery_timeout_s
    assert worker.stop.is_set() and worker.exit_code == 1
    assert "did not deliver" in worker._failure and "None" not in worker._failure
    assert worker.consumer.commits == []  # nothing was acknowledged

    worker._acknowledged()  # the drain's last flush, on the way out: short, not another delivery timeout
    assert producer.flush_timeouts[-1] <= 10.0
