"""The feedback loop's two record formats on Kafka, and reading the labels back: one owner for the worker
that writes reviews, the tools that write labels and the trainer that reads them.

Review topic (worker -> reviewers), ``BERT_STREAM_REVIEW_TOPIC``; one JSON record per message picked::

    {"id": ..., "text": ..., "reason": "uncertain" | "sampled", "model_version": ..., "score": 0.53,
     "margin": 0.06, "top_k": [{"label": ..., "score": ...}, ...],
     "source": {"topic": ..., "partition": 0, "offset": 42}}

Labels topic (reviewers -> trainer): ``{"id", "text", "label"}`` keyed by the id, on a compacted topic
(``cleanup.policy=compact``), so a correction replaces the earlier label of the same id and the topic stays
as large as the set of labelled messages. A record with a null value (a tombstone) withdraws the id's label.

A label record that cannot be used (not JSON, no text, a label the model does not have) is counted by reason
in :class:`Labels` and skipped; it never stops the reader.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from bert_stream.kafka import KafkaSettings, ensure_topics, make_consumer

REVIEW_REASONS = ("uncertain", "sampled")
LABELS_TOPIC_CONFIG = {"cleanup.policy": "compact"}
READ_TIMEOUT_S = 120.0  # the labels topic read to its end: a broker that stops answering fails the read


class BadLabel(ValueError):
    """A label record that cannot be used; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def review_value(message_id, text: str, reason: str, version: str, top_k: Iterable[tuple[str, float]],
                 source: tuple[str, int, int]) -> bytes:
    """One review record (see the module docstring)."""
    top = [{"label": label, "score": round(float(p), 6)} for label, p in top_k]
    scores = [t["score"] for t in top] + [0.0]
    topic, partition, offset = source
    return json.dumps({"id": message_id, "text": text, "reason": reason, "model_version": version,
                       "score": scores[0], "margin": round(scores[0] - scores[1], 6), "top_k": top,
                       "source": {"topic": topic, "partition": partition, "offset": offset}},
                      ensure_ascii=False).encode()


def label_record(message_id, text: str, label: str) -> tuple[bytes, bytes]:
    """(key, value) of a label for the labels topic: keyed by the id, so compaction keeps the latest."""
    if message_id is None or str(message_id) == "":
        raise BadLabel("no_id", "a label needs the id of the message it labels")
    return str(message_id).encode(), json.dumps({"id": message_id, "text": text, "label": label},
                                                ensure_ascii=False).encode()


def parse_label(key: bytes | None, value: bytes, labels: Iterable[str] | None = None) -> tuple[str, str, str]:
    """(id, text, label) of a label record; BadLabel when it cannot be used. ``labels``: the known ones."""
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadLabel("not_json", str(exc)[:100]) from None
    if not isinstance(obj, dict):
        raise BadLabel("not_json", "not a JSON object")
    ident = obj.get("id")
    if ident is None and key is not None:
        ident = key.decode("utf-8", "replace")
    text, label = obj.get("text"), obj.get("label")
    if ident is None or str(ident) == "":
        raise BadLabel("no_id", "no id and no key")
    if not isinstance(text, str) or not text.strip():
        raise BadLabel("no_text", f"id {ident!r} has no text")
    if not isinstance(label, str) or not label:
        raise BadLabel("no_label", f"id {ident!r} has no label")
    if labels is not None and label not in labels:
        raise BadLabel("unknown_label", f"id {ident!r}: {label!r} is not one of the model's labels")
    return str(ident), text, label


@dataclasses.dataclass
class Labels:
    """The labels topic read to its end: the latest usable label per id, and what was read (provenance)."""

    topic: str
    examples: dict[str, tuple[str, str]]          # id -> (text, label), the latest record of each id
    end_offsets: dict[int, int]                   # partition -> the offset read up to (exclusive)
    records: int = 0                              # records read, tombstones and bad ones included
    bad: Counter = dataclasses.field(default_factory=Counter)  # reason -> records skipped

    def per_label(self) -> dict[str, int]:
        return dict(sorted(Counter(label for _text, label in self.examples.values()).items()))

    def provenance(self) -> dict:
        """What a retrain records in metrics.json to say which labels it was trained on."""
        return {"topic": self.topic, "end_offsets": {str(p): o for p, o in sorted(self.end_offsets.items())},
                "records": self.records, "labels": len(self.examples), "per_label": self.per_label(),
                "bad": dict(self.bad)}


def read_labels(settings: KafkaSettings, topic: str, labels: Iterable[str] | None = None,
                timeout_s: float = READ_TIMEOUT_S) -> Labels:
    """Read ``topic`` from its start to the end offsets it had when the read began (read_committed), the
    latest record of an id winning. Raises ValueError when the topic does not exist, TimeoutError when the
    broker does not deliver up to those offsets within ``timeout_s``."""
    from kafka import TopicPartition

    known = set(labels) if labels is not None else None
    consumer = make_consumer(settings, None, isolation_level="read_committed", enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"the labels topic {topic!r} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
        result = Labels(topic, {}, ends)
        deadline = time.monotonic() + timeout_s
        left = {tp for tp in tps if consumer.position(tp) < ends[tp.partition]}
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the labels topic {topic!r} was not read to its end within {timeout_s:.0f} s")
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    if record.offset >= ends[tp.partition]:
                        break
                    result.records += 1
                    _apply(result, record.key, record.value, known)
            left = {tp for tp in left if consumer.position(tp) < ends[tp.partition]}
        return result
    finally:
        consumer.close()


def _apply(result: Labels, key: bytes | None, value: bytes | None, known: set[str] | None) -> None:
    if value is None:  # a tombstone: the id's label is withdrawn
        if key is not None:
            result.examples.pop(key.decode("utf-8", "replace"), None)
        return
    try:
        ident, text, label = parse_label(key, value, known)
    except BadLabel as exc:
        result.bad[exc.reason] += 1
        return
    result.examples.pop(ident, None)  # re-insert: the dict's order is the order of the latest records
    result.examples[ident] = (text, label)


def ensure_labels_topic(settings: KafkaSettings, topic: str, partitions: int = 1,
                        configs: Mapping[str, str] = LABELS_TOPIC_CONFIG) -> None:
    """Create the labels topic compacted when it does not exist (an existing one is left as it is)."""
    ensure_topics(settings, {topic: partitions}, configs={topic: dict(configs)})
