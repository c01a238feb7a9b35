"""Where the worker's time goes: py-spy samples of a worker draining a backlog, summed by pipeline step.

``python -m bench.profile [--messages 6000] [--cached] [--torch-threads N]``

Part 8 of ``make bench`` (bench/ceiling.py) profiles the cached path with it; this command profiles any
drain. It publishes the stream, starts one worker, attaches ``py-spy record --threads --format raw`` to it for
the drain, and sums the samples per thread into the steps of the worker loop (Kafka poll, decode, tokenisation, cache, model forward,
publish, commit, ...). ``--cached`` profiles a second pass over the same stream served from Redis (what
bounds the cached throughput). Writes the raw collapsed stacks and a JSON summary into the work dir.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common, e2e

# Priority order: the first category with a needle anywhere in the stack wins, so the worker's own steps
# (its function names) decide, and a wait inside a step counts for that step (a sync commit's round trip is
# commit time, not idle time).
CATEGORIES = (
    ("device wait (stand-in forward)", ("StandIn.",)),
    ("model forward", ("LoadedModel._forward", "device_forward", "_pass_logits")),
    ("n-gram half", ("ngram.py",)),
    ("tokenize", ("tokenization_utils", "tokenizers", "token_lengths", "token_budget", "LoadedModel.encode")),
    ("pass arrays", ("LoadedModel.passes",)),
    ("softmax, top-k, predictions", ("Pending.",)),
    ("redis cache", ("worker/cache.py", "redis/")),
    ("commit (producer flush + sync commit)", ("Worker._maybe_commit", "_on_revoked")),
    ("publish outputs (JSON + producer.send)", ("Worker._publish", "Worker._send")),
    ("decode input", ("Worker._route",)),
    ("kafka poll", ("Worker._poll",)),
    ("batcher + submit", ("Worker._submit_ready", "worker/batcher.py")),
    ("backpressure", ("Worker._backpressure",)),
    ("predict bookkeeping", ("LoadedModel.predict", "LoadedModel.launch", "Classifier.classify",
                             "Classifier.launch", "Classifier.finish", "_infer", "_result")),
    ("kafka client I/O thread", ("kafka/",)),
    ("logging/metrics", ("structlog", "logging/", "prometheus_client", "http/server")),
    ("waiting", ("threading.py", "queue.py", "selectors.py")),
)


def categorize(stack: str) -> str:
    for name, needles in CATEGORIES:
        if any(n in stack for n in needles):
            return name
    return "other"


def summarize(raw: Path) -> dict:
    """{thread: {category: share of that thread's samples}} plus sample counts, from py-spy's raw format."""
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        thread = stack.split(";", 1)[0]
        per_thread[thread][categorize(stack)] += int(count)
    out = {}
    for thread, counter in per_thread.items():
        total = sum(counter.values())
        out[thread] = {"samples": total, "shares": {k: v / total for k, v in counter.most_common()}}
    return out


def busy_steps(summary: dict, top: int = 6, min_share: float = 0.05, min_samples: int = 20):
    """(thread, its figures, step) for the busiest steps of each busy thread in a :func:`summarize`d profile:
    threads with at least ``min_samples`` samples (not the idle ones: the Kafka client's, the HTTP server's),
    at most ``top`` steps each, down to ``min_share`` of the thread's samples."""
    for thread, x in summary.get("threads", {}).items():
        if x["samples"] < min_samples:
            continue
        for step, share in list(x["shares"].items())[:top]:
            if share >= min_share:
                yield thread, x, step


def pyspy_binary() -> str | None:
    found = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    return found if Path(found).exists() else None


def record_drain(worker: common.WorkerProcess, messages: int, raw: Path, rate: int = 100,
                 timeout_s: float = 600) -> Path:
    """Attach py-spy to a running worker once it has handled its first message, until it has handled
    ``messages``; the raw collapsed stacks go to ``raw``."""
    pyspy = pyspy_binary()
    if pyspy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    while worker.handled() == 0:  # attach once the drain has started
        worker.check_alive()
        time.sleep(0.05)
    with open(raw.with_suffix(".log"), "wb") as spy_log:
        spy = subprocess.Popen([pyspy, "record", "--pid", str(worker.proc.pid), "--threads", "--format", "raw",
                                "--rate", str(rate), "--output", str(raw), "--nonblocking"],
                               stdout=spy_log, stderr=subprocess.STDOUT)
        common.wait_handled([worker], messages, timeout_s)
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        spy.wait(60)
    return raw


def drain(ws: common.Workspace, texts: Sequence[str], *, tag: str, cache_prefix: str, partitions: int = 1,
          rate: int = 100, **worker: Any) -> dict:
    """Publish ``texts`` to a new topic and profile one worker (``worker``: :class:`common.WorkerProcess`'s
    keywords) while it drains them: its msgs/s while sampled, and per thread the share of its samples and
    the microseconds per message of each step (samples / ``rate`` over the messages)."""
    topic = ws.name(tag)
    common.create_topics(ws, {topic: partitions})
    common.publish(ws, topic, texts, id_prefix=f"{tag}-", partitions=partitions)
    process = common.WorkerProcess(ws, input_topic=topic, group_id=ws.name(f"{tag}-group"),
                                   cache_prefix=cache_prefix, tag=tag, **worker)
    raw = ws.work_dir / f"{tag}-{ws.run_id}.raw.txt"
    with common.running_workers([process]):
        record_drain(process, len(texts), raw, rate)
    outputs = common.read_outputs(ws, process.output_topic, len(texts))
    threads = summarize(raw)
    for x in threads.values():
        x["us_per_message"] = {step: round(share * x["samples"] * 1e6 / rate / len(texts), 2)
                               for step, share in x["shares"].items()}
    return {"messages": len(texts), **common.stream_throughput(outputs), "threads": threads, "raw": str(raw)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--messages", type=int, default=6000, help="backlog size")
    parser.add_argument("--cached", action="store_true", help="profile the second, fully cached pass")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="the worker's --torch-threads (0: default)"
    )
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = parser.parse_args(argv)
    if pyspy_binary() is None:
        parser.exit(2, "bench.profile: py-spy is not installed (pip install py-spy)\n")
    texts = common.stream_texts(args.messages)
    extra = ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    with common.open_workspace(args.model_dir) as ws:
        prefix = f"bench:{ws.run_id}:profile:"
        if args.cached:
            e2e.run_stream(ws, texts, tag="profile-fill", cache_prefix=prefix, worker_args=extra)
        tag = "profile-cached" if args.cached else "profile"
        drained = drain(ws, texts, tag=tag, cache_prefix=prefix, rate=args.rate, extra=extra)
    summary = {"cached": args.cached, "torch_threads": args.torch_threads or None, **drained}
    common.save_json(ws.work_dir / f"{tag}.json", summary)
    print(f"{tag}: {summary['msgs_per_s']:,.0f} msgs/s over {summary['messages']:,} messages")
    for thread, x in summary["threads"].items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in x["shares"].items() if v >= 0.01)
        print(f"  {thread} ({x['samples']} samples): {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
