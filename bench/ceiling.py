"""Part 8: the worker's ceiling: the whole path at full speed with the model's cost taken out.

``python -m bench.ceiling [--messages 100000] [--unique 2000] [--compare-ref REF] [--workers 1,2]``

Every message is a cache hit: the unique texts are classified once (that fills Redis), then the stream
repeats them, so the worker runs everything but the model: poll, decode, batch, Redis lookup, publish,
ack, commit, through the real broker. That is what a GPU worker carries around a model that is ~never the
bottleneck (an H200 runs e5-small at ~100k titles/s). Nothing here is a benchmark-only code path: the
cache is the production one.

- variants, each with its own worker process(es), one group, the same 4-partition backlog:
  this checkout with 1 process (``ceiling_msgs_per_s``), 2 processes (two replicas in one group, as on one
  GPU), and optionally the worker of another commit (``--compare-ref``: a git worktree of it), for
  before/after figures from one run;
- a py-spy profile of a separate drain (sampling slows the worker a little: its own msgs/s is reported
  apart): the share of samples per pipeline step, per thread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common, e2e, profile

PARTITIONS = 4
PROFILE_RATE = 1000  # py-spy samples per second: a drain lasts seconds, 100/s gave ~60 samples per thread


def _worktree(ref: str, work_dir: Path) -> Path:
    """A detached git worktree of ``ref`` in the work dir (reused when it is there)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=common.REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = work_dir / f"ref-{sha}"
    if not (path / "worker").exists():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), sha], cwd=common.REPO,
                       capture_output=True, check=True)
    return path


