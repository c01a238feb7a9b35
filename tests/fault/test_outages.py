"""Outages of what the worker depends on: Redis (an optimisation) and the broker (the source of truth).

- Redis: stopped mid-stream and started again on the same port. No message may fail or be lost (the model
  runs instead), the outage is counted in /metrics (``bert_stream_cache_outages_total``, worker/metrics.py),
  and the cache is used again once Redis answers (cached=true outputs after the restart; the restarted
  Redis keeps nothing on disk, so a hit can only come from an entry stored after the recovery).
- Broker: Apache Kafka stopped mid-stream (SIGTERM, a clean shutdown; or kill -9, a crash) and started again
  on the same port and data dir. The worker must ride it out by itself (no restart), lose nothing, and
  publish twice at most its uncommitted window. A private broker, so the session's is not disturbed; only in
  the Apache Kafka pass: Tansu's in-memory storage loses every topic and offset on a restart.
"""

from __future__ import annotations

import signal
import time

import pytest

from bert_stream.kafka import KafkaSettings
from deploy.local import LocalStack
from tests.conftest import BROKER
from tests.fault import harness as h
from tests.fault.test_crash import _topics

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

SEED = 11


@pytest.fixture
def private_redis(tmp_path):
    """A Redis this test owns (the session's is shared with other tests): started, stopped, restarted here."""
    server = h.RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.parametrize("delivery, client", h.matrix())
def test_redis_outage_mid_stream(kafka_settings, names, model_store, stack, private_redis, workers, delivery, client):
    _topics(kafka_settings, names)
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=private_redis.url, http_port=0, delivery=delivery, kafka_client=client)
    # mostly repeats of a small set of titles: every repeat is a cache hit whenever Redis is up
    publisher = h.RatePublisher(kafka_settings, names.input_topic,
                                h.make_messages(20_000, seed=SEED, repeat_ratio=0.8), rate=60)
    started = time.monotonic()
    try:
        w = workers.start("worker", env)
        w.wait_assigned()
        publisher.start()
        h.wait_until(lambda: reader.poll() >= 0 and sum(r["cached"] for rs in reader.outputs.values() for r in rs)
                     >= 20, 90, "cache hits before the outage", workers.tails)
        private_redis.stop()
        down_at = time.time()
        w.wait_event("cache_unavailable", 30)
        before = len(reader.by_source)
        h.wait_until(lambda: reader.poll() >= 0 and len(reader.by_source) >= before + 150, 90,
                     "outputs during the outage", workers.tails)
        private_redis.start()  # same port, empty
        up_at = time.time()
        w.wait_event("cache_recovered", 60)
        h.wait_until(lambda: reader.poll() >= 0 and any(r["cached"] and r["_ts"] / 1000 > up_at
                                                        for rs in reader.outputs.values() for r in rs),
                     60, "a cache hit after Redis came back", workers.tails)
        sent = publisher.join_ok()
        reader.wait_all(sent, timeout=120, diagnostics=workers.tails)
        reader.drain()
        outages = w.metric("bert_stream_cache_outages_total")
        cache_up = w.metric("bert_stream_cache_up")
        unavailable = w.metric("bert_stream_cache_lookups_total", 'outcome="unavailable"')
        assert w.terminate() == 0
        outputs = [r for rs in reader.outputs.values() for r in rs]
        during = [r for r in outputs if down_at + 0.5 < r["_ts"] / 1000 < up_at]
        hits_after = sum(r["cached"] and r["_ts"] / 1000 > up_at for r in outputs)
        counts = h.count(sent, reader)
        h.report(f"redis-outage({h.variant(delivery, client)})", counts, outputs_during_outage=len(during),
                 cached_during_outage=sum(r["cached"] for r in during), cache_hits_after_recovery=hits_after,
                 outages_metric=outages, unavailable_lookups=unavailable,
                 seconds=round(time.monotonic() - started, 1))
    finally:
        publisher.stop.set()
        reader.close()

    assert counts.lost == 0 and counts.dlq == 0 and counts.output == len(sent)
    assert counts.duplicates == 0
    assert during and not any(r["cached"] for r in during)  # the model served the outage
    assert hits_after > 0
    assert outages is not None and outages >= 1
    assert unavailable is not None and unavailable > 0
    assert cache_up == 1


@pytest.mark.skipif(BROKER != "kafka", reason="needs a broker that keeps its data across a restart (Apache "
                                              "Kafka); Tansu's in-memory storage loses every topic")
@pytest.mark.parametrize("delivery, client", h.matrix())
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_broker_restart_mid_stream(names, model_store, tmp_path, workers, sig, delivery, client):
    private = LocalStack(tmp_path / "kafka-stack", broker="kafka")
    private.start_broker()
    settings = KafkaSettings(bootstrap_servers=private.bootstrap_servers, session_timeout_ms=6000,
                             max_poll_interval_ms=60_000, request_timeout_ms=20_000)
    reader = None
    started = time.monotonic()
    try:
        _topics(settings, names)
        sent = h.publish_messages(settings, names.input_topic, h.make_messages(1500, seed=SEED + 1))
        reader = h.TopicReader(settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
        # no Redis: this test is about the broker (the cache is disabled without REDIS_URL)
        env = h.worker_env(bootstrap_servers=private.bootstrap_servers, names=names, model_dir=model_store,
                           redis_url=None, delivery=delivery, kafka_client=client)
        w = workers.start("worker", env)
        h.wait_until(lambda: reader.poll() >= 0 and len(reader.by_source) >= 300, 180, "300 outputs",
                     workers.tails)
        private.stop_broker(sig)
        outage_started = time.monotonic()
        time.sleep(3.0)
        assert w.alive(), f"the worker died with the broker\n{w.tail()}"
        private.start_broker()  # same port, same data dir
        outage_s = time.monotonic() - outage_started
        done_at_restart = len(reader.by_source)
        reader.wait_all(sent, timeout=180, diagnostics=workers.tails, alive=w.alive)
        reader.drain()
        assert w.alive(), f"the worker exited instead of reconnecting\n{w.tail()}"
        assert w.terminate() == 0
        counts = h.count(sent, reader)
        h.report(f"broker-restart({sig.name},{h.variant(delivery, client)})", counts, outage_s=round(outage_s, 1),
                 done_at_restart=done_at_restart, window=h.uncommitted_window(client),
                 commit_failures=len(w.events("commit_failed")),
                 aborted_transactions=len(w.events("transaction_aborted")),
                 seconds=round(time.monotonic() - started, 1))
    finally:
        if reader is not None:
            reader.close()
        workers.cleanup()
        private.down()

    assert counts.lost == 0 and counts.dlq == 0 and counts.output == len(sent)
    assert counts.duplicates <= h.uncommitted_window(client)
    if delivery == "exactly-once":
        assert counts.duplicates == 0
