"""Part 6: scale-out: one worker process against two in one consumer group, on a 4-partition topic.

``python -m bench.scale_out [--messages 6000] [--rounds 1]``

Both variants get the same messages, round-robin over 4 partitions, published once every worker of the
variant is ready (model loaded, partitions assigned), so a rebalance never falls inside the measurement.
Threads are split so the variants use the same cores: one worker with torch's default (all cores) against
two workers with ``cores / 2`` threads each. The variants alternate, ``--rounds`` times.

On this 2-core machine the two workers mostly compete for the same cores: the figure shows what a second
process costs or gains (less Python overhead serialised behind one GIL, more memory, more client
connections), not how the design scales. Scaling out is for more machines or GPUs: one process per device.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from bench import common, e2e

PARTITIONS = 4


def run(
    ws: common.Workspace, *, messages: int = 6000, rounds: int = 1, stream: Sequence[str] | None = None
) -> dict:
    texts = list(stream or common.stream_texts(messages))[:messages]
    cores = os.cpu_count() or 2
    variants = {1: [], 2: []}
    for r in range(rounds):
        for n, runs in variants.items():
            threads = ["--torch-threads", str(max(1, cores // n))]
            runs.append(
                e2e.run_stream(
                    ws,
                    texts,
                    tag=f"scale{n}w-r{r}",
                    workers=n,
                    partitions=PARTITIONS,
                    prepublish=False,
                    worker_args=threads,
                )
            )
    summary = {
        str(n): {
            "msgs_per_s": sum(x["msgs_per_s"] for x in runs) / len(runs),
            "threads_per_worker": max(1, cores // n),
            "runs": runs,
        }
        for n, runs in variants.items()
    }
    result = {
        "messages": len(texts),
        "partitions": PARTITIONS,
        "cores": cores,
        "variants": summary,
        "two_over_one": common.ratio(summary["2"]["msgs_per_s"], summary["1"]["msgs_per_s"]),
    }
    common.print_table(
        f"Scale-out on a {PARTITIONS}-partition topic ({cores} cores: mostly contention)",
        ["workers", "threads each", "msgs/s", "ratio to 1 worker"],
        [
            [
                n,
                v["threads_per_worker"],
                v["msgs_per_s"],
                f"{v['msgs_per_s'] / summary['1']['msgs_per_s']:.2f}x",
            ]
            for n, v in summary.items()
        ],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_out", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--messages", type=int, default=6000, help="messages per variant")
    parser.add_argument("--rounds", type=int, default=1, help="times each variant runs (alternating)")
    parser.add_argument("--output", default=str(common.WORK_DIR / "scale_out.json"), help="JSON written here")
    args = parser.parse_args(argv)
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, messages=args.messages, rounds=args.rounds)
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
