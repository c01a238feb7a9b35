"""Unit tests of the delivery modes' bookkeeping (pure logic: fake clients, no Kafka, no model).

The integration side, on Apache Kafka with read_committed readers: tests/fault/ (kill -9, SIGTERM, a
rebalance, a broker restart, hostile input), each run in both modes."""

from __future__ import annotations

import types

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError, ProducerFencedError, UnsupportedVersionError

from worker import delivery
from worker.cache import ResultCache
from worker.messages import Prediction, Rejected, Source, decode
from worker.run import DoneBatch, Job, Result, Worker
from worker.settings import WorkerSettings

TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


class _Future:
    def __init__(self):
        self.callbacks = []

    def add_callback(self, fn):
        self.callbacks.append(fn)

    def add_errback(self, fn):
        pass

    def add_both(self, fn, *args):
        self.add_callback(lambda value: fn(*args, value))


class _Result:
    """kafka-python's TransactionalRequestResult: wait() raises the request's error, or says if it is done."""

    def __init__(self, error=None, done=True):
        self.error, self.done = error, done

    def wait(self, timeout_ms=None):
        if self.error is not None:
            raise self.error
        return self.done


class _TransactionalProducer:
    """Records the transactional calls in order; sends complete at flush; ``fail_commit`` makes the next
    commit fail with it; calls named in ``hang`` never complete. It is also its own transaction manager
    (the worker calls the manager, as KafkaProducer's own methods do, to bound the wait)."""

    def __init__(self):
        self.calls, self.pending, self.fail_commit, self.hang = [], [], None, set()
        self._transaction_manager = self
        self._sender = types.SimpleNamespace(wakeup=lambda: None)

    def partitions_for(self, _topic):
        return {0, 1}

    fatal_error = None  # the manager's fatal error (fenced), as kafka-python's reports it

    def has_fatal_error(self):
        return self.fatal_error is not None

    def last_error(self):
        return self.fatal_error

    def init_transactions(self):
        self.calls.append("init")

    def begin_transaction(self):
        self.calls.append("begin")

    def send(self, topic, *, value, key, headers, partition):
        self.calls.append(("send", topic, partition, value))
        future = _Future()
        self.pending.append(future)
        return future

    def flush(self, timeout=None):
        if "flush" in self.hang:
            raise KafkaTimeoutError(f"Failed to flush buffered records within {timeout} secs")
        for future in self.pending:
            for fn in future.callbacks:
                fn(None)
        self.pending.clear()

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self.calls.append(("offsets", {tp: m.offset for tp, m in offsets.items()}, group_metadata))
        return _Result(done="offsets" not in self.hang)

    def begin_commit(self):
        if self.fail_commit is not None:
            exc, self.fail_commit = self.fail_commit, None
            return _Result(error=exc)
        self.calls.append("commit")
        return _Result(done="commit" not in self.hang)

    def begin_abort(self):
        self.calls.append("abort")
        return _Result(done="abort" not in self.hang)

    def close(self, timeout=None):
        self.calls.append("close")


class _Consumer:
    def __init__(self, assigned=(TP0, TP1), committed=None):
        self.assigned, self._committed, self.seeks, self.polled = set(assigned), committed or {}, [], {}

    def group_metadata(self):
        return "group-metadata"  # passed through as is: the producer sends it with the offsets (KIP-447)

    def assignment(self):
        return self.assigned

    def committed(self, tp):
        return self._committed.get(tp)

    def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    def seek_to_beginning(self, tp):
        self.seeks.append((tp, "beginning"))

    def poll(self, timeout_ms, max_records):
        polled, self.polled = self.polled, {}
        return polled


def _worker(delivery: str = "exactly-once") -> Worker:
    worker = Worker(WorkerSettings(input_topic="in", output_topic="out", dlq_topic="dlq", delivery=delivery))
    worker.producer, worker.consumer = _TransactionalProducer(), _Consumer()
    worker.delivery.start(worker.consumer, lambda: worker.producer)
    worker._joining = False
    worker.classifier = types.SimpleNamespace(batches_in_flight=0, items_in_flight=0)
    worker.engine = types.SimpleNamespace(current=types.SimpleNamespace(token_budget=lambda texts: [5] * len(texts),
                                                                        version="v1"))
    worker.cache = ResultCache(None, "test:", 60, 100)  # disabled: every lookup a miss
    return worker


def _send(worker: Worker, tp: TopicPartition, offset: int) -> bool:
    worker.tracker.track(tp, offset)
    return worker._send("out", Source("in", tp.partition, offset), b"v", None, [])


