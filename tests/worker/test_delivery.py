"""Unit tests of the delivery modes' bookkeeping (pure logic: fake clients, no Kafka, no model).

The integration side, on Apache Kafka with read_committed readers: tests/fault/ (kill -9, SIGTERM, a
rebalance, a broker restart, hostile input), each run in both modes."""

from __future__ import annotations

import types

import pytest

from bert_stream.kafka import interface as kafka
from bert_stream.kafka.interface import TopicPartition
from worker import delivery
from worker.cache import ResultCache
from worker.messages import Prediction, Rejected, Source, decode
from worker.classifier import DoneBatch, Job, Result
from worker.loop import Worker
from worker.settings import WorkerSettings

TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


class _TransactionalProducer:
    """The interface's producer: records the transactional calls in order; sends complete at flush;
    ``fail_commit`` makes the next commit fail with it; calls named in ``hang`` time out, as an adapter
    reports a call that did not complete within its timeout."""

    lazy_commits = False
    delivery_timeout_s = 120.0

    def __init__(self):
        self.calls, self.pending, self.fail_commit, self.hang = [], [], None, set()
        self.fatal = None  # the producer's fatal error (fenced), as an adapter reports it

    def partitions_for(self, _topic):
        return {0, 1}

    def fatal_error(self):
        return self.fatal

    def _maybe_hang(self, what):
        if what in self.hang:
            raise kafka.TransactionTimeout(f"{what} did not complete within 30 s")

    def init_transactions(self, timeout_s):
        self.calls.append("init")

    def begin_transaction(self):
        self.calls.append("begin")

    def send(self, topic, partition, value, key, headers, on_delivery, *args):
        self.calls.append(("send", topic, partition, value))
        self.pending.append((on_delivery, args))

    def serve(self):
        pass

    def flush(self, timeout_s=None):
        if "flush" in self.hang:
            raise kafka.FlushTimeout(f"records not delivered within {timeout_s} s")
        for fn, args in self.pending:
            fn(*args, None)
        self.pending.clear()

    def send_offsets(self, offsets, consumer, timeout_s):
        self.calls.append(("offsets", dict(offsets), consumer.group_metadata()))
        self._maybe_hang("offsets")

    def commit_transaction(self, timeout_s):
        if self.fail_commit is not None:
            exc, self.fail_commit = self.fail_commit, None
            raise exc
        self.calls.append("commit")
        self._maybe_hang("commit")

    def abort_transaction(self, timeout_s):
        self.calls.append("abort")
        self._maybe_hang("abort")

    def close(self, timeout_s):
        self.calls.append("close")


class _Consumer(kafka.Consumer):
    """The interface's consumer, with its shared rewind logic; no rebalance is ever in progress."""

    def __init__(self, assigned=(TP0, TP1), committed=None):
        super().__init__()
        self.assigned, self._committed, self.seeks, self.polled = set(assigned), committed or {}, [], []

    def group_metadata(self):
        return "group-metadata"  # passed through as is: the producer sends it with the offsets (KIP-447)

    def assignment(self):
        return set(self.assigned)

    def _settled(self):
        return True

    def _seek_committed(self, partitions):
        for tp in partitions:
            self.seeks.append((tp, self._committed.get(tp, "beginning")))

    def _poll(self, timeout_s, max_records):
        polled, self.polled = self.polled, []
        return polled


def _worker(delivery: str = "exactly-once") -> Worker:
    worker = Worker(WorkerSettings(input_topic="in", output_topic="out", dlq_topic="dlq", delivery=delivery))
    worker.producer, worker.consumer = _TransactionalProducer(), _Consumer()
    worker.delivery.start(worker.consumer, lambda: worker.producer)
    worker.classifier = types.SimpleNamespace(batches_in_flight=0, items_in_flight=0)
    model = types.SimpleNamespace(token_budget=lambda texts: [5] * len(texts), version="v1")
    worker.engine = types.SimpleNamespace(current=model, acquire=lambda: model)
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
    worker.producer.fail_commit = kafka.TransactionAbortable("CommitFailedError: the group rebalanced")
    worker._commit(worker._acknowledged())
    assert worker.producer.calls[-1] == "abort"
    assert not worker.stop.is_set() and worker.exit_code == 0  # an abort is not a reason to exit
    assert worker.metrics.transactions.labels("aborted")._value.get() == 1
    assert len(worker.batcher) == 0 and worker.tracker.partitions() == [] and worker._epoch == 1
    # the next poll drops what was fetched from before the rewind and seeks to the committed offsets
    worker.consumer.polled = [_record(0, 5, b"stale"), _record(1, 0, b"fresh")]
    records = worker._poll()
    assert [(r.partition, r.offset) for r in records] == []  # TP1 was assigned too: rewound as well
    assert sorted(worker.consumer.seeks, key=str) == sorted([(TP0, 2), (TP1, "beginning")], key=str)
    worker.consumer.polled = [_record(0, 2, b"again")]
    assert [(r.partition, r.offset) for r in worker._poll()] == [(0, 2)]


