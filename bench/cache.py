"""Part 4: the same stream again, every message already in the Redis cache.

``python -m bench.cache [--messages 20000]``

The worker looks every batch up in Redis in one round trip and skips the model for hits, so a repeated
stream measures Kafka + JSON + Redis alone. Run standalone, it first drains the stream uncached (which
fills the cache); inside ``python -m bench.run`` it reuses the e2e backlog run and its cache prefix, so the
two figures come from the same messages and the same run. Both are measured alike (first input polled to
last output published) and the ratio cached / uncached is reported.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bench import common, e2e


def run(
    ws: common.Workspace,
    *,
    messages: int = e2e.DEFAULT_MESSAGES,
    uncached: dict | None = None,
    stream: Sequence[str] | None = None,
) -> dict:
    """``uncached``: the e2e backlog result over the same ``stream`` (its cache prefix holds the results)."""
    texts = list(stream or common.stream_texts(messages))[:messages]
    if uncached is None:
        uncached = e2e.backlog(ws, texts, tag="cache-fill")
    if uncached["messages"] != len(texts):
        raise ValueError("the uncached run must cover the same messages")
    cached = e2e.run_stream(ws, texts, tag="cached", cache_prefix=uncached["cache_prefix"])
    result = {
        "uncached": uncached,
        "cached": cached,
        "cached_over_uncached": common.ratio(cached["msgs_per_s"], uncached["msgs_per_s"]),
    }
    common.print_table(
        "Cache: the same stream again, fully cached",
        ["run", "messages", "msgs/s", "served from cache"],
        [
            ["uncached", uncached["messages"], uncached["msgs_per_s"], f"{uncached['cached_fraction']:.0%}"],
            ["cached", cached["messages"], cached["msgs_per_s"], f"{cached['cached_fraction']:.0%}"],
        ],
    )
    print(f"cached / uncached = {result['cached_over_uncached']:.1f}x", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--messages", type=int, default=e2e.DEFAULT_MESSAGES, help="stream length")
    parser.add_argument("--output", default=str(common.WORK_DIR / "cache.json"), help="JSON written here")
    args = parser.parse_args(argv)
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, messages=args.messages)
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
