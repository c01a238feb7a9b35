"""``python -m worker.publish``: send lines of a text file, a JSONL file or stdin to the input topic.

Each non-empty line is one message, sent as it is: the worker tells JSON objects (``{"id", "text", ...}``)
from plain text itself. Examples::

    python -m worker.publish --input titles.txt --rate 200
    python -m worker.publish --input news.jsonl --key-field id
    cat reviews.txt | python -m worker.publish --key shop-42
    python -m worker.publish --labels reviewed.jsonl        # reviewers' labels -> the labels topic

``--labels FILE`` sends labels instead of messages: JSON lines ``{"id", "text", "label"}`` to the compacted
labels topic (``--labels-topic``, created compacted when missing), keyed by id so a later label of the same
id replaces the earlier one (bert_stream.feedback). Lines without an id, text or label are counted, reported
and skipped; the rest are sent.

Keys: ``--key-field`` takes the key from a field of each JSON line (lines must then be JSON objects);
``--key`` gives every message the same key (all go to one partition, in order); default: no key.
``--rate`` caps messages per second (0: as fast as the broker acknowledges). A progress bar goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator

from bert_stream import feedback
from bert_stream.kafka import KafkaSettings, make_producer
from bert_stream.logs import configure_logging
from bert_stream.settings import parse_settings, require, setting


@dataclasses.dataclass(frozen=True)
class PublishSettings:
    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)
    input: str = setting("-", help="Text or JSONL file, one message per line; '-' reads stdin.")
    topic: str = setting("bert-stream.input", env="BERT_STREAM_INPUT_TOPIC", help="Topic to send to.")
    key_field: str | None = setting(None, help="Take each message's key from this field of its JSON line.")
    key: str | None = setting(None, help="One key for every message (keeps them in one partition, in order).")
    rate: float = setting(0.0, help="Messages per second at most; 0 sends as fast as the broker acknowledges.")
    limit: int = setting(0, help="Stop after this many messages; 0 sends all lines.")
    progress: bool = setting(True, help="Show a progress bar on stderr.")
    labels: str | None = setting(None, help="Send labels from this JSONL file ({id, text, label} per line) to "
                                            "--labels-topic instead of messages to --topic.")
    labels_topic: str = setting("bert-stream.labels", env="BERT_STREAM_LABELS_TOPIC",
                                help="The compacted topic reviewers' labels go to (trainer.run --feedback-topic).")

    def __post_init__(self) -> None:
        require(not (self.key and self.key_field), "give --key or --key-field, not both")
        require(self.rate >= 0, "--rate must not be negative")
        require(self.limit >= 0, "--limit must not be negative")
        require(not (self.labels and (self.key or self.key_field)), "--labels records are keyed by their id")


class InputError(ValueError):
    pass


def messages(lines, key_field: str | None, key: str | None) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) for each non-empty line; raises InputError (with the line number) on a bad line."""
    fixed = key.encode() if key is not None else None
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if key_field is None:
            yield fixed, line.encode()
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number}: not JSON ({exc.msg}), but --key-field needs JSON lines") from None
        if not isinstance(obj, dict) or obj.get(key_field) is None:
            raise InputError(f"line {number}: no field {key_field!r}")
        yield str(obj[key_field]).encode(), line.encode()


def label_lines(lines, bad: Counter) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of each usable label line; the others are counted in ``bad`` by reason."""
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise feedback.BadLabel("not_json", "not a JSON object")
            key, value = feedback.label_record(obj.get("id"), obj.get("text"), obj.get("label"))
            feedback.parse_label(key, value)  # the checks the trainer makes, but the model's label set
        except json.JSONDecodeError:
            bad["not_json"] += 1
            continue
        except feedback.BadLabel as exc:
            bad[exc.reason] += 1
            continue
        yield key, value


def publish_labels(settings: PublishSettings, lines) -> tuple[int, Counter]:
    """Send the usable labels of ``lines``; (sent, bad lines by reason)."""
    feedback.ensure_labels_topic(settings.kafka, settings.labels_topic)
    bad: Counter = Counter()
    sent = publish(dataclasses.replace(settings, topic=settings.labels_topic), lines, label_lines(lines, bad))
    return sent, bad


def publish(settings: PublishSettings, lines, records: Iterator[tuple[bytes | None, bytes]] | None = None) -> int:
    from tqdm import tqdm

    producer = make_producer(settings.kafka)
    sent, failed, start = 0, [], time.monotonic()
    bar = tqdm(unit="msg", disable=not settings.progress, file=sys.stderr, desc=settings.topic)
    try:
        if records is None:
            records = messages(lines, settings.key_field, settings.key)
        for key, value in records:
            if settings.rate:
                delay = start + sent / settings.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            producer.send(settings.topic, key=key, value=value).add_errback(failed.append)
            sent += 1
            bar.update()
            if settings.limit and sent >= settings.limit:
                break
        producer.flush()
    finally:
        bar.close()
        producer.close()
    if failed:
        raise RuntimeError(f"{len(failed)} of {sent} messages were not acknowledged: {failed[0]}")
    return sent


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(PublishSettings, argv, prog="python -m worker.publish",
                              description=__doc__.split("\n")[0])
    configure_logging("WARNING")
    prog = "python -m worker.publish"
    try:
        if settings.labels:
            with open(settings.labels, encoding="utf-8") as f:
                sent, bad = publish_labels(settings, f)
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(bad.items()))
            skipped = f", skipped {sum(bad.values())} bad lines ({reasons})" if bad else ""
            print(f"sent {sent} labels to {settings.labels_topic}{skipped}", file=sys.stderr)
            return 0
        if settings.input == "-":
            sent = publish(settings, sys.stdin)
        else:
            with open(settings.input, encoding="utf-8") as f:
                sent = publish(settings, f)
    except (OSError, UnicodeDecodeError, InputError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - broker unreachable etc.: one line, not a traceback
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"sent {sent} messages to {settings.topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
