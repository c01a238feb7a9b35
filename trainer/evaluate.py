"""The fine-tuner's evaluation: predictions gathered from every process, the final scores of the best
weights, and the hybrid rule that decides whether the char n-gram half joins the published model.

The final scores are those of the best weights in fp32 without autocast: the numbers (and labels) a plain
``AutoModelForSequenceClassification.from_pretrained`` of the checkpoint reproduces.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from bert_stream.ngram import NgramModel
from trainer import metrics
from trainer.batches import Data
from trainer.data import Splits
from trainer.prepare import Prepared
from trainer.settings import HYBRID_MAX_MACRO_F1_DROP, TrainSettings


def predict(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> np.ndarray:
    """[examples, labels] float32 logits in the order of the loader's examples, gathered from every process."""
    model.eval()
    by_index: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for batch in loader:
            idx = batch.pop("idx")
            batch.pop("labels")
            logits = model(**batch).logits.float()
            idx, logits = accelerator.gather_for_metrics((idx, logits))
            by_index.update(zip(idx.tolist(), logits.cpu().numpy()))
    n = len(loader.dataset)
    assert sorted(by_index) == list(range(n)), "evaluation lost or invented examples"
    return np.stack([by_index[i] for i in range(n)])


@dataclasses.dataclass
class Final:
    validation: dict
    test: dict
    test_predictions: list[int]
    eval_seconds: float
    validation_logits: np.ndarray | None = None  # the transformer's, fp32
    test_logits: np.ndarray | None = None
    baseline: dict | None = None  # trainer.baseline.versus: the classical model on the same split
    ngram: NgramModel | None = None  # the hybrid's n-gram half, when it was kept
    hybrid: dict | None = None  # its fit, and the transformer's own scores beside the published ones
    transformer_test_predictions: list[int] | None = None  # the transformer's alone, when a hybrid was kept


def final_evaluation(accelerator: Accelerator, p: Prepared, data: Data,
                     best: dict[str, torch.Tensor]) -> Final:
    """The best weights, in fp32 without autocast: the numbers (and labels) a plain
    ``AutoModelForSequenceClassification.from_pretrained`` of the checkpoint reproduces."""
    started = time.monotonic()
    plain = accelerator.unwrap_model(p.model, keep_fp32_wrapper=False)  # drops the autocast wrapper for good
    plain.load_state_dict(best)
    labels = data.splits.labels
    ids = {label: i for i, label in enumerate(labels)}
    val_logits = predict(accelerator, plain, p.validation)
    test_logits = predict(accelerator, plain, p.test)
    test_pred = test_logits.argmax(1).tolist()
    return Final(
        validation=metrics.report([ids[e.label] for e in data.splits.validation], val_logits.argmax(1).tolist(), labels),
        test=metrics.report([ids[e.label] for e in data.splits.test], test_pred, labels),
        test_predictions=test_pred, eval_seconds=time.monotonic() - started,
        validation_logits=val_logits, test_logits=test_logits)


def add_ngram_half(settings: TrainSettings, splits: Splits, final: Final) -> dict | None:
    """``--hybrid auto``: fit the char n-gram model on the training split, scale it and the transformer by
    validation log-loss (bert_stream.ngram), and when the n-grams get a weight make the sum what is scored
    and published. Returns the log's fields (None with --hybrid off)."""
    if settings.hybrid == "off":
        return None
    started = time.monotonic()
    ids = {label: i for i, label in enumerate(splits.labels)}
    ngram = NgramModel.fit([e.text for e in splits.train], [ids[e.label] for e in splits.train], len(ids))
    val_texts, test_texts = [e.text for e in splits.validation], [e.text for e in splits.test]
    fitted = ngram.calibrate(final.validation_logits, val_texts, [ids[e.label] for e in splits.validation])
    fitted["transformer"] = {"validation": _scores(final.validation), "test": _scores(final.test)}
    kept = ngram.ngram_scale > 0
    if kept:
        def hybrid(logits: np.ndarray, texts: list[str]) -> list[int]:
            return ngram.combine(torch.from_numpy(logits), texts).argmax(-1).tolist()

        validation = metrics.report([ids[e.label] for e in splits.validation],
                                    hybrid(final.validation_logits, val_texts), splits.labels)
        dropped = hybrid_costs_rare_classes(final.validation["macro_f1"], validation["macro_f1"])
        if dropped:
            kept, fitted["dropped"], fitted["hybrid_validation"] = False, dropped, _scores(validation)
        else:
            final.transformer_test_predictions = final.test_predictions
            final.validation = validation
            final.test_predictions = hybrid(final.test_logits, test_texts)
            final.test = metrics.report([ids[e.label] for e in splits.test], final.test_predictions, splits.labels)
            final.ngram = ngram
    fitted["kept"] = kept
    fitted["fit_s"] = round(time.monotonic() - started, 2)
    final.hybrid = fitted
    return fitted


def hybrid_costs_rare_classes(transformer_macro_f1: float, hybrid_macro_f1: float) -> str | None:
    """Why a hybrid that log-loss kept is dropped after all, or None. Log-loss is ruled by the common classes, so
    on a skewed set the sum can keep accuracy while it costs the rare class's recall. Dropped when validation
    macro-F1 falls by more than :data:`HYBRID_MAX_MACRO_F1_DROP`; smaller moves are a few texts of a small
    validation split."""
    if transformer_macro_f1 - hybrid_macro_f1 > HYBRID_MAX_MACRO_F1_DROP:
        return (f"validation macro-F1 {hybrid_macro_f1:.3f} with the n-grams against {transformer_macro_f1:.3f} "
                f"without (more than {HYBRID_MAX_MACRO_F1_DROP} lower)")
    return None


def _scores(report: dict) -> dict:
    return {"accuracy": round(report["accuracy"], 5), "macro_f1": round(report["macro_f1"], 5)}
