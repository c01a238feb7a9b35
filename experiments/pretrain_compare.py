"""Does our own MLM pretraining pay? The same small BERT fine-tuned on thucnews-titles from random init and
from ``python -m trainer.pretrain`` weights, plus its inference speed against e5-small (issue 8, part 3).

``python -m experiments.pretrain_compare [--preset mini] [--pretrain-minutes 15] [--pretrained DIR] ...``

Steps, each a real subprocess of the project's own CLIs (so the figures are what a user gets):

1. pretrain: ``python -m trainer.pretrain --preset P --max-minutes M --split-seed S --seed S`` into
   ``<work>/pretrained`` (skipped with ``--pretrained DIR``, which reuses a store or version folder);
2. fine-tune (a) random init: ``python -m trainer.run --model scratch --scratch-preset P``;
3. fine-tune (b) pretrained: ``python -m trainer.run --model <work>/pretrained``, the same data, seed, split,
   epochs, learning rate and batch size as (a): only the initial weights differ;
4. inference: model-only messages/s (tokenize + forward, batch ``--batch-size-infer``, bf16 where the CPU has
   it) of the fine-tuned (b) model and of e5-small on the same test texts, interleaved rounds, median;
5. context: e5-small's test accuracy from ``--e5-checkpoint`` (a store or version folder fine-tuned by
   ``trainer.run`` on thucnews-titles, same seed) when given, and the classical baseline from
   ``experiments/baseline.json``.

Writes ``<work>/pretrain_compare.json`` and prints a Markdown table. The split seed of the pretraining corpus
equals the fine-tuning seed, so no validation or test title is ever pretrained on (the script checks the
test fingerprints of (a) and (b) agree and, for ``--e5-checkpoint``, warns when they differ).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trainer.settings import POOLINGS

REPO = Path(__file__).resolve().parents[1]
DATA = "thucnews-titles"


LOADS: dict[str, list[float]] = {}  # phase -> 1-minute load average before and after: flags a shared CPU


def run_cli(args: list[str], log_path: Path) -> float:
    """Run ``python -m <args>`` with its log in ``log_path``; return its wall time; fail loudly."""
    load_before = os.getloadavg()[0]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    wall = time.monotonic() - started
    LOADS[log_path.stem] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"[{wall / 60:5.1f} min] python -m {' '.join(args)} -> exit {proc.returncode} (log {log_path})",
          file=sys.stderr)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit("\n".join(tail) + f"\nfailed: python -m {' '.join(args)}")
    return wall


def version_folder(path: Path) -> Path:
    from bert_stream.checkpoint import resolve

    return resolve(path)[1]


def pretrain(opts, work: Path) -> tuple[Path, dict]:
    if opts.pretrained:
        folder = version_folder(Path(opts.pretrained))
    else:
        store = work / "pretrained"
        run_cli(["trainer.pretrain", "--preset", opts.preset, "--max-minutes", str(opts.pretrain_minutes),
                 "--max-length", str(opts.pretrain_max_length), "--split-seed", str(opts.seed),
                 "--seed", str(opts.seed), "--output-dir", str(store), *opts.pretrain_args],
                work / "logs" / "pretrain.log")
        folder = version_folder(store)
    metrics = json.loads((folder / "metrics.json").read_text())
    args = json.loads((folder / "pretrain_args.json").read_text())
    if args.get("builtin_corpus") and DATA in args.get("builtin_datasets", []) and args.get("split_seed") != opts.seed:
        raise SystemExit(f"{folder} was pretrained on the thucnews split of seed {args.get('split_seed')}, "
                         f"not {opts.seed}: its corpus may hold this split's test titles")
    return folder, metrics


def fine_tune(opts, work: Path, name: str, model_args: list[str], reuse: str | None = None) -> dict:
    """Fine-tune one arm into ``<work>/ft-<name>``, or read ``reuse`` (a store or version folder an earlier
    run of this script fine-tuned with the same settings, which are checked)."""
    if reuse:
        folder = version_folder(Path(reuse))
        args = json.loads((folder / "training_args.json").read_text())
        wanted = {"seed": opts.seed, "epochs": opts.epochs, "learning_rate": opts.learning_rate,
                  "batch_size": opts.batch_size, "pooling": opts.pooling,
                  "max_train_examples": opts.max_train_examples}
        wanted |= {"model": "scratch", "scratch_preset": opts.preset}
        found = {k: args["hyperparameters"].get(k, args["settings"].get(k)) for k in wanted}
        if found != wanted:
            raise SystemExit(f"{folder} was fine-tuned with {found}, not {wanted}")
    else:
        store = work / f"ft-{name}"
        run_cli(["trainer.run", *model_args, "--data", DATA, "--seed", str(opts.seed), "--epochs",
                 str(opts.epochs), "--learning-rate", str(opts.learning_rate), "--batch-size",
                 str(opts.batch_size), "--output-dir", str(store), "--force", *opts.finetune_args],
                work / "logs" / f"finetune-{name}.log")
        folder = version_folder(store)
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"folder": str(folder), "test_accuracy": metrics["test"]["accuracy"],
            "test_macro_f1": metrics["test"]["macro_f1"], "validation_accuracy": metrics["validation"]["accuracy"],
            "train_time_s": metrics["train_time_s"], "steps": metrics["steps"], "epochs": metrics["epochs"],
            "test_fingerprint": metrics["test_fingerprint"]}


def inference_speed(opts, small_folder: Path, e5_folder: Path | None) -> dict:
    """Messages/s of tokenize + forward (no Kafka, no cache) on the test titles, interleaved rounds."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bert_stream.precision import cpu_prefers_bf16
    from trainer.data import DataSpec, load_splits
    from trainer.models import load_for_classification

    splits = load_splits(DataSpec(data=DATA, seed=opts.seed))
    texts = sorted((e.text for e in splits.test), key=len)  # what a length-sorting batcher does
    models = {"small": (AutoModelForSequenceClassification.from_pretrained(small_folder),
                        AutoTokenizer.from_pretrained(small_folder))}
    if e5_folder is not None:
        models["e5-small"] = (AutoModelForSequenceClassification.from_pretrained(e5_folder),
                              AutoTokenizer.from_pretrained(e5_folder))
    else:  # an untrained head costs the same as a trained one; vocabulary trimmed as trainer.run does
        models["e5-small"] = load_for_classification("e5-small", splits.labels,
                                                     corpus=[e.text for e in splits.train])
    bf16 = cpu_prefers_bf16() if opts.infer_dtype == "auto" else opts.infer_dtype == "bf16"
    for model, _ in models.values():
        model.eval()

    def one_pass(model, tokenizer) -> float:
        started = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(texts), opts.batch_size_infer):
                batch = tokenizer(texts[i:i + opts.batch_size_infer], padding=True, truncation=True,
                                  max_length=64, return_tensors="pt")
                model(**batch).logits.argmax(-1)
        return len(texts) / (time.perf_counter() - started)

    for model, tok in models.values():  # warm-up: first-call allocations and oneDNN kernel selection
        one_pass(model, tok)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(opts.rounds):
        for name, (model, tok) in models.items():
            rates[name].append(one_pass(model, tok))
    out = {name: {"msgs_per_s": statistics.median(r), "rounds": [round(x, 1) for x in r],
                  "params": sum(p.numel() for p in models[name][0].parameters())} for name, r in rates.items()}
    out["speedup_small_vs_e5"] = out["small"]["msgs_per_s"] / out["e5-small"]["msgs_per_s"]
    out.update(texts=len(texts), batch_size=opts.batch_size_infer, dtype="bf16" if bf16 else "fp32",
               threads=torch.get_num_threads())
    return out


