"""Crash and graceful stop: kill -9 loses nothing; SIGTERM exits 0 with everything it published committed.

Each test runs in both delivery modes (worker/delivery.py). The at-least-once promise (worker/loop.py): an
input offset is committed only after the outputs of it and of everything before it in its partition are
acknowledged. Two things follow that a test can see from outside:
1. at the moment a worker is killed, every offset below the group's committed offset has an output on the
   output topic (the commit never runs ahead of the publish), and
2. what the next worker publishes twice is only what was published but not yet committed: bounded by
   :func:`harness.uncommitted_window` per kill.
Exactly-once, read as its consumers read (``read_committed``): the outputs and the offsets of a commit become
visible together, so nothing is ever published-but-uncommitted and the duplicates must be 0, also across
kill -9 (the dead worker's open transaction is aborted; its partitions' next owner waits for that).

The replacement joins the same group, the real fail-over, once the dead member's session has timed out.
"""

from __future__ import annotations

import random
import time

import pytest

from bert_stream.kafka import ensure_topics
from tests.conftest import xfail_on_broker
from tests.fault import harness as h

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

SEED = 20261128
CRASH_MESSAGES = 2000
KILLS = 3
PARTITIONS = 2


def _topics(kafka_settings, names, partitions: int = PARTITIONS) -> None:
    # outputs too, so the reader can start before the first worker creates them
    ensure_topics(kafka_settings, {names.input_topic: partitions, names.output_topic: partitions,
                                   names.dlq_topic: partitions})


def _uncovered_commits(committed: dict[int, int | None], reader: h.TopicReader) -> list[tuple[int, int]]:
    """Offsets below the committed offset that have no output: a commit that ran ahead of the publish."""
    return [(p, o) for p, c in committed.items() for o in range(c or 0) if (p, o) not in reader.by_source]


def _published_uncommitted(committed: dict[int, int | None], reader: h.TopicReader) -> int:
    """Inputs with an output at or above the committed offset: what the next owner will publish again."""
    return sum(1 for (p, o) in reader.by_source if o >= (committed.get(p) or 0))


@pytest.mark.parametrize("delivery, client", h.matrix({("exactly-once", "kafka-python"): xfail_on_broker(
    "tansu", "it never aborts a killed producer's open transaction (no transaction timeout), so read_committed "
             "readers wait behind it for good")}))
