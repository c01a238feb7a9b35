"""The classical baseline a fine-tuned transformer must clearly beat: TF-IDF character 1-3-grams + LinearSVC.

``python -m experiments.baseline [--data NAME ...] [--output experiments/baseline.json]``

Two protocols per data set:

- ``ours``: fit on the train split, score on the test split that ``trainer.data.load_splits`` gives the
  trainer (seed 0, 80/10/10). This is the figure to put beside the trainer's test metrics; the JSON records
  the test split's fingerprint so a reader can check it is the same split.
- ``80/20``: scikit-learn's stratified ``train_test_split(test_size=0.2, random_state=0)`` over the cleaned
  data in file order, to compare with the figures in shared/docs/ENVIRONMENT.md (86.4% / 85.7%), which were
  measured that way. Expect about a point of difference either way: a 2,000-text test set has a standard
  error near 0.8 points, and those figures deduplicated without NFKC.

The model is :mod:`trainer.baseline`'s, the one every ``trainer.run`` also fits on its own split.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from sklearn.model_selection import train_test_split
from tqdm import tqdm

from bert_stream.logs import configure_logging, get_logger
from trainer.baseline import MODEL, fit_and_score
from trainer.data import BUILTINS, DataSpec, builtin_examples, load_splits

log = get_logger(__name__)
def ours(name: str, seed: int = 0) -> dict:
    """The trainer's own split (``trainer.run --seed``): the number to compare a fine-tuned model against."""
    splits = load_splits(DataSpec(data=name, seed=seed))
    result = fit_and_score(splits.train, splits.test)
    return {
        "data": name,
        "protocol": f"ours (80/10/10 stratified, seed {seed}; train -> test)",
        **result,
        "test_fingerprint": splits.test_fingerprint,
    }


def eighty_twenty(name: str) -> dict:
    """ENVIRONMENT.md's protocol: stratified 80/20 of the cleaned data in file order, random_state=0."""
    examples = builtin_examples(name)
    train, test = train_test_split(
        examples, test_size=0.2, stratify=[e.label for e in examples], random_state=0
    )
    return {"data": name, "protocol": "80/20 stratified, random_state=0", **fit_and_score(train, test)}


def print_table(results: list[dict]) -> None:
    print(
        f"{'data':<18} {'protocol':<50} {'train':>6} {'test':>5} {'accuracy':>8} {'macro-F1':>8} {'fit s':>6}"
    )
    for r in results:
        print(
            f"{r['data']:<18} {r['protocol']:<50} {r['train']:>6} {r['test']:>5} "
            f"{r['accuracy']:>8.2%} {r['macro_f1']:>8.2%} {r['fit_s']:>6.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        nargs="+",
        choices=BUILTINS,
        default=list(BUILTINS),
        help="built-in data sets to score [default: all]",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).with_name("baseline.json"),
        help="where to write the results as JSON [default: experiments/baseline.json]",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="split seeds of the trainer's protocol, one row each (trainer.run --seed N splits the same way; "
        "several seeds show how much one 1,000-text test set moves the figure) [default: 0]",
    )
    args = parser.parse_args(argv)
    configure_logging()
    results = []
    protocols = [functools.partial(ours, seed=seed) for seed in args.seeds] + [eighty_twenty]
    for name in tqdm(args.data, desc="baseline", unit="data set"):
        for protocol in protocols:
            results.append(protocol(name))
            log.info("baseline.scored", **{k: v for k, v in results[-1].items() if k != "test_fingerprint"})
    print_table(results)
    args.output.write_text(
        json.dumps({"model": MODEL, "results": results}, ensure_ascii=False, indent=2) + "\n"
    )
    log.info("baseline.written", path=str(args.output))


if __name__ == "__main__":
    main()
