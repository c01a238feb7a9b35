"""The inference thread: what a batch of polled messages becomes on its way through the model.

The consumer lives on the main thread (``worker.loop``); the model runs here, in two stages on two threads,
so the main loop keeps polling whatever a batch costs. The first stage (``classifier``) takes a batch,
swaps in a pending hot reload, answers what the cache and this thread's recent results can, and launches
the model on the rest; the second (``classifier-finish``) waits for the model, stores the fresh results in
the cache and hands the batch back. Batch N+1 is tokenized and launched while batch N is in the model.
At most ``MAX_IN_FLIGHT_BATCHES`` are handed over (one running, one prefetched, as text-embeddings-inference
does), and batches come back in submission order, so each partition is published in input order.

Failures: a batch the model fails is retried item by item, and an item that fails again becomes a dead
letter (``inference_failed``). A batch whose every item fails while a probe text fails too means the model is
broken (a lost CUDA context, out of memory): retried with backoff, then :class:`ModelBroken`, and the worker
exits 1 with nothing of that batch committed.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque

from bert_stream.logs import get_logger
from worker.batcher import Batch
from worker.cache import ResultCache
from worker.engine import Engine
from worker.messages import InputMessage, Prediction, Rejected
from worker.metrics import WorkerMetrics

log = get_logger("worker.classifier")

MAX_IN_FLIGHT_BATCHES = 2   # one inferring, one prefetched: the model never waits for the main loop
RECENT_RESULTS = 8192       # the classifier's latest results: a repeat polled while its twin was in flight
PROBE_TEXT = "模型自检：今天天气很好"  # a text any working model classifies: tells a broken model from poison input
MODEL_RETRY_BACKOFF_S = 0.5  # the first wait before a broken model's batch is retried; doubles each time


@dataclasses.dataclass
class Job:
    """One message between poll and publish. A rejected one (bad input: -> DLQ) travels through the batcher
    too, without reaching the model, so every partition's records are published in input order: then every
    record sent is below the acknowledged prefix, which exactly-once needs (a transaction's offsets must
    cover all of its records)."""

    message: InputMessage | Rejected
    received: float  # time.monotonic() at poll
    epoch: int = 0   # the loop's epoch at poll: results of an aborted transaction's epoch are dropped
    cached: Prediction | None = None  # the cache's answer at poll (Worker._route in worker.loop) ...
    version: str = ""                 # ... for this model version (a hot reload in between voids it)
    created: float = 0.0  # the input record's timestamp, seconds since the epoch (0: it had none)


@dataclasses.dataclass
class Result:
    job: Job
    prediction: Prediction | None  # None: inference failed twice -> DLQ
    cached: bool = False
    error: str = ""


@dataclasses.dataclass
class DoneBatch:
    results: list[Result]
    version: str
    infer_ms: float


class Classifier:
    """The inference thread: cache lookup -> infer -> cache store, one batch at a time, in submission order.
    Only the main thread calls submit/completed/drain, so the in-flight counts need no lock."""

    def __init__(self, engine: Engine, cache: ResultCache, metrics: WorkerMetrics, *, model_failure_retries: int = 3):
        self.engine, self.cache, self.metrics = engine, cache, metrics
        self.model_failure_retries = model_failure_retries
        self._started: deque[float] = deque()  # time.monotonic() when each batch in the model was launched
        self._todo: queue.Queue[Batch[Job] | None] = queue.Queue()
        self._launched: queue.Queue[Launched | None] = queue.Queue()
        self._done: queue.Queue[DoneBatch] = queue.Queue()
        self.batches_in_flight = 0
        self.items_in_flight = 0
        self._version = None
        # text -> (this thread's result for the model served now, time.monotonic() when it was stored)
        self._recent: dict[str, tuple[Prediction, float]] = {}
        self.failure: BaseException | None = None
        self._threads = [threading.Thread(target=self._launch_each, name="classifier", daemon=True),
                         threading.Thread(target=self._finish_each, name="classifier-finish", daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def busy_since(self) -> float | None:
        """time.monotonic() when the oldest batch now in the model was launched, else None."""
        started = self._started
        return started[0] if started else None

    def has_room(self) -> bool:
        return self.batches_in_flight < MAX_IN_FLIGHT_BATCHES

    def submit(self, batch: Batch[Job]) -> None:
        self.batches_in_flight += 1
        self.items_in_flight += len(batch)
        self._todo.put(batch)

    def completed(self, timeout: float | None = None) -> list[DoneBatch]:
        """Finished batches in submission order; waits up to ``timeout`` for the first one."""
        if self.failure is not None:  # nothing more will come: exit 1 (at-least-once: a restart re-reads)
            if isinstance(self.failure, ModelBroken):
                raise self.failure
            raise RuntimeError("the classifier thread failed") from self.failure
        out = []
        try:
            if timeout is not None and self.batches_in_flight:
                out.append(self._done.get(timeout=timeout))
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        for done in out:
            self.batches_in_flight -= 1
            self.items_in_flight -= len(done.results)
        return out

    def drain(self, timeout_s: float | None = None) -> list[DoneBatch]:
        """Every batch in flight, finished; raises TimeoutError when that takes over ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        out = []
        while self.batches_in_flight:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the model did not finish its batches within {timeout_s:.0f} s")
            out += self.completed(timeout=1.0)
        return out

    def stalled_for(self) -> float:
        """Seconds the batch now in the model has taken; 0 when it holds none."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self) -> None:
        self._todo.put(None)
        # a thread stuck in the model (a hung device) is a daemon: the exit does not wait for it
        for thread in self._threads:
            thread.join(timeout=5 if self.busy_since is not None else 30)

    def _launch_each(self) -> None:
        """The first stage: batch N+1 is tokenized and launched while the second stage waits for batch N."""
        try:
            while (batch := self._todo.get()) is not None:
                self._started.append(time.monotonic())
                self._launched.put(self.launch(batch))
        except BaseException as exc:  # a bug, not a model error (_infer isolates those): the worker must exit
            self.failure = exc
            log.exception("classifier_failed")
        finally:
            self._launched.put(None)

    def _finish_each(self) -> None:
        try:
            while (launched := self._launched.get()) is not None:
                done = self.finish(launched)
                self._started.popleft()
                self._done.put(done)
        except BaseException as exc:
            self.failure = exc
            log.exception("classifier_failed")

    def classify(self, batch: Batch[Job]) -> DoneBatch:
        """Results for a batch, both stages on the calling thread."""
        return self.finish(self.launch(batch))

    def launch(self, batch: Batch[Job]) -> Launched:
        """The cache's answers from poll time (for the model served now), then this thread's recent
        results; the model is launched on the rest (a text repeated in the batch runs once)."""
        model = self.engine.acquire()  # a pending hot reload is swapped in here, between batches
        if model.version != self._version:
            self.metrics.set_model(model)
            if self._version is not None:
                self.metrics.model_swaps.labels("swapped").inc()
            self._version = model.version
            # a new dict, not clear(): the other stage may still store the old version's last results, into
            # the dict its batch was launched with
            self._recent = {}
        start = time.monotonic()
        version, recent = model.version, self._recent
        jobs = [job for job in batch.items if not isinstance(job.message, Rejected)]
        texts = [job.message.text for job in jobs]
        cached = [job.cached if job.version == version else None for job in jobs]
        if recent and self.cache.enabled and self.cache.up:
            # What a lookup now, instead of at poll time, would have found: results stored since the job was
            # polled (a twin in flight then). Older ones were in Redis at poll time if it kept them, and
            # while Redis is down the model answers, as it did when the lookup ran here.
            recalled = 0
            for i, (job, t) in enumerate(zip(jobs, texts)):
                if cached[i] is None and (entry := recent.get(t)) is not None and entry[1] >= job.received:
                    cached[i] = entry[0]
                    recalled += 1
            if recalled:
                self.metrics.cache_lookups.labels("recent").inc(recalled)
        todo = list(dict.fromkeys(t for t, c in zip(texts, cached) if c is None))  # repeats inside a batch: once
        t0 = time.perf_counter()
        return Launched(batch, model, start, t0, jobs, texts, cached, todo, recent, _launch(model, todo))

    def finish(self, launched: Launched) -> DoneBatch:
        """The model's results for a launched batch (a failing batch is isolated item by item, a broken
        model retried: :meth:`_unless_broken`), stored in the cache, and the batch's results in order."""
        batch, model, start, jobs, texts, cached, todo = (launched.batch, launched.model, launched.start,
                                                          launched.jobs, launched.texts, launched.cached,
                                                          launched.todo)
        version, recent = model.version, launched.recent  # results of the version the batch was launched with
        fresh, errors = _result(model, todo, launched.pending)
        if todo and not fresh:
            fresh, errors = self._unless_broken(model, todo, errors)
        infer_ms = (time.perf_counter() - launched.t0) * 1000
        quality = self.metrics.quality
        if quality is not None and (tokens := getattr(launched.pending, "tokens", 0)):
            quality.observe_tokens(version, tokens, launched.pending.unknown)
        if fresh:
            self.cache.store(version, list(fresh.items()))
            if len(recent) + len(fresh) > RECENT_RESULTS:
                recent.clear()
            stored = time.monotonic()
            recent.update((t, (p, stored)) for t, p in fresh.items())
        results = [Result(job, c or fresh.get(t), cached=c is not None, error=errors.get(t, ""))
                   for job, t, c in zip(jobs, texts, cached)]
        if len(jobs) < len(batch):  # rejected ones keep their place: each partition is published in order
            by_job = {id(r.job): r for r in results}
            results = [by_job.get(id(job)) or Result(job, None) for job in batch.items]
        return self._finished(batch, results, version, start, infer_ms, inferred=len(todo), failed=len(errors))

    def _unless_broken(self, model, todo: list[str], errors: dict[str, str]) -> tuple[dict, dict[str, str]]:
        """Every text of a batch failed. If the probe text still classifies, they are poison input (-> DLQ);
        if it fails too the model is broken (a lost CUDA context, out of memory): the batch is retried with
        backoff, and still failing it raises ModelBroken, so none of it is published or committed and the
        worker exits 1 for its supervisor to restart it."""
        for attempt in range(self.model_failure_retries + 1):
            try:
                model.predict([PROBE_TEXT])
                return {}, errors
            except Exception as exc:  # noqa: BLE001
                probe_error = f"{type(exc).__name__}: {exc}"[:300]
            if attempt == self.model_failure_retries:
                break
            log.error("model_failing", attempt=attempt + 1, retries=self.model_failure_retries, size=len(todo),
                      error=probe_error, action="retrying the batch after a pause")
            time.sleep(MODEL_RETRY_BACKOFF_S * 2 ** attempt)
            fresh, errors = _infer(model, todo)
            if fresh:
                return fresh, errors
        raise ModelBroken(f"the model failed every message of a batch {self.model_failure_retries + 1} times "
                          f"and a probe text as well ({probe_error}); nothing of the batch is committed")

    def answer(self, batch: Batch[Job]) -> DoneBatch | None:
        """The batch's results without the model, when the cache answered every message in it at poll time
        for the model served now (rejected ones need no answer); else None. The main thread calls it when
        nothing is in flight, so a cached stream never waits for this thread to be scheduled."""
        version = self.engine.current.version
        if version != self._version:
            return None  # the first batch of a model version goes through classify (metrics, recent results)
        results = []
        for job in batch.items:
            if isinstance(job.message, Rejected):
                results.append(Result(job, None))
            elif job.cached is not None and job.version == version:
                results.append(Result(job, job.cached, cached=True))
            else:
                return None
        return self._finished(batch, results, version, time.monotonic(), 0.0, inferred=0, failed=0)

    def _finished(self, batch: Batch[Job], results: list[Result], version: str, start: float, infer_ms: float,
                  *, inferred: int, failed: int) -> DoneBatch:
        """Metrics and the batch's log line, once per batch, whoever produced the results."""
        queue_s = start - batch.first_arrival
        hits = sum(r.cached for r in results)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(batch.padded_tokens)
        self.metrics.queue_seconds.observe(queue_s)
        self.metrics.infer_seconds.observe(infer_ms / 1000)
        if self.metrics.quality is not None:
            self.metrics.quality.observe(version, [r.prediction for r in results if r.prediction is not None])
        log.info("batch", size=len(batch), tokens=batch.padded_tokens, queue_ms=round(queue_s * 1000, 1),
                 infer_ms=round(infer_ms, 1), cache_hits=hits, inferred=inferred, failed=failed,
                 model_version=version)
        return DoneBatch(results, version, infer_ms)


