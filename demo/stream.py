"""The Kafka and Redis side of the demo: where the servers are, the run's topic names, the messages it
sends (good, repeated and malformed), and the collector that reads back outputs and dead letters."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from bert_stream.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from demo.stats import Result
from deploy.local.errors import BrokerUnavailable
from deploy.local.stack import LocalStack, kafka_answers
from worker.messages import EMPTY_TEXT, INVALID_JSON, INVALID_UTF8, TOO_LARGE, parse_dlq_headers, parse_output

# Titles are short; a small limit lets the oversize example stay small too.
MAX_MESSAGE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class Servers:
    bootstrap_servers: str
    redis_url: str
    started: tuple[str, ...]  # what the demo started itself (and stops at the end)


def _answers(bootstrap: str | None) -> bool:
    if not bootstrap:
        return False
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return bool(port.isdigit()) and kafka_answers(host or "127.0.0.1", int(port))


def start_servers(state_dir: Path, cleanup: ExitStack) -> Servers:
    """Use the broker and Redis named by KAFKA_BOOTSTRAP_SERVERS / REDIS_URL when they answer; start a local
    broker and/or Redis (deploy.local) for whatever does not; ``cleanup`` stops what was started. The local
    broker is Apache Kafka where it can run (Java, Maven), else Tansu, said in one line; ``BROKER`` picks."""
    stale = LocalStack.load(state_dir)
    if stale:  # a previous demo killed before its cleanup: stop what it left
        stale.down()
    stack = LocalStack(state_dir)
    cleanup.callback(lambda: stack.down())  # the stack in use at the end (it may be the fallback)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    started = []
    if not _answers(bootstrap):
        try:
            bootstrap = stack.start_broker().address
        except BrokerUnavailable as exc:
            if os.environ.get("BROKER") or stack.broker_kind == "tansu":
                raise  # a broker the user chose: no silent substitute
            print(f"Apache Kafka cannot run here ({exc.reason}): falling back to Tansu (BROKER=tansu)", flush=True)
            stack = LocalStack(state_dir, "tansu")
            bootstrap = stack.start_broker().address
        started.append(f"{stack.broker_kind} broker")
    redis_service = stack.start_redis()  # reuses REDIS_URL when it answers
    if redis_service.pid:
        started.append("redis-server")
    if len(started) == 2:
        stack.save()  # `python -m deploy.local status --state-dir ...` can see it
    return Servers(bootstrap, redis_service.address, tuple(started))


@dataclasses.dataclass(frozen=True)
class RunNames:
    """Topics, consumer group and cache prefix of one demo run: runs sharing a broker or a Redis (a real
    cluster, the test suite's stack) never see each other's messages or cached results."""

    input_topic: str
    output_topic: str
    dlq_topic: str
    group_id: str
    cache_prefix: str

    @classmethod
    def new(cls) -> RunNames:
        tag = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        return cls(f"{tag}.input", f"{tag}.output", f"{tag}.dlq", f"{tag}-worker", f"bert-stream:{tag}:")

    def create_topics(self, kafka: KafkaSettings) -> None:
        ensure_topics(kafka, {self.input_topic: 2, self.output_topic: 2, self.dlq_topic: 1})


def write_jsonl(path: Path, items: list[tuple[str, str]]) -> Path:
    """(id, text) pairs as JSONL {id, text}: what ``worker.publish`` sends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in items),
                    encoding="utf-8")
    return path


def malformed_messages() -> list[tuple[str, bytes, str]]:
    """(key, value, the DLQ reason the worker must give) for each kind of bad input."""
    return [
        ("bad-utf8", b"\xe4\xbd\xa0\xff\xfe not UTF-8", INVALID_UTF8),
        ("bad-empty", json.dumps({"id": "bad-empty", "text": "   "}).encode(), EMPTY_TEXT),
        ("bad-json", b'{"id": "bad-json", "text": "unterminated', INVALID_JSON),
        ("bad-oversize", json.dumps({"id": "bad-oversize", "text": "长" * MAX_MESSAGE_BYTES},
                                    ensure_ascii=False).encode(), TOO_LARGE),
    ]


def send_raw(kafka: KafkaSettings, topic: str, messages: list[tuple[str, bytes, str]]) -> None:
    """Produce values byte for byte (``worker.publish`` only sends well-formed text)."""
    producer = make_producer(kafka)
    try:
        for key, value, _reason in messages:
            producer.send(topic, key=key.encode(), value=value)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    key: str
    reason: str
    detail: str


class Collector:
    """Reads the input (for produce timestamps), output and DLQ topics from the beginning, without a group.

    An output's latency is its record timestamp minus its input's, found through the output's source
    partition/offset; an output seen before its input waits in ``_pending`` for the next poll."""

    def __init__(self, kafka: KafkaSettings, names: RunNames, truth: dict[str, str]):
        self.names, self.truth = names, truth
        self.consumer = make_consumer(kafka, None, names.input_topic, names.output_topic, names.dlq_topic,
                                      auto_offset_reset="earliest")
        self.produced_ms: dict[tuple[int, int], int] = {}
        self.results: dict[str, Result] = {}
        self.dead_letters: list[DeadLetter] = []
        self._pending: list[tuple[dict, int]] = []

    def close(self) -> None:
        self.consumer.close()

    def poll(self, timeout_ms: int = 500) -> Iterator[Result | DeadLetter]:
        """New results and dead letters since the last poll (a repeated output of one id is skipped)."""
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                if record.topic == self.names.input_topic:
                    self.produced_ms[(record.partition, record.offset)] = record.timestamp
                elif record.topic == self.names.output_topic:
                    self._pending.append((parse_output(record.value), record.timestamp))
                else:
                    headers = parse_dlq_headers(record.headers or [])
                    letter = DeadLetter((record.key or b"").decode("utf-8", "replace"),
                                        headers.get("error", "?"), headers.get("error.detail", ""))
                    self.dead_letters.append(letter)
                    yield letter
        yield from self._resolve_pending()

    def _resolve_pending(self) -> Iterator[Result]:
        waiting = []
        for out, output_ms in self._pending:
            produced = self.produced_ms.get((out["source"]["partition"], out["source"]["offset"]))
            if produced is None:
                waiting.append((out, output_ms))
            elif out["id"] not in self.results:
                result = Result(out["id"], out["label"], out["score"], out["cached"], out["model_version"],
                                produced, output_ms, self.truth.get(out["id"]))
                self.results[result.id] = result
                yield result
        self._pending = waiting
