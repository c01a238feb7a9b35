"""Part 9: the worker's uncached path at GPU rates, measured on this CPU with a stand-in forward.

``python -m bench.standin [--messages 100000] [--processes 1,2] [--compare-ref REF] [--gpu-share 0.3]``

A GPU worker's throughput is what it does around the model per *uncached* message (poll, decode, batch,
tokenize, arrays, forward, softmax and top-k, the hybrid's n-grams, predictions, Redis store, publish, commit):
a GPU runs e5-small's forward for far more messages per second than that path carries. Here the whole
worker runs as in production except for one thing: the transformer's forward is :class:`StandIn`, which
returns logits of the right shape, deterministic in the token ids, after the time the pass would take on
the device. It takes ``LoadedModel.device_forward``'s place, so everything before and after it is the
worker's own code, with the shapes CUDA would get (length buckets, one pass per bucket).

The device time of a pass of ``rows`` x ``width`` padded tokens is ``US_PER_PASS`` plus its FLOPs (per row,
the dense and attention terms of :func:`bench.common.flops_per_message` for e5-small's shape,
``bench/gpu_inputs.json``, at the padded width: padding is computed too) at ``--gpu-share`` of an H100's dense bf16 rate. The default share, 30%, is what BERT-sized inference
reaches on large batches; ``US_PER_PASS`` is the floor of its ~120 kernels run back to back. The host side
of launching them is taken as negligible, as with CUDA graphs. While a pass "runs" the worker's thread
sleeps, releasing the GIL as a CUDA synchronisation does, and passes queue behind each other as on one
CUDA stream.

Only this benchmark selects it: the worker's CLI and environment refuse ``standin`` as a backend. The
workers run as ``python -c "runpy.run_path('bench/standin.py')"``, so the stand-in also drives an older
commit's worker (``--compare-ref``, a git worktree; its seam then is the older ``_transformer_logits``).

Variants, each its own consumer group on a 4-partition backlog of distinct real messages (no cache hits),
all on librdkafka:

- the cached ceiling of the same run (:mod:`bench.ceiling`'s drain: every message a cache hit), the figure
  the stand-in is judged against (``standin_over_ceiling``, target >= 0.7, and >= 50,000 msgs/s);
- the stand-in, at-least-once (``standin_msgs_per_s``) and exactly-once (``standin_eos_msgs_per_s``);
- 2 processes in one group (what ``--processes 2`` runs on one GPU);
- the worker of ``--compare-ref`` with the same stand-in (before/after);
- a py-spy profile of a stand-in drain: microseconds per message per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ENV = "BENCH_STANDIN"  # the cost model, as JSON, handed to each stand-in worker process
H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM
GPU_SHARE = 0.30
US_PER_PASS = 300.0  # device time of a pass however small: e5-small's ~120 kernels, ~2.5 us each
CLIENT = "confluent-kafka"
PARTITIONS = 4
# The gpu overlay's batching (deploy/k8s/overlays/gpu): a batch of titles and reviews of ~2k real tokens.
WORKER_ARGS = ("--kafka-client", CLIENT, "--max-batch-size", "512", "--max-batch-tokens", "32768",
               "--max-queued-messages", "4096", "--max-wait-ms", "5")


class StandIn:
    """A GPU's forward pass as the worker sees it: logits after a delay, passes in order on one stream."""

    def __init__(self, labels: int, *, us_per_pass: float, dense_flops_per_token: float,
                 attention_flops_per_token2: float, flops_per_s: float):
        self.labels = labels
        self.s_per_pass = us_per_pass / 1e6
        self.dense, self.attention, self.rate = dense_flops_per_token, attention_flops_per_token2, flops_per_s
        self._free_at = 0.0  # when the device finishes what it was given
        self._lock = threading.Lock()
        self._weights = (np.arange(1, labels + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))

    @classmethod
    def from_env(cls, labels: int) -> StandIn:
        return cls(labels, **json.loads(os.environ[ENV]))

    def seconds(self, rows: int, width: int) -> float:
        """Device time of one pass over ``rows`` x ``width`` padded tokens."""
        flops = rows * (self.dense * width + self.attention * width * width)
        return self.s_per_pass + flops / self.rate

    def _enqueue(self, seconds: float) -> float:
        with self._lock:
            self._free_at = max(time.perf_counter(), self._free_at) + seconds
            return self._free_at

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[rows, labels] float32 in [-4, 4), a hash of each row's ids: the same ids, the same logits."""
        row = (ids.astype(np.uint64) * np.uint64(0x100000001B3)).sum(axis=1, dtype=np.uint64)
        mixed = (row[:, None] ^ self._weights) * np.uint64(0xBF58476D1CE4E5B9)
        return ((mixed >> np.uint64(40)).astype(np.float32) / np.float32(2**24) * 8 - 4).astype(np.float32)

    def device_forward(self, passes) -> object:
        """``LoadedModel.device_forward``'s contract: start the passes, return a wait for their logits."""
        ready = self._enqueue(sum(self.seconds(*p.ids.shape) for p in passes))
        logits = np.concatenate([self.logits(p.ids) for p in passes])

        def wait() -> np.ndarray:
            delay = ready - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            return logits
        return wait

    def transformer_logits(self, rows: Sequence[Sequence[int]]):
        """The older worker's seam (``LoadedModel._transformer_logits``: id lists in, a tensor out, the
        caller synchronising at once): one padded pass, waited for here."""
        import torch

        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        delay = self._enqueue(self.seconds(len(rows), width)) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return torch.from_numpy(self.logits(ids))


