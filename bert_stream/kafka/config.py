"""Kafka connection settings: the one place that knows bootstrap servers, security, timeouts and the group
protocol. Every client in the project (worker, publish/tail CLIs, trainer announce, tests, benchmarks) is built
from these, by either adapter, so they are decided once.

Timeouts, and why:
- ``session_timeout_ms`` (default 10 s): how long a crashed worker holds its partitions before the group
  reassigns them. Shorter means faster failover but more false evictions on a loaded machine. Tansu takes
  about half of it to complete a join, so tests use 2-6 s.
- ``max_poll_interval_ms`` (default 5 min): the worker's loop polls between batches and a batch is bounded
  (``max_batch_tokens``), so a poll always comes far sooner; the margin covers a model swap.
- ``group_protocol``: ``classic`` (JoinGroup/SyncGroup; every member stops for a rebalance's join) or
  ``consumer`` (KIP-848, Apache Kafka 4.x: the broker assigns, members fetch on through a rebalance; librdkafka
  only). Under ``consumer`` the session and heartbeat timeouts are the broker's
  (``group.consumer.session.timeout.ms``, 45 s by default), not the client's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bert_stream.logs import register_secrets
from bert_stream.settings import require, setting

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
GROUP_PROTOCOLS = ("classic", "consumer")


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

    group_protocol: str = setting(
        "classic",
        env="KAFKA_GROUP_PROTOCOL",
        choices=GROUP_PROTOCOLS,
        help="Consumer group protocol: classic, or consumer (KIP-848: rebalances without a stop; Apache Kafka "
        "4.x and the confluent-kafka client only).",
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


