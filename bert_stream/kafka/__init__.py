"""Kafka for the whole project: connection settings, the worker's client interface, and one adapter per client.

- :mod:`bert_stream.kafka.config`: :class:`KafkaSettings` (servers, security, timeouts, group protocol).
- :mod:`bert_stream.kafka.interface`: what the worker needs of a client (poll, pause/resume, assignment
  events, commit, produce with a delivery result, transactions) and the errors it understands.
- :mod:`bert_stream.kafka.python`: kafka-python, the default client and the design's; also the tools the
  CLIs, tests and benchmarks use (``make_consumer``, ``make_producer``, ``ensure_topics``, ...).
- :mod:`bert_stream.kafka.librdkafka`: confluent-kafka used natively (``pip install 'bert-stream[confluent]'``).

:func:`adapter` picks the worker's by name; nothing else in the worker knows which one it has.
"""

from __future__ import annotations

from types import ModuleType

from bert_stream.kafka.config import GROUP_PROTOCOLS, KafkaSettings
from bert_stream.kafka.interface import Record, TopicPartition
from bert_stream.kafka.python import (UndecodableKey, close_producer, ensure_topics, make_admin, make_consumer,
                                      make_producer, unwritable)

CLIENTS = ("kafka-python", "confluent-kafka")

__all__ = ["CLIENTS", "GROUP_PROTOCOLS", "KafkaSettings", "Record", "TopicPartition", "UndecodableKey", "adapter",
           "close_producer", "ensure_topics", "make_admin", "make_consumer", "make_producer", "unwritable"]


def adapter(client: str) -> ModuleType:
    """The adapter module of ``client`` (one of :data:`CLIENTS`): its ``Consumer`` and ``Producer``."""
    if client == "confluent-kafka":
        from bert_stream.kafka import librdkafka

        return librdkafka
    if client == "kafka-python":
        from bert_stream.kafka import python

        return python
    raise ValueError(f"unknown Kafka client {client!r}: one of {', '.join(CLIENTS)}")
