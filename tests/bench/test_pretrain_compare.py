"""bench.pretrain_compare at toy sizes (no broker: it only runs the trainer's CLIs and reads their output)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_pretrain_compare_fine_tunes_both_arms_on_one_split(tmp_path):
    """bench.pretrain_compare at toy sizes: a real pretraining, both arms fine-tuned on the same split and
    test set, the gain computed from the two checkpoints' own metrics."""
    from bench import pretrain_compare
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
    assert result["pretraining"]["steps"] == 4 and "distill" not in result["pretraining"]
    assert result["pretraining"]["total_time_s"] == result["pretraining"]["train_time_s"]
    # A distilled pretraining is labelled as such, its teacher's pass counted in the pretraining time.
    distilled = result | {"pretraining": result["pretraining"] | {
        "total_time_s": 600.0, "distill": {"teacher": "e5-small", "teacher_time_s": 240.0}}}
    line = pretrain_compare.table(distilled).splitlines()[3]
    assert "MLM + e5-small distillation (10.0 min of which teacher 4.0" in line
