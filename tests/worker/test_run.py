"""The worker against the real broker, Redis and a real (small) model: count every message."""

from __future__ import annotations

import collections
import json
import time
import urllib.request

import pytest

from bert_stream.kafka import ensure_topics
from tests.worker.conftest import PredictOnly, chinese_messages, committed_offsets, produce, read_topic
from bert_stream import checkpoint
from worker import messages as m

pytestmark = pytest.mark.kafka

BAD = [  # (value, reason)
    (b"\xff\xfe\xfa garbage", m.INVALID_UTF8),
    (b'{"id": "broken", "text": ', m.INVALID_JSON),
    (b'{"id": "no-text"}', m.MISSING_TEXT),
    (b'{"id": "empty", "text": "  "}', m.EMPTY_TEXT),
    (b"   ", m.EMPTY_TEXT),
    ("超长".encode() * 2000, m.TOO_LARGE),
]


def _good_values(texts: list[str], start: int = 0) -> list[bytes]:
    """Half plain text, half JSON with an id."""
    out = []
    for i, text in enumerate(texts, start):
        if i % 2:
            out.append(json.dumps({"id": f"msg-{i}", "text": text, "lang": "zh"}, ensure_ascii=False).encode())
        else:
            out.append(text.encode())
    return out


def _by_source(records) -> dict[tuple[int, int], list]:
    out = collections.defaultdict(list)
    for r in records:
        value = m.parse_output(r.value)
        out[(value["source"]["partition"], value["source"]["offset"])].append((r, value))
    return out


def _source(record) -> tuple[int, int]:
    value = m.parse_output(record.value)
    return value["source"]["partition"], value["source"]["offset"]


def _id(record) -> str:
    return m.parse_output(record.value)["id"]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_every_message_gets_one_output_or_a_dead_letter(kafka_settings, names, worker_settings, start_worker,
                                                        stack, model_labels, client):
    confluent = pytest.importorskip("confluent_kafka")
    ensure_topics(kafka_settings, {names.input_topic: 2})
    texts = chinese_messages(300, seed=1)
    good = _good_values(texts)
    values = good[:150] + [v for v, _ in BAD] + good[150:]
    keys = [(json.loads(v)["id"] if v.startswith(b'{"id": "msg') else f"plain-{i % 17}").encode()
            for i, v in enumerate(values)]
    # the first part through kafka-python, the rest through librdkafka (confluent-kafka): two client stacks
    produce(kafka_settings, names.input_topic, values[:200], keys[:200])
    producer = confluent.Producer({"bootstrap.servers": stack.bootstrap_servers})
    for value, key in zip(values[200:], keys[200:]):
        producer.produce(names.input_topic, value=value, key=key, headers=[("trace", b"c")])
    assert producer.flush(30) == 0

    worker = start_worker(worker_settings(max_message_bytes=2000, kafka_client=client))
    outputs = read_topic(kafka_settings, names.output_topic, expect=len(good), timeout=90)
    dead = read_topic(kafka_settings, names.dlq_topic, expect=len(BAD), timeout=30)

    # exactly one output per good message, with a label of the model, the input's key, in partition order
    by_source = _by_source(outputs)
    assert len(outputs) == len(good) and all(len(v) == 1 for v in by_source.values())
    version = checkpoint.latest_version(worker.worker.settings.model_dir)
    for (r, value), in by_source.values():
        assert value["label"] in model_labels and value["model_version"] == version
        assert 0 < value["score"] <= 1 and len(value["top_k"]) == 3
        assert r.partition == value["source"]["partition"]
        if value["id"].startswith("msg-"):
            assert r.key == value["id"].encode()
    assert {f"msg-{i}" for i in range(1, 300, 2)} <= {value["id"] for (_, value), in by_source.values()}
    for p in (0, 1):
        offsets = [m.parse_output(r.value)["source"]["offset"] for r in outputs if r.partition == p]
        assert offsets == sorted(offsets)
    # the bad ones: on the DLQ with their reason, original bytes and key
    reasons = collections.Counter(m.parse_dlq_headers(r.headers)["error"] for r in dead)
    assert reasons == collections.Counter(reason for _, reason in BAD)
    assert {bytes(r.value or b"") for r in dead} == {v for v, _ in BAD}
    # repeats served from the cache: the set repeats ~14 titles
    assert sum(value["cached"] for (_, value), in by_source.values()) > 50

    port = worker.worker.http_port
    status, body = _get(port, "/metrics")
    assert status == 200 and "bert_stream_messages_total" in body and "bert_stream_batch_size_bucket" in body
    assert 'bert_stream_cache_lookups_total{outcome="recent"}' in body  # repeats polled with their twins
    assert _get(port, "/healthz")[0] == 200
    assert _get(port, "/readyz")[0] == 200

    # the same texts again: every one from the cache now
    produce(kafka_settings, names.input_topic, [t.encode() for t in texts[:50]])
    again = read_topic(kafka_settings, names.output_topic, expect=len(good) + 50, timeout=60)
    new = [m.parse_output(r.value) for r in again]
    new = [v for v in new if (v["source"]["partition"], v["source"]["offset"]) not in by_source]
    assert len(again) == len(good) + 50 and len(new) == 50 and all(v["cached"] for v in new)
    assert 'bert_stream_cache_lookups_total{outcome="hit"}' in _get(port, "/metrics")[1]  # these from Redis

    assert worker.stop() == 0
    committed = committed_offsets(kafka_settings, names.group_id, names.input_topic)
    assert sum(c or 0 for c in committed.values()) == len(values) + 50  # everything read is committed


