"""``python -m bench.run`` (``make bench``): every benchmark part in one run, one stack, one checkpoint.

Starts the local stack (its own broker and Redis), uses the newest checkpoint in ``checkpoints/`` (trains a
``--quick`` one when there is none), runs the parts in order and writes ``bench/results.json``,
``bench/RESULTS.md`` and the plots ``bench/*.png``:

1. model-only sweep (titles, reviews; batch 1..256; fp32 vs bf16) with the GEMM limit measured in the same
   run;
2. end to end through the broker (Apache Kafka by default): a 20,000-message backlog, then a steady rate at
   70% of its throughput; right after, the same backlog and the cached stream on Tansu (``bench/brokers.py``);
3. the per-message ``pipeline`` consumer loop (time-boxed) on the same messages;
4. the same stream again, fully cached;
5. overhead = end-to-end / model-only at the worker's batch setting (computed from 1 and 2);
6. one vs two worker processes on a 4-partition topic;
7. exactly-once against at-least-once at two commit intervals, on a cached stream, on both Kafka clients
   (``bench/delivery.py``); then the output gap while a second worker joins and leaves, per group protocol
   (``bench/rebalance_gap.py``);
8. the ceiling: the worker path with the model's cost taken out (every message a cache hit), one and two
   processes, exactly-once too, and a py-spy profile of where its time goes (``bench/ceiling.py``);
9. the uncached path at GPU rates: the worker with a stand-in forward that costs what an H100's would, on
   distinct messages, against the cached ceiling of the same run and batching (``bench/standin.py``).

Sized to finish well within 20 minutes on a 2-core machine (``--quick`` shrinks every part for a smoke run).
A part that fails is recorded with its error and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

from bench import common
from bench.summary import summarize

BENCH_DIR = common.REPO / "bench"


def run_all(
    ws: common.Workspace,
    *,
    messages: int,
    steady_seconds: float,
    pipeline_seconds: float,
    scale_messages: int,
    seconds_per_point: float,
    batch_sizes: list[int],
    parts: set[str],
    scale: float = 1.0,
    e2e_seconds: float | None = None,
    scale_seconds: float | None = None,
    delivery_sizes: dict | None = None,
    ceiling_sizes: dict | None = None,
    gap_sizes: dict | None = None,
    standin_sizes: dict | None = None,
) -> dict:
    """All parts on one workspace; ``scale`` shrinks the fixed time boxes (GEMM timing, model-only over the
    stream) for smoke runs. ``e2e_seconds``/``scale_seconds`` cap the e2e/cache stream and each scale-out
    variant at that many seconds of the model-only rate measured first, so a slow CPU still finishes in
    time and a fast one gets the full counts."""
    from bench import (brokers, cache, ceiling, delivery, e2e, model_only, pipeline_baseline, rebalance_gap,
                       scale_out, standin)

    stream = common.stream_texts(messages)
    delivery_sizes = delivery_sizes or {}
    results: dict = {"parts": {}, "errors": {}}

    def part(name: str, fn):
        if name not in parts:
            return None
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on: the other parts are still worth having
            traceback.print_exc()
            results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            return None
        out["part_seconds"] = time.perf_counter() - t0
        results["parts"][name] = out
        return out

    mo = part(
        "model_only",
        lambda: model_only.run(
            ws,
            stream=stream[:4000],
            batch_sizes=batch_sizes,
            seconds_per_point=seconds_per_point,
            stream_seconds=15.0 * scale,
            gemm_seconds=0.4 * scale,
        ),
    )
    rate = mo["stream"]["msgs_per_s"] if mo else None
    messages = sized(messages, rate, e2e_seconds)
    scale_messages = sized(scale_messages, rate, scale_seconds)
    results["sized"] = {"messages": messages, "scale_messages": scale_messages, "model_only_rate": rate}
    e = part("e2e", lambda: e2e.run(ws, messages=messages, steady_seconds=steady_seconds, stream=stream))
    part("brokers", lambda: brokers.run(ws, stream[:messages], kafka_backlog=e["backlog"] if e else None))
    part(
        "pipeline_baseline",
        lambda: pipeline_baseline.run(
            ws, seconds=pipeline_seconds, stream=stream, messages=min(len(stream), 4000)
        ),
    )
    part(
        "cache", lambda: cache.run(ws, messages=messages, stream=stream, uncached=e["backlog"] if e else None)
    )
    part("scale_out", lambda: scale_out.run(ws, messages=min(scale_messages, len(stream)), stream=stream))
    part("delivery", lambda: delivery.run(ws, stream=stream, **delivery_sizes))
    part("rebalance_gap", lambda: rebalance_gap.run(ws, stream=stream, **(gap_sizes or {})))
    part("ceiling", lambda: ceiling.run(ws, stream=stream, **(ceiling_sizes or {})))
    part("standin", lambda: standin.run(ws, **(standin_sizes or {})))
    if mo:
        results["gpu_inputs"] = mo.pop("gpu_inputs")
    return results


MIN_SIZED_MESSAGES = 2000  # below this, start-up and the last partial batches weigh on the rates


def sized(count: int, rate: float | None, seconds: float | None) -> int:
    """``count`` capped at ``seconds`` of ``rate`` (never below :data:`MIN_SIZED_MESSAGES`)."""
    if not rate or not seconds:
        return count
    return min(count, max(MIN_SIZED_MESSAGES, round(rate * seconds)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir",
        default=None,
        help="checkpoint store (default: checkpoints/, trained --quick when empty)",
    )
    parser.add_argument("--messages", type=int, default=20_000, help="e2e backlog and cache stream length")
    parser.add_argument("--steady-seconds", type=float, default=30.0, help="steady-load duration")
    parser.add_argument("--pipeline-seconds", type=float, default=30.0, help="pipeline baseline time box")
    parser.add_argument("--scale-messages", type=int, default=6000, help="messages per scale-out variant")
    parser.add_argument("--e2e-seconds", type=float, default=150.0,
                        help="cap --messages at this many seconds of the measured model-only rate (0: no cap)")
    parser.add_argument("--scale-seconds", type=float, default=60.0,
                        help="cap --scale-messages at this many seconds of the model-only rate (0: no cap)")
    parser.add_argument("--seconds-per-point", type=float, default=1.0, help="model-only time per point")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256", help="model-only sweep")
    parser.add_argument(
        "--parts",
        default="model_only,e2e,brokers,pipeline_baseline,cache,scale_out,delivery,rebalance_gap,"
                "ceiling,standin",
        help="comma-separated subset of parts",
    )
    parser.add_argument("--ceiling-compare-ref", default=None,
                        help="part 8 also runs the worker of this git commit on the same backlog (before/after)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in about a minute")
    parser.add_argument("--out-dir", default=str(BENCH_DIR), help="where results.json, RESULTS.md, PNGs go")
    parser.add_argument("--work-dir", default=str(common.WORK_DIR), help="scratch: logs, stack, workers")
    args = parser.parse_args(argv)
    scale = 1.0
    if args.quick:
        scale = 0.1
        args.messages, args.steady_seconds, args.pipeline_seconds, args.scale_messages = 300, 4.0, 4.0, 200
        args.seconds_per_point, args.batch_sizes = 0.05, "1,8,64"
    delivery_sizes = {"unique": 60, "repeat": 4, "rate": 200.0, "seconds": 2.0} if args.quick else {}
    ceiling_sizes = ({"messages": 3000, "unique": 100, "profile_messages": 0, "client_messages": 3000,
                      "quality_pairs": 1}
                     if args.quick else {})
    if args.ceiling_compare_ref:
        ceiling_sizes["compare_ref"] = args.ceiling_compare_ref
    gap_sizes = {"rate": 200.0, "seconds": 3.0, "unique": 60} if args.quick else {}
    standin_sizes = {"messages": 3000, "processes": (1,), "profile_messages": 0} if args.quick else {}

    from bench import report
    from bert_stream.logs import configure_logging

    configure_logging("WARNING")
    started = time.time()
    machine = common.machine_info()
    with common.open_workspace(args.model_dir, Path(args.work_dir)) as ws:
        version, folder = ws.checkpoint_folder()
        results = run_all(
            ws,
            messages=args.messages,
            steady_seconds=args.steady_seconds,
            pipeline_seconds=args.pipeline_seconds,
            scale_messages=args.scale_messages,
            seconds_per_point=args.seconds_per_point,
            batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
            parts=set(args.parts.split(",")),
            scale=scale,
            e2e_seconds=args.e2e_seconds,
            scale_seconds=args.scale_seconds,
            delivery_sizes=delivery_sizes,
            ceiling_sizes=ceiling_sizes,
            gap_sizes=gap_sizes,
            standin_sizes=standin_sizes,
        )
        broker = ws.broker
    mo = results["parts"].get("model_only") or {}
    settings = {
        "model_version": version,
        "model_folder": str(folder),
        "model": mo.get("model"),
        "dtype": mo.get("worker_dtype"),
        "batch": mo.get("batch_settings"),
        "messages": results["sized"]["messages"],
        "messages_asked": args.messages,
        "e2e_seconds": args.e2e_seconds,
        "steady_seconds": args.steady_seconds,
        "steady_load": 0.7,
        "pipeline_seconds": args.pipeline_seconds,
        "scale_messages": results["sized"]["scale_messages"],
        "scale_seconds": args.scale_seconds,
        "broker": broker,
        "quick": args.quick,
        "model_dir": str(args.model_dir or common.DEFAULT_STORE),
    }
    summary = summarize(results, settings, machine)
    summary["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    summary["duration_s"] = time.time() - started
    import os

    summary["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()[:2]]
    out_dir = Path(args.out_dir)
    report.write_all(summary, out_dir)
    print(
        f"\nbench: {summary['duration_s'] / 60:.1f} min; wrote {out_dir}/results.json, RESULTS.md and plots"
    )
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
