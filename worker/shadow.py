"""Shadow: the store's ``CANDIDATE`` version classifies a sample of live traffic beside the serving model.

Nothing it does reaches an output. The main loop hands it (text, serving label) pairs for a random
``shadow_sample_rate`` of the outputs it publishes (:meth:`Shadow.offer`: a deque append, no waiting); a
thread of its own classifies them with the candidate and counts agreement. Its cost to serving is bounded
twice: the queue holds at most ``QUEUE_ITEMS`` (a sample that finds it full is dropped and counted), and after
each batch the thread sleeps long enough that it computes at most ``shadow_max_share`` of the wall time. On a
CPU the candidate's forward shares the cores with the serving model's; ``bench/feedback.py`` measures what
that costs in throughput.

It follows the pointer as workers follow ``LATEST``: checked every ``model_poll_s``; a new candidate is
loaded on this thread (the serving model never waits for it), a removed one (promoted or withdrawn) is
dropped. A candidate that fails to load is logged once and not retried.

Metrics (per candidate version; the previous candidate's series are removed when it changes):
``bert_stream_shadow_predictions_total{candidate,result}`` (agree, disagree),
``bert_stream_shadow_disagreements_total{candidate,label}`` (by the serving model's label),
``bert_stream_shadow_dropped_total``, ``bert_stream_shadow_seconds_total`` (the candidate's compute).
``trainer.promote --metrics-url`` reads the first to check live agreement before promoting.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque

from prometheus_client import Counter

from bert_stream import checkpoint
from bert_stream.logs import get_logger

log = get_logger("worker.shadow")

QUEUE_ITEMS = 1024  # samples waiting for the candidate at most; more are dropped
BATCH_ITEMS = 64    # samples per candidate forward


class Shadow:
    def __init__(self, engine, rate: float, max_share: float, poll_s: float, registry, *,
                 producer=None, topic: str | None = None, seed: int | None = None):
        self.engine, self.rate, self.max_share, self.poll_s = engine, rate, max_share, poll_s or 5.0
        self.producer, self.topic = producer, topic
        self._random = random.Random(seed).random
        self._queue: deque = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self.model = None             # the candidate's LoadedModel, on this thread
        self.version: str | None = None  # read by the main loop: None = nothing to sample for
        self._refused: set[str] = set()
        self.predictions = Counter("bert_stream_shadow_predictions", "Samples the candidate classified, by "
                                   "whether it agreed with the serving model.", ["candidate", "result"],
                                   registry=registry)
        self.disagreements = Counter("bert_stream_shadow_disagreements", "Samples the candidate labelled "
                                     "differently, by the serving model's label.", ["candidate", "label"],
                                     registry=registry)
        self.dropped = Counter("bert_stream_shadow_dropped", "Samples dropped because the shadow was busy.",
                               registry=registry)
        self.seconds = Counter("bert_stream_shadow_seconds", "Wall time the candidate spent classifying.",
                               registry=registry)

    def start(self) -> Shadow:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.producer is not None:
            self.producer.close(timeout=5)

    # ---- the main loop's side --------------------------------------------------------------------------------
    def offer(self, items: list) -> None:
        """(message, serving prediction) pairs of published outputs; a random ``rate`` of them is kept."""
        if self.version is None:
            return
        rate, draw, queue = self.rate, self._random, self._queue
        for item in items:
            if draw() < rate:
                if len(queue) >= QUEUE_ITEMS:
                    self.dropped.inc()
                else:
                    queue.append(item)

    # ---- the shadow thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.poll_s
                self._follow()
            if not self._queue or self.model is None:
                self._stop.wait(0.05)
                continue
            batch = [self._queue.popleft() for _ in range(min(BATCH_ITEMS, len(self._queue)))]
            started = time.perf_counter()
            try:
                predictions = self.model.predict([m.text for m, _p in batch])
            except Exception as exc:  # noqa: BLE001 - a broken candidate stops shadowing, never serving
                log.error("shadow_failed", candidate=self.version, error=str(exc)[:300])
                self._refused.add(self.version)
                self._drop_candidate()
                continue
            busy = time.perf_counter() - started
            self._count(batch, predictions, busy)
            # the duty cycle: busy / (busy + idle) <= max_share
            self._stop.wait(busy * (1 - self.max_share) / self.max_share)

    def _count(self, batch: list, predictions: list, busy: float) -> None:
        version, agree = self.version, 0
        for (message, served), candidate in zip(batch, predictions):
            if candidate.label == served.label:
                agree += 1
            else:
                self.disagreements.labels(version, served.label).inc()
            if self.producer is not None:
                self._publish(message, served, candidate)
        self.predictions.labels(version, "agree").inc(agree)
        self.predictions.labels(version, "disagree").inc(len(batch) - agree)
        self.seconds.inc(busy)

    def _publish(self, message, served, candidate) -> None:
        value = json.dumps({"id": message.id, "candidate": self.version, "label": candidate.label,
                            "score": round(candidate.score, 6), "serving_label": served.label,
                            "source": {"topic": message.source.topic, "partition": message.source.partition,
                                       "offset": message.source.offset}}, ensure_ascii=False).encode()
        try:
            self.producer.send(self.topic, key=message.key, value=value)
        except Exception as exc:  # noqa: BLE001 - best effort: the shadow topic is for inspection
            log.warning("shadow_publish_failed", error=str(exc)[:200])

    def _follow(self) -> None:
        """Load the version CANDIDATE names when it changed; drop ours when it is gone or is being served."""
        try:
            wanted = checkpoint.read_pointer(self.engine.model_dir, checkpoint.CANDIDATE)
        except checkpoint.CheckpointError as exc:
            log.warning("candidate_pointer_unreadable", error=str(exc)[:300])
            return
        if wanted == self.engine.version:
            wanted = None  # promoted: it serves now
        if wanted == self.version or wanted in self._refused:
            return
        self._drop_candidate()
        if wanted is None:
            return
        try:
            model = self.engine.load((wanted, self.engine.model_dir / wanted))
        except Exception as exc:  # noqa: BLE001 - the candidate is refused, serving goes on
            self._refused.add(wanted)
            log.error("candidate_refused", candidate=wanted, error=str(exc)[:500])
            return
        self.model, self.version = model, wanted
        log.info("shadow_started", candidate=wanted, serving=self.engine.version, sample_rate=self.rate,
                 max_share=self.max_share)

    def _drop_candidate(self) -> None:
        if self.version is not None:
            log.info("shadow_stopped", candidate=self.version)
            for metric in (self.predictions, self.disagreements):
                metric.clear()
        self.model = self.version = None
        self._queue.clear()
