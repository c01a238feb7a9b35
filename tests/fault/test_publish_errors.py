"""A publish error that will not go away (the output topic deleted under a running worker) ends the worker with
one line and exit 1, not a retry loop or a crash loop: the restarted worker creates the topic again at start
and answers everything that was not committed."""

from __future__ import annotations


import pytest

from bert_stream.kafka import ensure_topics, make_admin
from tests.conftest import BROKER
from tests.fault import harness as h

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]



@pytest.mark.skipif(BROKER != "kafka", reason="Tansu keeps serving a deleted topic's partitions: no publish error")
@pytest.mark.parametrize("delivery, client", h.matrix())
def test_a_deleted_output_topic_is_one_error_line_and_a_clean_restart(kafka_settings, names, model_store, stack,
                                                                      workers, delivery, client):
    ensure_topics(kafka_settings, {names.input_topic: 2, names.output_topic: 2, names.dlq_topic: 2})
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, delivery=delivery, kafka_client=client)
    first = workers.start("first", env)
    first.wait_assigned()
    before = h.publish_messages(kafka_settings, names.input_topic, h.make_messages(20, seed=1, prefix="a"))
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
    try:
        reader.wait_all(before, timeout=90, diagnostics=workers.tails, alive=first.alive)
    finally:
        reader.close()

    admin = make_admin(kafka_settings)
    admin.delete_topics([names.output_topic])
    admin.close()
    after = h.publish_messages(kafka_settings, names.input_topic, h.make_messages(40, seed=2, prefix="b"))
    # kafka-python with stale metadata retries the sends to the vanished partition for its delivery timeout
    # (120 s) while the at-least-once flush waits for them, and the drain's last flush can wait as long again
    # for sends queued before the failure was seen: the exit is bounded by two delivery timeouts
    h.wait_until(lambda: not first.alive(), 420, "the worker to exit after its output topic was deleted",
                 workers.tails)
    assert first.returncode() == 1, first.tail()
    failed = first.events("worker_failed")
    assert len(failed) == 1 and failed[0].get("error") and "exception" not in failed[0], failed  # one line

    second = workers.start("second", env)  # creates the output topic again at start
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
    try:
        reader.wait_all(after, timeout=120, diagnostics=workers.tails, alive=second.alive)
        reader.drain()
        counts = h.count(after, reader)
    finally:
        reader.close()
    h.report(f"deleted-output-topic({h.variant(delivery, client)})", counts, error=failed[0]["error"][:80])
    assert counts.lost == 0
    if delivery == "exactly-once":
        assert counts.duplicates == 0
    assert second.terminate() == 0
