"""Model quality on the live stream: what the outputs say about whether the model still fits its traffic.

Exported per model version (``version`` label), for the serving version and the one before it only
(:data:`MAX_VERSIONS`), so a worker that swaps models every hour still exports a bounded set of series:

- ``bert_stream_prediction_score`` / ``bert_stream_prediction_margin``: histograms of the top-1 probability
  and of top-1 minus top-2;
- ``bert_stream_predictions_total{version, label}``: predicted labels (at most :data:`MAX_LABELS` label
  values; the rest count as ``other``);
- ``bert_stream_truncated_total{version}``: outputs whose text was cut to max_length;
- ``bert_stream_tokens_total{version, kind="all"|"unknown"}``: tokens the model saw, and how many were the
  tokenizer's unknown token (text the vocabulary cannot represent);
- ``bert_stream_label_drift{version}``: Jensen-Shannon divergence (bits, 0..1) between the predicted-label
  mix of the last :attr:`window` outputs and the training split's (``bert_stream.reference``);
- ``bert_stream_low_confidence_share{version}``: the share of those outputs scoring below the validation
  split's 10th percentile: about 0.1 while the stream looks like the validation data;
- ``bert_stream_quality_window{version}``: how many outputs the two gauges above are computed over;
- ``bert_stream_reference_quantile{version, of="score"|"margin", quantile}``: the validation split's
  quantiles from the reference, to draw beside the live histograms' (a constant per version).

Cost: each batch is observed once (numpy over its scores and label ids), not each message, and the gauges
are computed when Prometheus scrapes. The gauges need the version's reference (its ``quality.json``);
without one they are absent, and the rest is exported as usual.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bert_stream.reference import Reference, js_divergence

MAX_VERSIONS = 2   # the serving version and the one it replaced: both sides of a swap, and no more series
MAX_LABELS = 64    # label values per version; a model with more counts the rest under "other"
WINDOW = 2000      # outputs the drift and confidence gauges look back over
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
MARGIN_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class BulkHistogram:
    """A histogram observed a batch of values at a time (one ``searchsorted``), exported as Prometheus's."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, values: np.ndarray) -> None:
        if len(values):
            self.counts += np.bincount(np.searchsorted(self.bounds, values, side="left"),
                                       minlength=len(self.counts))
            self.sum += float(values.sum())

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = np.cumsum(self.counts).tolist()
        return [*((floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cumulative)),
                ("+Inf", cumulative[-1])]


class BatchHistogram(Collector):
    """One unlabelled :class:`BulkHistogram` as a Prometheus collector, observed from any thread."""

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]):
        self.name, self.documentation = name, documentation
        self._histogram = BulkHistogram(bounds)
        self._lock = threading.Lock()

    def observe(self, values: np.ndarray) -> None:
        with self._lock:
            self._histogram.observe(values)

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation)
        with self._lock:
            family.add_metric([], self._histogram.buckets(), self._histogram.sum)
        yield family


class _Version:
    """One model version's counts, and the window of its latest outputs' label ids and low scores."""

    def __init__(self, labels: Sequence[str], reference: Reference | None, window: int):
        self.labels = list(labels[:MAX_LABELS]) + (["other"] if len(labels) > MAX_LABELS else [])
        self.reference = reference
        self.score = BulkHistogram(SCORE_BUCKETS)
        self.margin = BulkHistogram(MARGIN_BUCKETS)
        self.predicted = np.zeros(len(self.labels), dtype=np.int64)
        self.truncated = 0
        self.tokens = self.unknown = 0
        self.window = window
        self.recent: collections.deque[tuple[np.ndarray, int, int]] = collections.deque()  # per batch
        self.recent_counts = np.zeros(len(labels), dtype=np.int64)
        self.recent_n = self.recent_low = 0

    def observe(self, label_ids: np.ndarray, scores: np.ndarray, margins: np.ndarray, truncated: int) -> None:
        self.score.observe(scores)
        self.margin.observe(margins)
        self.truncated += truncated
        if not self.labels:  # a model that names no labels: nothing to count them by
            return
        self.predicted += np.bincount(np.clip(label_ids, 0, len(self.labels) - 1), minlength=len(self.labels))
        if self.reference is None:
            return
        counts = np.bincount(np.clip(label_ids, 0, len(self.recent_counts) - 1), minlength=len(self.recent_counts))
        low = int((scores < self.reference.low_score).sum())
        self.recent.append((counts, len(label_ids), low))
        self.recent_counts += counts
        self.recent_n += len(label_ids)
        self.recent_low += low
        # whole batches leave the window, the oldest first, while the rest still fill it
        while self.recent and self.recent_n - self.recent[0][1] >= self.window:
            old, n, old_low = self.recent.popleft()
            self.recent_counts -= old
            self.recent_n -= n
            self.recent_low -= old_low