class ModelBroken(RuntimeError):
    """The model fails on any input: the worker exits 1 (nothing of the failing batches is committed)."""


@dataclasses.dataclass
class Launched:
    """A batch between the classifier's two stages: what the cache answered, and the model's pending work."""

    batch: Batch[Job]
    model: object
    start: float  # time.monotonic() when the classifier took the batch
    t0: float     # time.perf_counter() before the model was launched
    jobs: list[Job]
    texts: list[str]
    cached: list[Prediction | None]
    todo: list[str]
    recent: dict  # the classifier's recent results of this batch's model version
    pending: object  # the model's Pending, or the exception its launch raised


def _launch(model, texts: list[str]):
    """The model's pending result for ``texts``; an error here is handled where the result is taken."""
    if not texts:
        return None
    try:
        return model.launch(texts)
    except Exception as exc:  # noqa: BLE001 - any model error: isolated by _result
        return exc


def _result(model, texts: list[str], pending) -> tuple[dict[str, Prediction], dict[str, str]]:
    """Predictions by text from a launched batch; a failing batch is retried item by item once, and an item
    that fails again is returned in the errors (-> DLQ inference_failed)."""
    if not texts:
        return {}, {}
    try:
        if isinstance(pending, Exception):
            raise pending
        return dict(zip(texts, pending.result())), {}
    except Exception as exc:  # noqa: BLE001 - any model error: isolate the culprit
        log.warning("batch_inference_failed", size=len(texts), error=f"{type(exc).__name__}: {exc}"[:300])
    return _one_by_one(model, texts)


def _infer(model, texts: list[str]) -> tuple[dict[str, Prediction], dict[str, str]]:
    """:func:`_result` of a batch launched now."""
    return _result(model, texts, _launch(model, texts))


def _one_by_one(model, texts: list[str]) -> tuple[dict[str, Prediction], dict[str, str]]:
    fresh, errors = {}, {}
    for text in texts:
        try:
            fresh[text] = model.predict([text])[0]
        except Exception as exc:  # noqa: BLE001
            errors[text] = f"{type(exc).__name__}: {exc}"[:500]
    return fresh, errors
