"""The end-of-run figures: accuracy against the true labels, throughput, latency percentiles, cache hits,
dead letters by reason. Pure functions over what the collector saw, so they are unit-tested without Kafka."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence

from bert_stream import stats


def percentile(values: Sequence[float], q: float) -> float:
    """:func:`bert_stream.stats.percentile`, NaN for no values (a summary with no results shows n/a)."""
    return stats.percentile(values, q) if values else math.nan


@dataclasses.dataclass(frozen=True)
class Result:
    """One output record as the demo needs it. Times are Kafka record timestamps in milliseconds."""

    id: str
    label: str
    score: float
    cached: bool
    model_version: str
    produced_ms: int  # the input record's timestamp (set by the producer)
    output_ms: int  # the output record's timestamp (set by the worker's producer)
    true_label: str | None = None

    @property
    def latency_ms(self) -> int:
        return self.output_ms - self.produced_ms

    @property
    def correct(self) -> bool | None:
        return None if self.true_label is None else self.label == self.true_label


@dataclasses.dataclass(frozen=True)
class Summary:
    results: int
    scored: int  # results with a known true label
    correct: int
    messages_per_s: float
    p50_ms: float
    p99_ms: float
    cache_hits: int
    versions: dict[str, int]
    dead_letters: dict[str, int]

    @property
    def accuracy(self) -> float:
        return self.correct / self.scored if self.scored else math.nan

    @property
    def dlq_total(self) -> int:
        return sum(self.dead_letters.values())


def summarize(results: Iterable[Result], dlq_reasons: Iterable[str] = ()) -> Summary:
    """Throughput is end to end: results over the span from the first input produced to the last output."""
    results = list(results)
    scored = [r for r in results if r.correct is not None]
    latencies = [r.latency_ms for r in results]
    first_ms = min((r.produced_ms for r in results), default=0)
    span_s = (max((r.output_ms for r in results), default=0) - first_ms) / 1000
    return Summary(
        results=len(results),
        scored=len(scored),
        correct=sum(bool(r.correct) for r in scored),
        messages_per_s=len(results) / span_s if span_s > 0 else math.nan,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        cache_hits=sum(r.cached for r in results),
        versions=dict(Counter(r.model_version for r in results)),
        dead_letters=dict(sorted(Counter(dlq_reasons).items())),
    )


def format_summary(summary: Summary, labels: int | None = None) -> list[str]:
    """The summary as aligned ``name  value`` lines."""
    chance = f" (chance: {1 / labels:.0%})" if labels else ""
    reasons = ", ".join(f"{reason} {n}" for reason, n in summary.dead_letters.items()) or "none"
    lines = [
        ("results", f"{summary.results} labelled"),
        ("accuracy", f"{summary.accuracy:.1%} ({summary.correct}/{summary.scored} correct){chance}"),
        ("throughput", f"{summary.messages_per_s:.1f} messages/s (first produce to last output)"),
        ("latency", f"p50 {summary.p50_ms:.0f} ms, p99 {summary.p99_ms:.0f} ms (produce to output record)"),
        ("cache hits", f"{summary.cache_hits} (served from Redis without the model)"),
        ("dead letters", f"{summary.dlq_total} ({reasons})"),
    ]
    return [f"  {name:<13}{value}" for name, value in lines]
