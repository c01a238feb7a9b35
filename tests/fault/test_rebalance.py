"""Rebalance: a second worker joins the group mid-stream and later leaves it (SIGTERM); nothing is lost.

On a revocation the worker publishes what its model holds, commits it and drops what it had not started
(worker/rebalance.py ``on_revoking``, ``on_revoked``), so a cooperative hand-over should publish nothing twice. Duplicates are
reported and bounded by the uncommitted window per rebalance (a broker may refuse a commit during a
rebalance); a revocation commit that fails because of how the client is used (a blocking call from
kafka-python's IO thread) is a worker bug and fails the test.

A member that a rebalance leaves out gets an empty SyncGroup assignment, which kafka-python 3.0.12 cannot
decode (``struct.error: unpack requires a buffer of 2 bytes``). The worker leaves and rejoins the group
(bert_stream/kafka/python.py ``_rejoin``) instead of dying; the rejoins are reported.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import BROKER
from tests.fault import harness as h
from tests.fault.test_crash import _topics

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

SEED = 7
RATE = 60.0  # messages per second: a stream that outlasts the second worker's start, stay and leave


def _batches(w: h.WorkerProcess) -> int:
    return len(w.events("batch"))


# the KIP-848 consumer protocol (the gpu overlay's), on librdkafka and Apache Kafka 4.x only
KIP848 = [pytest.param(d, "confluent-kafka", "consumer", id=f"{d}-confluent-kafka-kip848",
                       marks=pytest.mark.skipif(BROKER != "kafka", reason="KIP-848 is Apache Kafka 4.x's"))
          for d in h.DELIVERY_MODES]


@pytest.mark.parametrize("delivery, client, protocol", [
    pytest.param(*p.values, "classic", id=p.id, marks=p.marks) for p in h.matrix()] + KIP848)
def test_worker_joins_and_leaves_mid_stream(kafka_settings, names, model_store, stack, workers, delivery, client,
                                            protocol):
    _topics(kafka_settings, names)
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
    # a long max_wait keeps an open batch in the batcher nearly all the time, so a revocation always finds
    # messages that were polled but not started (what a rebalance must not lose)
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, max_wait_ms=300, delivery=delivery, kafka_client=client,
                       group_protocol=protocol)
    publisher = h.RatePublisher(kafka_settings, names.input_topic, h.make_messages(20_000, seed=SEED), RATE)
    started = time.monotonic()
    try:
        a = workers.start("worker-a", env)
        a.wait_assigned()
        publisher.start()
        b = workers.start("worker-b", env)  # joins once its model is loaded: mid-stream
        b.wait_assigned(timeout=120)
        h.wait_until(lambda: _batches(b) >= 3, 90, "worker-b to process batches", workers.tails)
        assert publisher.is_alive(), "the stream ended before the join was exercised"
        outputs_at_leave = len(reader.by_source) if reader.poll() >= 0 else 0
        everything = set(a.events("partitions_assigned")[0]["partitions"])  # worker-a alone had them all
        assignments_before_leave = len(a.events("partitions_assigned"))
        assert b.terminate() == 0
        # worker-a takes every partition back and goes on with the stream. Its assignment of the join may come
        # before the leave (Apache Kafka: a split, then everything) or fold into the leave's rebalance (Tansu
        # completes a join in about half the session timeout, while worker-b may already be leaving): what
        # must hold is that a rebalance after the leave gives worker-a every partition.
        h.wait_until(lambda: any(set(e["partitions"]) == everything
                                 for e in a.events("partitions_assigned")[assignments_before_leave:]),
                     90, "worker-a to be assigned every partition after worker-b left", workers.tails)
        h.wait_until(lambda: reader.poll() >= 0 and len(reader.by_source) >= outputs_at_leave + 200, 120,
                     "outputs after worker-b left", workers.tails)
        assert publisher.is_alive(), "the stream ended before the leave was exercised"
        sent = publisher.join_ok()
        unfinished = None
        try:
            reader.wait_all(sent, timeout=180, diagnostics=workers.tails)
        except AssertionError as exc:  # counted and reported below, then failed
            unfinished = str(exc).split("\n", 1)[0]
        reader.drain()
        exit_code = a.terminate()
        counts = h.count(sent, reader)
        failed_commits = [e["error"] for w in (a, b) for name in ("commit_failed", "revocation_commit_failed")
                          for e in w.events(name)]
        aborted = [e["reason"] for w in (a, b) for e in w.events("transaction_aborted")]
        h.report(f"rebalance({h.variant(delivery, client)}{', kip-848' if protocol == 'consumer' else ''})", counts, aborted_transactions=len(aborted), batches_a=_batches(a),
                 batches_b=_batches(b),
                 assignments_a=len(a.events("partitions_assigned")), failed_commits=len(failed_commits),
                 dropped_on_revocation=sum(e.get("dropped", 0) for w in (a, b)
                                           for e in w.events("partitions_revoked")),
                 rejoins=len(b.events("assignment_undecodable")), seconds=round(time.monotonic() - started, 1),
                 duplicated=h.duplicated(sent, reader))
    finally:
        publisher.stop.set()
        reader.close()

    assert counts.lost == 0, unfinished
    assert counts.dlq == 0 and counts.output == len(sent) and exit_code == 0
    misuse = [e for e in failed_commits if e.startswith("RuntimeError")]
    assert not misuse, f"the commit on revocation cannot work as written: {misuse[0][:300]}"
    assert counts.duplicates <= 2 * h.uncommitted_window(client)
    if delivery == "exactly-once":
        assert counts.duplicates == 0, aborted
    assert _batches(b) >= 3 and _batches(a) > 0
