"""Retraining on what reviewers labelled: the labels topic merged into the base data, a held-out share of it,
and the served models scored on that share.

``python -m trainer.run --feedback-topic TOPIC`` reads the compacted labels topic to its end at start
(bert_stream.feedback: the latest label of an id wins; records with an unknown label or no text are counted,
never fatal), then:

- the feedback is deduplicated by normalised text (trainer.data.normalize), the later label winning, and
  wins over the base data: a base example with the same text leaves whichever split it was in;
- a share (``--feedback-holdout``) of it is held out, chosen by a hash of the text, so a text stays on its
  side as the topic grows: a retrain never trains on what an earlier one was evaluated on;
- the rest joins the training split. Validation and test stay the base data's.

The held-out feedback is the recent stream's distribution, which the base test split is not: the version
records it (``feedback_holdout.jsonl``) and its scores on it, and those of the version it would replace, in
``metrics.json`` under ``feedback``, beside the topic, end offsets and label counts it was trained on
(reproducible: the same offsets give the same labels). ``trainer.promote`` decides on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np

from bert_stream import checkpoint
from bert_stream.feedback import Labels, read_labels
from bert_stream.logs import get_logger
from trainer import metrics
from trainer.data import DataError, Example, Splits, fingerprints, normalize
from trainer.settings import TrainSettings

HOLDOUT_FILE = "feedback_holdout.jsonl"
EVAL_BATCH = 64

log = get_logger("trainer.feedback")


@dataclasses.dataclass
class Feedback:
    """What the labels topic added to a run."""

    labels: Labels
    train: list[Example]
    holdout: list[Example]
    replaced: int  # base examples whose text the feedback labelled again

    def provenance(self) -> dict:
        return {**self.labels.provenance(), "trained_on": len(self.train), "held_out": len(self.holdout),
                "replaced_base_examples": self.replaced}


def load(settings: TrainSettings, splits: Splits) -> tuple[Splits, Feedback]:
    """The base splits with the labels topic merged in (see the module docstring)."""
    try:
        labels = read_labels(settings.kafka, settings.feedback_topic, splits.labels)
    except (ValueError, TimeoutError) as exc:
        raise DataError(f"--feedback-topic: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a broker that cannot be reached: one line, exit 2
        raise DataError(f"--feedback-topic {settings.feedback_topic}: {type(exc).__name__}: {exc}"[:300]) from None
    merged, feedback = merge(splits, labels, settings.feedback_holdout, settings.seed)
    log.info("feedback.merged", topic=labels.topic, records=labels.records, labels=len(labels.examples),
             trained_on=len(feedback.train), held_out=len(feedback.holdout), replaced=feedback.replaced,
             bad=dict(labels.bad), per_label=labels.per_label())
    return merged, feedback


def held_out(key: str, share: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:feedback-holdout:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def merge(splits: Splits, labels: Labels, share: float, seed: int) -> tuple[Splits, Feedback]:
    by_text: dict[str, Example] = {}
    for text, label in labels.examples.values():  # in record order: a later label of the same text wins
        key = normalize(text)
        if key:
            by_text.pop(key, None)
            by_text[key] = Example(text.strip(), label)
    train_fb, holdout = [], []
    for key, example in by_text.items():
        (holdout if held_out(key, share, seed) else train_fb).append(example)
    keep = lambda part: [e for e in part if normalize(e.text) not in by_text]  # noqa: E731
    train, validation, test = keep(splits.train), keep(splits.validation), keep(splits.test)
    replaced = sum(len(p) for p in (splits.train, splits.validation, splits.test)) - \
        len(train) - len(validation) - len(test)
    train = train + train_fb
    random.Random(f"{seed}:order:train+feedback").shuffle(train)
    fingerprint, test_fingerprint = fingerprints(train, validation, test, splits.labels,
                                                 {"base": splits.fingerprint, "feedback": labels.provenance()})
    merged = dataclasses.replace(splits, train=train, validation=validation, test=test, fingerprint=fingerprint,
                                 test_fingerprint=test_fingerprint)
    return merged, Feedback(labels, train_fb, holdout, replaced)


def write_holdout(folder: Path, holdout: list[Example]) -> None:
    with open(folder / HOLDOUT_FILE, "w", encoding="utf-8") as f:
        for e in holdout:
            f.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")


def read_holdout(folder: Path) -> list[Example]:
    path = folder / HOLDOUT_FILE
    if not path.exists():
        return []
    return [Example(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_served(folder: Path, version: str, examples: list[Example]) -> dict:
    """Accuracy and macro-F1 of a published version on ``examples``, as a worker serves it (the hybrid's
    n-gram half included), on the CPU in fp32."""
    import torch

    from worker.engine import LoadedModel

    max_length = int(json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("max_length", 128))
    model = LoadedModel(version, folder, torch.device("cpu"), torch.float32, max_length=max_length, top_k=1)
    predicted = []
    for start in range(0, len(examples), EVAL_BATCH):
        predicted += [p.label for p in model.predict([e.text for e in examples[start:start + EVAL_BATCH]])]
    labels = sorted({e.label for e in examples} | set(model.labels))
    ids = {label: i for i, label in enumerate(labels)}
    y_true, y_pred = [ids[e.label] for e in examples], [ids[p] for p in predicted]
    accuracy = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if examples else 0.0
    return {"version": version, "examples": len(examples), "accuracy": round(accuracy, 5),
            "macro_f1": round(metrics.macro_f1(y_true, y_pred, len(labels)), 5) if examples else 0.0}


def holdout_scores(root: Path, staged: Path, version: str, holdout: list[Example]) -> dict:
    """The new version's scores on the held-out feedback, and those of the version LATEST serves (the one a
    promotion would replace), on the same examples."""
    scores = {"candidate": score_served(staged, version, holdout)}
    serving = checkpoint.latest_version(root)
    if serving is not None:
        try:
            scores["serving"] = score_served(root / serving, serving, holdout)
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal: promote scores it again
            log.warning("feedback.serving_unscored", version=serving, error=str(exc)[:300])
    return scores
