"""What the cluster tells the worker, and what changes under it: the lag gauge KEDA scales on, and partitions
added to the input topic while the worker runs. Real broker, real model, a worker on a thread."""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import pytest

from bert_stream.kafka import ensure_topics, make_admin, make_producer
from tests.conftest import xfail_on_broker
from tests.fault.harness import wait_until
from tests.worker.conftest import PredictOnly, chinese_messages, committed_offsets, read_topic
from worker import messages as m
from worker import loop as worker_loop

pytestmark = pytest.mark.kafka


def _produce(kafka_settings, topic: str, texts: list[str], partitions: list[int]) -> dict[int, int]:
    """One linger-batched send per text, round-robin over ``partitions``; the end offset of each partition
    as the producer's acks report it (the last acked offset + 1), which is the truth the gauge must match."""
    producer = make_producer(kafka_settings, linger_ms=50)
    try:
        futures = [producer.send(topic, value=json.dumps({"id": f"lag-{i}", "text": t}, ensure_ascii=False).encode(),
                                 partition=partitions[i % len(partitions)]) for i, t in enumerate(texts)]
        producer.flush()
        ends: dict[int, int] = {}
        for future in futures:
            meta = future.get(timeout=30)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
        return ends
    finally:
        producer.close()


def _lag_gauge(port: int, topic: str) -> dict[int, float]:
    """``bert_stream_consumer_lag`` per partition, as Prometheus (and KEDA's Prometheus scaler) reads it."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    pattern = re.compile(r'^bert_stream_consumer_lag\{partition="(\d+)",topic="([^"]+)"\} (\S+)$', re.MULTILINE)
    return {int(p): float(v) for p, t, v in pattern.findall(body) if t == topic}


class GatedModel(PredictOnly):
    """The served model, held at a gate: nothing is published (so nothing committed) until it opens."""

    gate = threading.Event()

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def predict(self, texts):
        assert self.gate.wait(120), "the test never opened the gate"
        return self._inner.predict(texts)


@xfail_on_broker("tansu", "it reports a partition's end offset as the start of its last batch + 1")
def test_lag_gauge_equals_the_real_lag(kafka_settings, names, worker_settings, start_worker, monkeypatch):
    from worker.engine import Engine

    class GatedEngine(Engine):
        def acquire(self):
            return GatedModel(super().acquire())

    monkeypatch.setattr(worker_loop, "LAG_EVERY_S", 0.2)
    GatedModel.gate.clear()
    ensure_topics(kafka_settings, {names.input_topic: 2})
    # without Redis: cache hits would publish without the model
    settings = worker_settings(redis_url=None, max_batch_size=16, max_queued_messages=32, commit_interval_ms=100)
    worker = start_worker(settings, engine=GatedEngine.from_settings(settings))
    try:
        worker.wait_assigned()
        ends = _produce(kafka_settings, names.input_topic, chinese_messages(300, seed=31), [0, 1])
        assert ends == {0: 150, 1: 150}
        # nothing committed yet (the model holds the first batches): the lag is every message produced
        port = worker.worker.http_port
        gauge = lambda: f"gauge {_lag_gauge(port, names.input_topic)}"  # noqa: E731
        wait_until(lambda: _lag_gauge(port, names.input_topic) == {0: 150.0, 1: 150.0}, 20, "lag 150 + 150", gauge)
        assert committed_offsets(kafka_settings, names.group_id, names.input_topic) == {0: None, 1: None}
    finally:
        GatedModel.gate.set()
    read_topic(kafka_settings, names.output_topic, expect=300, timeout=90)
    # everything published and committed: end minus committed, per partition, is 0, for the gauge as for the
    # group's offsets read back from the broker
    wait_until(lambda: _lag_gauge(port, names.input_topic) == {0: 0.0, 1: 0.0}, 30, "lag 0 + 0", gauge)
    assert committed_offsets(kafka_settings, names.group_id, names.input_topic) == {0: 150, 1: 150}
    # and a partial backlog: 40 more on partition 1 while the model is held again
    GatedModel.gate.clear()
    try:
        more = _produce(kafka_settings, names.input_topic, chinese_messages(40, seed=32), [1])
        assert more == {1: 190}
        wait_until(lambda: _lag_gauge(port, names.input_topic) == {0: 0.0, 1: 40.0}, 20, "lag 0 + 40", gauge)
    finally:
        GatedModel.gate.set()
    assert worker.stop() == 0


@xfail_on_broker("tansu", "CreatePartitions is not supported")
def test_partitions_added_while_running_are_picked_up(kafka_settings, names, worker_settings, start_worker):
    from kafka.admin import NewPartitions

    fast_metadata = dataclasses.replace(kafka_settings, metadata_max_age_ms=1000)
    ensure_topics(kafka_settings, {names.input_topic: 2})
    worker = start_worker(worker_settings(kafka=fast_metadata))
    worker.wait_assigned()
    _produce(kafka_settings, names.input_topic, chinese_messages(40, seed=41), [0, 1])
    assert len(read_topic(kafka_settings, names.output_topic, expect=40, timeout=60)) == 40
    admin = make_admin(kafka_settings)
    try:
        admin.create_partitions({names.input_topic: NewPartitions(total_count=4)})
    finally:
        admin.close()
    wait_until(lambda: worker.worker.health.assigned == 4, 60, "4 partitions assigned",
               lambda: f"assigned: {worker.worker.health.assigned}")
    ends = _produce(kafka_settings, names.input_topic, chinese_messages(60, seed=42), [2, 3])
    assert ends == {2: 30, 3: 30}
    outputs = [m.parse_output(r.value) for r in read_topic(kafka_settings, names.output_topic, expect=100,
                                                           timeout=60, settle=1.0)]
    sources = sorted((o["source"]["partition"], o["source"]["offset"]) for o in outputs)
    assert sources == sorted([(p, o) for p in (0, 1) for o in range(20)] + [(p, o) for p in (2, 3) for o in range(30)])
    assert worker.worker.metrics.rebalances.labels("assigned")._value.get() >= 2
    assert worker.stop() == 0
    assert committed_offsets(kafka_settings, names.group_id, names.input_topic) == {0: 20, 1: 20, 2: 30, 3: 30}