class SlowFaultyModel(PredictOnly):
    """The real model, but the first multi-item batch takes ``delay`` seconds and texts with 故障 always fail."""

    slow_batches_left = 1

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, texts):
        if len(texts) > 1 and SlowFaultyModel.slow_batches_left:
            SlowFaultyModel.slow_batches_left -= 1
            time.sleep(self.delay)
        if any("故障" in t for t in texts):
            raise RuntimeError("poisoned input")
        return self.inner.predict(texts)


def test_slow_batches_do_not_get_the_worker_evicted(kafka_settings, names, worker_settings, start_worker):
    """A batch takes longer than max.poll.interval.ms: a loop that polled only between batches would be
    evicted. Also: a message whose inference fails twice goes to the DLQ and the rest of its batch does not.
    (6 s is the smallest session timeout brokers accept by default: group.min.session.timeout.ms.)"""
    import dataclasses

    from worker.engine import Engine

    class SlowEngine(Engine):
        def acquire(self):
            return SlowFaultyModel(super().acquire(), delay=8.5)

    SlowFaultyModel.slow_batches_left = 1
    fast_kafka = dataclasses.replace(kafka_settings, session_timeout_ms=6000, max_poll_interval_ms=7000)
    settings = worker_settings(kafka=fast_kafka, max_batch_size=16, cache_prefix=names.redis_prefix + "slow:")
    ensure_topics(kafka_settings, {names.input_topic: 1})
    texts = chinese_messages(30, seed=5)
    texts[7] = "这条消息会让模型故障"
    produce(kafka_settings, names.input_topic, texts)
    worker = start_worker(settings, engine=SlowEngine.from_settings(settings))
    outputs = read_topic(kafka_settings, names.output_topic, expect=29, timeout=60)
    dead = read_topic(kafka_settings, names.dlq_topic, expect=1, timeout=30)
    rebalances = worker.worker.metrics.rebalances
    assert rebalances.labels("revoked")._value.get() == 0 and rebalances.labels("assigned")._value.get() == 1
    assert worker.stop() == 0
    assert len(outputs) == 29 and sorted(m.parse_output(r.value)["source"]["offset"] for r in outputs) == [
        o for o in range(30) if o != 7]
    assert len(dead) == 1 and m.parse_dlq_headers(dead[0].headers)["error"] == m.INFERENCE_FAILED
    assert dead[0].value == texts[7].encode()
    assert committed_offsets(kafka_settings, names.group_id, names.input_topic) == {0: 30}


