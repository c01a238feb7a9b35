"""Part 3: the obvious alternative: a consumer loop calling a transformers ``pipeline`` per message.

``python -m bench.pipeline_baseline [--seconds 30] [--messages 4000]``

What most users write first: ``for record in consumer: producer.send(out, pipe(text))``. Same checkpoint,
same broker, same messages (the start of the e2e stream), the pipeline's defaults (fp32, one message per
call). It runs as its own process (``python -m bench.pipeline_baseline --consume ...``), like the worker,
and is time-boxed: it stops ``--seconds`` after its first message, because at tens of messages per second
the full 20,000-message stream would take minutes. Its throughput is measured the same way as the
worker's (first input polled to last output published, from the records' timestamps).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common


def consume(args: argparse.Namespace) -> int:
    """The naive loop itself. Deliberately plain: no batching, no cache, auto-commit."""
    from transformers import pipeline

    from bert_stream.kafka import KafkaSettings, make_consumer, make_producer

    pipe = pipeline("text-classification", model=args.model, tokenizer=args.model, device="cpu")
    kafka = KafkaSettings(
        bootstrap_servers=args.bootstrap_servers,
        session_timeout_ms=common.BENCH_SESSION_TIMEOUT_MS,
        max_poll_interval_ms=120_000,
    )
    consumer = make_consumer(kafka, args.group_id, args.input_topic, enable_auto_commit=True)
    producer = make_producer(kafka)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    first = None
    done = 0
    try:
        while not stop and done < args.limit:
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    received = time.time()
                    first = first or received
                    msg = json.loads(record.value)
                    pred = pipe(msg["text"], truncation=True, max_length=args.max_length)[0]
                    infer_ms = (time.time() - received) * 1000
                    producer.send(
                        args.output_topic,
                        key=record.key,
                        value=json.dumps(
                            {
                                "id": msg["id"],
                                "label": pred["label"],
                                "score": pred["score"],
                                "timing": {"queue_ms": 0.0, "infer_ms": infer_ms},
                            },
                            ensure_ascii=False,
                        ).encode(),
                    )
                    done += 1
                    if time.time() - first > args.seconds or done >= args.limit:
                        break
                if first and time.time() - first > args.seconds:
                    stop.append(1)
                    break
    finally:
        producer.flush()
        producer.close()
        consumer.close()
    return 0


def run(
    ws: common.Workspace, *, seconds: float = 30.0, messages: int = 4000, stream: Sequence[str] | None = None
) -> dict:
    from bench.model_only import worker_settings

    texts = list(stream or common.stream_texts(messages))[:messages]
    topic = ws.name("pipeline")
    common.create_topics(ws, {topic: 1, f"{topic}-out": 1})
    common.publish(ws, topic, texts, id_prefix="pipeline-")
    _, folder = ws.checkpoint_folder()
    log = ws.work_dir / f"pipeline-{ws.run_id}.log"
    argv = [
        sys.executable,
        "-m",
        "bench.pipeline_baseline",
        "--consume",
        "--model",
        str(folder),
        "--bootstrap-servers",
        ws.bootstrap_servers,
        "--input-topic",
        topic,
        "--output-topic",
        f"{topic}-out",
        "--group-id",
        ws.name("pipeline-group"),
        "--seconds",
        str(seconds),
        "--limit",
        str(len(texts)),
        "--max-length",
        str(worker_settings().max_length),
    ]
    with open(log, "ab") as out:
        proc = subprocess.run(  # noqa: PLW1510 - the exit status is checked below, with the log
            argv, cwd=common.REPO, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 180
        )
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline baseline failed (exit {proc.returncode}); see {log}")
    outputs = common.read_outputs(ws, f"{topic}-out", len(texts), timeout_s=5.0)
    result = {
        "published": len(texts),
        "time_box_s": seconds,
        **common.stream_throughput(outputs),
        "dtype": "fp32 (pipeline default)",
        "log": str(log),
    }
    common.print_table(
        "Per-message transformers pipeline in a consumer loop (time-boxed)",
        ["messages", "seconds", "msgs/s"],
        [[result["messages"], result["seconds"], result["msgs_per_s"]]],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline_baseline", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time box from the first message")
    parser.add_argument(
        "--messages", type=int, default=4000, help="messages published (more than it gets to)"
    )
    parser.add_argument("--output", default=str(common.WORK_DIR / "pipeline_baseline.json"), help="JSON here")
    # the consumer subprocess
    parser.add_argument("--consume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap-servers", help=argparse.SUPPRESS)
    parser.add_argument("--input-topic", help=argparse.SUPPRESS)
    parser.add_argument("--output-topic", help=argparse.SUPPRESS)
    parser.add_argument("--group-id", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=10**9, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consume:
        return consume(args)
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, seconds=args.seconds, messages=args.messages)
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