def _install(model) -> None:
    """Replace a loaded model's forward by the stand-in, with CUDA's pass shapes (padded, length buckets,
    one pass per bucket)."""
    from worker import engine

    standin = StandIn.from_env(len(model.labels))
    model.packed, model.backend = None, "standin"
    model.chunk_tokens = engine.CUDA_CHUNK_TOKENS
    if hasattr(model, "device_forward"):
        model.buckets = engine.length_buckets(model.max_length)
        model.device_forward = standin.device_forward
    else:  # a worker from before the launch/result split (--compare-ref)
        model._transformer_logits = standin.transformer_logits


def serve(argv: Sequence[str]) -> int:
    """``python -m worker.run`` with the stand-in installed in every model it loads."""
    from worker import engine
    from worker.run import main

    load = engine.LoadedModel.__init__

    def init(self, *args, **kwargs):
        load(self, *args, **kwargs)
        _install(self)

    engine.LoadedModel.__init__ = init
    return main(list(argv))


def worker_entry() -> tuple[str, ...]:
    """The argv head that runs :func:`serve` in a worker process (in whichever checkout is its cwd)."""
    path = Path(__file__).resolve()
    return ("-c", f"import runpy, sys; runpy.run_path({str(path)!r}, run_name='bench_standin_serve')")


def cost_model(gpu_share: float = GPU_SHARE, us_per_pass: float = US_PER_PASS) -> dict:
    from bench import common

    config = json.loads((common.REPO / "bench" / "gpu_inputs.json").read_text())["config"]
    shape = common.ModelShape.from_config(config)
    # flops_per_message's terms as coefficients: the worker process computes them without bench's modules
    return {"us_per_pass": us_per_pass, "dense_flops_per_token": 2.0 * shape.params_nonembedding,
            "attention_flops_per_token2": 4.0 * shape.layers * shape.hidden,
            "flops_per_s": gpu_share * H100_BF16_FLOPS}


def unique_texts(n: int) -> list[str]:
    """``n`` distinct texts: the real stream's, then again with a round number appended (a few characters:
    the lengths stay the stream's)."""
    from bench import common

    base = common.stream_texts(min(n, 27_000))
    out = list(base)
    round_ = 1
    while len(out) < n:
        out += [f"{t}（{round_}）" for t in base[:n - len(out)]]
        round_ += 1
    return out


def run(ws, *, messages: int = 100_000, processes: Sequence[int] = (1, 2), compare_ref: str | None = None,
        exactly_once: bool = True, ceiling: bool = True, profile_messages: int = 40_000,
        gpu_share: float = GPU_SHARE, us_per_pass: float = US_PER_PASS) -> dict:
    from bench import ceiling as ceiling_part, common, e2e, profile

    model = cost_model(gpu_share, us_per_pass)
    env = {ENV: json.dumps(model)}
    texts = unique_texts(messages)
    variants: dict[str, dict] = {}
    result: dict = {"messages": len(texts), "partitions": PARTITIONS, "client": CLIENT, "cost_model": model,
                    "worker_args": list(WORKER_ARGS), "variants": variants, "compare_ref": compare_ref}

    def drain(name: str, tag: str, *, workers: int = 1, args: Sequence[str] = (), repo=None) -> None:
        r = e2e.run_stream(ws, texts, tag=tag, partitions=PARTITIONS, workers=workers, worker_repo=repo,
                           worker_args=(*WORKER_ARGS, *args), worker_entry=worker_entry(), worker_env=env)
        variants[name] = {k: r[k] for k in ("messages", "msgs_per_s", "seconds", "cached_fraction", "workers")}
        variants[name]["batch_infer_ms"] = r["batch_infer_ms"]
        print(f"stand-in {name}: {r['msgs_per_s']:,.0f} msgs/s ({r['cached_fraction']:.0%} cached)", flush=True)

    if ceiling:  # the cached path of this run, on the same client and batching
        c = ceiling_part.run(ws, messages=messages, workers=(1,), clients=(CLIENT,), exactly_once=False,
                             quality_pairs=0, client_messages=0, profile_messages=0, worker_args=WORKER_ARGS[2:],
                             part="standin-ceiling")
        result["ceiling_msgs_per_s"] = c["ceiling_confluent_msgs_per_s"]
        result["ceiling"] = c["variants"]["1 process, confluent-kafka"]
    if compare_ref:
        drain(f"at {compare_ref}", "standin-ref", repo=ceiling_part._worktree(compare_ref, ws.work_dir))
    for n in processes:
        drain("1 process" if n == 1 else f"{n} processes", f"standin-p{n}", workers=n)
    if exactly_once:
        drain("1 process, exactly-once", "standin-eos", args=("--delivery", "exactly-once"))
    one = variants.get("1 process", {}).get("msgs_per_s")
    result["standin_msgs_per_s"] = one
    result["standin_eos_msgs_per_s"] = variants.get("1 process, exactly-once", {}).get("msgs_per_s")
    result["standin_over_ceiling"] = common.ratio(one, result.get("ceiling_msgs_per_s"))
    if "2 processes" in variants:
        result["two_over_one"] = common.ratio(variants["2 processes"]["msgs_per_s"], one)
    if compare_ref:
        result["over_ref"] = common.ratio(one, variants[f"at {compare_ref}"]["msgs_per_s"])
    if profile_messages and profile.pyspy_binary():
        result["profile"] = _profile(ws, texts[:profile_messages], env)
        if compare_ref:
            result["profile_ref"] = _profile(ws, texts[:profile_messages], env, "standin-profile-ref",
                                             ceiling_part._worktree(compare_ref, ws.work_dir))
    print_tables(result)
    return result


