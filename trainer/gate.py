"""The quality gate: what a trained model must beat before it may be published.

A refused model is kept aside (``<output-dir>/.rejected/<version>``) and ``LATEST`` is never moved; the
reasons are one line each, for the operator who reads the Job's log.
"""

from __future__ import annotations

import json
from pathlib import Path

from bert_stream import checkpoint
from bert_stream.logs import get_logger
from trainer.settings import TrainSettings

log = get_logger("trainer.gate")


def gate(settings: TrainSettings, test: dict, test_fingerprint: str,
         versus_baseline: dict | None = None, compare_published: bool = True) -> list[str]:
    """Reasons to refuse publishing (empty: publish). Against the --min-* floors, the classical baseline's
    accuracy plus --min-gain-over-baseline, and, with ``compare_published``, the published model when it was
    tested on the same split (a lower test macro-F1, the selection metric, is worse). A candidate is not
    compared here: trainer.promote weighs it against the serving model on the recent stream's labels."""
    reasons = []
    floor = settings.min_gain_over_baseline
    if floor is not None and versus_baseline is not None and versus_baseline["gain_accuracy"] < floor:
        reasons.append(f"test accuracy {test['accuracy']:.4f} beats the classical baseline's "
                       f"{versus_baseline['accuracy']:.4f} by {versus_baseline['gain_accuracy']:+.4f} < "
                       f"--min-gain-over-baseline {floor:.4f}")
    if settings.min_accuracy is not None and test["accuracy"] < settings.min_accuracy:
        reasons.append(f"test accuracy {test['accuracy']:.4f} < --min-accuracy {settings.min_accuracy:.4f}")
    if settings.min_macro_f1 is not None and test["macro_f1"] < settings.min_macro_f1:
        reasons.append(f"test macro-F1 {test['macro_f1']:.4f} < --min-macro-f1 {settings.min_macro_f1:.4f}")
    if not compare_published:
        return reasons
    root = Path(settings.output_dir)
    try:
        current = checkpoint.latest_version(root)
        published = json.loads((root / current / "metrics.json").read_text()) if current else None
    except (checkpoint.CheckpointError, OSError, ValueError) as exc:
        log.warning("gate.no_comparison", reason=f"published model unreadable: {exc}")
        return reasons
    if published is None:
        return reasons
    if published.get("test_fingerprint") != test_fingerprint:
        log.info("gate.no_comparison", published=current,
                 reason="the published model was tested on a different test split; scores are not comparable")
    elif test["macro_f1"] < published["test"]["macro_f1"]:
        reasons.append(f"test macro-F1 {test['macro_f1']:.4f} is below the published {current}'s "
                       f"{published['test']['macro_f1']:.4f} on the same test split")
    return reasons