def test_results_classified_before_an_abort_are_not_published():
    worker = _worker()
    job = Job(decode(_record(0, 0, b"in flight")), 0.0, epoch=0)
    worker.tracker.track(TP0, 0)
    worker._abort("test")
    worker._publish([DoneBatch([Result(job, PREDICTION)], "v1", 1.0)])
    assert not [c for c in worker.producer.calls if c[0] == "send"]


def test_a_transactional_call_that_hangs_is_bounded_and_the_producer_replaced():
    """A call that times out (the adapters bound every one by the transaction timeout) leaves the producer
    in doubt: a new producer with the same transactional id fences the old one."""
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
    assert worker.tracker.partitions() == [] and worker.consumer._needs_rewind == {TP0, TP1}


def test_a_fenced_producer_is_fatal():
    worker = _worker()
    assert _send(worker, TP0, 0)
    worker.producer.fail_commit = kafka.Fenced("PRODUCER_FENCED")
    with pytest.raises(kafka.Fenced):
        worker._commit(worker._acknowledged())


def test_a_fenced_producer_is_fatal_when_later_calls_raise_a_plain_error():
    """After its first fencing error, a producer may raise a plain error ("in an error state") from every
    call. Aborting and replacing it would fence the other worker with this id in turn."""
    worker = _worker()
    new = _TransactionalProducer()
    worker.delivery.start(worker.consumer, iter([worker.producer, new]).__next__)
    assert _send(worker, TP0, 0)
    worker.producer.fatal = kafka.Fenced("PRODUCER_FENCED")
    worker.producer.fail_commit = kafka.TransactionAbortable("in an error state")
    with pytest.raises(kafka.Fenced):
        worker._commit(worker._acknowledged())
    assert new.calls == []  # no new producer under the same id


def test_a_transaction_the_broker_timed_out_is_replaced_not_fatal():
    """A broker outage longer than the transaction timeout: the coordinator aborts the open transaction and
    bumps the epoch, which librdkafka reports as fenced. That transaction began over a timeout ago, so it is
    the broker's abort (a new producer settles it), not a twin's takeover."""
    worker = _worker()
    new = _TransactionalProducer()
    worker.delivery.start(worker.consumer, iter([worker.producer, new]).__next__)
    assert _send(worker, TP0, 0)
    worker.delivery._began -= worker.delivery.timeout_s + 1  # opened before the outage
    worker.producer.fatal = kafka.Fenced("_FENCED: Failed to end transaction")
    worker.producer.fail_commit = kafka.Fenced("_FENCED: Failed to end transaction")
    worker._commit(worker._acknowledged())
    assert worker.producer is new and new.calls == ["init"] and not worker.stop.is_set()
    assert worker.metrics.transactions.labels("aborted")._value.get() == 1


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
        def init_transactions(self, timeout_s):
            raise kafka.Unsupported("UnsupportedVersionError: InitProducerId")

    with pytest.raises(delivery.DeliveryUnsupported, match="exactly-once needs a broker with transactions"):
        delivery.make("exactly-once").start(_Consumer(), NoTransactions)


def test_transactional_ids_are_per_instance():
    assert delivery.transactional_id("g", "pod-7") == "g-pod-7"
    assert delivery.transactional_id("g", None) == f"g-{delivery.default_instance_id()}"
    producer, consumer = delivery.client_options("exactly-once", "g", "pod-7", 30_000)
    assert producer == {"transactional_id": "g-pod-7", "transaction_timeout_ms": 30_000}
    assert consumer == {"read_committed": True}
    assert delivery.client_options("at-least-once", "g", None, 30_000) == ({}, {})
