"""Part: the same streams on Tansu, right after they ran on Apache Kafka (the bench's broker).

``python -m bench.brokers [--messages 2000]``

Inside ``python -m bench.run`` this runs right after the e2e part, on the same messages: the uncached backlog
(a fresh cache prefix: every message a miss), then the fully cached stream (the e2e backlog's prefix, so every
message a hit). Each figure says which broker it came from. Tansu runs on its own loopback port, the worker
and the model are the same; Redis is the bench's.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from bench import common, e2e


def run(ws: common.Workspace, texts: Sequence[str], *, kafka_backlog: dict | None = None,
        broker: str | None = None) -> dict:
    """``kafka_backlog``: the e2e backlog that just ran on the workspace's broker over ``texts`` (its cache
    prefix holds their results); run here when not given. ``broker``: the other one (default: Tansu, or
    Apache Kafka when the bench itself runs on Tansu)."""
    from deploy.local import LocalStack

    broker = broker or ("kafka" if ws.broker == "tansu" else "tansu")
    texts = list(texts)
    if kafka_backlog is None:
        kafka_backlog = e2e.backlog(ws, texts)
    if kafka_backlog["messages"] != len(texts):
        raise ValueError("the reference backlog must cover the same messages")
    other = LocalStack(ws.work_dir / f"stack-{broker}", broker)
    try:
        # only a broker: Redis stays the bench's, so the cached run finds the e2e backlog's results
        other_ws = dataclasses.replace(ws, bootstrap_servers=other.start_broker().address, broker=broker)
        backlog = e2e.backlog(other_ws, texts, tag=f"{broker}-backlog")
        cached = e2e.run_stream(other_ws, texts, tag=f"{broker}-cached", cache_prefix=kafka_backlog["cache_prefix"])
    finally:
        other.down()
    result = {
        "broker": broker, "reference_broker": ws.broker, "messages": len(texts),
        "backlog": backlog, "cached": cached,
        "backlog_over_reference": common.ratio(backlog["msgs_per_s"], kafka_backlog["msgs_per_s"]),
    }
    common.print_table(
        f"Brokers: the same {len(texts):,} messages on {ws.broker} and {broker}",
        ["broker", "run", "msgs/s", "served from cache"],
        [[ws.broker, "backlog (uncached)", kafka_backlog["msgs_per_s"], f"{kafka_backlog['cached_fraction']:.0%}"],
         [broker, "backlog (uncached)", backlog["msgs_per_s"], f"{backlog['cached_fraction']:.0%}"],
         [broker, "cached", cached["msgs_per_s"], f"{cached['cached_fraction']:.0%}"]],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.brokers", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--messages", type=int, default=2000, help="backlog length")
    parser.add_argument("--output", default=str(common.WORK_DIR / "brokers.json"), help="JSON written here")
    args = parser.parse_args(argv)
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, common.stream_texts(args.messages)[: args.messages])
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
