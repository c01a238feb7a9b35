"""Part: exactly-once against at-least-once, side by side, at two commit intervals, on both Kafka clients.

``python -m bench.delivery [--unique 800] [--repeat 12] [--rate 800] [--seconds 20] [--clients ...]``

What a delivery mode costs is the commit (a transaction per commit interval, against one OffsetCommit) and,
for exactly-once, the wait of a ``read_committed`` reader until the transaction holding its record commits.
Both show best where the model does not hide them, so every message here is a cache hit: the unique texts
are classified once (that fills the cache), then every variant streams the same repeated texts.

For each (client, mode, commit interval), with its own worker process:
- **backlog**: the whole stream published first, then the worker drains it. msgs/s = messages / (last output
  published - the worker's poll of the first input): what the worker sustains (the outputs' own timestamps,
  as parts 2 and 8 measure it). "visible" msgs/s ends at the last output *visible to its reader* instead,
  which adds the wait for the last transaction's commit (up to a commit interval) to a finite backlog.
  Commits are paced by the interval alone (``--commit-every`` is set out of reach), so "1,000 ms" means one
  commit, one transaction, a second. librdkafka's backlog is ``CONFLUENT_SCALE`` times longer: at its rate
  the default one drains in a fraction of a commit interval.
- **steady**: the worker ready, messages published at ``--rate`` for ``--seconds``; latency = when a live
  reader (``read_committed`` for exactly-once, the default for at-least-once: as their consumers read) got
  the output, minus the input's produce time. p50/p99.
Variants run back to back, in the same order every time (per client, at-least-once first at each interval).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common, e2e
from bert_stream.kafka import CLIENTS

CONFLUENT_SCALE = 5
COMMIT_EVERY = 10_000_000  # out of reach: the commit interval alone paces commits
VARIANTS = (("at-least-once", 1000), ("exactly-once", 1000), ("at-least-once", 100), ("exactly-once", 100))


class LiveReader(threading.Thread):
    """Reads ``topic`` from the beginning as a consumer of that delivery mode would, and records when each
    output id first arrived (wall clock, ms)."""

    def __init__(self, ws: common.Workspace, topic: str, isolation_level: str):
        super().__init__(name="live-reader", daemon=True)
        self.ws, self.topic, self.isolation_level = ws, topic, isolation_level
        self.arrived: dict[str, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        from kafka import TopicPartition

        from bert_stream.kafka import make_consumer

        consumer = make_consumer(self.ws.kafka, None, isolation_level=self.isolation_level)
        try:
            parts = None
            while not parts and not self.stop.is_set():
                parts = consumer.partitions_for_topic(self.topic)
                time.sleep(0.05)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts or [])]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            self.ready.set()
            while not self.stop.is_set():
                for records in consumer.poll(timeout_ms=50, max_records=10_000).values():
                    now = time.time() * 1000
                    for r in records:
                        self.arrived.setdefault(json.loads(r.value)["id"], now)
        finally:
            consumer.close()


def _variant(ws: common.Workspace, texts: Sequence[str], *, client: str, mode: str, interval_ms: int,
             cache_prefix: str, prepublish: bool, rate: float | None = None, timeout_s: float = 300.0) -> dict:
    tag = (f"{'ck' if client == 'confluent-kafka' else 'kp'}-{'eos' if mode == 'exactly-once' else 'alos'}-"
           f"{interval_ms}-{'backlog' if prepublish else 'steady'}")
    topic = ws.name(tag)
    common.create_topics(ws, {topic: 2, f"{topic}-out": 2, f"{topic}-dlq": 2})
    worker = common.WorkerProcess(ws, input_topic=topic, group_id=ws.name(f"{tag}-group"), cache_prefix=cache_prefix,
                                  tag=tag, extra=["--kafka-client", client, "--delivery", mode,
                                         "--commit-interval-ms", str(interval_ms), "--commit-every",
                                         str(COMMIT_EVERY)])
    reader = LiveReader(ws, worker.output_topic, "read_committed" if mode == "exactly-once" else "read_uncommitted")
    reader.start()
    reader.ready.wait(30)
    sent: dict[str, int] = {}
    try:
        if prepublish:
            sent = common.publish(ws, topic, texts, id_prefix=f"{tag}-", partitions=2)
        with common.running_workers([worker]):
            worker.wait_ready()
            if not prepublish:
                sent = common.publish(ws, topic, texts, id_prefix=f"{tag}-", rate=rate, partitions=2)
            deadline = time.monotonic() + timeout_s
            while len(reader.arrived) < len(sent) and time.monotonic() < deadline:
                worker.check_alive()
                time.sleep(0.1)
            transactions = _metric(worker, 'bert_stream_transactions_total{result="committed"}')
            commits = _metric(worker, 'bert_stream_commits_total{result="ok"}')
    finally:
        reader.stop.set()
        reader.join(10)
    missing = [i for i in sent if i not in reader.arrived]
    if missing:
        raise RuntimeError(f"{tag}: {len(missing)} of {len(sent)} outputs never became visible (e.g. {missing[:3]})")
    outputs = common.read_outputs(ws, worker.output_topic, len(texts))
    first_polled = min(o.received_ms for o in outputs)
    last_visible = max(reader.arrived.values())
    visible = [reader.arrived[i] - sent[i] for i in sent]
    return {
        "client": client, "mode": mode, "commit_interval_ms": interval_ms, "messages": len(sent), "rate_target": rate,
        "msgs_per_s": common.stream_throughput(outputs)["msgs_per_s"],
        "visible_msgs_per_s": len(sent) / max((last_visible - first_polled) / 1000, 1e-3),
        "visible_latency_ms": common.latency_summary(visible),
        "cached_fraction": sum(o.cached for o in outputs) / len(outputs),
        "duplicates": len(outputs) - len({o.id for o in outputs}),
        "transactions": transactions, "commits": commits,
    }


def _short(client: str) -> str:
    """The ratio keys' client part: none for the default client (the keys it always had)."""
    return "" if client == "kafka-python" else "confluent_"


