"""Failures that are not the input's, on the real broker, Redis and model: each ends the worker (exit 1, the
first error in its log, nothing of the failing work committed) or fails its health check, and none turns
outputs into dead letters or hangs it."""

from __future__ import annotations

import threading
import time

import pytest

from bert_stream.kafka import ensure_topics
from tests.conftest import xfail_on_broker
from tests.worker.conftest import PredictOnly, chinese_messages, committed_offsets, produce, read_topic
from worker import messages as m


class Breakable(PredictOnly):
    """The real model until ``broken`` is set (a lost CUDA context: every call fails, the probe text too), or
    held on ``gate`` for texts with 卡住 (a hung device)."""

    broken = False
    gate = threading.Event()

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, texts):
        if Breakable.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any("卡住" in t for t in texts):
            Breakable.gate.wait(30)
        return self.inner.predict(texts)


def _engine(settings):
    from worker.engine import Engine

    class BreakableEngine(Engine):
        def acquire(self):
            return Breakable(super().acquire())

    return BreakableEngine.from_settings(settings)


def _events(caplog, event: str) -> list[dict]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == event]


@pytest.mark.kafka
def test_a_model_that_breaks_stops_the_worker_with_nothing_committed(kafka_settings, names, worker_settings,
                                                                    start_worker, caplog):
    Breakable.broken = False
    settings = worker_settings(max_batch_size=8, model_failure_retries=1)
    ensure_topics(kafka_settings, {names.input_topic: 1})
    produce(kafka_settings, names.input_topic, chinese_messages(20, seed=11))
    worker = start_worker(settings, engine=_engine(settings))
    assert len(read_topic(kafka_settings, names.output_topic, expect=20, timeout=60)) == 20
    deadline = time.monotonic() + 20
    while committed_offsets(kafka_settings, names.group_id, names.input_topic) != {0: 20}:
        assert time.monotonic() < deadline, "the first 20 were never committed"
        time.sleep(0.2)

    Breakable.broken = True
    produce(kafka_settings, names.input_topic, chinese_messages(20, seed=12))
    worker.thread.join(60)
    assert not worker.thread.is_alive() and worker.exit_code == 1
    assert committed_offsets(kafka_settings, names.group_id, names.input_topic) == {0: 20}
    dead = read_topic(kafka_settings, names.dlq_topic, expect=1, timeout=3)
    assert not [d for d in dead if m.parse_dlq_headers(d.headers)["error"] == m.INFERENCE_FAILED]
    assert len(read_topic(kafka_settings, names.output_topic, expect=21, timeout=3)) == 20
    # the log names the first error; closing the clients after it adds no other failure
    (failed,) = _events(caplog, "worker_failed")
    assert "failed every message of a batch 2 times" in failed["error"] and "CUDA error" in failed["error"]
    assert not _events(caplog, "revocation_commit_failed") and not _events(caplog, "worker_cleanup_failed")
    Breakable.broken = False


@pytest.mark.kafka
def test_a_hung_batch_fails_healthz_and_shutdown_still_ends_in_time(kafka_settings, names, worker_settings,
                                                                    start_worker):
    from tests.worker.test_run import _get

    Breakable.gate.clear()
    settings = worker_settings(max_batch_size=4, inference_stall_s=2, shutdown_timeout_s=3, cache_prefix=names.redis_prefix + "hung:")
    ensure_topics(kafka_settings, {names.input_topic: 1})
    texts = chinese_messages(8, seed=13)
    produce(kafka_settings, names.input_topic, texts)
    worker = start_worker(settings, engine=_engine(settings))
    assert len(read_topic(kafka_settings, names.output_topic, expect=8, timeout=60)) == 8
    port = worker.worker.http_port
    assert _get(port, "/healthz")[0] == 200
    produce(kafka_settings, names.input_topic, ["这条消息会让设备卡住"] + chinese_messages(6, seed=14))
    deadline = time.monotonic() + 15
    while _get(port, "/healthz")[0] == 200:  # within inference_stall_s, plus the batch's wait
        assert time.monotonic() < deadline, "/healthz stayed green with a batch stuck in the model"
        time.sleep(0.2)
    status, body = _get(port, "/healthz")
    assert status == 503 and "in the model for" in body
    started = time.monotonic()
    try:
        assert worker.stop(timeout=30) == 0  # drains what it can within shutdown_timeout_s
        assert time.monotonic() - started < 3 + 10, "shutdown did not keep to shutdown_timeout_s"
        # the stuck message and everything after it in its partition are handed back, not committed
        assert committed_offsets(kafka_settings, names.group_id, names.input_topic) == {0: 8}
    finally:
        Breakable.gate.set()


@pytest.mark.kafka
# Tansu fences an older transactional producer in AddPartitionsToTxn only, so whether the first worker is
# fenced depends on the order of the two workers' requests: the mark cannot be strict.
@xfail_on_broker("tansu", "Tansu fences a transactional producer by a newer epoch only sometimes (seen in "
                 "AddPartitionsToTxn)", strict=False)