def _profile(ws, texts: Sequence[str], env: dict, tag: str = "standin-profile", repo=None) -> dict:
    from bench import ceiling, profile

    return profile.drain(ws, texts, tag=tag, cache_prefix=f"bench:{ws.run_id}:{tag}:", partitions=PARTITIONS,
                         rate=ceiling.PROFILE_RATE, extra=WORKER_ARGS, entry=worker_entry(), env=env, repo=repo)


def table_rows(r: dict) -> list[list]:
    from bench import common

    rows = [[name, v["messages"], v["msgs_per_s"], common.ratio(v["msgs_per_s"], r.get("ceiling_msgs_per_s"))]
            for name, v in r["variants"].items()]
    if r.get("ceiling_msgs_per_s"):
        rows.insert(0, ["cached ceiling (same run)", r["messages"], r["ceiling_msgs_per_s"], 1.0])
    return rows


def profile_rows(prof: dict) -> list[list]:
    from bench import profile

    return [[thread, x["samples"], step, f"{x['shares'][step]:.0%}", x["us_per_message"][step]]
            for thread, x, step in profile.busy_steps(prof)]


def print_tables(r: dict) -> None:
    from bench import common

    common.print_table(f"Stand-in forward: {r['messages']:,} distinct messages, {r['partitions']} partitions, "
                       f"{r['client']}", ["variant", "messages", "msgs/s", "vs ceiling"], table_rows(r))
    for key, whose in (("profile_ref", f"at {r.get('compare_ref')}"), ("profile", "this checkout")):
        prof = r.get(key)
        if prof:
            common.print_table(f"Where the time goes, {whose} (py-spy, {prof['msgs_per_s']:,.0f} msgs/s while "
                               "sampled)", ["thread", "samples", "step", "share", "us/msg"], profile_rows(prof))


def main(argv: list[str] | None = None) -> int:
    from bench import common

    parser = argparse.ArgumentParser(prog="python -m bench.standin", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--messages", type=int, default=100_000, help="distinct messages per variant")
    parser.add_argument("--processes", default="1,2", help="worker process counts to run (one group each)")
    parser.add_argument("--compare-ref", default=None, help="also run the worker of this git commit/tag")
    parser.add_argument("--gpu-share", type=float, default=GPU_SHARE,
                        help="share of an H100's dense bf16 rate the forward reaches")
    parser.add_argument("--us-per-pass", type=float, default=US_PER_PASS, help="device time of any pass")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the cached ceiling")
    parser.add_argument("--profile-messages", type=int, default=40_000, help="py-spy drain size (0: none)")
    parser.add_argument("--output", default=str(common.WORK_DIR / "standin.json"), help="JSON written here")
    args = parser.parse_args(argv)
    try:
        processes = [int(p) for p in args.processes.split(",") if p]
    except ValueError:
        parser.error(f"--processes takes counts like 1,2; got {args.processes!r}")
    with common.open_workspace(args.model_dir) as ws:
        result = run(ws, messages=args.messages, processes=processes, compare_ref=args.compare_ref,
                     ceiling=not args.no_ceiling, profile_messages=args.profile_messages,
                     gpu_share=args.gpu_share, us_per_pass=args.us_per_pass)
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
elif __name__ == "bench_standin_serve":
    raise SystemExit(serve(sys.argv[1:]))
