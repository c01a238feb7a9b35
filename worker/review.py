"""Which outputs also go to the review topic: the uncertain ones, and a random sample of the rest.

Uncertain: the top score is below ``review_score_below`` or the top-1 minus top-2 margin is below
``review_margin_below``. Unset, the score threshold is the serving version's validation-split score p10
(its ``quality.json``, bert_stream.reference): in distribution about a tenth of new texts are picked, more as
the stream drifts away from what the model was trained on, which is what reviewers should see first. A
version without a reference falls back to ``FALLBACK_SCORE``.

The sample (``review_sample_rate``) is drawn from every model output, uncertain or not: it is the unbiased
view of the stream that a held-out evaluation needs. Cached outputs are not picked: their text was
classified, and offered for review, when it was first seen.

The worker sends review records with the outputs (worker/loop.py): under exactly-once in the same
transaction, so a review exists exactly when its output does.
"""

from __future__ import annotations

import random

from bert_stream import feedback

FALLBACK_SCORE = 0.5  # the score threshold of a version without quality.json


class ReviewRouter:
    """``reason(prediction)``: "uncertain", "sampled" or None, for the version set by :meth:`use`."""

    def __init__(self, score_below: float | None, margin_below: float, sample_rate: float, seed: int | None = None):
        self.score_below, self.margin_below, self.sample_rate = score_below, margin_below, sample_rate
        self._random = random.Random(seed).random
        self._thresholds: dict[str, float] = {}
        self.threshold = FALLBACK_SCORE if score_below is None else score_below

    def use(self, version: str, model=None) -> None:
        """The score threshold of ``version`` (its reference's p10 unless set); ``model`` its LoadedModel."""
        if self.score_below is not None:
            return
        threshold = self._thresholds.get(version)
        if threshold is None:
            ref = getattr(model, "reference", None) if model is not None and model.version == version else None
            threshold = ref.low_score if ref is not None else FALLBACK_SCORE
            if len(self._thresholds) > 8:
                self._thresholds.clear()
            self._thresholds[version] = threshold
        self.threshold = threshold

    def reason(self, prediction) -> str | None:
        top = prediction.top_k
        if prediction.score < self.threshold or (
                self.margin_below and len(top) > 1 and top[0][1] - top[1][1] < self.margin_below):
            return "uncertain"
        if self.sample_rate and self._random() < self.sample_rate:
            return "sampled"
        return None


def review_value(message, prediction, reason: str, version: str) -> bytes:
    source = message.source
    return feedback.review_value(message.id, message.text, reason, version, prediction.top_k,
                                 (source.topic, source.partition, source.offset))