@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_two_workers_with_one_instance_id_end_with_the_first_fenced_not_a_fencing_loop(
        kafka_settings, names, worker_settings, start_worker, caplog, client):
    """Exactly-once: the second worker's init_transactions fences the first; the first must exit 1. Replacing
    its producer instead would fence the second in turn, and the two would take turns."""
    import dataclasses

    from tests.fault.harness import TopicReader

    Breakable.broken = False
    fast = dataclasses.replace(kafka_settings, session_timeout_ms=6000)
    settings = worker_settings(kafka=fast, delivery="exactly-once", instance_id="twin", max_batch_size=8,
                               transaction_timeout_ms=10_000, shutdown_timeout_s=5, kafka_client=client)
    ensure_topics(kafka_settings, {names.input_topic: 2, names.output_topic: 2, names.dlq_topic: 2})
    first = start_worker(settings)
    first.wait_assigned()
    produce(kafka_settings, names.input_topic, chinese_messages(10, seed=15))
    second = start_worker(settings)  # same transactional id: fences the first's producer
    second.wait_assigned()
    produce(kafka_settings, names.input_topic, chinese_messages(40, seed=16))
    first.thread.join(60)
    assert not first.thread.is_alive() and first.exit_code == 1
    reader = TopicReader(kafka_settings, names.output_topic, names.dlq_topic, "read_committed")
    try:
        deadline = time.monotonic() + 90
        while sum(len(v) for v in reader.by_source.values()) < 50:
            assert time.monotonic() < deadline, f"{sum(len(v) for v in reader.by_source.values())} of 50"
            assert second.thread.is_alive(), "the second worker died: it was fenced back"
            reader.poll(500)
        reader.drain()
        assert sorted(len(v) for v in reader.by_source.values()) == [1] * 50  # each input once
    finally:
        reader.close()
    assert second.stop() == 0
    (failed,) = _events(caplog, "worker_failed")
    assert "BERT_STREAM_INSTANCE_ID" in failed["error"], failed  # the fencing error, then what to do about it


def test_unwritable_reads_the_brokers_answer(monkeypatch):
    """Pure logic over DescribeTopics' answer: a topic error, or authorised operations without WRITE."""
    from bert_stream.kafka import python as kafka

    answers = {
        "ok": {"error_code": 0, "authorized_operations": ["READ", "WRITE", "DESCRIBE"]},
        "no-authoriser": {"error_code": 0, "authorized_operations": []},
        "missing": {"error_code": 3, "authorized_operations": []},
        "read-only": {"error_code": 0, "authorized_operations": ["READ", "DESCRIBE"]},
    }
    requests = []

    class Admin:
        def describe_topics(self, topics):
            requests.append(topics)
            return [{"name": t, **answers[t]} for t in topics]

        def close(self):
            pass

    monkeypatch.setattr(kafka, "make_admin", lambda _settings: Admin())
    problems = kafka.unwritable(kafka.KafkaSettings(), list(answers))
    assert len(requests) == 1  # one metadata request for every topic
    assert set(problems) == {"missing", "read-only"}
    assert problems["missing"] == "UnknownTopicOrPartitionError"
    assert "not authorised to write" in problems["read-only"]


def test_topic_names_the_broker_would_refuse_are_refused_by_the_settings():
    from bert_stream.settings import SettingsError
    from worker.settings import WorkerSettings

    for bad in ("with space", "slash/topic", "x" * 250, ".."):
        with pytest.raises(SettingsError, match="not a Kafka topic name"):
            WorkerSettings(output_topic=bad)


def test_topics_are_created_with_the_brokers_default_replication_factor(monkeypatch):
    """-1: the broker's default.replication.factor (KIP-464), so acks=all output survives a broker's loss
    on a cluster; a fixed 1 would keep one copy whatever the cluster."""
    from bert_stream.kafka import python as kafka

    created = []

    class Admin:
        def list_topics(self):
            return ["exists"]

        def create_topics(self, topics):
            created.extend(topics)

        def close(self):
            pass

    monkeypatch.setattr(kafka, "make_admin", lambda _settings: Admin())
    kafka.ensure_topics(kafka.KafkaSettings(), {"exists": 3, "new": 3})
    assert [(t.name, t.num_partitions, t.replication_factor) for t in created] == [("new", 3, -1)]


def test_settings_refuse_a_shutdown_that_outlasts_the_last_transaction():
    from bert_stream.settings import SettingsError
    from worker.settings import WorkerSettings

    with pytest.raises(SettingsError, match="shutdown_timeout_s plus commit_interval_ms"):
        WorkerSettings(delivery="exactly-once", transaction_timeout_ms=10_000, shutdown_timeout_s=10)
    WorkerSettings(delivery="exactly-once", transaction_timeout_ms=10_000, shutdown_timeout_s=8)
    WorkerSettings(delivery="at-least-once", transaction_timeout_ms=10_000, shutdown_timeout_s=50)