def test_kill9_at_random_points_loses_nothing(kafka_settings, names, model_store, stack, workers, delivery,
                                              client):
    rng = random.Random(SEED)
    _topics(kafka_settings, names)
    messages = h.make_messages(CRASH_MESSAGES, seed=SEED)
    sent = h.publish_messages(kafka_settings, names.input_topic, messages)
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
    # kill points: a random share of the stream done, then a random fraction of a second (inside a batch,
    # a publish, a commit or a poll: wherever the process happens to be)
    shares = sorted(rng.uniform(lo, hi) for lo, hi in ((0.05, 0.25), (0.3, 0.5), (0.55, 0.75))[:KILLS])
    window = h.uncommitted_window(client)
    group = names.group_id
    uncommitted_at_kill, kill_log, commits_ahead, unfinished = [], [], 0, None
    started = time.monotonic()

    def start(i: int) -> h.WorkerProcess:
        env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                           redis_url=stack.redis_url, group_id=group, delivery=delivery, kafka_client=client)
        return workers.start(f"worker-{i}", env)

    try:
        for i, share in enumerate(shares):
            w = start(i)
            target = int(share * CRASH_MESSAGES)
            h.wait_until(lambda t=target: reader.poll() >= 0 and len(reader.by_source) >= t, 180,
                         f"{target} outputs before kill {i + 1}", workers.tails)
            time.sleep(rng.uniform(0.0, 0.4))
            w.kill9()
            reader.drain()  # everything the dead worker got acknowledged is on the topic now
            committed = h.committed_offsets(kafka_settings, group, names.input_topic, h.isolation(delivery))
            ahead = _uncovered_commits(committed, reader)
            # exactly-once: committed offsets can run ahead of what read_committed can read for a while. A
            # transaction the dead worker had ended makes its offsets stable a moment before its outputs show
            # (commit markers land on __consumer_offsets and on the output partitions one by one). And an earlier
            # dead worker's transaction that never reached its offsets stays open until the broker aborts it,
            # hiding every later output on its partitions, committed or not.
            settle = time.monotonic() + (h.DEAD_TRANSACTION_S if delivery == "exactly-once" else 10)
            while ahead and time.monotonic() < settle:
                time.sleep(0.5)
                reader.drain()
                ahead = _uncovered_commits(committed, reader)
            commits_ahead += len(ahead)
            if ahead:
                print(f"kill {i + 1}: offsets committed without an output: {ahead[:10]}")
            pending = _published_uncommitted(committed, reader)
            uncommitted_at_kill.append(pending)
            kill_log.append(f"kill{i + 1}@{len(reader.by_source)}:committed={sum(c or 0 for c in committed.values())}"
                            f",uncommitted={pending}")

        last = start(len(shares))
        # joined before it is asked to stop: when the third worker finished the stream before its kill (seen
        # under exactly-once, whose outputs show at commits), a SIGTERM would otherwise reach this one while it
        # still imports torch, before its handler is installed (exit -15, nothing lost, but not a clean stop)
        last.wait_assigned()
        try:
            reader.wait_all(sent, timeout=240, diagnostics=workers.tails)
        except AssertionError as exc:  # counted and reported below, then failed
            unfinished = str(exc)
        reader.drain()
        exit_code = last.terminate()
        counts = h.count(sent, reader)
        h.report(f"crash({h.variant(delivery, client)})", counts, kills=len(shares), window=window, kill_points=";".join(kill_log),
                 commits_ahead_of_outputs=commits_ahead, seconds=round(time.monotonic() - started, 1))
    finally:
        reader.close()

    assert commits_ahead == 0, "offsets were committed before their outputs were published"
    assert counts.lost == 0, unfinished
    assert exit_code == 0
    assert counts.output == len(sent) and counts.dlq == 0
    assert all(msg_id in reader.outputs for msg_id, _ in messages)  # by id too, not only by offset
    assert all(u <= window for u in uncommitted_at_kill), (uncommitted_at_kill, window)
    # a duplicate is a re-delivery of something published but not committed when a worker died
    assert counts.duplicates <= sum(uncommitted_at_kill), (counts.duplicates, uncommitted_at_kill)
    if delivery == "exactly-once":
        assert sum(uncommitted_at_kill) == 0 and counts.duplicates == 0, kill_log
    # every output record is a correct one for its input
    for records in reader.outputs.values():
        assert len({(r["label"], r["model_version"]) for r in records}) == 1, records


@pytest.mark.parametrize("delivery, client", h.matrix())
def test_sigterm_during_a_batch_commits_and_redelivers_nothing(kafka_settings, names, model_store, stack,
                                                               workers, delivery, client):
    _topics(kafka_settings, names)
    messages = h.make_messages(1200, seed=SEED + 1)
    sent = h.publish_messages(kafka_settings, names.input_topic, messages)
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, delivery=delivery, kafka_client=client)
    started = time.monotonic()
    try:
        first = workers.start("worker-1", env)
        h.wait_until(lambda: reader.poll() >= 0 and len(reader.by_source) >= 250, 180, "250 outputs",
                     workers.tails)
        assert first.terminate() == 0  # mid-stream: ~950 messages still to go
        draining = first.wait_event("worker_draining", 5, allow_exit=True)
        reader.drain()
        done_at_stop = len(reader.by_source)
        committed = h.committed_offsets(kafka_settings, names.group_id, names.input_topic, h.isolation(delivery))
        # committed == exactly what was published: no output above it, none missing below it
        assert not _uncovered_commits(committed, reader)
        assert _published_uncommitted(committed, reader) == 0, "SIGTERM left published outputs uncommitted"
        assert done_at_stop < len(sent), "the stop was not mid-stream"

        second = workers.start("worker-2", env)
        reader.wait_all(sent, timeout=180, diagnostics=workers.tails)
        reader.drain()
        assert second.terminate() == 0
        counts = h.count(sent, reader)
        h.report(f"graceful-stop({h.variant(delivery, client)})", counts, done_at_sigterm=done_at_stop, queued_at_sigterm=draining["queued"],
                 seconds=round(time.monotonic() - started, 1))
    finally:
        reader.close()

    assert draining["queued"] > 0, "nothing was in flight when SIGTERM came: the test did not stop a batch"
    assert counts.lost == 0 and counts.duplicates == 0 and counts.output == len(sent)
    final = h.committed_offsets(kafka_settings, names.group_id, names.input_topic)
    assert sum(c or 0 for c in final.values()) == len(sent)
