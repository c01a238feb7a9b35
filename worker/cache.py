"""The result cache on Redis: keys, one-round-trip lookup, pipelined store, outage handling.

Key: ``<prefix><model version>:<entry format>:<sha256 of the normalised text>``. The version is part of the
key, so a new model never serves its predecessor's answers, and the old entries simply expire (TTL). The
text is the normalised text (:func:`worker.messages.normalize_text`) the model itself classifies. The value
is the prediction's part of the output record (:attr:`worker.messages.Prediction.json`); its format is in
the key too, so during a rolling upgrade that changes it the old and the new workers each keep their own
entries instead of overwriting each other's with values the other reads as misses.

Round trips: one ``MGET`` per poll for every text it returned (the worker's main thread, before batching),
one script call per batch that stores the new results after inference (``SET ... EX ttl`` each).

Redis is an optimisation, never a dependency: when a call fails or exceeds ``timeout_ms`` the cache is
marked down, the batch runs without it, and calls are skipped until a retry time (backoff doubling from
0.5 s to 30 s); the first call that succeeds marks it up again. Each change of state is logged once and
counted; skipped lookups are counted as misses with outcome ``unavailable``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

from bert_stream.logs import get_logger
from worker.messages import Prediction

log = get_logger("worker.cache")

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
# Entries read back into predictions, kept by their bytes: a popular text's entry is the same bytes every
# time, and reading one (JSON, checks, the dataclass) is the largest single step of a cache hit.
# An entry's bytes decide its prediction completely, so this never answers differently; it is emptied
# when full (a cheap bound: popular entries come back in the next lookups).
PARSED_ENTRIES = 16_384


# SET key value EX ttl for every key: ARGV[1] is the TTL, ARGV[i + 1] the value of KEYS[i]. Atomic as a side
# effect, which nothing relies on; the keys of one call may lie in different cluster slots only on a
# single-node Redis, which is what the worker's client connects to.
STORE_SCRIPT = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1]) end"


ENTRY_FORMAT = "j1"  # a JSON object of the output's prediction fields (before it: a JSON array, no tag)


def cache_key(prefix: str, version: str, text: str) -> str:
    return cache_keys(prefix, version, [text])[0]


def cache_keys(prefix: str, version: str, texts: Sequence[str]) -> list[str]:
    """:func:`cache_key` of each text, the common head formatted once (a lookup keys a whole poll)."""
    head, sha256 = f"{prefix}{version}:{ENTRY_FORMAT}:", hashlib.sha256
    return [head + sha256(t.encode("utf-8")).hexdigest() for t in texts]


class ResultCache:
    """Lookup/store predictions by (model version, text). ``url=None`` disables the cache."""

    def __init__(self, url: str | None, prefix: str, ttl_s: int, timeout_ms: int, *, metrics=None,
                 clock: Callable[[], float] = time.monotonic):
        self.url, self.prefix, self.ttl_s, self.timeout_s = url, prefix, ttl_s, timeout_ms / 1000
        self.metrics = metrics
        self.clock = clock
        self._client = None  # created lazily: constructing the cache never touches the network
        self.up = True
        self._retry_at = 0.0
        self._backoff = MIN_BACKOFF_S
        self._parsed: dict[bytes, Prediction] = {}  # entry bytes -> the prediction they hold (see lookup)
        self._store_script = None  # the registered store script; False once Redis refused scripts

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def _redis(self):
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # no client-side retries: a slow or dead Redis must cost one timeout per batch, not several
            self._client = redis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        return self._client

    def _usable(self) -> bool:
        return self.enabled and (self.up or self.clock() >= self._retry_at)

    def _ok(self) -> None:
        if not self.up:
            log.warning("cache_recovered", url=_safe_url(self.url))
            self._count_state(True)
        self.up, self._backoff = True, MIN_BACKOFF_S

    def _failed(self, exc: Exception) -> None:
        if self.up:
            log.warning("cache_unavailable", url=_safe_url(self.url), error=f"{type(exc).__name__}: {exc}"[:300],
                        retry_in_s=self._backoff)
            self._count_state(False)
            if self.metrics:
                self.metrics.cache_outages.inc()
        else:
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        self.up = False
        self._retry_at = self.clock() + self._backoff
        if self._client is not None:  # drop pooled sockets that may be half-dead
            try:
                self._client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001
                pass

    def _count_state(self, up: bool) -> None:
        if self.metrics:
            self.metrics.cache_up.set(1 if up else 0)

    def _count(self, outcome: str, n: int) -> None:
        if self.metrics and n:
            self.metrics.cache_lookups.labels(outcome).inc(n)

    def lookup(self, version: str, texts: Sequence[str]) -> list[Prediction | None]:
        """Cached predictions for ``texts`` (None where absent), in one MGET."""
        if not texts or not self._usable():
            if self.enabled:
                self._count("unavailable", len(texts))
            return [None] * len(texts)
        try:
            raw = self._redis().mget(cache_keys(self.prefix, version, texts))
        except Exception as exc:  # noqa: BLE001 - any Redis/socket error: go on without the cache
            self._failed(exc)
            self._count("unavailable", len(texts))
            return [None] * len(texts)
        self._ok()
        out: list[Prediction | None] = []
        parsed = self._parsed
        for value in raw:
            if value is None:
                out.append(None)
            elif (prediction := parsed.get(value)) is not None:
                out.append(prediction)
            else:
                try:
                    prediction = Prediction.from_cache(value)
                except (ValueError, TypeError):
                    out.append(None)  # an entry we cannot read (another writer, older format) is a miss
                    continue
                if len(parsed) >= PARSED_ENTRIES:
                    parsed.clear()
                parsed[value] = prediction
                out.append(prediction)
        hits = sum(p is not None for p in out)
        self._count("hit", hits)
        self._count("miss", len(out) - hits)
        return out

    def store(self, version: str, items: Sequence[tuple[str, Prediction]]) -> None:
        """Write new results, each with the TTL, in one round trip: one script call that SETs them all (a
        pipeline of SETs costs the client a command object per entry), or a pipeline where scripts are
        refused."""
        if not items or not self._usable():
            return
        keys = cache_keys(self.prefix, version, [text for text, _ in items])
        values = [prediction.to_cache() for _text, prediction in items]
        try:
            if self._store_script is not False:
                from redis.exceptions import ResponseError

                try:
                    self._script()(keys=keys, args=[self.ttl_s, *values])
                except ResponseError as exc:  # scripting disabled (ACL, a managed Redis)
                    log.warning("cache_script_refused", error=str(exc)[:200], action="storing by pipeline")
                    self._store_script = False
            if self._store_script is False:
                with self._redis().pipeline(transaction=False) as pipe:
                    for key, value in zip(keys, values):
                        pipe.set(key, value, ex=self.ttl_s)
                    pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        self._ok()

    def _script(self):
        if self._store_script is None:
            self._store_script = self._redis().register_script(STORE_SCRIPT)
        return self._store_script

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            if self._store_script is not False:
                self._store_script = None  # bound to the closed client


def _safe_url(url: str | None) -> str | None:
    """The URL without its password, for logs."""
    if not url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
