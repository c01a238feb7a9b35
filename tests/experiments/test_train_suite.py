"""The generalisation suite cuts its sets as documented and reports against the baseline: its logic on toy
examples, then one real entry end to end through ``python -m trainer.run`` (a tiny scratch model)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from experiments import train_suite as ts
from trainer.data import Example


def pool(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label}{i}", label) for label, n in counts.items() for i in range(n)]


def test_shares_cut_one_class_or_keep_three():
    natural = pool({"a": 100, "b": 100, "c": 200})
    assert ts.shares(ts.Entry("x", 10), natural) == {"a": 0.25, "b": 0.25, "c": 0.5}
    cut = ts.shares(ts.Entry("x", 10, "minority10"), natural)
    assert cut["a"] == pytest.approx(10 / 310) and cut["c"] == pytest.approx(200 / 310)
    with pytest.raises(ts.SuiteError, match="finance"):
        ts.shares(ts.Entry("x", 10, "3class"), natural)
    assert sum(ts.shares(ts.Entry("x", 10, "3class"), pool(dict.fromkeys(ts.THREE_CLASSES, 5))).values()) == 1


def test_sample_keeps_the_mix_and_refuses_what_the_set_lacks():
    examples = pool({"a": 50, "b": 500})
    got = ts.sample(examples, 100, {"a": 0.1, "b": 0.9}, random.Random(0), "t")
    assert Counter(e.label for e in got) == {"a": 10, "b": 90} and len(set(got)) == 100
    most = ts.sample(examples, None, {"a": 0.5, "b": 0.5}, random.Random(0), "t")  # a's 50 bound it
    assert Counter(e.label for e in most) == {"a": 50, "b": 50}
    assert len(ts.sample(examples, None, {"a": 0.1, "b": 0.9}, random.Random(0), "t", cap=200)) == 200
    with pytest.raises(ts.SuiteError, match="60 examples of 'a' wanted, the set has 50"):
        ts.sample(examples, 120, {"a": 0.5, "b": 0.5}, random.Random(0), "t")


def test_summary_gains_spread_and_target():
    def run(seed, acc, base, f1, base_f1, val):
        return {"entry": "e", "seed": seed, "train": 10, "test_n": 5, "seconds": 60, "accuracy": acc,
                "baseline_accuracy": base, "macro_f1": f1, "baseline_macro_f1": base_f1, "validation_accuracy": val}

    (row,) = ts.summarise([run(0, 0.90, 0.86, 0.80, 0.74, 0.95), run(1, 0.88, 0.86, 0.78, 0.74, 0.93)])
    assert row["gain_accuracy"] == pytest.approx(0.03) and row["gain_macro_f1"] == pytest.approx(0.05)
    assert row["gain_accuracy_sd"] == pytest.approx(0.01414, abs=1e-4)
    assert row["validation_test_gap"] == pytest.approx(0.05) and row["meets_target"]
    (low,) = ts.summarise([run(0, 0.87, 0.86, 0.80, 0.74, 0.9)])
    assert not low["meets_target"] and low["gain_accuracy_sd"] == 0.0


def test_training_md_section_is_replaced_not_appended(tmp_path):
    md = tmp_path / "TRAINING.md"
    md.write_text("## Model quality\n\nhand-written\n")
    ts.write_training_md(md, f"{ts.MARK_START}\nfirst\n{ts.MARK_END}")
    ts.write_training_md(md, f"{ts.MARK_START}\nsecond\n{ts.MARK_END}")
    text = md.read_text()
    assert "second" in text and "first" not in text and text.count(ts.MARK_START) == 1
    assert text.startswith("## Model quality") and "hand-written" in text


def test_one_entry_end_to_end(tmp_path, capsys):
    """thucnews-3class-1000 through the real trainer (a tiny scratch model, one short epoch): the splits are
    disjoint, the baseline is fitted in the same run, the report is written, and a second call reuses it."""
    train, validation, test = ts.build_splits(ts.ENTRIES["thucnews-3class-1000"], 0)
    texts = [{e.text for e in split} for split in (train, validation, test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert Counter(e.label for e in train) == {"finance": 500, "sports": 400, "science": 100}
    args = ["--entries", "thucnews-3class-1000", "--seeds", "0", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(tmp_path), "--trainer-args",
            "--model scratch --scratch-preset tiny --epochs 1 --max-length 32 --torch-threads 1"]
    assert ts.main(args) == 0
    summary = json.loads((tmp_path / "train_suite.json").read_text())
    (row,) = summary["entries"]
    (r,) = summary["runs"]
    assert r["train"] == 1000 and r["test_n"] == len(test) and r["validation_n"] == len(validation)
    assert 0 < r["baseline_accuracy"] <= 1 and 0 < r["accuracy"] <= 1  # both scored on the same test file
    assert 0 < r["transformer_accuracy"] <= 1 and isinstance(r["hybrid_kept"], bool)  # the hybrid's halves
    assert not r["hybrid_kept"] or r["ngram_scale"] > 0
    assert row["gain_accuracy"] == pytest.approx(r["accuracy"] - r["baseline_accuracy"])
    assert (tmp_path / "train_suite.png").stat().st_size > 0
    assert "thucnews-3class-1000" in (tmp_path / "TRAINING.md").read_text()
    assert not list((tmp_path / "work").rglob("*.safetensors"))  # weights are not kept
    assert ts.main(args) == 0  # read back, not trained again
    assert json.loads((tmp_path / "train_suite.json").read_text())["runs"][0]["seconds"] == r["seconds"]
    assert ts.main([*args, "--report-only"]) == 0
    assert ts.main([*args[:2], "--seeds", "5", *args[4:], "--report-only"]) == 1  # nothing kept for seed 5
    assert r["code"] and "commit" in r  # what the run was made with, for a report that reads it back
    # an earlier report's runs stand in where a (new) work dir has none: nothing is trained, the report says so
    earlier = tmp_path / "earlier.json"
    earlier.write_text((tmp_path / "train_suite.json").read_text())
    fresh = [*args[:4], "--work-dir", str(tmp_path / "empty"), *args[6:]]
    assert ts.main([*fresh, "--report-only", "--runs-from", str(earlier)]) == 0
    assert not (tmp_path / "empty").exists()
    (again,) = json.loads((tmp_path / "train_suite.json").read_text())["runs"]
    assert again["accuracy"] == r["accuracy"] and again["from"] == str(earlier)
    assert "1 of 1 runs were read from an earlier report" in (tmp_path / "TRAINING.md").read_text()
    assert ts.main([*fresh, "--runs-from", str(tmp_path / "missing.json")]) == 1
    with pytest.raises(SystemExit):
        ts.main(["--entries", "nonsense"])
