"""The fine-tuner's last stage, on the main process: write the version into a staging folder, pass it through
the gate, publish it atomically (``bert_stream.checkpoint``) or set it aside, and announce it.

A version folder is a standard transformers folder plus what makes it reproducible and inspectable:
``metrics.json`` (scores, the classical baseline, the hybrid), ``training_args.json`` (settings,
hyperparameters, library versions), ``data_fingerprint.json``, ``test_predictions.jsonl`` and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from bert_stream import checkpoint, reference
from bert_stream.logs import get_logger
from bert_stream.settings import public_view
from trainer import feedback, plots
from trainer.batches import Data
from trainer.evaluate import Final
from trainer.gate import gate
from trainer.loop import Fit
from trainer.settings import TrainSettings

REJECTED_DIR = ".rejected"

log = get_logger("trainer.publish")


def save_and_publish(settings: TrainSettings, accelerator: Accelerator, model, tokenizer, data: Data, fit: Fit,
                     final: Final, total_seconds: float, fed: feedback.Feedback | None = None) -> bool:
    """Main process only: write the version into a staging folder, then publish it (True) or, refused by the
    gate, set it aside in ``<output-dir>/.rejected/`` (False). A candidate (``--stage candidate``) is
    published under the CANDIDATE pointer; LATEST stays, and promotion decides on the held-out feedback
    (trainer.promote). In a store without LATEST a candidate is published as LATEST."""
    root, splits = Path(settings.output_dir), data.splits
    # the store's first version has nothing to be compared with, or shadowed beside: it serves
    candidate = settings.stage == "candidate" and checkpoint.latest_version(root) is not None
    version = checkpoint.new_version_id()
    staged = checkpoint.staging_dir(root, version)
    try:
        write_checkpoint(staged, settings, accelerator, model, tokenizer, data, fit, final, version,
                         total_seconds)
        if fed is not None:
            _add_feedback(root, staged, version, fed)
        reasons = gate(settings, final.test, splits.test_fingerprint, final.baseline,
                       compare_published=not candidate)
        if reasons and not settings.force:
            rejected = root / REJECTED_DIR / version
            rejected.parent.mkdir(exist_ok=True)
            os.replace(staged, rejected)
            log.error("gate.refused", reason="; ".join(reasons), latest=checkpoint.latest_version(root),
                      kept_at=str(rejected), hint="LATEST unchanged; --force publishes anyway")
            return False
        if reasons:
            log.warning("gate.forced", reasons=reasons)
        final_dir = checkpoint.publish(root, staged, version, update_latest=not candidate)
        if candidate:
            checkpoint.set_pointer(root, checkpoint.CANDIDATE, version)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already unless something failed
    log.info("checkpoint.published", version=version, path=str(final_dir),
             stage="candidate" if candidate else "latest",
             test_accuracy=round(final.test["accuracy"], 4), test_macro_f1=round(final.test["macro_f1"], 4),
             total_s=round(total_seconds, 1),
             **({"next": "python -m trainer.promote --model-dir " + str(root)} if candidate else {}))
    if settings.redis_url and not candidate:  # workers find a candidate by polling CANDIDATE
        try:
            checkpoint.announce(settings.redis_url, version)
            log.info("checkpoint.announced", version=version)
        except Exception as exc:  # noqa: BLE001 - best effort: workers also poll LATEST
            log.warning("checkpoint.announce_failed", version=version, error=str(exc))
    return True


def write_checkpoint(folder: Path, settings: TrainSettings, accelerator: Accelerator, model, tokenizer,
                     data: Data, fit: Fit, final: Final, version: str, total_seconds: float) -> None:
    splits, progress = data.splits, fit.progress
    plain = accelerator.unwrap_model(model)
    plain.config.id2label = dict(enumerate(splits.labels))
    plain.config.label2id = {label: i for i, label in enumerate(splits.labels)}
    plain.save_pretrained(folder)  # model.safetensors + config.json
    tokenizer.save_pretrained(folder)
    _write_json(folder / "metrics.json", {
        "version": version, "model": settings.model, "data": splits.name, "labels": splits.labels,
        "data_fingerprint": splits.fingerprint, "test_fingerprint": splits.test_fingerprint,
        "validation": final.validation, "test": final.test, "baseline": final.baseline,
        "hybrid": final.hybrid,
        "best_step": progress.best_step, "steps": progress.step, "early_stopped": progress.early_stopped,
        "epochs": round(progress.step / data.steps_per_epoch, 3), "max_length": data.hyper.max_length,
        "mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes,
        "train_time_s": round(progress.fit_seconds, 2), "total_time_s": round(total_seconds, 2),
        "train_examples_per_s": progress.examples_per_s(accelerator.num_processes),
        "eval_examples_per_s": round((len(splits.validation) + len(splits.test)) / max(final.eval_seconds, 1e-9), 1),
        "history": progress.history,
    })
    _write_json(folder / "training_args.json", {
        "settings": public_view(settings), "hyperparameters": dataclasses.asdict(data.hyper),
        "mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes,
        "versions": _versions(), "argv": sys.argv[1:]})
    _write_json(folder / "data_fingerprint.json", splits.describe())
    if final.validation_logits is not None:
        reference.write(folder, served_reference(splits, final))
    if final.ngram is not None:
        final.ngram.save(folder)  # ngram.json + ngram.safetensors: the worker adds it to every prediction
    transformer = final.transformer_test_predictions or final.test_predictions
    with open(folder / "test_predictions.jsonl", "w", encoding="utf-8") as f:
        for example, pred, alone in zip(splits.test, final.test_predictions, transformer):
            f.write(json.dumps({"text": example.text, "label": example.label, "predicted": splits.labels[pred],
                                "transformer": splits.labels[alone]}, ensure_ascii=False) + "\n")
    plots.training_curve(progress.history, progress.losses, folder / "training_curve.png")
    plots.confusion(final.test["confusion_matrix"], splits.labels, folder / "confusion_matrix.png",
                    title=f"{splits.name} test: accuracy {final.test['accuracy']:.3f}, "
                          f"macro-F1 {final.test['macro_f1']:.3f}")


def _add_feedback(root: Path, staged: Path, version: str, fed: feedback.Feedback) -> None:
    """What the labels topic added (provenance), the held-out feedback, and this version's and the serving
    version's scores on it, into the staged version's metrics.json."""
    feedback.write_holdout(staged, fed.holdout)
    section = fed.provenance()
    if fed.holdout:
        section["holdout"] = feedback.holdout_scores(root, staged, version, fed.holdout)
    path = staged / "metrics.json"
    _write_json(path, {**json.loads(path.read_text(encoding="utf-8")), "feedback": section})
    scores = {f"{who}_accuracy": s["accuracy"] for who, s in section.get("holdout", {}).items()}
    log.info("feedback.scored", **scores, held_out=len(fed.holdout))


def served_reference(splits, final: Final) -> dict:
    """The quality reference (``bert_stream.reference``): the training split's label mix, and the validation
    split's confidence as the worker will serve it (a hybrid's from the summed logits)."""
    ids = {label: i for i, label in enumerate(splits.labels)}
    logits = final.validation_logits
    if final.ngram is not None:
        logits = final.ngram.add(logits.astype(np.float32), final.ngram.scores([e.text for e in splits.validation]))
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    return reference.build(splits.labels, [ids[e.label] for e in splits.train], probs)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": sys.version.split()[0]}