def test_new_checkpoint_mid_stream_is_picked_up_without_loss(kafka_settings, names, worker_settings,
                                                            start_worker, model_store, stack):
    import shutil
    import threading

    from tests.worker.conftest import publish_tiny_model

    ensure_topics(kafka_settings, {names.input_topic: 2})
    # model_poll_s long: the Redis announcement is what makes the reload prompt
    worker = start_worker(worker_settings(model_poll_s=30, commit_interval_ms=100))
    v1 = checkpoint.latest_version(model_store)
    texts = chinese_messages(400, seed=7)
    produce(kafka_settings, names.input_topic, texts[:100])
    assert len(read_topic(kafka_settings, names.output_topic, expect=100, timeout=60)) == 100

    # a corrupt version is announced: refused, the old model keeps serving
    bad = checkpoint.new_version_id()
    shutil.copytree(model_store / v1, model_store / bad)
    (model_store / bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    checkpoint.set_latest(model_store, bad)
    checkpoint.announce(stack.redis_url, bad)
    swaps = worker.worker.metrics.model_swaps
    deadline = time.monotonic() + 20
    while swaps.labels("refused")._value.get() < 1:
        assert time.monotonic() < deadline, "corrupt version not refused"
        time.sleep(0.1)

    # a good version is announced while messages keep coming
    def stream():
        for i in range(100, 400, 30):
            produce(kafka_settings, names.input_topic, texts[i:i + 30])
            time.sleep(0.1)

    producer = threading.Thread(target=stream)
    producer.start()
    v2 = publish_tiny_model(model_store, seed=2, labels=tuple(worker.worker.engine.current.labels))  # same labels
    checkpoint.announce(stack.redis_url, v2)
    producer.join()
    outputs = read_topic(kafka_settings, names.output_topic, expect=400, timeout=90)
    assert worker.stop() == 0

    values = [m.parse_output(r.value) for r in outputs]
    assert len(values) == 400 and len({(v["source"]["partition"], v["source"]["offset"]) for v in values}) == 400
    assert {v["model_version"] for v in values} == {v1, v2}
    assert swaps.labels("swapped")._value.get() == 1
    for p in (0, 1):  # per partition, once v2 appears v1 never comes back
        versions = [v["model_version"] for v in values if v["source"]["partition"] == p]
        assert versions == sorted(versions, key=lambda v: v == v2)


# ---- the real process: signals and crashes ------------------------------------------------------------------
def _spawn_worker(settings_args: list[str], env: dict, log_path):
    import os
    import subprocess
    import sys

    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "worker.run", *settings_args], stdout=log, stderr=log,
                            env={**os.environ, **env, "LOG_FORMAT": "json", "USE_TF": "0"})


def _args(names, model_store, port: int, session_timeout_ms: int = 6000) -> list[str]:
    return ["--input-topic", names.input_topic, "--output-topic", names.output_topic, "--dlq-topic", names.dlq_topic,
            "--group-id", names.group_id, "--model-dir", str(model_store), "--cache-prefix", names.redis_prefix,
            "--http-port", str(port), "--max-wait-ms", "10", "--commit-interval-ms", "200",
            "--session-timeout-ms", str(session_timeout_ms), "--max-poll-interval-ms", "60000"]