class QualityMonitor(Collector):
    """Registered on the worker's registry; observed by whoever finishes a batch (the classifier's threads or
    the main loop), read by the HTTP thread at scrape time: one lock for both."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self._versions: collections.OrderedDict[str, _Version] = collections.OrderedDict()
        self._lock = threading.Lock()

    def set_model(self, version: str, labels: Sequence[str], reference: Reference | None) -> None:
        with self._lock:
            if version in self._versions:
                self._versions.move_to_end(version)
                return
            self._versions[version] = _Version(labels, reference, self.window)
            while len(self._versions) > MAX_VERSIONS:
                self._versions.popitem(last=False)

    def observe(self, version: str, predictions: Sequence) -> None:
        """One batch's predictions (``label_id``, ``score``, ``top_k``, ``truncated``) by ``version``."""
        if not predictions:
            return
        label_ids = np.fromiter((p.label_id for p in predictions), dtype=np.int64, count=len(predictions))
        scores = np.fromiter((p.score for p in predictions), dtype=np.float64, count=len(predictions))
        seconds = np.fromiter((p.top_k[1][1] if len(p.top_k) > 1 else 0.0 for p in predictions),
                              dtype=np.float64, count=len(predictions))
        truncated = sum(p.truncated for p in predictions)
        with self._lock:
            stats = self._versions.get(version)
            if stats is not None:
                stats.observe(label_ids, scores, scores - seconds, truncated)

    def observe_tokens(self, version: str, tokens: int, unknown: int) -> None:
        with self._lock:
            stats = self._versions.get(version)
            if stats is not None:
                stats.tokens += tokens
                stats.unknown += unknown

    def gauges(self, version: str) -> dict[str, float] | None:
        """The drift and low-confidence gauges of ``version`` now (None without a reference or outputs)."""
        with self._lock:
            stats = self._versions.get(version)
            if stats is None or stats.reference is None or not stats.recent_n:
                return None
            return {"drift": js_divergence(stats.recent_counts / stats.recent_n, stats.reference.label_prior),
                    "low_confidence": stats.recent_low / stats.recent_n, "window": stats.recent_n}

    def collect(self):
        score = HistogramMetricFamily("bert_stream_prediction_score", "Top-1 probability of each output.",
                                      labels=["version"])
        margin = HistogramMetricFamily("bert_stream_prediction_margin", "Top-1 minus top-2 probability of each "
                                       "output: small when the model hesitates between two labels.",
                                       labels=["version"])
        predicted = CounterMetricFamily("bert_stream_predictions", "Outputs by predicted label.",
                                        labels=["version", "label"])
        truncated = CounterMetricFamily("bert_stream_truncated", "Outputs whose text was cut to max_length.",
                                        labels=["version"])
        tokens = CounterMetricFamily("bert_stream_tokens", "Tokens the model read (kind=all), and how many were "
                                     "the tokenizer's unknown token (kind=unknown).", labels=["version", "kind"])
        drift = GaugeMetricFamily("bert_stream_label_drift", "Jensen-Shannon divergence (bits, 0-1) between the "
                                  "predicted-label mix of the recent window and the training split's.",
                                  labels=["version"])
        low = GaugeMetricFamily("bert_stream_low_confidence_share", "Share of the recent window scoring below "
                                "the validation split's 10th percentile (about 0.1 in-distribution).",
                                labels=["version"])
        window = GaugeMetricFamily("bert_stream_quality_window", "Outputs the drift and low-confidence gauges "
                                   "are computed over (they fill up to the configured window).",
                                   labels=["version"])
        expected = GaugeMetricFamily("bert_stream_reference_quantile", "The validation split's quantiles of the "
                                     "top-1 probability (of=score) and margin (of=margin), from the version's "
                                     "quality.json.", labels=["version", "of", "quantile"])
        with self._lock:
            versions = list(self._versions.items())
            for version, s in versions:
                score.add_metric([version], s.score.buckets(), s.score.sum)
                margin.add_metric([version], s.margin.buckets(), s.margin.sum)
                for label, n in zip(s.labels, s.predicted.tolist()):
                    predicted.add_metric([version, label], n)
                truncated.add_metric([version], s.truncated)
                tokens.add_metric([version, "all"], s.tokens)
                tokens.add_metric([version, "unknown"], s.unknown)
                if s.reference is not None:
                    for of, quantiles in (("score", s.reference.score_quantiles),
                                          ("margin", s.reference.margin_quantiles)):
                        for q, v in quantiles.items():
                            expected.add_metric([version, of, f"{q:g}"], v)
        for version, _ in versions:
            g = self.gauges(version)
            if g is not None:
                drift.add_metric([version], g["drift"])
                low.add_metric([version], g["low_confidence"])
                window.add_metric([version], g["window"])
        yield from (score, margin, predicted, truncated, tokens, drift, low, window, expected)
