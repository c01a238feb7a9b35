"""The worker end to end on a GPU, in one command with no network: what to run when a device is lent.

``python -m bench.gpu_check [--device cuda] [--processes 1,2,4] [--output gpu_check.json]``

Sized for a short lease: about 5 minutes on an H100 host (16 cores), 8 at most. On the GPU machine (torch
and transformers are there; the rest of the worker's packages travel as wheels, which ``make gpu-wheels``
downloads here into ``.whl/``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 -m bench.gpu_check --output $OUT/gpu_check.json

What it runs, against a local stack it starts (Apache Kafka where ``java`` is, else Tansu; Redis):

1. a checkpoint of the served model's shape (``bench/gpu_inputs.json``: e5-small, 12 layers of 384, the
   labels) with random weights and one token per character (the CJK block as vocabulary). A forward pass
   costs what the trained model's costs at the same token counts; its labels mean nothing, so no accuracy
   is reported. Texts are random characters with the token lengths of the real mixed stream (titles and
   reviews, as the worker's tokenizer cut them), all distinct: every message reaches the model.
2. model-only per token budget in bf16 (``--dtypes``, ``--backends`` add fp32 and packed): the worker's own
   engine (``LoadedModel.predict``: tokenize, forward in length buckets, softmax, one copy to the host) on
   the batches the worker's batcher cuts from the stream.
3. end to end: a backlog drained by 1, 2 and 4 worker processes in one group sharing the GPU (what
   ``--processes N`` runs), with the gpu overlay's client (librdkafka) and batching; msgs/s, and the GPU's
   utilisation and memory sampled by ``nvidia-smi`` every 200 ms meanwhile. The target: >= 50,000 msgs/s
   per GPU.
4. the stand-in (``bench.standin``) on this host's CPUs: the path around the forward, against the cached
   ceiling of the same run, 1 and 2 processes.

It also runs on a CPU (``--device cpu``, small ``--messages``): that is how it is checked without a GPU.
``--parts`` cuts it down when device time is short; the JSON is rewritten after each part, so a run stopped
by its time limit keeps what it measured. Copied to ``bench/gpu_check.json`` it is rendered into RESULTS.md
by ``python -m bench.report``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import common

INPUTS = common.REPO / "bench" / "gpu_inputs.json"
CJK = range(0x4E00, 0x9FA6)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def stream(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts of random CJK characters, token lengths drawn from the real mixed stream."""
    lengths = json.loads(INPUTS.read_text())["token_lengths"]
    pool = [n_tokens for values in lengths.values() for n_tokens in values]
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        text = "".join(chr(rng.choice(CJK)) for _ in range(max(1, rng.choice(pool) - 2)))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def publish_random_model(store: Path) -> str:
    """A checkpoint of the served shape with random weights and a character vocabulary, published as the
    trainer publishes (a version folder, LATEST)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from bert_stream import checkpoint

    store.mkdir(parents=True, exist_ok=True)
    vocab = store / "vocab.txt"
    vocab.write_text("\n".join([*SPECIALS, *(chr(c) for c in CJK)]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    shape = json.loads(INPUTS.read_text())["config"]
    config = BertConfig(**{k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size", "max_position_embeddings",
                                                 "type_vocab_size")},
                        vocab_size=len(SPECIALS) + len(CJK), id2label=shape["id2label"],
                        label2id={v: int(k) for k, v in shape["id2label"].items()})
    torch.manual_seed(0)
    return checkpoint.publish_pretrained(store, BertForSequenceClassification(config), tokenizer)


class GpuSampler:
    """``nvidia-smi`` sampling utilisation (%) and memory (MiB) every 200 ms for the ``with`` block; empty
    where there is no nvidia-smi (a CPU run)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._proc = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        for line in out.splitlines():
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))

    def summary(self) -> dict:
        if not self.samples:
            return {"samples": 0}
        util = [u for u, _ in self.samples]
        return {"samples": len(util), "util_mean": round(statistics.fmean(util), 1),
                "util_p90": common.percentile(util, 90), "memory_max_mib": max(m for _, m in self.samples)}


