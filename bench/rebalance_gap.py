"""Part: the output gap while a second worker joins, then leaves, a busy group, per group protocol.

``python -m bench.rebalance_gap [--rate 400] [--seconds 8] [--variants ...]``

Variants, each with its own 4-partition topic and group:
- ``kafka-python, classic``: eager, the only protocol kafka-python speaks (every partition is revoked and
  assigned again at each rebalance);
- ``confluent-kafka, classic``: cooperative-sticky (only the partitions that move are revoked);
- ``confluent-kafka, consumer``: KIP-848 (the broker assigns; members fetch on through a rebalance), with the
  broker's default heartbeat interval (``group.consumer.heartbeat.interval.ms``, 5 s).

Messages are published at ``--rate`` throughout; every one is a cache hit (their texts are classified once
first), so the model does not hide the gap. A live reader records when each output arrived. The **gap** of a
window is the longest time in it with no output arriving: steady (before the join, the baseline: batching
and commit pacing), join (the second worker's start to ``--seconds`` after it is ready), leave (its SIGTERM
to ``--seconds`` after). Duplicates and losses are counted over the whole stream.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common, e2e
from bench.delivery import LiveReader

VARIANTS = (("kafka-python", "classic"), ("confluent-kafka", "classic"), ("confluent-kafka", "consumer"))
PARTITIONS = 4


class Publisher(threading.Thread):
    """Publishes ``texts`` round-robin at ``rate`` msgs/s until stopped or done; ``sent`` = id -> ms."""

    def __init__(self, ws: common.Workspace, topic: str, texts: Sequence[str], rate: float, prefix: str):
        super().__init__(name="publisher", daemon=True)
        self.ws, self.topic, self.texts, self.rate, self.prefix = ws, topic, texts, rate, prefix
        self.sent: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from bert_stream.kafka import make_producer

        producer = make_producer(self.ws.kafka, linger_ms=5)
        start = time.perf_counter()
        try:
            for i, text in enumerate(self.texts):
                if self.stop.is_set():
                    break
                delay = start + i / self.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                msg_id = f"{self.prefix}{i}"
                self.sent[msg_id] = int(time.time() * 1000)
                producer.send(self.topic, value=common.encode_message(msg_id, text), key=msg_id.encode(),
                              partition=i % PARTITIONS)
            producer.flush()
        finally:
            producer.close()


def _gap_ms(arrivals: Sequence[float], start_ms: float, end_ms: float) -> float:
    """The longest time in [start, end] with no arrival (from the window's start to the first one, too)."""
    inside = [a for a in arrivals if start_ms <= a <= end_ms]
    points = [start_ms, *inside, end_ms] if inside else [start_ms, end_ms]
    return max(b - a for a, b in zip(points, points[1:]))


def _variant(ws: common.Workspace, texts: Sequence[str], *, client: str, protocol: str, rate: float,
             seconds: float, cache_prefix: str) -> dict:
    tag = f"gap-{'ck' if client == 'confluent-kafka' else 'kp'}-{protocol}"
    topic = ws.name(tag)
    common.create_topics(ws, {topic: PARTITIONS, f"{topic}-out": PARTITIONS, f"{topic}-dlq": PARTITIONS})
    args = ["--kafka-client", client, "--group-protocol", protocol, "--commit-interval-ms", "200"]
    group = ws.name(f"{tag}-group")
    a = common.WorkerProcess(ws, input_topic=topic, group_id=group, cache_prefix=cache_prefix, tag=f"{tag}-a",
                             extra=args)
    b = common.WorkerProcess(ws, input_topic=topic, group_id=group, cache_prefix=cache_prefix, tag=f"{tag}-b",
                             extra=args)
    reader = LiveReader(ws, a.output_topic, "read_uncommitted")
    reader.start()
    reader.ready.wait(30)
    publisher = Publisher(ws, topic, texts, rate, f"{tag}-")
    now_ms = lambda: time.time() * 1000  # noqa: E731
    try:
        with common.running_workers([a]):
            a.wait_ready()
            publisher.start()
            steady_start = now_ms()
            time.sleep(seconds)
            steady_end = join_start = now_ms()
            with common.running_workers([b]):
                b.wait_ready()
                time.sleep(seconds)
                join_end = leave_start = now_ms()
                b.stop()
            time.sleep(seconds)
            leave_end = now_ms()
            publisher.stop.set()
            publisher.join(30)
            deadline = time.monotonic() + 60
            while len(reader.arrived) < len(publisher.sent) and time.monotonic() < deadline:
                a.check_alive()
                time.sleep(0.1)
    finally:
        publisher.stop.set()
        reader.stop.set()
        reader.join(10)
    arrivals = sorted(reader.arrived.values())
    outputs = common.read_outputs(ws, a.output_topic, len(publisher.sent))
    return {
        "client": client, "protocol": protocol, "messages": len(publisher.sent), "rate": rate,
        "steady_gap_ms": _gap_ms(arrivals, steady_start, steady_end),
        "join_gap_ms": _gap_ms(arrivals, join_start, join_end),
        "leave_gap_ms": _gap_ms(arrivals, leave_start, leave_end),
        "lost": len(set(publisher.sent) - set(reader.arrived)),
        "duplicates": len(outputs) - len({o.id for o in outputs}),
    }


def run(ws: common.Workspace, *, rate: float = 400.0, seconds: float = 8.0, unique: int = 400,
        stream: Sequence[str] | None = None, variants: Sequence[tuple[str, str]] = VARIANTS) -> dict:
    base = list(stream or common.stream_texts(unique))[:unique]
    cache_prefix = f"bench:{ws.run_id}:gap:"
    e2e.backlog(ws, base, tag="gap-fill", cache_prefix=cache_prefix)
    texts = (base * int(rate * (seconds * 3 + 120) / len(base) + 1))  # outlasts both model loads
    results = [_variant(ws, texts, client=c, protocol=p, rate=rate, seconds=seconds, cache_prefix=cache_prefix)
               for c, p in variants]
    result = {"variants": results, "rate": rate, "seconds": seconds, "partitions": PARTITIONS}
    print_tables(result)
    return result


TABLE_HEADER = ["client", "group protocol", "messages", "steady gap ms", "join gap ms", "leave gap ms",
                "duplicates", "lost"]


def table_rows(r: dict) -> list[list]:
    return [[v["client"], v["protocol"], v["messages"], round(v["steady_gap_ms"]), round(v["join_gap_ms"]),
             round(v["leave_gap_ms"]), v["duplicates"], v["lost"]] for v in r["variants"]]


def print_tables(r: dict) -> None:
    common.print_table(f"Output gap while a second worker joins and leaves ({r['rate']:.0f} msgs/s, "
                       f"{r['partitions']} partitions)", TABLE_HEADER, table_rows(r))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rebalance_gap", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--rate", type=float, default=400.0, help="messages/s published throughout")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each window")
    parser.add_argument("--variants", default=",".join(f"{c}:{p}" for c, p in VARIANTS),
                        help="client:protocol pairs, comma-separated")
    parser.add_argument("--output", default=str(common.WORK_DIR / "rebalance_gap.json"), help="JSON written here")
    args = parser.parse_args(argv)
    variants = [tuple(v.split(":", 1)) for v in args.variants.split(",") if v]
    if not args.rate > 0 or not args.seconds > 0 or any(len(v) != 2 for v in variants):
        parser.error("--rate and --seconds must be positive; --variants is client:protocol,...")
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, rate=args.rate, seconds=args.seconds, variants=variants)
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
