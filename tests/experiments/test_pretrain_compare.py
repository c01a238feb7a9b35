"""experiments.pretrain_compare at toy sizes (no broker: it only runs the trainer's CLIs and reads their output)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_pretrain_compare_fine_tunes_both_arms_on_one_split(tmp_path):
    """A real pretraining, both arms fine-tuned on the same split and test set, the gain computed from the
    two checkpoints' own metrics, and the Markdown table that reports it."""
    from experiments import pretrain_compare
    from trainer.data import peoples_daily_texts

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(peoples_daily_texts()[:200]), encoding="utf-8")
    result = pretrain_compare.main([
        "--preset", "tiny", "--epochs", "1", "--max-train-examples", "200", "--skip-inference",
        "--work-dir", str(tmp_path / "work"), "--pretrain-args", "--max-steps", "4", "--no-builtin-corpus",
        "--corpus-dir", str(corpus)])
    a, b = result["random_init"], result["pretrained"]
    assert a["folder"] != b["folder"] and a["test_fingerprint"] == b["test_fingerprint"]
    assert result["gain_points"] == pytest.approx(100 * (b["test_accuracy"] - a["test_accuracy"]))
    assert result["pretraining"]["steps"] == 4
    table = pretrain_compare.table(result)
    assert f"| (a) random init | {a['test_accuracy']:.4f} |" in table
    assert f"(b) - (a): {result['gain_points']:+.1f} accuracy points." in table
