"""The fine-tuning recipes side by side: training examples per second of each regulariser combination.

``python -m experiments.train_recipes [--steps 12] [--rounds 3] [--precisions auto,no] [--data thucnews-titles]``

Not part of ``make bench`` (about a minute per recipe and precision on 2 cores). Every recipe gets its own
e5-small classifier (the trainer's model, data and batches: ``trainer.batches.build_data``, ``prepare``) and is
stepped by the trainer's own ``train_step`` on the same training batches, in rounds that interleave the
recipes so the machine's noise hits all of them alike (median of the rounds; one untimed step first). The
ratios say what a recipe costs on this CPU; which recipe trains the better model is in
``experiments/TRAINING.md`` (accuracy takes whole runs). What is compared, as ``python -m trainer.run`` flags:

- ``plain``: ``--rdrop 0 --adversarial 0 --ema 0`` (one forward/backward per batch);
- ``R-Drop + EMA``: ``--adversarial 0`` (the batch twice, in one doubled forward pass);
- ``R-Drop + FGM + EMA``: ``--rdrop-pair dropout`` (the doubled pass, then FGM's third);
- ``R-Drop on the FGM pair + EMA``: ``--rdrop-pair adversarial`` (the clean pass, then the pushed one).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from bench import common

RECIPES = {
    "plain": dict(rdrop=0.0, adversarial=0.0, ema=0.0),
    "R-Drop + EMA": dict(adversarial=0.0),
    "R-Drop + FGM + EMA": dict(rdrop_pair="dropout"),
    "R-Drop on the FGM pair + EMA": dict(rdrop_pair="adversarial"),
}
REFERENCE = "R-Drop + FGM + EMA"  # the ratios' denominator


def recipe_runs(data: str, precision: str, names: list[str]) -> dict:
    """One prepared trainer per recipe, all from the same weights and on the same batches."""
    from accelerate.utils import set_seed

    from trainer import batches, prepare
    from trainer.data import load_splits
    from trainer.models import load_for_classification
    from trainer.settings import TrainSettings

    prepared, splits = {}, None
    for name in names:
        settings = TrainSettings(data=data, mixed_precision=precision, **RECIPES[name])
        accelerator = prepare.make_accelerator(settings)
        set_seed(settings.seed)
        splits = splits or load_splits(batches.data_spec(settings))  # the recipes differ in flags, not data
        model, tokenizer = load_for_classification(settings.model, splits.labels,
                                                   corpus=[e.text for e in splits.train])
        built = batches.build_data(settings, splits, tokenizer, model.config.max_position_embeddings, 1)
        prepared[name] = (accelerator, prepare.prepare(accelerator, model, built), built.hyper)
    return prepared


def time_recipes(prepared: dict, steps: int, rounds: int) -> dict:
    from trainer import loop

    batches = list(itertools.islice(iter(next(iter(prepared.values()))[1].train), steps * rounds + 1))
    for accelerator, p, hyper in prepared.values():  # untimed: oneDNN builds its kernels on first use
        loop.train_step(accelerator, p, dict(batches[-1]), hyper, loop.Progress(), loop.LossMeter(accelerator.device))
    rates: dict[str, list[float]] = {name: [] for name in prepared}
    for r in range(rounds):
        chunk = batches[r * steps:(r + 1) * steps]
        for name, (accelerator, p, hyper) in prepared.items():
            progress, losses = loop.Progress(), loop.LossMeter(accelerator.device)
            started = time.perf_counter()
            for batch in chunk:
                loop.train_step(accelerator, p, dict(batch), hyper, progress, losses)
            rates[name].append(progress.examples / (time.perf_counter() - started))
    return {name: {"examples_per_s": round(statistics.median(r), 1),
                   "examples_per_s_per_round": [round(x, 1) for x in r]} for name, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.train_recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="thucnews-titles", help="built-in data set whose batches are timed")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per recipe per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    parser.add_argument("--precisions", default="auto,no",
                        help="comma-separated --mixed-precision values to time (auto: what training picks here)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: "
                        + ", ".join(RECIPES))
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--out", default=str(common.REPO / "bench" / ".work" / "train_recipes.json"))
    opts = parser.parse_args(argv)
    names = [n.strip() for n in opts.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or opts.steps < 1 or opts.rounds < 1:
        parser.error(f"unknown recipe {unknown[0]!r}" if unknown else "--steps and --rounds must be at least 1")
    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)

    result = {"machine": common.machine_info(), "threads": torch.get_num_threads(), "steps": opts.steps,
              "rounds": opts.rounds, "data": opts.data, "precisions": {}}
    rows = []
    for precision in [p.strip() for p in opts.precisions.split(",") if p.strip()]:
        prepared = recipe_runs(opts.data, precision, names)
        resolved = next(iter(prepared.values()))[0].mixed_precision
        timed = time_recipes(prepared, opts.steps, opts.rounds)
        reference = timed.get(REFERENCE, {}).get("examples_per_s")
        for name, t in timed.items():
            t["vs_reference"] = common.ratio(t["examples_per_s"], reference)
            rows.append((f"{precision} ({resolved})", name, t["examples_per_s"], t["vs_reference"]))
        result["precisions"][precision] = {"resolved": resolved, "recipes": timed}
    common.print_table(f"Training examples/s per recipe ({opts.data}, {result['threads']} threads, "
                       f"median of {opts.rounds} rounds of {opts.steps} steps)",
                       ("precision", "recipe", "examples/s", f"x {REFERENCE}"), rows)
    common.save_json(Path(opts.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
