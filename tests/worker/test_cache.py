"""The cache against a real Redis: one round trip per batch, TTL, per-version keys, and an outage."""

from __future__ import annotations

import os
import time

import pytest
import redis

from deploy.local import LocalStack
from worker.cache import ResultCache, cache_key
from worker.messages import Prediction
from worker.metrics import WorkerMetrics

P = Prediction("体育", 0, 0.9, (("体育", 0.9), ("财经", 0.05)))


def test_keys_depend_on_version_and_text():
    assert cache_key("p:", "v1", "国足") != cache_key("p:", "v2", "国足")
    assert cache_key("p:", "v1", "国足") != cache_key("p:", "v1", "国足 ")
    assert cache_key("p:", "v1", "国足").startswith("p:v1:")


def test_disabled_cache_never_connects():
    cache = ResultCache(None, "p:", 60, 100)
    assert cache.lookup("v1", ["a"]) == [None]
    cache.store("v1", [("a", P)])  # no-op


def test_lookup_and_store_against_redis(stack, names):
    metrics = WorkerMetrics()
    cache = ResultCache(stack.redis_url, names.redis_prefix, ttl_s=30, timeout_ms=500, metrics=metrics)
    assert cache.lookup("v1", ["国足获胜", "央行降准"]) == [None, None]
    cache.store("v1", [("国足获胜", P)])
    assert cache.lookup("v1", ["国足获胜", "央行降准"]) == [P, None]
    assert cache.lookup("v2", ["国足获胜"]) == [None]  # a new model version does not see old answers
    ttl = redis.Redis.from_url(stack.redis_url).ttl(cache_key(names.redis_prefix, "v1", "国足获胜"))
    assert 0 < ttl <= 30
    assert metrics.cache_lookups.labels("hit")._value.get() == 1
    assert metrics.cache_lookups.labels("miss")._value.get() == 4


def test_an_entry_is_read_once_and_a_changed_entry_is_read_again(stack, names):
    cache = ResultCache(stack.redis_url, names.redis_prefix, ttl_s=30, timeout_ms=500)
    cache.store("v1", [("国足获胜", P), ("国足告负", P)])
    first = cache.lookup("v1", ["国足获胜", "国足告负"])
    assert first == [P, P] and first[0] is first[1]  # the same bytes: parsed once, one shared prediction
    other = Prediction("财经", 1, 0.7, (("财经", 0.7),))
    cache.store("v1", [("国足告负", other)])
    assert cache.lookup("v1", ["国足获胜", "国足告负"]) == [P, other]
    redis.Redis.from_url(stack.redis_url).set(cache_key(names.redis_prefix, "v1", "国足获胜"), b"[1, 2]")
    assert cache.lookup("v1", ["国足获胜"]) == [None]  # unreadable: a miss, never remembered as an answer


@pytest.fixture
def private_redis(tmp_path):
    saved = os.environ.pop("REDIS_URL", None)  # our own server: this test stops it
    try:
        local = LocalStack(tmp_path, "tansu")
        local.start_redis()
    finally:
        if saved is not None:
            os.environ["REDIS_URL"] = saved
    yield local
    local.down()


def test_outage_skips_the_cache_and_recovers(private_redis, names, caplog):
    metrics = WorkerMetrics()
    clock = [0.0]
    cache = ResultCache(private_redis.redis_url, names.redis_prefix, ttl_s=60, timeout_ms=200, metrics=metrics,
                        clock=lambda: clock[0])
    cache.store("v1", [("a", P)])
    assert cache.lookup("v1", ["a"]) == [P]

    private_redis.stop_redis()
    t0 = time.monotonic()
    assert cache.lookup("v1", ["a", "b"]) == [None, None]  # down: the batch goes on without the cache
    assert not cache.up and metrics.cache_outages._value.get() == 1
    for _ in range(100):  # while backing off, no network calls at all: fast
        assert cache.lookup("v1", ["a"]) == [None]
        cache.store("v1", [("a", P)])
    assert time.monotonic() - t0 < 2.0
    assert metrics.cache_lookups.labels("unavailable")._value.get() == 102
    assert metrics.cache_up._value.get() == 0

    # same port; an in-memory Redis comes back empty. (LocalStack.start_redis cannot parse the port out of its
    # own "redis://host:port/0" address on a restart: strip the "/0" until deploy/local is fixed.)
    service = private_redis.services["redis"]
    service.address = service.address.removesuffix("/0")
    private_redis.start_redis()
    clock[0] += 60  # past the backoff
    assert cache.lookup("v1", ["a"]) == [None]
    assert cache.up and metrics.cache_up._value.get() == 1
    cache.store("v1", [("a", P)])
    assert cache.lookup("v1", ["a"]) == [P]
    assert metrics.cache_outages._value.get() == 1  # one outage, counted once


def test_slow_redis_counts_as_down(names):
    import socket
    import threading

    server = socket.socket()  # accepts connections, never answers: a hung Redis
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns = []
    threading.Thread(target=lambda: conns.append(server.accept()), daemon=True).start()
    cache = ResultCache(f"redis://127.0.0.1:{server.getsockname()[1]}/0", names.redis_prefix, 60, timeout_ms=100)
    t0 = time.monotonic()
    assert cache.lookup("v1", ["a"]) == [None]
    assert time.monotonic() - t0 < 1.0 and not cache.up
    server.close()


def test_a_redis_that_refuses_scripts_gets_its_entries_by_pipeline(stack, names):
    """Stores are one script call; a Redis whose ACL (or vendor) refuses scripting still gets every entry,
    by pipeline (the refusal is logged once)."""
    admin = redis.Redis.from_url(stack.redis_url)
    user = f"noscript-{names.redis_prefix.strip(':').replace(':', '-')}"
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@scripting"])
    try:
        host, port = admin.connection_pool.connection_kwargs["host"], admin.connection_pool.connection_kwargs["port"]
        cache = ResultCache(f"redis://{user}:pw@{host}:{port}/0", names.redis_prefix, ttl_s=30, timeout_ms=500)
        cache.store("v1", [("国足获胜", P)])
        cache.store("v1", [("央行降准", P)])
        assert cache.up and cache.lookup("v1", ["国足获胜", "央行降准"]) == [P, P]
        assert 0 < admin.ttl(cache_key(names.redis_prefix, "v1", "央行降准")) <= 30
        assert cache._store_script is False  # refused once, not asked again per batch
        cache.close()
    finally:
        admin.acl_deluser(user)