def baseline_accuracy() -> float | None:
    path = REPO / "experiments" / "baseline.json"
    if not path.is_file():
        return None
    for row in json.loads(path.read_text()).get("results", []):
        if row.get("data") == DATA and row.get("protocol", "").startswith("ours"):
            return row["accuracy"]
    return None


def table(result: dict) -> str:
    a, b = result["random_init"], result["pretrained"]
    pre = result["pretraining"]
    labelled = f" ({result['max_train_examples']:,} labelled)" if result.get("max_train_examples") else ""
    lines = [
        f"| {DATA}{labelled}, {result['preset']} BERT | test accuracy | macro-F1 | fine-tune time |",
        "|---|---|---|---|",
        f"| (a) random init | {a['test_accuracy']:.4f} | {a['test_macro_f1']:.4f} | {a['train_time_s']:.0f} s |",
        (f"| (b) MLM-pretrained ({pre['train_time_s'] / 60:.1f} min, {pre['steps']} steps, "
         f"MLM acc {pre['final_mlm_accuracy']:.3f}) | {b['test_accuracy']:.4f} | {b['test_macro_f1']:.4f} | "
         f"{b['train_time_s']:.0f} s |"),
    ]
    if result.get("e5_small"):
        lines.append(f"| e5-small (fine-tuned) | {result['e5_small']['test_accuracy']:.4f} | "
                     f"{result['e5_small']['test_macro_f1']:.4f} | {result['e5_small']['train_time_s']:.0f} s |")
    if result.get("baseline_accuracy") is not None:
        on_all = " (all training titles)" if labelled else ""
        lines.append(f"| TF-IDF char 1-3 + LinearSVC{on_all} | {result['baseline_accuracy']:.4f} | | |")
    lines.append(f"\n(b) - (a): {100 * (b['test_accuracy'] - a['test_accuracy']):+.1f} accuracy points.")
    speed = result.get("inference")
    if speed:
        lines.append(f"Inference ({speed['dtype']}, batch {speed['batch_size']}, {speed['threads']} threads, "
                     f"tokenize + forward): small {speed['small']['msgs_per_s']:.0f} msg/s, e5-small "
                     f"{speed['e5-small']['msgs_per_s']:.0f} msg/s ({speed['speedup_small_vs_e5']:.1f}x).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.pretrain_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini", help="Model size of both arms (SCRATCH_PRESETS).")
    parser.add_argument("--pretrain-minutes", type=float, default=15.0,
                        help="Pretraining budget (--max-minutes of trainer.pretrain).")
    parser.add_argument("--pretrain-max-length", type=int, default=64,
                        help="Tokens per pretraining row. The titles fine-tuned on are at most ~32 tokens, and at "
                             "64 attention costs half as much per token as at 128.")
    parser.add_argument("--pretrained", help="Reuse this pretrained store/version instead of pretraining.")
    parser.add_argument("--random-init", help="Reuse this finished random-init arm (a store or version "
                                               "folder of an earlier run, same fine-tuning settings).")
    parser.add_argument("--epochs", type=float, default=3.0, help="Fine-tuning epochs, both arms.")
    parser.add_argument("--learning-rate", type=float, default=5e-4,
                        help="Fine-tuning peak learning rate, both arms (trainer.run's scratch default).")
    parser.add_argument("--batch-size", type=int, default=32, help="Fine-tuning batch size, both arms.")
    parser.add_argument("--max-train-examples", type=int,
                        help="Fine-tune both arms on a stratified subsample of this many labelled titles "
                             "(validation and test stay whole): where pretraining pays, with few labels.")
    parser.add_argument("--pooling", choices=POOLINGS, default="mean",
                        help="Sentence vector of both arms' classifiers (trainer.run --pooling). MLM trains the "
                             "token states, never [CLS], so the pretrained arm reads them through mean pooling.")
    parser.add_argument("--seed", type=int, default=0, help="Split, initialisation and order seed, all runs.")
    parser.add_argument("--e5-checkpoint", help="A thucnews-titles e5-small checkpoint (store or version) for "
                                                "the accuracy row and the speed comparison.")
    parser.add_argument("--skip-inference", action="store_true", help="Accuracy only.")
    parser.add_argument("--batch-size-infer", type=int, default=32, help="Inference batch size.")
    parser.add_argument("--infer-dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="Timed passes over the test texts per model.")
    parser.add_argument("--work-dir", default=str(REPO / "bench" / ".work" / "pretrain_compare"))
    parser.add_argument("--pretrain-args", nargs=argparse.REMAINDER, default=[],
                        help="Extra flags for trainer.pretrain (last on the line).")
    opts = parser.parse_args(argv)
    # Same budget for both arms: trainer.run turns its regularisers on for pretrained models only (arm b),
    # so they are pinned off here (the figures in experiments/TRAINING.md were taken without them).
    opts.finetune_args = ["--pooling", opts.pooling, "--rdrop", "0", "--adversarial", "0", "--ema", "0"]
    if opts.max_train_examples:
        opts.finetune_args += ["--max-train-examples", str(opts.max_train_examples)]
    from transformers.utils import logging as hf_logging

    from bert_stream.logs import configure_logging

    configure_logging()
    hf_logging.disable_progress_bar()  # "Loading weights" bars between the table lines
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    pretrained, pre_metrics = pretrain(opts, work)
    result: dict = {
        "data": DATA, "preset": opts.preset, "seed": opts.seed, "epochs": opts.epochs,
        "learning_rate": opts.learning_rate, "batch_size": opts.batch_size, "pooling": opts.pooling,
        "max_train_examples": opts.max_train_examples,
        "pretraining": {"folder": str(pretrained), **{k: pre_metrics[k] for k in (
            "steps", "epochs", "tokens", "tokens_per_s", "train_time_s", "wall_time_s", "final_mlm_loss",
            "final_mlm_accuracy", "initial_mlm_loss", "precision")}, "corpus": {
            k: v for k, v in pre_metrics["corpus"].items() if k != "sha256"}},
    }
    result["random_init"] = fine_tune(opts, work, "random", ["--model", "scratch", "--scratch-preset", opts.preset],
                                      reuse=opts.random_init)
    result["pretrained"] = fine_tune(opts, work, "pretrained", ["--model", str(pretrained)])
    if result["random_init"]["test_fingerprint"] != result["pretrained"]["test_fingerprint"]:
        raise SystemExit("the two arms were tested on different test splits")
    result["gain_points"] = 100 * (result["pretrained"]["test_accuracy"] - result["random_init"]["test_accuracy"])
    e5_folder = None
    if opts.e5_checkpoint:
        e5_folder = version_folder(Path(opts.e5_checkpoint))
        m = json.loads((e5_folder / "metrics.json").read_text())
        if m.get("test_fingerprint") != result["pretrained"]["test_fingerprint"]:
            print("warning: the e5-small checkpoint was tested on another split", file=sys.stderr)
        result["e5_small"] = {"folder": str(e5_folder), "test_accuracy": m["test"]["accuracy"],
                              "test_macro_f1": m["test"]["macro_f1"], "train_time_s": m["train_time_s"]}
    result["baseline_accuracy"] = baseline_accuracy()
    result["load_average"] = LOADS  # well above the core count means the times above are inflated
    result["cpu_count"] = os.cpu_count()
    if not opts.skip_inference:
        load_before = os.getloadavg()[0]
        result["inference"] = inference_speed(opts, Path(result["pretrained"]["folder"]), e5_folder)
        LOADS["inference"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    (work / "pretrain_compare.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