def _record(partition: int, offset: int, value: bytes):
    return types.SimpleNamespace(topic="in", partition=partition, offset=offset, key=None, value=value, headers=[])


PREDICTION = Prediction("体育", 0, 0.9, (("体育", 0.9),))


def test_outputs_and_offsets_are_one_transaction_per_commit():
    worker = _worker()
    assert all(_send(worker, TP0, o) for o in range(3)) and _send(worker, TP1, 0)
    worker._commit(worker._acknowledged())
    calls = worker.producer.calls
    assert calls[0] == "init" and calls[1] == "begin"
    assert [c[0] for c in calls[2:6]] == ["send"] * 4
    assert calls[6:] == [("offsets", {TP0: 3, TP1: 1}, "group-metadata"), "commit"]
    assert worker.tracker.committed(TP0) == 3 and worker.metrics.transactions.labels("committed")._value.get() == 1
    worker.producer.calls.clear()
    worker._commit(worker._acknowledged())  # nothing sent since: no transaction at all
    assert worker.producer.calls == []
    assert _send(worker, TP0, 3)  # the next send opens the next transaction
    assert worker.producer.calls[0] == "begin"


def test_a_failed_commit_aborts_and_rewinds_to_the_committed_offsets():
    worker = _worker()
    worker.consumer = _Consumer(committed={TP0: 2})
    worker.delivery.start(worker.consumer, lambda: worker.producer)
    for o in range(2, 5):
        assert _send(worker, TP0, o)
    worker.batcher.add(Job(decode(_record(0, 5, b"later")), 0.0), 5, 0.0)  # polled, not yet classified
    worker.producer.fail_commit = KafkaError("CommitFailedError: the group rebalanced")
    worker._commit(worker._acknowledged())
    assert worker.producer.calls[-1] == "abort"
    assert not worker.stop.is_set() and worker.exit_code == 0  # an abort is not a reason to exit
    assert worker.metrics.transactions.labels("aborted")._value.get() == 1
    assert len(worker.batcher) == 0 and worker.tracker.partitions() == [] and worker._epoch == 1
    # the next poll drops what was fetched from before the rewind and seeks to the committed offsets
    worker.consumer.polled = {TP0: [_record(0, 5, b"stale")], TP1: [_record(1, 0, b"fresh")]}
    records = worker._poll()
    assert [(r.partition, r.offset) for r in records] == []  # TP1 was assigned too: rewound as well
    assert sorted(worker.consumer.seeks, key=str) == sorted([(TP0, 2), (TP1, "beginning")], key=str)
    worker.consumer.polled = {TP0: [_record(0, 2, b"again")]}
    assert [(r.partition, r.offset) for r in worker._poll()] == [(0, 2)]


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_every_assigned_partition_starts_at_the_committed_offset(delivery):
    """kafka-python keeps the fetch position of a partition in both its previous and its new assignment, and
    drops a join that completes between two polls: a worker can get back, a generation later, a partition
    that another member processed and committed meanwhile. It must start at that commit, not at its own
    kept position (seen: 41 and 125 duplicates under exactly-once in a rebalance test)."""
    worker = _worker(delivery)
    worker.consumer = _Consumer(committed={TP0: 40})
    worker._forget({TP0, TP1})  # a revocation: the join is in flight from here
    worker._joining = True
    worker.consumer.polled = {TP0: [_record(0, 7, b"fetched before")]}
    assert [r.offset for r in worker._poll()] == [7] and worker.consumer.seeks == []  # no I/O of ours mid-join
    worker._on_assigned({TP0, TP1})  # the assignment of a later generation: the same partitions
    worker.consumer.polled = {TP0: [_record(0, 8, b"from the kept position")]}
    assert worker._poll() == []  # dropped: read again from the committed offset
    assert sorted(worker.consumer.seeks, key=str) == sorted([(TP0, 40), (TP1, "beginning")], key=str)
    worker.consumer.polled = {TP0: [_record(0, 40, b"after the rewind")]}
    assert [r.offset for r in worker._poll()] == [40]


def test_results_classified_before_an_abort_are_not_published():
    worker = _worker()
    job = Job(decode(_record(0, 0, b"in flight")), 0.0, epoch=0)
    worker.tracker.track(TP0, 0)
    worker._abort("test")
    worker._publish([DoneBatch([Result(job, PREDICTION)], "v1", 1.0)])
    assert not [c for c in worker.producer.calls if c[0] == "send"]