def model_only(store: Path, device: str, texts: list[str], budgets: list[int], dtypes: list[str],
               seconds: float, backends: list[str] = ("padded", "packed")) -> list[dict]:
    """The engine's ``predict`` per dtype, backend and budget, each batch shape run once before the clock starts
    (a GPU loads a kernel the first time a shape needs it: the first pass over the stream ran at a tenth of
    the second); ``tokenize_msgs_per_s``: the tokenizer alone on the same batches, the host's share."""
    from worker.batcher import Batcher
    from worker.engine import Engine

    rows = []
    for dtype, backend in [(d, b) for d in dtypes for b in backends]:
        engine = Engine(store, device=device, dtype=dtype, max_length=128, top_k=3, backend=backend).start()
        model = engine.current
        for budget in budgets:
            batcher: Batcher[str] = Batcher(max(64, budget // 32), budget, 0.0)
            for text, n in zip(texts, model.token_budget(texts)):
                batcher.add(text, n, 0.0)
            batches = []
            while (batch := batcher.pop_ready(0.0, flush=True)) is not None:
                batches.append(batch.items)
            t0 = time.perf_counter()
            for batch in batches:  # warm-up: every shape once, within a bound
                model.predict(batch)
                if time.perf_counter() - t0 > 4 * seconds:
                    break
            done, t0, i = 0, time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds or i < 3:
                done += len(model.predict(batches[i % len(batches)]))
                i += 1
            rate = done / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for j in range(i):
                model.token_lengths(batches[j % len(batches)])
            tokenize_rate = done / (time.perf_counter() - t0)
            rows.append({"dtype": dtype, "backend": model.backend, "budget": budget, "batches": i,
                         "mean_batch": round(done / i, 1), "msgs_per_s": round(rate, 1),
                         "tokenize_msgs_per_s": round(tokenize_rate, 1)})
            print(f"model-only {dtype} {model.backend} budget {budget}: {rate:,.0f} msgs/s "
                  f"(mean batch {done / i:.0f}; tokenizer alone {tokenize_rate:,.0f} msgs/s)", flush=True)
        del engine, model  # the next dtype's copy replaces this one on the device
    return rows


def end_to_end(ws: common.Workspace, device: str, texts: list[str], processes: list[int], client: str) -> list[dict]:
    """A backlog drained by 1, 2, 4 worker processes in one group sharing the GPU (what ``--processes N`` runs),
    with the gpu overlay's client and batching, and how busy the GPU was meanwhile."""
    from bench import e2e, standin

    rows = []
    for n in processes:
        args = [*standin.WORKER_ARGS, "--device", device, "--kafka-client", client]
        with GpuSampler() as gpu:
            r = e2e.backlog(ws, texts, tag=f"gpu-e2e-p{n}", partitions=4 * max(processes), workers=n,
                            worker_args=args)
        rows.append({"client": client, "processes": n, "msgs_per_s": round(r["msgs_per_s"], 1),
                     "latency_ms": r["latency_ms"], "batch_infer_ms": r["batch_infer_ms"], "gpu": gpu.summary()})
        print(f"e2e {n} process(es), {client}: {r['msgs_per_s']:,.0f} msgs/s, GPU {gpu.summary()}", flush=True)
    return rows


PARTS = ("model", "e2e", "standin")


def run(*, device: str, budgets: list[int], dtypes: list[str], messages: int, model_seconds: float,
        standin_messages: int, work_dir: Path, stack=None, client: str = "confluent-kafka",
        processes: list[int] = (1, 2, 4), backends: list[str] = ("padded",), parts: tuple[str, ...] = PARTS,
        output: Path | None = None) -> dict:
    """Every part asked for, into one dict (written to ``output`` after each part, so a run cut short keeps
    what it measured); ``stack``: a running local stack to use (else one is started and stopped)."""
    store = Path(work_dir) / "store"
    version = publish_random_model(store)
    texts = stream(messages)
    result: dict = {"device": device, "model_version": version, "messages": messages, "budgets": budgets,
                    "versions": common.package_versions(), "cpus": os.cpu_count()}

    def save() -> None:
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=2, ensure_ascii=False))

    if device.startswith("cuda"):
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    if "model" in parts:
        result["model_only"] = model_only(store, device, texts, budgets, dtypes, model_seconds, backends)
        save()
    if not {"e2e", "standin"} & set(parts):
        return result
    with common.open_workspace(model_dir=store, work_dir=work_dir, stack=stack) as ws:
        result["broker"] = ws.broker
        if "e2e" in parts:
            result["e2e"] = end_to_end(ws, device, texts, list(processes), client)
            save()
        if standin_messages and "standin" in parts:  # the path around the forward on this host's CPUs
            from bench import standin

            r = standin.run(ws, messages=standin_messages, processes=(1, 2), exactly_once=False, profile_messages=0)
            result["standin"] = {k: r.get(k) for k in ("variants", "ceiling_msgs_per_s", "standin_msgs_per_s",
                                                       "standin_over_ceiling", "two_over_one", "cost_model")}
            save()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script itself)")
    parser.add_argument("--budgets", default="8192,16384,32768,65536", help="model-only padded-token budgets")
    parser.add_argument("--dtypes", default="bf16", help="model-only dtypes, of bf16,fp32 (e2e: the worker's auto)")
    parser.add_argument("--messages", type=int, default=60_000, help="messages per end-to-end run")
    parser.add_argument("--model-seconds", type=float, default=3.0, help="time per model-only point")
    parser.add_argument("--standin-messages", type=int, default=60_000, help="stand-in part's messages (0: none)")
    parser.add_argument("--backends", default="padded", help="model-only forward paths, of padded,packed")
    parser.add_argument("--processes", default="1,2,4", help="worker processes per end-to-end run")
    parser.add_argument("--client", default="confluent-kafka", help="the workers' Kafka client")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)} to run")
    parser.add_argument("--output", default=str(common.WORK_DIR / "gpu_check.json"), help="JSON written here")
    args = parser.parse_args(argv)
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
        processes = [int(n) for n in args.processes.split(",")]
    except ValueError:
        parser.error(f"--budgets and --processes take integers separated by commas, got {args.budgets!r}, "
                     f"{args.processes!r}")
    parts = tuple(args.parts.split(","))
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts: choose from {','.join(PARTS)}, got {args.parts!r}")
    if not set(args.dtypes.split(",")) <= {"bf16", "fp32"}:
        parser.error(f"--dtypes: choose from bf16,fp32, got {args.dtypes!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: use --device cpu to check the script on a CPU")
    if "BROKER" not in os.environ and not shutil.which("java"):
        os.environ["BROKER"] = "tansu"
        print("gpu_check: no java here: the local stack runs Tansu", flush=True)
    run(device=args.device, budgets=budgets, dtypes=args.dtypes.split(","), messages=args.messages,
        model_seconds=args.model_seconds, standin_messages=args.standin_messages,
        work_dir=common.WORK_DIR / f"gpu-check-{time.strftime('%H%M%S')}", client=args.client,
        processes=processes, backends=args.backends.split(","), parts=parts, output=Path(args.output))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
