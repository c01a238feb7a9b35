"""The local stack starts real servers that standard clients talk to, and stops exactly what it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from pathlib import Path

from kafka.structs import OffsetAndMetadata

from bert_stream.kafka import KafkaSettings, ensure_topics, make_admin, make_consumer, make_producer
from deploy.local import apache_kafka
from deploy.local.stack import LocalStack, _pid_alive
from tests.conftest import BROKER, xfail_on_broker

pytestmark = pytest.mark.kafka

# Apache Kafka's own lifecycle (data dir, jar fetch): once, in the Apache Kafka pass of `make test`
only_on_kafka = pytest.mark.skipif(BROKER != "kafka", reason="Apache Kafka's lifecycle: tested in the kafka pass")


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
@xfail_on_broker("tansu", "Debian's kcat (librdkafka 2.0.2) fails with 'ApiVersionRequest failed: Read underflow'")
def test_kcat_round_trip(stack, names):
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
        stack = LocalStack(tmp_path, BROKER).up()
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


@only_on_kafka
def test_kafka_keeps_topics_and_offsets_across_a_restart_and_down_removes_its_data(tmp_path):
    """Apache Kafka's data dir survives stop/start, also a kill -9 (a crash), and ``down`` removes it."""
    from kafka import TopicPartition

    stack = LocalStack(tmp_path, "kafka")
    stack.start_broker()
    try:
        settings = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
        topic = "restart-me"
        _roundtrip_kafka_python(settings, topic)  # 10 records on 2 partitions
        committer = make_consumer(settings, "restart-group", topic)
        tps = [TopicPartition(topic, p) for p in (0, 1)]
        committer.poll(timeout_ms=5000)
        committer.commit({tp: OffsetAndMetadata(1, "", -1) for tp in tps})
        committer.close(autocommit=False)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            stack.stop_broker(sig)
            assert not stack.services["broker"].alive()
            stack.start_broker()
            consumer = make_consumer(settings, "restart-group")
            try:
                ends = consumer.end_offsets(tps)
                assert sum(ends.values()) == 10, f"after {sig.name}: {ends}"
                assert [consumer.committed(tp) for tp in tps] == [1, 1], f"after {sig.name}"
            finally:
                consumer.close(autocommit=False)
        data_dir = Path(stack.services["broker"].data_dir)
        assert (data_dir / "meta.properties").exists()
    finally:
        stack.down()
    assert not data_dir.exists()


@only_on_kafka
def test_cli_down_keep_data_then_up_serves_the_same_topics(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "deploy.local", *a, "--state-dir", str(tmp_path)],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=180)
    assert run("up", "--broker", "kafka").returncode == 0
    try:
        settings = KafkaSettings(bootstrap_servers=LocalStack.load(tmp_path).bootstrap_servers)
        ensure_topics(settings, {"kept": 3})
        down = run("down", "--keep-data")
        assert down.returncode == 0 and "kept" in down.stderr
        assert run("up", "--broker", "kafka").returncode == 0
        settings = KafkaSettings(bootstrap_servers=LocalStack.load(tmp_path).bootstrap_servers)
        admin = make_admin(settings)
        try:
            assert "kept" in admin.list_topics()
        finally:
            admin.close()
    finally:
        assert run("down").returncode == 0
    assert not (tmp_path / "kafka-data").exists()


def _deploy_local_up(tmp_path, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "JAVA_HOME")}
    env.update({"BERT_STREAM_CACHE": str(tmp_path / "cache"), **env_changes})
    return subprocess.run([sys.executable, "-m", "deploy.local", "up", "--broker", "kafka",
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, env=env,
                          timeout=300)


def _only_python_on_path(tmp_path) -> str:
    """A PATH with this Python and nothing else (no java, no mvn)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    return str(bin_dir)


def test_no_java_is_one_line_that_names_the_tansu_fallback(tmp_path):
    out = _deploy_local_up(tmp_path, PATH=_only_python_on_path(tmp_path))
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "java" in out.stderr and "BROKER=tansu" in out.stderr and "Traceback" not in out.stderr


def test_no_mvn_is_one_line_that_names_the_tansu_fallback(tmp_path):
    java = shutil.which("java")
    if java is None:
        pytest.skip("needs a java without mvn; the no-java case is tested above")
    bin_dir = Path(_only_python_on_path(tmp_path))
    (bin_dir / "java").symlink_to(java)
    out = _deploy_local_up(tmp_path, PATH=str(bin_dir))
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "mvn" in out.stderr and "BROKER=tansu" in out.stderr and "Traceback" not in out.stderr


@only_on_kafka
def test_unreachable_registry_is_one_line_not_a_hang(tmp_path):
    """Maven pointed at a mirror that refuses connections, with an empty local repository."""
    home = tmp_path / "home"
    (home / ".m2").mkdir(parents=True)
    (home / ".m2" / "settings.xml").write_text(
        "<settings><mirrors><mirror><id>nowhere</id><mirrorOf>*</mirrorOf>"
        "<url>http://127.0.0.1:9/maven2</url></mirror></mirrors></settings>")
    out = _deploy_local_up(tmp_path, MAVEN_OPTS=f"-Duser.home={home}")
    assert out.returncode == 1
    error = out.stderr.strip().splitlines()[-1]
    assert "could not fetch Apache Kafka" in error and "BROKER=tansu" in error, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "cache" / f"kafka-{apache_kafka.KAFKA_VERSION}" / "libs.complete").exists()
