"""``python -m worker.tail``: print the output topic (or the dead-letter or review topic) readably.

One line per record::

    p0@41   体育    0.973  cached  v=20261128T174501Z-3f9a1c  id=msg-7
    p1@3    DLQ     invalid_json   '{"id": "broken", "text": '   (Expecting value: line 1 column 26)
    p2@9    REVIEW  uncertain  positive 0.541  id=msg-12  '屏幕一般，键盘手感还行'

``--review`` prints the review topic (what the workers send people to label; bert_stream.feedback):
``--review --json`` is a file a reviewer fills in (``"label"``) and hands to ``worker.publish --labels``.

``--json`` prints each record's value as one JSON line instead (for ``jq``); ``--from-beginning`` starts at
the oldest record instead of new ones; ``--max N`` stops after N records; ``--idle-timeout-s`` stops when
nothing arrives for that long. Reads without a consumer group: tailing never moves anyone's offsets.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from bert_stream.kafka import KafkaSettings, make_consumer
from bert_stream.logs import configure_logging
from bert_stream.settings import parse_settings, require, setting
from worker.messages import parse_dlq_headers, parse_output

SNIPPET = 40


@dataclasses.dataclass(frozen=True)
class TailSettings:
    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)
    output_topic: str = setting("bert-stream.output", env="BERT_STREAM_OUTPUT_TOPIC", help="The output topic.")
    dlq_topic: str = setting("bert-stream.dlq", env="BERT_STREAM_DLQ_TOPIC", help="The dead-letter topic.")
    review_topic: str = setting("bert-stream.review", env="BERT_STREAM_REVIEW_TOPIC", help="The review topic.")
    dlq: bool = setting(False, help="Print the dead-letter topic instead of the outputs.")
    review: bool = setting(False, help="Print the review topic instead of the outputs.")
    from_beginning: bool = setting(False, help="Start at the oldest record rather than at new ones.")
    max: int = setting(0, help="Stop after this many records; 0 runs until Ctrl-C (or --idle-timeout-s).")
    idle_timeout_s: float = setting(0.0, help="Stop when nothing arrives for this long; 0 waits forever.")
    json: bool = setting(False, help="Print each record as one JSON line (the value, plus DLQ headers).")

    def __post_init__(self) -> None:
        require(self.max >= 0 and self.idle_timeout_s >= 0, "--max and --idle-timeout-s must not be negative")
        require(not (self.dlq and self.review), "give --dlq or --review, not both")


def _snippet(raw: bytes | None) -> str:
    if raw is None:
        return "(null)"
    text = raw.decode("utf-8", "replace").replace("\n", " ")
    return repr(text if len(text) <= SNIPPET else text[:SNIPPET] + "…")


def format_record(record, dlq: bool, as_json: bool, review: bool = False) -> str:
    where = f"p{record.partition}@{record.offset}"
    if review and not as_json:
        try:
            r = json.loads(record.value)
            return (f"{where:<9} REVIEW  {r['reason']:<10} {r['top_k'][0]['label']} {r['score']:.3f}  "
                    f"id={r['id']}  {_snippet(r['text'].encode())}")
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{where:<9} (not a review record) {_snippet(record.value)}"
    if dlq:
        headers = parse_dlq_headers(record.headers or [])
        if as_json:
            return json.dumps({"partition": record.partition, "offset": record.offset, **headers,
                               "value": (record.value or b"").decode("utf-8", "replace")}, ensure_ascii=False)
        return (f"{where:<9} DLQ  {headers.get('error', '?'):<16} {_snippet(record.value)}"
                f"  ({headers.get('error.detail', '')[:80]})")
    if as_json:
        return (record.value or b"").decode("utf-8", "replace")
    try:
        out = parse_output(record.value)
        flags = " ".join(f for f, on in (("cached", out.get("cached")), ("truncated", out.get("truncated"))) if on)
        return (f"{where:<9} {out['label']:<6} {out['score']:.3f}  {flags:<16} v={out.get('model_version')}  "
                f"id={out.get('id')}")
    except (ValueError, KeyError, TypeError):
        return f"{where:<9} (not an output record) {_snippet(record.value)}"


def tail(settings: TailSettings, out=sys.stdout) -> int:
    from kafka import TopicPartition

    topic = settings.dlq_topic if settings.dlq else settings.review_topic if settings.review else settings.output_topic
    consumer = make_consumer(settings.kafka, None)
    printed = 0
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise LookupError(f"topic {topic!r} does not exist (yet)")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        (consumer.seek_to_beginning if settings.from_beginning else consumer.seek_to_end)(*tps)
        last = time.monotonic()
        while not settings.max or printed < settings.max:
            polled = consumer.poll(timeout_ms=500)
            for record in (r for rs in polled.values() for r in rs):
                print(format_record(record, settings.dlq, settings.json, settings.review), file=out, flush=True)
                printed += 1
                last = time.monotonic()
                if settings.max and printed >= settings.max:
                    break
            if settings.idle_timeout_s and time.monotonic() - last > settings.idle_timeout_s:
                break
    finally:
        consumer.close()
    return printed


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(TailSettings, argv, prog="python -m worker.tail", description=__doc__.split("\n")[0])
    configure_logging("WARNING")
    try:
        tail(settings)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
    except Exception as exc:  # noqa: BLE001
        print(f"python -m worker.tail: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
