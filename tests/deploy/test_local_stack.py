"""The local stack starts real servers that standard clients talk to, and stops exactly what it started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import redis

from bert_stream.kafka import ensure_topics, make_consumer, make_producer
from deploy.local.stack import LocalStack, _pid_alive

pytestmark = pytest.mark.kafka


def _roundtrip_kafka_python(kafka_settings, topic: str) -> list[tuple[bytes, bytes, list]]:
    ensure_topics(kafka_settings, {topic: 2})
    producer = make_producer(kafka_settings)
    for i in range(10):
        producer.send(topic, key=f"k{i}".encode(), value=f"新闻标题 {i}".encode(), headers=[("h", b"v")])
    producer.flush()
    producer.close()
    consumer = make_consumer(kafka_settings, None, topic, consumer_timeout_ms=5000)
    got = [(m.key, m.value, m.headers) for m in consumer]
    consumer.close()
    return got


def test_kafka_python_produces_and_consumes(kafka_settings, names):
    got = _roundtrip_kafka_python(kafka_settings, names.input_topic)
    assert sorted(v.decode() for _, v, _ in got) == sorted(f"新闻标题 {i}" for i in range(10))
    assert all(h == [("h", b"v")] for _, _, h in got)


def test_confluent_kafka_produces_and_consumes(stack, names):
    confluent = pytest.importorskip("confluent_kafka")
    conf = {"bootstrap.servers": stack.bootstrap_servers}
    producer = confluent.Producer(conf)
    for i in range(5):
        producer.produce(names.input_topic, key=f"k{i}", value=f"评论 {i}".encode())
    assert producer.flush(10) == 0
    consumer = confluent.Consumer({**conf, "group.id": names.group_id, "auto.offset.reset": "earliest"})
    consumer.subscribe([names.input_topic])
    seen, deadline = [], time.monotonic() + 30
    while len(seen) < 5 and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None:
            seen.append(msg.value().decode())
    consumer.close()
    assert sorted(seen) == sorted(f"评论 {i}" for i in range(5))


@pytest.mark.skipif(shutil.which("kcat") is None, reason="Debian's kcat is not installed (apt-get install kcat)")
def test_kcat_round_trip_on_noida(stack, names):
    if stack.broker_kind != "noida":
        pytest.xfail("Tansu: Debian's kcat (librdkafka 2.0.2) fails with 'ApiVersionRequest failed: Read underflow'")
    subprocess.run(["kcat", "-P", "-b", stack.bootstrap_servers, "-t", names.input_topic, "-K:"],
                   input="k1:你好\nk2:世界\n", text=True, check=True, timeout=30)
    out = subprocess.run(["kcat", "-C", "-b", stack.bootstrap_servers, "-t", names.input_topic, "-e", "-f", "%k=%s\n"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert sorted(out.split()) == ["k1=你好", "k2=世界"]


def test_redis_answers(stack):
    client = redis.Redis.from_url(stack.redis_url)
    key = f"test:{uuid.uuid4().hex}"
    client.set(key, "好", ex=10)
    assert client.get(key).decode() == "好"
    cli = shutil.which("redis-cli")
    if cli:
        port = stack.redis_url.rsplit(":", 1)[1].split("/")[0]
        assert subprocess.run([cli, "-p", port, "ping"], capture_output=True, text=True).stdout.strip() == "PONG"


def test_cli_up_status_down_leaves_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "deploy.local", *a, "--state-dir", str(tmp_path)],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=60)
    up = run("up")
    assert up.returncode == 0, up.stderr
    assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:" in up.stdout and "REDIS_URL=redis://" in up.stdout
    again = run("up")  # idempotent: the same processes
    assert "already up" in again.stderr and again.stdout == up.stdout
    stack = LocalStack.load(tmp_path)
    pids = [(s.pid, s.binary) for s in stack.services.values()]
    assert all(_pid_alive(pid, binary) for pid, binary in pids)
    assert run("status").returncode == 0
    assert run("down").returncode == 0
    assert not any(_pid_alive(pid, binary) for pid, binary in pids)
    assert run("status").returncode == 1


def test_bad_broker_name_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deploy.local", "up", "--broker", "zookeeper"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_redis_and_broker_restart_on_the_same_address(tmp_path):
    saved = os.environ.pop("REDIS_URL", None)
    try:
        stack = LocalStack(tmp_path, "noida").up()
    finally:
        if saved is not None:
            os.environ["REDIS_URL"] = saved
    try:
        redis_url, bootstrap = stack.redis_url, stack.bootstrap_servers
        stack.stop_redis()
        stack.start_redis()
        stack.stop_broker()
        stack.start_broker()
        assert (stack.redis_url, stack.bootstrap_servers) == (redis_url, bootstrap)
        assert redis.Redis.from_url(redis_url).ping()
    finally:
        stack.down()