def run(ws: common.Workspace, *, messages: int = 100_000, unique: int = 2000, compare_ref: str | None = None,
        workers: Sequence[int] = (1, 2), profile_messages: int = 40_000, client_messages: int = 60_000,
        stream: Sequence[str] | None = None, clients: Sequence[str] = ("kafka-python", "confluent-kafka"),
        exactly_once: bool = True, quality_pairs: int = 3, worker_args: Sequence[str] = (),
        part: str = "ceiling") -> dict:
    """``worker_args``: added to every variant's worker (bench/standin.py: its batch settings). ``part``
    prefixes this run's topics and cache keys: a second ceiling in the same workspace (the stand-in's) must
    not read the first one's topics or cache."""
    base = list(stream or common.stream_texts(unique))[:unique]
    texts = (base * (messages // len(base) + 1))[:messages]
    prefix = f"bench:{ws.run_id}:{part}:"
    fill = e2e.backlog(ws, base, tag=f"{part}-fill", cache_prefix=prefix)
    variants: dict[str, dict] = {}
    result_quality: dict[str, dict] = {}
    drained: list[str] = []  # input topics holding the whole stream (the client floor reads one again)

    def drain(name: str, tag: str, cache_prefix: str = prefix, **kw) -> None:
        kw["worker_args"] = (*kw.get("worker_args", ()), *worker_args)
        r = e2e.run_stream(ws, texts, tag=tag, cache_prefix=cache_prefix, partitions=PARTITIONS, **kw)
        drained.append(ws.name(tag))
        variants[name] = {k: r[k] for k in ("messages", "msgs_per_s", "seconds", "cached_fraction", "workers")}
        variants[name]["extra_args"] = list(kw.get("worker_args", ()))
        print(f"ceiling {name}: {r['msgs_per_s']:,.0f} msgs/s ({r['cached_fraction']:.0%} cached)", flush=True)

    if compare_ref:  # its own fill, by its own worker: the cache's entry format may differ between commits
        ref_repo, ref_prefix = _worktree(compare_ref, ws.work_dir), f"{prefix}ref:"
        e2e.backlog(ws, base, tag=f"{part}-ref-fill", cache_prefix=ref_prefix, worker_repo=ref_repo)
        for client in clients:
            suffix, args = _client_variant(client)
            drain(f"at {compare_ref}{suffix}", f"{part}-ref{suffix[2:8]}", cache_prefix=ref_prefix,
                  worker_repo=ref_repo, worker_args=args)
    for client in clients:  # the default client's variants keep the plain names (the headline's)
        suffix, args = _client_variant(client)
        for n in workers:
            drain(("1 process" if n == 1 else f"{n} processes") + suffix, f"{part}-p{n}{suffix[2:8]}",
                  workers=n, worker_args=args)
        if exactly_once:  # a transaction per commit interval (1 s): what it costs at the ceiling
            drain(f"1 process{suffix}, exactly-once", f"{part}-eos{suffix[2:8]}",
                  worker_args=(*args, "--delivery", "exactly-once"))
        if quality_pairs:
            result_quality[client] = _quality_pairs(ws, texts, prefix, part, suffix, args, quality_pairs,
                                                    worker_args)
    result = {"messages": len(texts), "unique": len(base), "partitions": PARTITIONS, "variants": variants,
              "fill_msgs_per_s": fill["msgs_per_s"], "compare_ref": compare_ref,
              "ceiling_msgs_per_s": variants.get("1 process", {}).get("msgs_per_s"),
              "ceiling_confluent_msgs_per_s": variants.get("1 process, confluent-kafka", {}).get("msgs_per_s"),
              "ceiling_eos_msgs_per_s": variants.get("1 process, exactly-once", {}).get("msgs_per_s"),
              "ceiling_confluent_eos_msgs_per_s": variants.get("1 process, confluent-kafka, exactly-once",
                                                               {}).get("msgs_per_s")}
    if result_quality:
        result["quality_cost"] = {"drains": result_quality, "in_process": quality_in_process()}
    if "2 processes" in variants:
        result["two_over_one"] = common.ratio(variants["2 processes"]["msgs_per_s"], result["ceiling_msgs_per_s"])
    if compare_ref:
        for client in clients:
            suffix = _client_variant(client)[0]
            now, then = variants.get(f"1 process{suffix}"), variants.get(f"at {compare_ref}{suffix}")
            if now and then:
                result["over_ref" + suffix.replace(", ", "_").replace("-", "_")] = common.ratio(
                    now["msgs_per_s"], then["msgs_per_s"])
    if client_messages and drained:
        result["client_floor"] = client_floor(ws, drained[-1], min(client_messages, len(texts)))
        print("client floor: " + ", ".join(f"{k} {result['client_floor'][k]:,.0f} msgs/s"
                                           for k in ("kafka-python", "confluent-kafka")), flush=True)
    if profile_messages and profile.pyspy_binary():
        if "kafka-python" in clients:
            result["profile"] = _profile(ws, texts[:profile_messages], prefix, part)
        if "confluent-kafka" in clients:
            result["profile_confluent"] = _profile(ws, texts[:profile_messages], prefix, part, "confluent-kafka")
    print_tables(result)
    return result


def _quality_pairs(ws: common.Workspace, texts: Sequence[str], prefix: str, part: str, suffix: str,
                   args: Sequence[str], pairs: int, worker_args: Sequence[str]) -> dict:
    """The model-quality metrics' cost on the cached path: drains with and without them
    (``--quality-window 0``), interleaved so drift in the machine's speed hits both alike; medians."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(pairs):
        for state, extra in (("on", ()), ("off", ("--quality-window", "0"))):
            r = e2e.run_stream(ws, texts, tag=f"{part}-q{state}{i}{suffix[2:8]}", cache_prefix=prefix,
                               partitions=PARTITIONS, worker_args=(*args, *extra, *worker_args))
            rates[state].append(r["msgs_per_s"])
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(f"quality metrics{suffix}: {on:,.0f} msgs/s with, {off:,.0f} without", flush=True)
    return {"msgs_per_s": rates, "median_on": on, "median_off": off, "on_over_off": common.ratio(on, off),
            "us_per_msg": round(1e6 / on - 1e6 / off, 2)}


def quality_in_process(batches: int = 2000, batch: int = 64) -> dict:
    """The same cost without a broker: what observing one published batch costs the worker per message
    (worker/quality.py: the quality monitor's batch update, and the end-to-end histogram's)."""
    import numpy as np

    from worker.messages import Prediction
    from worker.metrics import WorkerMetrics

    labels = [f"label-{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    predictions = []
    for _ in range(batch):
        p = rng.dirichlet(np.ones(len(labels)))
        top = np.argsort(-p)[:3]
        predictions.append(Prediction(labels[top[0]], int(top[0]), float(p[top[0]]),
                                      tuple((labels[i], float(p[i])) for i in top)))
    from bert_stream.reference import Reference

    metrics = WorkerMetrics()
    prior = np.full(len(labels), 1 / len(labels))  # a reference: the drift window is updated as well
    model = type("Model", (), {"version": "v1", "dtype": "float32", "device": "cpu", "labels": labels,
                               "reference": Reference(tuple(labels), prior, {0.1: 0.3}, {0.1: 0.1})})()
    metrics.set_model(model)
    created = [time.time() - 0.05] * batch
    start = time.perf_counter()
    for _ in range(batches):
        metrics.quality.observe("v1", predictions)
        stamps = np.asarray(created)
        metrics.end_to_end.observe(np.maximum(time.time() - stamps[stamps > 0], 0.0))
    seconds = time.perf_counter() - start
    return {"batch": batch, "batches": batches, "us_per_msg": round(seconds / (batches * batch) * 1e6, 3)}


def _client_variant(client: str) -> tuple[str, tuple[str, ...]]:
    """(name suffix, worker arguments) of a Kafka client's variants: the default's keep the plain names."""
    return ("", ()) if client == "kafka-python" else (f", {client}", ("--kafka-client", client))


def client_floor(ws: common.Workspace, topic: str, messages: int, value_bytes: int = 420) -> dict:
    """What the Kafka client alone costs on the worker's path: consume ``messages`` from ``topic`` in a new
    group and produce one output-sized record per input to the same partition number, flush, commit; no
    decoding, batching, Redis or JSON. Once with kafka-python (the worker's client, its settings), once with
    confluent-kafka (librdkafka), back to back on the same records: how far each client's own floor lies."""
    out = ws.name("floor-out")
    partitions = PARTITIONS
    common.create_topics(ws, {out: partitions})
    value = b"x" * value_bytes
    return {"kafka-python": _floor_kafka_python(ws, topic, out, messages, value),
            "confluent-kafka": _floor_confluent(ws, topic, out, messages, value), "messages": messages,
            "value_bytes": value_bytes}


def _floor_kafka_python(ws: common.Workspace, topic: str, out: str, messages: int, value: bytes) -> float:
    from bert_stream.kafka import make_consumer, make_producer

    consumer = make_consumer(ws.kafka, ws.name("floor-kp"), topic)
    producer = make_producer(ws.kafka)
    try:
        while not consumer.assignment():
            consumer.poll(timeout_ms=1000, max_records=1)  # the join
            if consumer.assignment():
                consumer.seek_to_beginning()  # a record the joining poll returned is read again
        done, t0 = 0, time.perf_counter()
        while done < messages:
            for records in consumer.poll(timeout_ms=200, max_records=1024).values():
                for r in records:
                    producer.send(out, value=value, key=r.key, partition=r.partition)
                done += len(records)
        producer.flush()
        consumer.commit()
        return messages / (time.perf_counter() - t0)
    finally:
        producer.close()
        consumer.close(autocommit=False)


def _floor_confluent(ws: common.Workspace, topic: str, out: str, messages: int, value: bytes) -> float:
    import confluent_kafka

    servers = ws.bootstrap_servers
    consumer = confluent_kafka.Consumer({"bootstrap.servers": servers, "group.id": ws.name("floor-ck"),
                                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    producer = confluent_kafka.Producer({"bootstrap.servers": servers, "acks": "all", "linger.ms": 5,
                                         "enable.idempotence": True})
    try:
        consumer.subscribe([topic])
        first = None
        while first is None:  # the join (its first record counts below)
            first = consumer.poll(1.0)
        pending, done, t0 = [first], 0, time.perf_counter()
        while done < messages:
            for m in pending:
                if m.error() is None:
                    producer.produce(out, value, m.key(), partition=m.partition())
                    done += 1
            producer.poll(0)
            pending = consumer.consume(num_messages=1024, timeout=0.2)
        producer.flush()
        consumer.commit(asynchronous=False)
        return messages / (time.perf_counter() - t0)
    finally:
        consumer.close()


def _profile(ws: common.Workspace, texts: Sequence[str], prefix: str, part: str,
             client: str = "kafka-python") -> dict:
    tag = f"{part}-profile" if client == "kafka-python" else f"{part}-profile-ck"
    return profile.drain(ws, texts, tag=tag, cache_prefix=prefix, partitions=PARTITIONS, rate=PROFILE_RATE,
                         extra=("--kafka-client", client))


def table_rows(r: dict) -> list[list]:
    first = next(iter(r["variants"].values()))["msgs_per_s"]
    return [[name, v["messages"], v["msgs_per_s"], common.ratio(v["msgs_per_s"], first)]
            for name, v in r["variants"].items()]


def profile_rows(r: dict, key: str = "profile") -> list[list]:
    return [[thread, x["samples"], step, f"{x['shares'][step]:.0%}"]
            for thread, x, step in profile.busy_steps(r.get(key) or {})]


def print_tables(r: dict) -> None:
    common.print_table(f"Ceiling: {r['messages']:,} cached messages, {r['partitions']} partitions",
                       ["variant", "messages", "msgs/s", "vs first"], table_rows(r))
    if r.get("profile"):
        common.print_table(f"Where the time goes (py-spy, {r['profile']['msgs_per_s']:,.0f} msgs/s while sampled)",
                           ["thread", "samples", "step", "share"], profile_rows(r))
    if r.get("profile_confluent"):
        common.print_table(f"The same with confluent-kafka ({r['profile_confluent']['msgs_per_s']:,.0f} msgs/s "
                           "while sampled)", ["thread", "samples", "step", "share"],
                           profile_rows(r, key="profile_confluent"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--messages", type=int, default=100_000, help="cached messages per variant")
    parser.add_argument("--unique", type=int, default=2000, help="distinct texts (classified once: the fill)")
    parser.add_argument("--compare-ref", default=None, help="also run the worker of this git commit/tag")
    parser.add_argument("--workers", default="1,2", help="worker process counts to run (one group each)")
    parser.add_argument("--profile-messages", type=int, default=40_000, help="py-spy drain size (0: none)")
    parser.add_argument("--clients", default="kafka-python,confluent-kafka", help="worker Kafka clients to run")
    parser.add_argument("--output", default=str(common.WORK_DIR / "ceiling.json"), help="JSON written here")
    args = parser.parse_args(argv)
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, messages=args.messages, unique=args.unique, compare_ref=args.compare_ref,
                     workers=[int(p) for p in args.workers.split(",") if p],
                     profile_messages=args.profile_messages, clients=args.clients.split(","))
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
