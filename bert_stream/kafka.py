"""Kafka client construction: the one place that knows bootstrap servers, security and timeouts.

Every consumer, producer and admin client in the project (worker, publish/tail CLIs, trainer announce,
tests, benchmarks) is built here, so security settings (SSL, SASL PLAIN/SCRAM) and the timeouts that
tolerate the local brokers' quirks are decided once.

Timeouts, and why:
- ``session_timeout_ms`` (default 10 s): how long a crashed worker holds its partitions before the group
  reassigns them. Shorter means faster failover but more false evictions on a loaded machine. Tansu takes
  about half of it to complete a join, so tests use 2-6 s.
- ``max_poll_interval_ms`` (default 5 min): the worker's loop polls between batches and a batch is bounded
  (``max_batch_tokens``), so a poll always comes far sooner; the margin covers a model swap.
- kafka-python can lose a finished group join when polls are short and spaced (the next poll sends a fresh
  JoinGroup, and the partitions the lost join gave stay unowned), so the worker polls with a timeout of at
  least ``JOIN_POLL_TIMEOUT_MS`` from a revocation (or its start) until it is assigned partitions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bert_stream.logs import register_secrets
from bert_stream.settings import require, setting

JOIN_POLL_TIMEOUT_MS = 1000

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclasses.dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = setting(
        "127.0.0.1:9092",
        env="KAFKA_BOOTSTRAP_SERVERS",
        help="Comma-separated host:port list of Kafka brokers. `python -m deploy.local up` writes the local one.",
    )
    security_protocol: str = setting(
        "PLAINTEXT",
        env="KAFKA_SECURITY_PROTOCOL",
        choices=_SECURITY_PROTOCOLS,
        help="PLAINTEXT for a local broker; SSL or SASL_SSL for a real cluster (encrypts credentials and data).",
    )
    sasl_mechanism: str | None = setting(
        None,
        env="KAFKA_SASL_MECHANISM",
        help=f"SASL mechanism, one of {', '.join(_SASL_MECHANISMS)}; SCRAM never sends the password itself.",
    )
    sasl_username: str | None = setting(None, env="KAFKA_SASL_USERNAME", help="SASL user name.")
    sasl_password: str | None = setting(None, env="KAFKA_SASL_PASSWORD", secret=True, help="SASL password.")
    ssl_cafile: str | None = setting(
        None, env="KAFKA_SSL_CAFILE", help="CA bundle that signed the brokers' certificates (PEM)."
    )
    ssl_certfile: str | None = setting(None, env="KAFKA_SSL_CERTFILE", help="Client certificate for mTLS (PEM).")
    ssl_keyfile: str | None = setting(None, env="KAFKA_SSL_KEYFILE", help="Client private key for mTLS (PEM).")
    session_timeout_ms: int = setting(
        10_000,
        env="KAFKA_SESSION_TIMEOUT_MS",
        help="Group session timeout: shorter fails over a crashed worker faster but risks false evictions.",
    )
    max_poll_interval_ms: int = setting(
        300_000,
        env="KAFKA_MAX_POLL_INTERVAL_MS",
        help="Longest gap between polls before the group evicts a consumer; batches are bounded far below it.",
    )
    request_timeout_ms: int = setting(
        30_000, env="KAFKA_REQUEST_TIMEOUT_MS", help="Per-request timeout; longer rides out broker restarts."
    )
    metadata_max_age_ms: int = setting(
        60_000,
        env="KAFKA_METADATA_MAX_AGE_MS",
        help="How often cluster metadata is refreshed: the longest a worker takes to notice partitions added to "
        "its input topic. One small request per refresh (the clients' default is 5 min).",
    )

    def __post_init__(self) -> None:
        require(bool(self.bootstrap_servers.strip()), "bootstrap_servers must not be empty")
        if self.sasl_mechanism is not None:
            require(self.sasl_mechanism in _SASL_MECHANISMS, f"sasl_mechanism must be one of {_SASL_MECHANISMS}")
        if self.security_protocol.startswith("SASL"):
            require(self.sasl_mechanism is not None, f"{self.security_protocol} needs sasl_mechanism")
            require(bool(self.sasl_username and self.sasl_password), "SASL needs sasl_username and sasl_password")
        require(self.session_timeout_ms >= 1000, "session_timeout_ms must be at least 1000")
        require(self.metadata_max_age_ms >= 100, "metadata_max_age_ms must be at least 100")
        require(
            self.max_poll_interval_ms > self.session_timeout_ms,
            "max_poll_interval_ms must exceed session_timeout_ms",
        )

    def client_config(self) -> dict[str, Any]:
        """Connection and security options shared by every kafka-python client."""
        config: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "metadata_max_age_ms": self.metadata_max_age_ms,
        }
        register_secrets(self.sasl_password)  # kafka-python logs this dict at DEBUG
        if self.sasl_mechanism:
            config.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config.update(
                ssl_check_hostname=True,
                ssl_cafile=self.ssl_cafile,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
            )
        return config


def make_consumer(settings: KafkaSettings, group_id: str | None, *topics: str, **overrides: Any):
    """A consumer that never auto-commits (the caller commits what it has published), and whose ``poll``
    never raises for one record it cannot parse (:class:`_Consumer`)."""
    config = {
        **settings.client_config(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": max(300, settings.session_timeout_ms // 4),
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        # request_timeout must exceed the session timeout for the JoinGroup request
        "request_timeout_ms": max(settings.request_timeout_ms, settings.session_timeout_ms + 5000),
        **overrides,
    }
    return _consumer_class()(*topics, **config)


class Record:
    """One consumed record as the worker reads it (kafka-python's ConsumerRecord has the same attributes):
    what the librdkafka adapter returns, and what either adapter returns in place of a record it could not
    read whole, with ``unreadable`` = (DLQ reason, detail). The worker dead-letters such a record like bad
    input, so its partition moves on and nothing is skipped silently."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "headers", "unreadable")

    def __init__(self, topic: str, partition: int, offset: int, key, value, headers, unreadable=None):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value, self.headers = key, value, headers or []
        self.unreadable = unreadable


_CONSUMER_CLASS = None


def _consumer_class():
    """kafka-python's KafkaConsumer, with a poll that skips a record it cannot parse (made once: the
    subclass needs kafka imported)."""
    global _CONSUMER_CLASS
    if _CONSUMER_CLASS is not None:
        return _CONSUMER_CLASS
    from kafka import KafkaConsumer
    from kafka import errors

    _lenient_header_keys()

    class _Consumer(KafkaConsumer):
        """``poll`` turns an error about one record (CRC, codec, corrupt framing) into an
        unreadable :class:`Record` at the partition's position and moves past it. kafka-python raises those
        from ``poll()`` after the records before it, and raises again at the same position forever: one
        such record would stop its partition, and the worker on every restart."""

        def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
            try:
                return super().poll(timeout_ms=timeout_ms, max_records=max_records, update_offsets=update_offsets)
            except (errors.CorruptRecordError, errors.UnsupportedCodecError, UnicodeDecodeError) as exc:
                failing = self._fetcher._next_partition_records  # the records whose parse raised
                if failing is None:
                    raise
                tp = failing.topic_partition
                offset = self.position(tp)
                self.seek(tp, offset + 1)  # also drops the fetcher's dead iterator (its offset is now stale)
                return {tp: [Record(tp.topic, tp.partition, offset, None, None, None,
                                    ("unreadable_record", f"{type(exc).__name__}: {exc}"[:500]))]}

    _CONSUMER_CLASS = _Consumer
    return _Consumer


class UndecodableKey(str):
    """A header key that is not UTF-8: its text is the bytes with backslash escapes (valid UTF-8, so any
    producer can copy it into a dead letter), ``raw`` the bytes themselves. The worker's decode rejects a
    record with one as ``invalid_header``."""

    raw: bytes

    def __new__(cls, raw: bytes) -> UndecodableKey:
        key = super().__new__(cls, raw.decode("utf-8", "backslashreplace"))
        key.raw = raw
        return key


def _lenient_header_keys() -> None:
    """kafka-python decodes header keys as strict UTF-8 while it parses a fetched batch, inside ``poll()``:
    one key that is not UTF-8 raises there, and takes every later record of its batch with it. A record
    that fails so is parsed again here with such a key as an :class:`UndecodableKey`."""
    from kafka.record import default_records as dr

    original = dr.DefaultRecordBatch._read_msg
    if getattr(original, "lenient", False):
        return

    def _read_msg(self, decode_varint=dr.decode_varint):
        try:
            return original(self, decode_varint)
        except UnicodeDecodeError:
            return _read_msg_escaping_keys(self, decode_varint)

    _read_msg.lenient = True
    dr.DefaultRecordBatch._read_msg = _read_msg


def _read_msg_escaping_keys(batch, decode_varint):
    """kafka-python 3.0's ``DefaultRecordBatch._read_msg`` (the v2 record format), with a header key that is
    not UTF-8 kept as an :class:`UndecodableKey`; only called for a record whose strict parse failed."""
    from kafka.record.default_records import DefaultRecord
    from kafka.errors import CorruptRecordError

    buffer, pos = batch._buffer, batch._pos
    length, pos = decode_varint(buffer, pos)
    start = pos
    _attributes, pos = decode_varint(buffer, pos)
    ts_delta, pos = decode_varint(buffer, pos)
    timestamp = batch.max_timestamp if batch.timestamp_type == batch.LOG_APPEND_TIME else batch.first_timestamp + ts_delta
    offset_delta, pos = decode_varint(buffer, pos)
    fields = []
    for _ in range(2):  # key, value
        size, pos = decode_varint(buffer, pos)
        fields.append(bytes(buffer[pos:pos + size]) if size >= 0 else None)
        pos += max(size, 0)
    count, pos = decode_varint(buffer, pos)
    headers = []
    for _ in range(max(count, 0)):
        size, pos = decode_varint(buffer, pos)
        raw = bytes(buffer[pos:pos + size])
        try:
            h_key = raw.decode("utf-8")
        except UnicodeDecodeError:
            h_key = UndecodableKey(raw)
        pos += size
        size, pos = decode_varint(buffer, pos)
        headers.append((h_key, bytes(buffer[pos:pos + size]) if size >= 0 else None))
        pos += max(size, 0)
    if pos - start != length:
        raise CorruptRecordError(f"Invalid record size: expected {length} bytes, read {pos - start}")
    batch._pos = pos
    return DefaultRecord(length, batch.base_offset + offset_delta, timestamp, batch.timestamp_type, *fields, headers)


def make_producer(settings: KafkaSettings, **overrides: Any):
    """A producer that waits for all in-sync replicas and retries: outputs are acknowledged before the
    input offsets that produced them are committed."""
    from kafka import KafkaProducer

    config = {
        **settings.client_config(),
        "acks": "all",
        "retries": 10,
        "linger_ms": 5,
        # batch_size stays at kafka-python's 16 KiB (~40 outputs): 128 KiB batches woke the sender thread less
        # often, but a request that fails across a broker restart then takes ~8x more outputs with it (256
        # duplicates instead of <= 96 in tests/fault/test_outages.py::test_broker_restart_mid_stream)
        "max_in_flight_requests_per_connection": 1,  # keeps per-partition order across retries
        **overrides,
    }
    return KafkaProducer(**config)


def close_producer(producer, timeout_s: float) -> None:
    """Close ``producer`` within about ``timeout_s``, for sure. kafka-python 3.0.12's ``close(timeout)``
    raises when its flush times out and then never stops the sender thread; what is still unsent is
    aborted here instead (its futures fail), as close() itself does once its flush returns."""
    from kafka.errors import KafkaTimeoutError

    try:
        producer.close(timeout=timeout_s)
    except KafkaTimeoutError:
        producer._sender.force_close()  # the sender thread aborts the incomplete batches as it stops
        producer._sender.join(max(timeout_s, 1.0))
        try:
            producer.close(timeout=0)
        except KafkaTimeoutError:
            pass  # the sender did not stop in time: it is a daemon thread, and a fenced one if transactional


def make_admin(settings: KafkaSettings, **overrides: Any):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**{**settings.client_config(), **overrides})


