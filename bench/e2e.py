"""Part 2: end to end through the broker: real messages in, the worker subprocess, labels out.

``python -m bench.e2e [--messages 20000] [--steady-seconds 30] [--load 0.7]``

Two load shapes, each with its own worker process and its own cache prefix (every message a cache miss):

- **backlog**: ``--messages`` real messages are published first, then ``python -m worker.run`` starts and
  drains them. Throughput = messages / (last output's timestamp - the worker's poll time of the first
  input); start-up (imports, model load, group join) is not in it. Latency here is mostly time spent waiting
  in the backlog, so it is reported but not judged.
- **steady**: a worker is started and ready (``/readyz``), then messages are published at ``--load`` x the
  backlog throughput for ``--steady-seconds``. Per-message latency = output record timestamp - input record
  timestamp (both CreateTime, set at ``send``): p50/p95/p99. The target compares p99 with
  ``max_wait_ms`` + one batch's inference time (the median per-batch ``infer_ms`` the worker reports in its
  outputs during that run).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common

DEFAULT_MESSAGES = 20_000


def run_stream(
    ws: common.Workspace,
    texts: Sequence[str],
    *,
    tag: str,
    cache_prefix: str | None = None,
    workers: int = 1,
    partitions: int = 1,
    rate: float | None = None,
    prepublish: bool = True,
    worker_args: Sequence[str] = (),
    timeout_s: float = 600.0,
    worker_repo=None,
    worker_entry: Sequence[str] = ("-m", "worker.run"),
    worker_env: dict[str, str] | None = None,
) -> dict:
    """Publish ``texts`` and have ``workers`` worker processes (one group) classify them.

    ``prepublish``: the whole input is on the topic before the workers start (a backlog); otherwise the
    workers are started and ready first and the input is published (paced at ``rate`` when given)."""
    topic = ws.name(tag)
    cache_prefix = cache_prefix or f"bench:{ws.run_id}:{tag}:"
    common.create_topics(ws, {topic: partitions})
    procs = [
        common.WorkerProcess(
            ws,
            input_topic=topic,
            group_id=ws.name(f"{tag}-group"),
            cache_prefix=cache_prefix,
            tag=f"{tag}-{i}",
            extra=worker_args,
            repo=worker_repo,
            entry=worker_entry,
            env=worker_env,
        )
        for i in range(workers)
    ]
    sent: dict[str, int] = {}
    t_start = time.monotonic()
    if prepublish:
        sent = common.publish(ws, topic, texts, id_prefix=f"{tag}-", partitions=partitions)
    with common.running_workers(procs):
        ready_s = max(p.wait_ready() for p in procs) if not prepublish else None
        if not prepublish:
            sent = common.publish(ws, topic, texts, id_prefix=f"{tag}-", rate=rate, partitions=partitions)
        common.wait_handled(procs, len(texts), timeout_s)
        wall_s = time.monotonic() - t_start
    outputs = common.read_outputs(ws, procs[0].output_topic, len(texts))
    ids = {o.id for o in outputs}
    missing = [i for i in sent if i not in ids]
    if missing:
        raise RuntimeError(
            f"{tag}: {len(missing)} of {len(sent)} messages have no output (e.g. {missing[:3]})"
        )
    infer_ms = [o.infer_ms for o in outputs if not o.cached]
    lat = common.latencies_ms(outputs, sent)
    return {
        "tag": tag,
        "messages": len(texts),
        "outputs": len(outputs),
        "workers": workers,
        "partitions": partitions,
        "rate_target": rate,
        "cache_prefix": cache_prefix,
        "cached_fraction": sum(o.cached for o in outputs) / len(outputs),
        **common.stream_throughput(outputs),
        "latency_ms": common.latency_summary(lat),
        "latency_cdf_ms": [common.percentile(lat, q) for q in range(101)] if lat else [],
        "batch_infer_ms": common.latency_summary(infer_ms) if infer_ms else {"n": 0},
        "ready_s": ready_s,
        "wall_s": wall_s,
        "worker_logs": [str(p.log_path) for p in procs],
    }


def backlog(ws: common.Workspace, texts: Sequence[str], **kw) -> dict:
    return run_stream(ws, texts, tag=kw.pop("tag", "backlog"), **kw)


def steady(ws: common.Workspace, texts: Sequence[str], *, rate: float, seconds: float, **kw) -> dict:
    n = min(len(texts), max(50, int(rate * seconds)))  # fewer texts than rate x seconds: a shorter run
    result = run_stream(ws, texts[:n], tag=kw.pop("tag", "steady"), rate=rate, prepublish=False, **kw)
    from bench.model_only import worker_settings

    s = worker_settings()
    one_batch = result["batch_infer_ms"].get("p50", 0.0)
    bound = 4 * (s.max_wait_ms + one_batch)
    result["p99_bound_ms"] = bound
    result["p99_within_bound"] = result["latency_ms"].get("p99", float("inf")) < bound
    result["max_wait_ms"] = s.max_wait_ms
    return result


def run(
    ws: common.Workspace,
    *,
    messages: int = DEFAULT_MESSAGES,
    steady_seconds: float = 30.0,
    load: float = 0.7,
    stream: Sequence[str] | None = None,
) -> dict:
    """Part 2: backlog, then steady load at ``load`` x the backlog throughput."""
    texts = list(stream or common.stream_texts(messages))[:messages]
    b = backlog(ws, texts)
    rate = load * b["msgs_per_s"]
    s = steady(ws, texts, rate=rate, seconds=steady_seconds)
    result = {"backlog": b, "steady": s, "load": load}
    print_tables(result)
    return result


TABLE_HEADER = ["load shape", "messages", "offered msgs/s", "msgs/s", "seconds", "latency p50 ms", "p95 ms",
                "p99 ms", "batch infer p50 ms", "cached"]


def table_rows(r: dict) -> list[list]:
    """One row per load shape, in :data:`TABLE_HEADER`'s order (the console table and RESULTS.md)."""
    rows = []
    for shape in ("backlog", "steady"):
        x = r[shape]
        lat = x["latency_ms"]
        rows.append([shape, x["messages"], x.get("rate_target"), x["msgs_per_s"], x["seconds"], lat.get("p50"),
                     lat.get("p95"), lat.get("p99"), x["batch_infer_ms"].get("p50"),
                     f"{x.get('cached_fraction', 0):.0%}"])
    return rows


def print_tables(r: dict) -> None:
    common.print_table("End to end through the broker (worker subprocess)", TABLE_HEADER, table_rows(r))
    st = r["steady"]
    print(
        f"steady at {r['load']:.0%} of backlog throughput ({st['rate_target']:.0f} msgs/s): p99 "
        f"{st['latency_ms'].get('p99', 0):.0f} ms vs bound 4 x (max_wait {st['max_wait_ms']:.0f} ms + batch "
        f"{st['batch_infer_ms'].get('p50', 0):.0f} ms) = {st['p99_bound_ms']:.0f} ms: "
        f"{'within' if st['p99_within_bound'] else 'OVER'}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="backlog size")
    parser.add_argument("--steady-seconds", type=float, default=30.0, help="duration of the steady load")
    parser.add_argument("--load", type=float, default=0.7, help="steady rate as a share of backlog msgs/s")
    parser.add_argument("--output", default=str(common.WORK_DIR / "e2e.json"), help="JSON written here")
    args = parser.parse_args(argv)
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, messages=args.messages, steady_seconds=args.steady_seconds, load=args.load)
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
