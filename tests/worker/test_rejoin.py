"""Unit test of the worker's answer to a group assignment kafka-python cannot decode (pure logic: a fake
consumer, no Kafka, no model).

A coordinator answers a member the group leader left out of its plan with zero assignment bytes. noida-db
(a stand-in broker the suite used to run on) did it to members joining mid-rebalance:
``tests/worker/test_run.py::test_a_second_worker_joining_mid_stream_causes_no_loss_and_no_duplicates``
failed on it (the worker thread died of ``struct.error``) in 2 of 3 runs before the fix. This pins the policy: leave and rejoin the group, and exit only when it keeps happening.
"""

from __future__ import annotations

import struct
import types

import pytest

from worker.run import MAX_REJOINS, Worker
from worker.settings import WorkerSettings


class _Consumer:
    """poll() raises what kafka-python raises on a zero-byte assignment, ``failures`` times, then returns."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, []

    def assignment(self):
        return set()

    def poll(self, timeout_ms, max_records):
        self.calls.append("poll")
        if self.failures:
            self.failures -= 1
            struct.unpack(">h", b"")  # the exact error: "unpack requires a buffer of 2 bytes"
        return {}

    def unsubscribe(self):
        self.calls.append("unsubscribe")

    def subscribe(self, topics, listener):
        self.calls.append(("subscribe", tuple(topics)))

    def topics(self):
        self.calls.append("topics")  # the metadata refresh that keeps the join from rebalancing again
        return {"in"}


def _worker(consumer: _Consumer) -> Worker:
    worker = Worker(WorkerSettings(input_topic="in", output_topic="out"))
    worker.consumer = consumer
    worker.classifier = types.SimpleNamespace(batches_in_flight=0, items_in_flight=0)
    return worker


def test_an_undecodable_assignment_makes_the_worker_rejoin_the_group():
    consumer = _Consumer(failures=1)
    worker = _worker(consumer)
    assert worker._poll() == []
    assert consumer.calls == ["poll", "unsubscribe", ("subscribe", ("in",)), "topics"]
    assert worker._joining  # the next polls wait for the join (JOIN_POLL_TIMEOUT_MS)
    assert worker.metrics.rebalances.labels("rejoined")._value.get() == 1
    assert worker._poll() == []  # then it polls on as a member
    assert consumer.calls[-1] == "poll"


def test_an_assignment_resets_the_count_and_a_persistent_failure_exits():
    consumer = _Consumer(failures=MAX_REJOINS)
    worker = _worker(consumer)
    for _ in range(MAX_REJOINS):
        worker._poll()
    worker._on_assigned(set())  # a good (empty) assignment: the quirk passed
    assert worker._rejoins == 0

    consumer.failures = MAX_REJOINS + 1
    for _ in range(MAX_REJOINS):
        worker._poll()
    with pytest.raises(struct.error):  # not the quirk: main() logs worker_failed, exit 1, supervisor restarts
        worker._poll()
    assert consumer.calls.count("unsubscribe") == 2 * MAX_REJOINS
