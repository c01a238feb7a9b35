"""What a model version was trained on, kept in its checkpoint so the live stream can be compared with it.

``quality.json`` in a version folder (written by the trainer, read by the worker's quality metrics)::

    {"labels": [...],                      the label order of the model
     "label_prior": [...],                 each label's share of the training split
     "score_quantiles": {"0.05": ..},      the served top-1 probability on the validation split
     "margin_quantiles": {"0.05": ..},     top-1 minus top-2 probability, same split
     "examples": {"train": n, "validation": m}}

The quantiles are of what the worker serves: a hybrid's are taken from the summed logits. A version without
the file (published before it existed, or a pretrained one) is served as before; only the comparisons that
need it are missing from its metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FILE = "quality.json"
QUANTILES = (0.05, 0.1, 0.25, 0.5)
# Added to every share before the divergence: a label the window has not seen yet (or the training split
# lacked) would otherwise weigh as much as a missing mode
SMOOTHING = 1e-6


@dataclasses.dataclass(frozen=True)
class Reference:
    labels: tuple[str, ...]
    label_prior: np.ndarray  # float64, sums to 1
    score_quantiles: dict[float, float]
    margin_quantiles: dict[float, float]

    @property
    def low_score(self) -> float:
        """The validation split's 10th percentile of the top-1 probability: in the training distribution,
        one prediction in ten scores below it."""
        return self.score_quantiles[0.1]


def build(labels: Sequence[str], train_label_ids: Sequence[int], validation_probs: np.ndarray) -> dict:
    """The reference of a version: ``validation_probs`` is [examples, labels], as served (softmax of the
    served logits)."""
    top = np.sort(np.asarray(validation_probs, dtype=np.float64), axis=1)[:, ::-1]
    return build_from_top(labels, train_label_ids, top[:, :2] if top.shape[1] > 1 else
                          np.column_stack([top[:, 0], np.zeros(len(top))]))


def build_from_top(labels: Sequence[str], train_label_ids: Sequence[int], top: np.ndarray) -> dict:
    """:func:`build` from each validation example's two highest probabilities ([examples, 2])."""
    counts = np.bincount(np.asarray(train_label_ids, dtype=np.int64), minlength=len(labels)).astype(np.float64)
    top = np.asarray(top, dtype=np.float64)
    scores, margins = top[:, 0], top[:, 0] - top[:, 1]
    return {
        "labels": list(labels),
        "label_prior": [round(c, 8) for c in (counts / max(counts.sum(), 1.0)).tolist()],
        "score_quantiles": {str(q): round(float(np.quantile(scores, q)), 6) for q in QUANTILES},
        "margin_quantiles": {str(q): round(float(np.quantile(margins, q)), 6) for q in QUANTILES},
        "examples": {"train": len(train_label_ids), "validation": len(scores)},
    }


def write(folder: Path, reference: dict) -> None:
    (Path(folder) / FILE).write_text(json.dumps(reference, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load(folder: Path, labels: Sequence[str]) -> Reference | None:
    """The version's reference, or None when it has none or one that does not match its ``labels``
    (a hand-edited folder): a comparison against the wrong label order would be noise that looks like
    drift."""
    path = Path(folder) / FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if list(raw["labels"]) != list(labels):
            return None
        prior = np.asarray(raw["label_prior"], dtype=np.float64)
        scores = {float(q): float(v) for q, v in raw["score_quantiles"].items()}
        margins = {float(q): float(v) for q, v in raw["margin_quantiles"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if prior.shape != (len(labels),) or not math.isclose(prior.sum(), 1.0, abs_tol=1e-3) or 0.1 not in scores:
        return None
    return Reference(tuple(labels), prior / prior.sum(), scores, margins)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions over the same labels, in bits: 0 when they are equal,
    1 when they share nothing. Symmetric and bounded, so one alert threshold means the same for any number
    of labels (PSI, by contrast, grows without bound as a share approaches zero)."""
    p = np.asarray(p, dtype=np.float64) + SMOOTHING
    q = np.asarray(q, dtype=np.float64) + SMOOTHING
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(max(0.0, 0.5 * (np.sum(p * np.log2(p / m)) + np.sum(q * np.log2(q / m)))))