def test_a_transactional_call_that_hangs_is_bounded_and_the_producer_replaced():
    """kafka-python waits without a limit (seen forever, after a broker restart): the worker waits at most
    the transaction timeout, then a new producer with the same transactional id fences the old one."""
    worker = _worker()
    old = worker.producer
    new = _TransactionalProducer()
    worker.delivery.start(worker.consumer, iter([old, new]).__next__)
    old.calls.clear()
    assert _send(worker, TP0, 0)
    old.hang.add("commit")
    worker._commit(worker._acknowledged())
    assert old.calls[-1] == "close" and "abort" not in old.calls  # no abort through a producer in doubt
    assert worker.producer is new and new.calls == ["init"]  # init_transactions aborts what was open
    assert worker.metrics.transactions.labels("aborted")._value.get() == 1 and not worker.stop.is_set()
    assert _send(worker, TP0, 0)  # read again after the rewind, published through the new producer
    assert new.calls[-2:] == ["begin", ("send", "out", 0, b"v")]


def test_sends_stuck_behind_a_hanging_transaction_are_bounded_too():
    worker = _worker()
    new = _TransactionalProducer()
    worker.delivery.start(worker.consumer, iter([worker.producer, new]).__next__)
    old = worker.producer
    assert _send(worker, TP0, 0)
    old.hang.add("flush")
    worker._commit(worker._acknowledged())
    assert old.calls[-1] == "close" and worker.producer is new and not worker.stop.is_set()
    assert worker.tracker.partitions() == [] and worker._needs_rewind == {TP0, TP1}


def test_a_fenced_producer_is_fatal():
    worker = _worker()
    assert _send(worker, TP0, 0)
    worker.producer.fail_commit = ProducerFencedError()
    with pytest.raises(ProducerFencedError):
        worker._commit(worker._acknowledged())


def test_a_fenced_producer_is_fatal_when_later_calls_raise_a_plain_kafka_error():
    """After its first ProducerFencedError, kafka-python's producer raises KafkaError("... in an error state")
    from every call. Aborting and replacing it would fence the other worker with this id in turn."""
    from kafka.errors import KafkaError

    worker = _worker()
    new = _TransactionalProducer()
    worker.delivery.start(worker.consumer, iter([worker.producer, new]).__next__)
    assert _send(worker, TP0, 0)
    worker.producer.fatal_error = ProducerFencedError()
    worker.producer.fail_commit = KafkaError("Cannot execute transactional method because we are in an error state")
    with pytest.raises(ProducerFencedError):
        worker._commit(worker._acknowledged())
    assert new.calls == []  # no new producer under the same id


def test_dead_letters_are_published_in_input_order_with_the_outputs():
    """A rejected message waits in the batcher like any other, so no record is ever sent ahead of an
    unpublished earlier offset of its partition: every record of a transaction is under its offsets."""
    worker = _worker()
    worker._route([_record(0, 0, b"good one"), _record(0, 1, b"\xff bad utf-8"), _record(0, 2, b"good two")])
    batch = worker.batcher.pop_ready(now=1e9, flush=True)
    jobs = batch.items
    assert [j.message.source.offset for j in jobs] == [0, 1, 2] and isinstance(jobs[1].message, Rejected)
    assert not [c for c in worker.producer.calls if c[0] == "send"]  # nothing sent at route time
    worker._publish([DoneBatch([Result(jobs[0], PREDICTION), Result(jobs[1], None), Result(jobs[2], PREDICTION)],
                               "v1", 1.0)])
    assert [c[1] for c in worker.producer.calls if c[0] == "send"] == ["out", "dlq", "out"]
    worker._commit(worker._acknowledged())
    assert ("offsets", {TP0: 3}, "group-metadata") in worker.producer.calls


def test_a_broker_without_transactions_is_a_clear_error():
    class NoTransactions(_TransactionalProducer):
        def init_transactions(self):
            raise UnsupportedVersionError("InitProducerId")

    with pytest.raises(delivery.DeliveryUnsupported, match="exactly-once needs a broker with transactions"):
        delivery.make("exactly-once").start(_Consumer(), NoTransactions)


def test_transactional_ids_are_per_instance():
    assert delivery.transactional_id("g", "pod-7") == "g-pod-7"
    assert delivery.transactional_id("g", None) == f"g-{delivery.default_instance_id()}"
    producer, consumer = delivery.client_overrides("exactly-once", "g", "pod-7", 30_000)
    assert producer == {"transactional_id": "g-pod-7", "enable_idempotence": True, "transaction_timeout_ms": 30_000}
    assert consumer == {"isolation_level": "read_committed"}
    assert delivery.client_overrides("at-least-once", "g", None, 30_000) == ({}, {})