def _metric(worker: common.WorkerProcess, sample: str) -> float | None:
    code, text = worker._get("/metrics")
    for line in text.splitlines() if code == 200 else []:
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def run(ws: common.Workspace, *, unique: int = 800, repeat: int = 12, rate: float = 800.0, seconds: float = 20.0,
        stream: Sequence[str] | None = None, variants: Sequence[tuple[str, int]] = VARIANTS,
        clients: Sequence[str] = CLIENTS) -> dict:
    base = list(stream or common.stream_texts(unique))[:unique]
    texts = base * repeat  # all cache hits once the fill below has run
    cache_prefix = f"bench:{ws.run_id}:delivery:"
    fill = e2e.backlog(ws, base, tag="delivery-fill", cache_prefix=cache_prefix)
    steady_texts = texts[: max(50, int(rate * seconds))]
    results = []
    for client in clients:
        backlog_texts = texts * (CONFLUENT_SCALE if client == "confluent-kafka" else 1)
        for mode, interval in variants:
            backlog = _variant(ws, backlog_texts, client=client, mode=mode, interval_ms=interval, cache_prefix=cache_prefix,
                               prepublish=True)
            steady = _variant(ws, steady_texts, client=client, mode=mode, interval_ms=interval,
                              cache_prefix=cache_prefix, prepublish=False, rate=rate)
            results.append({"client": client, "mode": mode, "commit_interval_ms": interval, "backlog": backlog,
                            "steady": steady})
    by = {(r["client"], r["mode"], r["commit_interval_ms"]): r for r in results}
    ratios = {f"eos_over_alos_{_short(c)}{i}ms": common.ratio(by[(c, "exactly-once", i)]["backlog"]["msgs_per_s"],
                                                                by[(c, "at-least-once", i)]["backlog"]["msgs_per_s"])
              for c in clients for i in sorted({i for _, i in variants})
              if (c, "exactly-once", i) in by and (c, "at-least-once", i) in by}
    result = {"variants": results, "ratios": ratios, "fill": {"messages": fill["messages"],
                                                                "msgs_per_s": fill["msgs_per_s"]},
              "messages": len(texts), "unique": len(base), "rate": rate, "seconds": seconds}
    print_tables(result)
    return result


TABLE_HEADER = ["client", "delivery", "commit interval ms", "backlog messages", "backlog msgs/s",
                "backlog msgs/s visible", "steady msgs/s offered", "visible p50 ms",
                "visible p99 ms", "transactions (steady)", "duplicates"]


def table_rows(r: dict) -> list[list]:
    return [[v.get("client", "kafka-python"), v["mode"], v["commit_interval_ms"], v["backlog"]["messages"],
             v["backlog"]["msgs_per_s"], v["backlog"].get("visible_msgs_per_s"), v["steady"]["rate_target"],
             v["steady"]["visible_latency_ms"].get("p50"), v["steady"]["visible_latency_ms"].get("p99"),
             v["steady"]["transactions"], v["backlog"]["duplicates"] + v["steady"]["duplicates"]]
            for v in r["variants"]]


def print_tables(r: dict) -> None:
    common.print_table(f"Delivery modes: {r['messages']:,} cached messages per backlog, steady at {r['rate']:.0f} "
                       "msgs/s", TABLE_HEADER, table_rows(r))
    for name, x in r["ratios"].items():
        print(f"{name}: {x:.2f}x" if x else f"{name}: -", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--unique", type=int, default=800, help="distinct texts (classified once: the cache fill)")
    parser.add_argument("--repeat", type=int, default=12, help="the backlog streams the unique texts this often")
    parser.add_argument("--rate", type=float, default=800.0, help="steady load, messages/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="steady duration per variant")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="Kafka clients to run, comma-separated")
    parser.add_argument("--output", default=str(common.WORK_DIR / "delivery.json"), help="JSON written here")
    args = parser.parse_args(argv)
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, unique=args.unique, repeat=args.repeat, rate=args.rate, seconds=args.seconds,
                     clients=[c for c in args.clients.split(",") if c])
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