def _wait_ready(port: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        assert time.monotonic() < deadline, "worker not ready"
        try:
            if _get(port, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_commits_and_a_restart_redelivers_nothing(kafka_settings, names, model_store, stack, tmp_path):
    import signal

    from deploy.local.stack import free_port

    ensure_topics(kafka_settings, {names.input_topic: 2})
    texts = chinese_messages(220, seed=11)
    port = free_port()
    first = _spawn_worker(_args(names, model_store, port), stack.env(), tmp_path / "worker1.log")
    try:
        _wait_ready(port, first)
        assert _get(port, "/healthz")[0] == 200
        produce(kafka_settings, names.input_topic, texts[:200])
        assert len(read_topic(kafka_settings, names.output_topic, expect=200, timeout=60)) == 200
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert sum(committed_offsets(kafka_settings, names.group_id, names.input_topic).values()) == 200

    second = _spawn_worker(_args(names, model_store, port), stack.env(), tmp_path / "worker2.log")
    try:
        _wait_ready(port, second)
        produce(kafka_settings, names.input_topic, texts[200:])
        outputs = read_topic(kafka_settings, names.output_topic, expect=220, timeout=60, settle=2.0)
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=30) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert len(outputs) == 220  # nothing published twice: the restart started at the committed offsets
    log = (tmp_path / "worker1.log").read_text()
    assert '"event": "batch"' in log and '"event": "worker_stopped"' in log


@pytest.mark.slow
def test_kill_9_loses_nothing(kafka_settings, names, model_store, stack, tmp_path):
    import signal
    import threading

    from deploy.local.stack import free_port

    ensure_topics(kafka_settings, {names.input_topic: 2})
    texts = [json.dumps({"id": f"k{i}", "text": t}, ensure_ascii=False)
             for i, t in enumerate(chinese_messages(300, seed=13))]
    port = free_port()
    victim = _spawn_worker(_args(names, model_store, port), stack.env(), tmp_path / "victim.log")
    try:
        _wait_ready(port, victim)
        feeder = threading.Thread(target=lambda: [produce(kafka_settings, names.input_topic, texts[i:i + 50])
                                                  or time.sleep(0.1) for i in range(0, 300, 30)])
        feeder.start()
        read_topic(kafka_settings, names.output_topic, expect=60, timeout=60)
        victim.send_signal(signal.SIGKILL)  # mid-stream: batches in flight, offsets uncommitted
        victim.wait(timeout=10)
        feeder.join()
    finally:
        if victim.poll() is None:
            victim.kill()
    survivor = _spawn_worker(_args(names, model_store, free_port()), stack.env(), tmp_path / "survivor.log")
    try:
        # the broker expires the dead member after the session timeout (6 s), then the survivor joins
        outputs = read_topic(kafka_settings, names.output_topic, expect=300, timeout=90, distinct=_id)
        # every message has an output (by id: a producer retry may also duplicate an input); duplicates only
        # from the uncommitted window
        assert {_id(r) for r in outputs} == {f"k{i}" for i in range(300)}
    finally:
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(timeout=30)


def test_a_second_worker_joining_mid_stream_causes_no_loss_and_no_duplicates(kafka_settings, names,
                                                                           worker_settings, start_worker):
    """Scale-out: the first worker's partitions are revoked mid-stream. It publishes what it holds, commits,
    drops the rest; the new owners start exactly there, so each message has exactly one output."""
    import threading

    ensure_topics(kafka_settings, {names.input_topic: 4})
    texts = [json.dumps({"id": f"s{i}", "text": t}, ensure_ascii=False)
             for i, t in enumerate(chinese_messages(400, seed=17))]
    first = start_worker(worker_settings())
    first.wait_assigned()

    def stream():  # ~10 s of traffic: the rebalance happens in the middle of it
        for i in range(0, 400, 10):
            produce(kafka_settings, names.input_topic, texts[i:i + 10])
            time.sleep(0.2)

    feeder = threading.Thread(target=stream)
    feeder.start()
    read_topic(kafka_settings, names.output_topic, expect=40, timeout=60)
    second = start_worker(worker_settings())
    second.wait_assigned(timeout=60.0)
    feeder.join()
    outputs = read_topic(kafka_settings, names.output_topic, expect=400, timeout=90, settle=2.0, distinct=_id)
    assert first.worker.metrics.rebalances.labels("revoked")._value.get() >= 1
    assert second.worker.health.assigned >= 1
    assert {_id(r) for r in outputs} == {f"s{i}" for i in range(400)}  # no loss
    # the old owner commits what it published on revocation and the broker accepts that commit (the
    # generation only moves once every member has rejoined), so a graceful rebalance publishes nothing twice
    seen = collections.Counter(map(_source, outputs))  # per input record (a producer retry may duplicate one)
    assert max(seen.values()) == 1
    assert first.stop() == 0 and second.stop() == 0