def ensure_topics(settings: KafkaSettings, topics: dict[str, int], replication_factor: int = -1) -> None:
    """Create the topics that do not exist yet (name -> partitions). Existing topics are left alone. The
    replication factor -1 is the broker's ``default.replication.factor`` (KIP-464): 1 on a one-node local
    broker, what the operators chose on a cluster, where acks=all output then survives a broker's loss."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(name, num_partitions=parts, replication_factor=replication_factor)
            for name, parts in topics.items()
            if name not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
    finally:
        admin.close()


def unwritable(settings: KafkaSettings, topics: list[str]) -> dict[str, str]:
    """Why each of ``topics`` that cannot be written cannot (it does not exist, or this client is not
    authorised to write it, as the broker's authoriser reports through Metadata); the writable ones are
    left out. One metadata request for all of them."""
    from kafka.errors import for_code

    admin = make_admin(settings)
    try:
        described = admin.describe_topics(list(topics))
    except Exception as exc:  # noqa: BLE001 - e.g. authorisation refused for the whole request
        return dict.fromkeys(topics, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        admin.close()
    problems = {}
    for meta in described:
        allowed = meta.get("authorized_operations")
        if meta.get("error_code"):
            problems[meta["name"]] = for_code(meta["error_code"]).__name__
        elif allowed and "WRITE" not in allowed and "ALL" not in allowed:
            problems[meta["name"]] = f"not authorised to write (allowed: {', '.join(allowed)})"
    return problems
