"""What the hybrid's n-gram half costs a worker: ``predict`` with and without it, side by side.

``python -m experiments.hybrid_cost [--model-dir checkpoints] [--seconds-per-point 2] [--batch-sizes 16,64,256]``

A hybrid checkpoint (``trainer.run --hybrid auto``, bert_stream.ngram) adds TF-IDF character n-gram scores
to the transformer's on every prediction the model makes (cache hits never reach it). Measured in one
process, interleaved round by round so the machine's noise hits both alike, on real titles and reviews at
the worker's dtype: :meth:`LoadedModel.predict` with the n-gram half, the same loaded model with it switched
off, and the n-gram scoring alone. When the checkpoint is transformer-only, an n-gram half is fitted on the
built-in set's training split for the measurement (the cost does not depend on its weights' values).
Writes ``experiments/hybrid_cost.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import common

BATCH_SIZES = (16, 64, 256)


def ngram_half(loaded, data: str = "thucnews-titles"):
    from bert_stream.ngram import NgramModel
    from trainer.data import DataSpec, load_splits

    if loaded.ngram is not None:
        return loaded.ngram, "the checkpoint's"
    splits = load_splits(DataSpec(data=data, seed=0))
    ids = {label: i for i, label in enumerate(loaded.labels)}
    train = [e for e in splits.train if e.label in ids]
    if not train:  # a checkpoint trained on other labels: any labels do for timing
        train, ids = splits.train, {label: i % len(loaded.labels) for i, label in enumerate(splits.labels)}
    half = NgramModel.fit([e.text for e in train], [ids[e.label] for e in train], len(loaded.labels))
    half.model_scale, half.ngram_scale = 1.0, 1.0
    return half, f"fitted here on {data}"


def run(model_dir: Path, seconds_per_point: float, batch_sizes, rounds: int = 3) -> dict:
    from bench.model_only import batches_of, load_engines, time_predict, worker_dtype

    engines = load_engines(model_dir)
    dtype = worker_dtype(engines)
    loaded = engines[dtype].current
    half, origin = ngram_half(loaded)
    sets = {"titles": common.dataset_texts("titles"), "reviews": common.dataset_texts("reviews")}
    totals: dict = {}
    for r in range(rounds):
        for name, texts in sets.items():
            for size in batch_sizes:
                batches = batches_of(texts, size, start=r * 8 * size)
                for variant in ("transformer", "hybrid", "ngram alone"):
                    loaded.ngram = half if variant == "hybrid" else None
                    fn = half.scores if variant == "ngram alone" else loaded.predict
                    done, secs = time_predict(fn, batches, seconds_per_point / 3)
                    t = totals.setdefault((name, size, variant), [0, 0.0])
                    t[0] += done
                    t[1] += secs
    loaded.ngram = half if origin == "the checkpoint's" else None
    rows = []
    for (name, size, variant), (done, secs) in totals.items():
        rows.append({"set": name, "batch": size, "variant": variant, "msgs_per_s": round(done / secs, 1)})
    rate = {(r["set"], r["batch"], r["variant"]): r["msgs_per_s"] for r in rows}
    for row in rows:
        row["vs_transformer"] = round(row["msgs_per_s"] / rate[(row["set"], row["batch"], "transformer")], 3)
    return {"date": time.strftime("%Y-%m-%d"), "machine": common.machine_info(), "dtype": dtype,
            "model_version": loaded.version, "ngram_half": origin, "seconds_per_point": seconds_per_point,
            "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.hybrid_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=str(common.DEFAULT_STORE), help="checkpoint store or version folder")
    parser.add_argument("--seconds-per-point", type=float, default=2.0, help="per (set, batch size, variant)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--out", default=str(common.REPO / "experiments" / "hybrid_cost.json"))
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}")
    result = run(common.ensure_checkpoint(Path(args.model_dir)), args.seconds_per_point, sizes)
    common.save_json(Path(args.out), result)
    common.print_table(f"predict() with and without the n-gram half ({result['dtype']}, {result['ngram_half']})",
                       ["set", "batch", "variant", "msgs/s", "x transformer"],
                       [[r["set"], r["batch"], r["variant"], r["msgs_per_s"], r["vs_transformer"]]
                        for r in result["rows"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
