"""Security settings and trust boundaries.

- Redis with a password (``requirepass``): the worker authenticates from ``REDIS_URL`` and uses the cache; with
  a wrong password it keeps classifying without the cache (counted, logged); the password never reaches
  the logs.
- Weights load only from safetensors: a checkpoint with only ``pytorch_model.bin`` (a pickle, which can run
  code when loaded) is refused by bert_stream.checkpoint.validate, by the worker at start-up and on hot reload,
  and the pickle is never opened (its payload would create a marker file).
- Nothing from a message or from Redis becomes a file path: an announcement of ``../../etc`` or of an
  absolute path, a LATEST that points outside the store, and an id like ``../../etc/passwd`` are inert.
- Kafka SSL/SASL: no local broker speaks them, so the test checks that the settings reach the client
  configuration and that secrets are masked in what the worker logs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import uuid
from pathlib import Path

import pytest
import redis

from bert_stream.settings import parse_settings, public_view
from tests.fault import harness as h
from tests.fault.test_crash import _topics
from bert_stream import checkpoint

SEED = 17


@pytest.fixture
def password_redis(tmp_path):
    """A private redis-server that requires a password; yields (password, port)."""
    server = h.RedisServer(tmp_path / "redis-auth", password=f"pw-{uuid.uuid4().hex}").start()
    yield server.password, server.port
    server.stop()


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_only_checkpoint(source: Path, target: Path, marker: Path) -> None:
    """A checkpoint folder like ``source`` whose weights are only a (malicious) pytorch_model.bin."""
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    with open(target / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)


def _announce_raw(url: str, value: str) -> None:
    """What a hostile or confused Redis client could write: not a version id at all."""
    client = redis.Redis.from_url(url)
    try:
        client.set(f"{checkpoint.ANNOUNCE_PREFIX}latest", value)
        client.publish(f"{checkpoint.ANNOUNCE_PREFIX}announce", value)
    finally:
        client.close()


def _cached(reader: h.TopicReader, ids) -> list[bool]:
    return [reader.outputs[i][0]["cached"] for i in ids]


@pytest.mark.fault
@pytest.mark.kafka
@pytest.mark.slow
def test_redis_password_and_untrusted_paths(kafka_settings, names, model_store, stack, password_redis, workers,
                                            tmp_path):
    password, port = password_redis
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    _topics(kafka_settings, names)
    v0 = checkpoint.latest_version(model_store)
    marker = tmp_path / "pickle-was-loaded"
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic)
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=url, model_poll_s=0.5)
    # a second worker, started at the same time, whose store holds only a pickle checkpoint
    pickle_store = tmp_path / "pickle-store"
    pickle_store.mkdir()
    pickle_only_checkpoint(model_store / v0, pickle_store / v0, marker)
    (pickle_store / checkpoint.LATEST).write_text(v0 + "\n")
    refused_env = dict(env, BERT_STREAM_MODEL_DIR=str(pickle_store), BERT_STREAM_GROUP_ID=names.group_id + "-pkl")
    started = time.monotonic()
    try:
        w = workers.start("worker", env)
        pickle_worker = workers.start("pickle-worker", refused_env)
        messages = h.make_messages(40, seed=SEED, repeat_ratio=0.0)
        first = h.publish_messages(kafka_settings, names.input_topic, messages)
        reader.wait_all(first, timeout=180, diagnostics=workers.tails, alive=w.alive)
        # the same texts again, new ids: all from the cache on the password-protected Redis
        again = [(f"again-{i}", json.dumps({"id": f"again-{i}", "text": json.loads(v)["text"]},
                                           ensure_ascii=False).encode()) for i, (_, v) in enumerate(messages)]
        second = h.publish_messages(kafka_settings, names.input_topic, again)
        reader.wait_all(second, timeout=60, diagnostics=workers.tails, alive=w.alive)
        keys = redis.Redis.from_url(url).keys(f"{names.redis_prefix}*")

        # paths from Redis or from LATEST are never followed
        outside = tmp_path / "outside"
        shutil.copytree(model_store / v0, outside / "20991231T000000Z-abcdef")
        for hostile in ("../../etc", "/etc/passwd", "../outside/20991231T000000Z-abcdef"):
            _announce_raw(url, hostile)
        (model_store / checkpoint.LATEST).write_text("../outside/20991231T000000Z-abcdef\n")
        w.wait_event("model_pointer_unreadable", 30)
        # a pickle-only version published as LATEST: refused on hot reload, the pickle never opened
        bad = checkpoint.new_version_id()
        pickle_only_checkpoint(model_store / v0, model_store / bad, marker)
        checkpoint.set_latest(model_store, bad)
        checkpoint.announce(url, bad)
        refusal = w.wait_event("model_refused", 60, where=lambda e: e.get("model_version") == bad)
        checkpoint.set_latest(model_store, v0)

        third_ids = ["../../etc/passwd"] + [f"third-{i}" for i in range(1, 10)]
        third_msgs = [(i, json.dumps({"id": i, "text": f"路径测试{n}"}, ensure_ascii=False).encode())
                      for n, i in enumerate(third_ids)]
        third = h.publish_messages(kafka_settings, names.input_topic, third_msgs)
        reader.wait_all(third, timeout=60, diagnostics=workers.tails, alive=w.alive)
        reader.drain()
        pickle_rc = pickle_worker.proc.wait(timeout=120)
        assert w.terminate() == 0
        sent = h.Sent(first.ids + second.ids + third.ids, first.sources + second.sources + third.sources)
        counts = h.count(sent, reader)
        h.report("security-redis-password", counts, cached_second_round=sum(_cached(reader, second.ids)),
                 redis_keys=len(keys), pickle_worker_exit=pickle_rc, seconds=round(time.monotonic() - started, 1))
    finally:
        reader.close()

    assert counts.lost == 0 and counts.dlq == 0 and counts.duplicates == 0
    assert keys and all(_cached(reader, second.ids))
    assert not any(_cached(reader, first.ids))
    # nothing outside the store was loaded; the pickle was never unpickled
    loaded = [e for e in w.events("model_loaded")]
    assert [e["model_version"] for e in loaded] == [v0], loaded
    assert all(Path(e["folder"]).resolve().is_relative_to(model_store.resolve()) for e in loaded)
    assert "model.safetensors is missing" in refusal["error"]
    assert not marker.exists(), "a pickle checkpoint was unpickled"
    assert pickle_rc != 0 and "model.safetensors" in pickle_worker.log_text()
    assert {r[0]["model_version"] for r in (reader.outputs[i] for i in third.ids)} == {v0}
    assert reader.outputs["../../etc/passwd"][0]["label"]  # an id is just a string that is echoed
    for worker in (w, pickle_worker):
        assert password not in worker.log_text(), f"{worker.name} logged the Redis password"


@pytest.mark.fault
@pytest.mark.kafka
@pytest.mark.slow
def test_wrong_redis_password_runs_without_cache(kafka_settings, names, model_store, stack, password_redis,
                                                 workers):
    password, port = password_redis
    wrong = f"wrong-{uuid.uuid4().hex}"
    _topics(kafka_settings, names)
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic)
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=f"redis://:{wrong}@127.0.0.1:{port}/0", http_port=0)
    started = time.monotonic()
    try:
        w = workers.start("worker", env)
        messages = h.make_messages(200, seed=SEED + 1, repeat_ratio=0.7)
        sent = h.publish_messages(kafka_settings, names.input_topic, messages)
        reader.wait_all(sent, timeout=180, diagnostics=workers.tails, alive=w.alive)
        reader.drain()
        unavailable = w.wait_event("cache_unavailable", 10)
        cache_up = w.metric("bert_stream_cache_up")
        assert w.alive()
        assert w.terminate() == 0
        counts = h.count(sent, reader)
        h.report("security-wrong-redis-password", counts, cache_up=cache_up, error=unavailable["error"][:60],
                 seconds=round(time.monotonic() - started, 1))
    finally:
        reader.close()

    assert counts.lost == 0 and counts.dlq == 0 and counts.duplicates == 0
    assert not any(r["cached"] for rs in reader.outputs.values() for r in rs)
    assert "Authentication" in unavailable["error"] or "auth" in unavailable["error"].lower()
    assert cache_up == 0
    assert wrong not in w.log_text() and password not in w.log_text()


def test_pickle_weights_are_refused_by_the_checkpoint_contract(fault_store, tmp_path):
    """bert_stream.checkpoint.validate and publish refuse a folder without model.safetensors, and never open the
    pickle that is there instead."""
    marker = tmp_path / "pickle-was-loaded"
    version = checkpoint.latest_version(fault_store)
    folder = tmp_path / "pickle-only"
    pickle_only_checkpoint(fault_store / version, folder, marker)
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is missing"):
        checkpoint.validate(folder)
    store = tmp_path / "store"
    store.mkdir()
    staged = checkpoint.staging_dir(store, checkpoint.new_version_id())
    shutil.copytree(folder, staged, dirs_exist_ok=True)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.publish(store, staged, checkpoint.new_version_id())
    assert checkpoint.latest_version(store) is None
    # a LATEST naming a path instead of a version id is an error, not a path to follow
    for pointer in ("../../etc", "/etc/passwd", "../outside/20991231T000000Z-abcdef"):
        (store / checkpoint.LATEST).write_text(pointer)
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.latest_version(store)
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.set_latest(store, pointer)
    assert not marker.exists()


def test_security_settings_reach_the_clients_and_secrets_stay_out_of_logs():
    """SASL_SSL + SCRAM and a Redis password from the environment: the Kafka client gets them, the settings
    the worker logs at start-up (``public_view``) show none of the secrets."""
    from worker.settings import WorkerSettings

    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "broker-0.kafka:9093", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "worker",
        "KAFKA_SASL_PASSWORD": "kafka-secret-123", "KAFKA_SSL_CAFILE": "/etc/ssl/kafka-ca.pem",
        "REDIS_URL": "rediss://:redis-secret-456@redis.internal:6380/0",
    }
    settings = parse_settings(WorkerSettings, [], prog="worker", env=env)
    config = settings.kafka.client_config()
    assert config["security_protocol"] == "SASL_SSL" and config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "worker" and config["sasl_plain_password"] == "kafka-secret-123"
    assert config["ssl_cafile"] == "/etc/ssl/kafka-ca.pem" and config["ssl_check_hostname"] is True
    assert settings.redis_url.startswith("rediss://")  # TLS to Redis is a URL scheme away
    shown = json.dumps(public_view(settings))
    assert "kafka-secret-123" not in shown
    assert "redis-secret-456" not in shown, f"the worker logs the Redis password at start-up: {shown}"
    with pytest.raises(SystemExit):  # SASL without credentials fails clearly, before any connection
        parse_settings(WorkerSettings, [], prog="worker",
                       env={"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN"})
    assert os.environ.get("KAFKA_SASL_PASSWORD") != "kafka-secret-123"
