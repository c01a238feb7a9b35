"""``python -m worker.run``: consume Chinese messages, micro-batch them through the model, publish labels.

The pipeline: poll -> decode -> cache lookup -> batch -> infer -> cache store -> publish -> commit.
Each step is a call into its owner: :mod:`worker.messages` (decode, records), :mod:`worker.batcher`,
:mod:`worker.cache`, :mod:`worker.engine`, :mod:`worker.offsets`, :mod:`bert_stream.kafka` (clients).

The path around the model (what a GPU waits on)
    The cache is asked on the main thread, once per poll, and a batch it answered entirely is published
    there too when nothing is in flight: a cached message never changes threads. Only batches with work for
    the model go to the classifier thread, which also remembers its recent results for the repeats that were
    polled while their twin was being classified. bench/ceiling.py measures this path with every message a
    cache hit (bench/RESULTS.md, part 8).

How inference never starves group membership
    The consumer lives on the main thread; inference runs on one background thread (:class:`Classifier`),
    handed at most ``MAX_IN_FLIGHT_BATCHES`` batches (one running, one prefetched, as text-embeddings-
    inference does). The main loop keeps polling while a batch infers, so the gap between polls is a few
    milliseconds whatever the model costs. When ``max_queued_messages`` are between poll and publish the
    loop takes no more; if that lasts (a slow model), every assigned partition is paused and the polls go
    on, returning nothing but counting as polls, so memory stays bounded and the member stays in the group
    (:meth:`Worker._backpressure`). The alternative (one thread, batches small enough
    that a poll always comes in time) ties membership to hardware speed: a slow CPU, a cold GPU or a
    swapped-in larger model could exceed ``max.poll.interval.ms``. Here a slow batch only slows throughput.
    Tested by ``tests/worker/test_run.py::test_slow_batches_do_not_get_the_worker_evicted``.

Delivery guarantee: at-least-once (default) or exactly-once (:mod:`worker.delivery`)
    An input offset is committed only after the output (or DLQ) records of it and of every earlier message
    of its partition are acknowledged by the broker (``acks=all``): commit = flush the producer, take the
    acknowledged prefix (:class:`worker.offsets.OffsetTracker`), commit it. Commits happen every
    ``commit_interval_ms`` (at-least-once also every ``commit_every`` messages), on partition revocation
    (after the in-flight batches are published) and on shutdown. A crash at any point loses nothing; at-least-once publishes
    again what was published after the last commit, exactly-once puts the outputs and the offsets of one
    commit in one transaction, and a transaction that fails is aborted and the partitions rewound to the
    committed offsets (``_abort``). Outputs keep the input's key and go to the same partition number, so per
    input partition the output order is the input order and a replay is recognisable by ``source.offset``.
    The Redis cache stays outside any transaction (it is keyed by content, not by offset).

Shutdown: SIGTERM/SIGINT set a flag; the loop stops polling, finishes and publishes what it holds, flushes,
commits, closes the clients and exits 0. A second signal exits at once (status 1; at-least-once still holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import queue
import signal
import sys
import threading
import time
from collections import deque

from bert_stream.kafka import adapter, ensure_topics, unwritable
from bert_stream.kafka.interface import ClientError, Fenced, FlushTimeout, TopicPartition
from bert_stream.logs import bind_process, configure_logging, get_logger
from bert_stream.settings import parse_settings, public_view
from bert_stream.checkpoint import CheckpointError
from worker.batcher import Batch, Batcher
from worker import delivery
from worker.cache import ResultCache
from worker.engine import Engine, ModelWatcher
from worker.messages import (CHARS_PER_TOKEN, InputMessage, OutputEncoder, Prediction, Rejected, Source,
                             dead_letter, decode, rejected_for_failure)
from worker.metrics import Health, OpsServer, WorkerMetrics
from worker.offsets import OffsetTracker
from worker.settings import WorkerSettings

log = get_logger("worker.run")

MAX_IN_FLIGHT_BATCHES = 2   # one inferring, one prefetched: the model never waits for the main loop
RECENT_RESULTS = 8192       # the classifier's latest results: a repeat polled while its twin was in flight
BUSY_POLL_MS = 5            # poll timeout while batches are in flight: how soon their outputs are published
IDLE_POLL_MS = 200          # poll timeout with nothing to do (also the shutdown reaction time)
LAG_EVERY_S = 10.0          # end-offset requests for the lag gauge (one round trip)
DLQ_MAX_BYTES = 900_000     # a dead letter's value, key and headers together: under the 1 MB request limit
PROBE_TEXT = "模型自检：今天天气很好"  # a text any working model classifies: tells a broken model from poison input
MODEL_RETRY_BACKOFF_S = 0.5  # the first wait before a broken model's batch is retried; doubles each time
PAUSE_AFTER_S = 1.0          # a queue full this long pauses the partitions (_backpressure)
PRODUCER_CLOSE_S = 10.0     # the producer's close at exit: what is not sent by then is re-delivered anyway


@dataclasses.dataclass
class Job:
    """One message between poll and publish. A rejected one (bad input: -> DLQ) travels through the batcher
    too, without reaching the model, so every partition's records are published in input order: then every
    record sent is below the acknowledged prefix, which exactly-once needs (a transaction's offsets must
    cover all of its records)."""

    message: InputMessage | Rejected
    received: float  # time.monotonic() at poll
    epoch: int = 0   # Worker._epoch at poll: results of an aborted transaction's epoch are dropped
    cached: Prediction | None = None  # the cache's answer at poll (Worker._route) ...
    version: str = ""                 # ... for this model version (a hot reload in between voids it)


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
            self.metrics.set_model(model.version, str(model.dtype).removeprefix("torch."), str(model.device))
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
        log.info("batch", size=len(batch), tokens=batch.padded_tokens, queue_ms=round(queue_s * 1000, 1),
                 infer_ms=round(infer_ms, 1), cache_hits=hits, inferred=inferred, failed=failed,
                 model_version=version)
        return DoneBatch(results, version, infer_ms)


class TopicUnavailable(RuntimeError):
    """The output or DLQ topic cannot be written (missing, not authorised): the worker exits 1 at start."""


class PublishFailing(RuntimeError):
    """Exactly-once: transactions keep aborting for the same records; the worker exits 1 instead of looping."""


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


class Worker:
    """One worker process' state. ``run()`` returns the exit status; ``stop`` ends it gracefully."""

    def __init__(self, settings: WorkerSettings, *, engine: Engine | None = None,
                 stop: threading.Event | None = None, freeze_heap: bool = False):
        self.settings = settings
        self.freeze_heap = freeze_heap
        self.stop = stop or threading.Event()
        self.engine = engine
        self.metrics = WorkerMetrics()
        self.health = Health()
        self.http_port: int | None = None
        self.exit_code = 0
        self.batcher: Batcher[Job] = Batcher(settings.max_batch_size, settings.max_batch_tokens,
                                             settings.max_wait_ms / 1000)
        self.tracker = OffsetTracker()
        self.delivery = delivery.make(settings.delivery, settings.transaction_timeout_ms)
        self._acks: deque = deque()         # (epoch, tp, offset) appended by the producer's I/O thread
        self._send_errors: deque = deque()  # (epoch, tp, offset, exception)
        self._sent = self._acked = 0        # sends made, and acks drained from _acks (main thread only)
        self._sent_at_last_commit = 0       # self._sent when the last commit took its offsets
        self._epoch = 0                     # +1 per aborted transaction: what was in flight before is dropped
        self._partitions: dict[str, int] = {}
        self._next_commit = 0.0
        self._since_commit = 0
        self._next_lag = 0.0
        self._revoking: dict = {}           # offsets handed to the consumer to commit in a revocation
        self._closing = False               # set before the clients close: the listener then does nothing
        self._failure: str | None = None    # why the worker is stopping with exit 1 (logged as worker_failed)
        self._aborting_since: float | None = None  # exactly-once: first abort since the last commit
        self._full_since: float | None = None      # when the queue last reached max_queued_messages
        self._max_text_chars = CHARS_PER_TOKEN * settings.max_length

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> int:
        """The exit status. An error is logged (``worker_failed``) before anything is closed, so the log names
        the first error, not one that cleaning up after it raised."""
        with contextlib.ExitStack() as stack:
            try:
                self._serve(stack)
            except (CheckpointError, delivery.DeliveryUnsupported, ModelBroken, TopicUnavailable,
                    PublishFailing) as exc:
                log.error("worker_failed", error=str(exc)[:1000])  # an operator's problem: one line
                self.exit_code = 1
            except Fenced as exc:
                txn_id = delivery.transactional_id(self.settings.group_id, self.settings.instance_id)
                log.error("worker_failed", error=f"{exc}: a newer producer with this worker's transactional id "
                          f"({txn_id}) took over; each live worker needs its own BERT_STREAM_INSTANCE_ID"[:1000])
                self.exit_code = 1
            except ClientError as exc:  # what the broker or client reports (a topic gone, a request refused)
                log.error("worker_failed", error=str(exc)[:1000])
                self.exit_code = 1
            except Exception:
                log.exception("worker_failed")
                self.exit_code = 1
            else:
                if self._failure is not None:  # stopped on purpose (a publish failure): the same one line
                    log.error("worker_failed", error=self._failure)
            finally:
                self._closing = True  # a consumer's close runs no rebalance listener of ours
        log.info("worker_stopped", exit_code=self.exit_code)
        return self.exit_code

    def _serve(self, stack: contextlib.ExitStack) -> None:
        self._open(stack)  # model loaded and warm before the consumer joins the group
        while not self.stop.is_set():
            self.health.beat()
            records = self._poll()                         # keeps membership, also while a batch infers
            self._route(records)                           # decode: bad -> DLQ now, good -> batcher
            self._submit_ready()                           # -> inference thread: cache, model, cache
            self._publish(self.classifier.completed(self._done_wait()))  # in input order, same key/partition
            self._backpressure()                           # pause partitions while too much is queued
            self._maybe_commit()                           # flush producer, commit the acked prefix
        self._finish()                                     # last batches -> publish -> flush -> commit

    def _open(self, stack: contextlib.ExitStack) -> None:
        s = self.settings
        log.info("worker_starting", **public_view(s))
        if self.engine is None:
            self.engine = Engine.from_settings(s)
        if not self.engine.loaded:
            self.engine.start()
        self.health.model_loaded = True
        if s.http_port >= 0:
            server = OpsServer(self.metrics, self.health, s.http_port).start()
            self.http_port = server.port
            stack.callback(server.close)
        self.cache = ResultCache(s.redis_url, s.cache_prefix, s.cache_ttl_s, s.cache_timeout_ms,
                                 metrics=self.metrics)
        stack.callback(self.cache.close)
        watcher = ModelWatcher(self.engine, s.model_poll_s, s.redis_url, metrics=self.metrics).start()
        stack.callback(watcher.stop)
        self.classifier = Classifier(self.engine, self.cache, self.metrics,
                                     model_failure_retries=s.model_failure_retries)
        stack.callback(self.classifier.close)
        self.health.stalled_for, self.health.stall_after_s = self.classifier.stalled_for, s.inference_stall_s
        producer_options, consumer_options = delivery.client_options(
            s.delivery, s.group_id, s.instance_id, s.transaction_timeout_ms)
        client = adapter(s.kafka_client)
        self.consumer = client.Consumer(s.kafka, s.group_id, **consumer_options)
        new_producer = lambda: client.Producer(s.kafka, **producer_options)  # noqa: E731
        stack.callback(self.consumer.close)
        # the delivery owns the producer: exactly-once registers its transactional id, and replaces it after
        # a transactional call that hangs (worker.delivery.ExactlyOnce)
        self.delivery.start(self.consumer, new_producer)
        self.producer = self.delivery.producer
        # bounded: after _finish everything is flushed; on the way out of an error nothing may hang the exit
        stack.callback(lambda: self.producer.close(PRODUCER_CLOSE_S))
        self._ensure_output_topics()
        if self.freeze_heap:
            # Everything alive now (torch, transformers, the model, the clients) lives until exit: moved out
            # of the collector's generations, it is no longer re-scanned by the collections that the hot
            # path's short-lived objects trigger. 1.17x on the cached stream (bench/ANALYSIS.md). Only for
            # a process of its own (main): in a host process it would pin the host's later garbage too.
            gc.collect()
            gc.freeze()
        self._subscribe()

    def _subscribe(self) -> None:
        """Join the consumer group on the input topic; this worker is the group listener (on_assigned,
        on_revoking, on_revoked)."""
        self.consumer.subscribe(self.settings.input_topic, self)

    def _ensure_output_topics(self) -> None:
        """Create missing output/DLQ topics with the input's partition count (best effort: a cluster that
        forbids it has them created by its operators), then check that both can be written: a worker that
        cannot publish would otherwise find out at its first output, or at its first bad message for the DLQ,
        and fail there on every restart."""
        s = self.settings
        inputs = self.consumer.partitions_for(s.input_topic) or set()  # None while it does not exist
        try:
            ensure_topics(s.kafka, {s.output_topic: max(1, len(inputs)), s.dlq_topic: max(1, len(inputs))})
        except Exception as exc:  # noqa: BLE001
            log.warning("topic_creation_failed", error=str(exc)[:300])
        problems = unwritable(s.kafka, [s.output_topic, s.dlq_topic])
        for role, topic in (("output", s.output_topic), ("dead-letter", s.dlq_topic)):
            if topic in problems:
                raise TopicUnavailable(f"the {role} topic {topic!r} cannot be written: {problems[topic]}")

    # ---- steps ---------------------------------------------------------------------------------------------
    def _poll(self) -> list:
        if self._input_waiting():
            timeout_ms = 0  # work is queued already: the wait, if any, is for the model (_done_wait)
        elif self.classifier.batches_in_flight:
            timeout_ms = BUSY_POLL_MS
        else:
            wait = self.batcher.seconds_until_ready(time.monotonic())
            timeout_ms = IDLE_POLL_MS if wait is None else min(IDLE_POLL_MS, int(wait * 1000) + 1)
        room = self.settings.max_queued_messages - self._queued()
        if room <= 0 and not self.consumer.paused():
            return []  # full, briefly (see _backpressure): the loop waits for the model instead
        return self.consumer.poll(timeout_ms / 1000, max(1, room))

    def _input_waiting(self) -> bool:
        """A full batch (by items or by tokens) is queued for the model: polling can wait, the model cannot.
        (A client that needs longer polls while it joins a group takes them: bert_stream.kafka.python.)"""
        return self.batcher.full

    def _done_wait(self) -> float | None:
        """How long to wait for the model after submitting: while input is queued and the model holds all the
        batches it may, until a batch is done (at most BUSY_POLL_MS), else not at all (the poll waits). The
        main thread then sleeps on whichever side it waits for, never a fixed poll timeout while the other
        side has work: a client that hands over a whole backlog in one poll (librdkafka) otherwise left the
        model idle for a poll timeout per batch."""
        if self.classifier.batches_in_flight and (
                (self._input_waiting() and not self.classifier.has_room()) or self._full_since is not None):
            return BUSY_POLL_MS / 1000
        return None

    def _route(self, records: list) -> None:
        if not records:
            return
        s, now = self.settings, time.monotonic()
        decoded = []
        for record in records:
            self.tracker.track(_tp(record.topic, record.partition), record.offset)
            decoded.append(decode(record, s.input_format, s.max_message_bytes, self._max_text_chars))
        texts = [m.text for m in decoded if not isinstance(m, Rejected)]
        model, epoch, add = self.engine.current, self._epoch, self.batcher.add
        # The cache is asked here, once per poll (one MGET for everything polled), not per batch on the
        # classifier thread: a cached stream then never hands its messages between threads, whose GIL
        # hand-offs around every Redis round trip held the cached worker at ~25k msgs/s.
        lengths = iter(model.token_budget(texts) if texts else ())
        answers = iter(self.cache.lookup(model.version, texts) if texts else ())
        version = model.version
        for message in decoded:  # in input order; a rejected message costs the batch one token, no model
            if isinstance(message, Rejected):
                add(Job(message, now, epoch), 1, now)
            else:
                add(Job(message, now, epoch, next(answers), version), next(lengths), now)

    def _submit_ready(self, flush: bool = False) -> None:
        """Ready batches to the classifier; one the cache answered entirely is published here at once when
        nothing is in flight (its outputs cannot overtake an earlier batch's)."""
        classifier = self.classifier
        while classifier.has_room():
            batch = self.batcher.pop_ready(time.monotonic(), flush=flush)
            if batch is None:
                return
            done = None if classifier.batches_in_flight else classifier.answer(batch)
            if done is None:
                classifier.submit(batch)
            else:
                self._publish([done])

    def _publish(self, done_batches: list[DoneBatch]) -> None:
        for done in done_batches:
            if done.results and done.results[0].job.epoch != self._epoch:
                continue  # classified before an abort: its partitions were rewound and read again
            counts = {"cached": 0, "output": 0}
            encode, topic, send = OutputEncoder(done.version, done.infer_ms), self.settings.output_topic, self._send
            published = time.monotonic() - done.infer_ms / 1000  # one clock read per batch: they go out together
            for r in done.results:
                m = r.job.message
                if isinstance(m, Rejected):
                    self._send_dlq(m)
                    continue
                if r.prediction is None:
                    self._send_dlq(rejected_for_failure(m, r.error))
                    continue
                value = encode(m, r.prediction, r.cached, max(0.0, (published - r.job.received) * 1000))
                if send(topic, m.source, value, m.key, m.headers):
                    counts["cached" if r.cached else "output"] += 1
            for outcome, n in counts.items():  # once per batch: a labelled counter lookup is not free
                if n:
                    self.metrics.messages.labels(outcome, "").inc(n)

    def _send_dlq(self, rejected: Rejected) -> None:
        value, key, headers = dead_letter(rejected, DLQ_MAX_BYTES)
        if not self._send(self.settings.dlq_topic, rejected.source, value, key, headers):
            return
        self.metrics.messages.labels("dlq", rejected.reason).inc()
        log.info("dead_letter", reason=rejected.reason, detail=rejected.detail[:200], topic=rejected.source.topic,
                 partition=rejected.source.partition, offset=rejected.source.offset)

    def _send(self, topic: str, source: Source, value: bytes | None, key: bytes | None, headers) -> bool:
        """Publish to the input's partition number (mod the topic's partitions): per input partition the
        output order is the input order. The ack is what lets the input offset be committed."""
        tp, offset = _tp(source.topic, source.partition), source.offset
        if self._send_errors and self._failed(tp):
            return False  # its commit position is stuck before the failed send: it would only be a duplicate
        partitions = self._partitions.get(topic) or self._partition_count(topic)
        try:
            self.delivery.before_send()  # exactly-once: the first send after a commit begins a transaction
            self.producer.send(topic, source.partition % partitions, value, key, headers,
                               self._delivered, self._epoch, tp, offset)
        except ClientError as exc:
            # refused before it was queued: a transaction in error, a topic the broker re-created with other
            # partitions, a record too large. As a failed delivery: under at-least-once commit what was
            # acknowledged and exit 1; under exactly-once abort and rewind.
            self._send_errors.append((self._epoch, tp, offset, exc))
            return False
        self._since_commit += 1
        self._sent += 1
        return True

    def _delivered(self, epoch: int, tp, offset: int, error: Exception | None) -> None:
        """A send's outcome, on whichever thread the client reports it (deques: thread-safe appends)."""
        if error is not None:
            self._send_errors.append((epoch, tp, offset, error))
        else:
            self._acks.append((epoch, tp, offset))

    def _failed(self, tp) -> bool:
        """A send for this input partition failed: the worker is on its way out (see :meth:`_acknowledged`),
        and the restart re-reads the partition from before the failed offset. Publishing more of it, as the
        shutdown drain would, only adds duplicates (up to ``max_queued_messages`` of them)."""
        return any(failed_tp == tp and epoch == self._epoch for epoch, failed_tp, _offset, _exc in
                   list(self._send_errors))

    def _partition_count(self, topic: str) -> int:
        if topic not in self._partitions:
            self._partitions[topic] = len(self.producer.partitions_for(topic) or {0})
        return self._partitions[topic]

    def _queued(self) -> int:
        return len(self.batcher) + self.classifier.items_in_flight

    def _backpressure(self) -> None:
        """At ``max_queued_messages`` the loop stops taking records: for up to ``PAUSE_AFTER_S`` it does not
        poll at all (at full speed the queue is full between every two batches, and a pause would cost a
        refetch: librdkafka drops what it prefetched for a paused partition); past that (a slow or stuck
        model) every assigned partition is paused and the loop polls again, empty polls that keep the
        member in its group. It resumes at half the limit, so pauses do not come and go with each batch."""
        queued = self._queued()
        self.metrics.queued.set(queued)
        if queued < self.settings.max_queued_messages:
            self._full_since = None
        elif self._full_since is None:
            self._full_since = time.monotonic()
        paused = self.consumer.paused()
        if self._full_since is not None and time.monotonic() - self._full_since >= PAUSE_AFTER_S:
            assigned = self.consumer.assignment()
            if assigned - paused:
                self.consumer.pause(assigned - paused)
                self.metrics.paused.set(1)
        elif paused and queued <= self.settings.max_queued_messages // 2:
            self.consumer.resume(paused)
            self.metrics.paused.set(0)

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        # Exactly-once commits by the interval alone: every commit is a transaction (a flush and three round
        # trips, the loop waiting), and a count would make them as frequent as the stream is fast; there are
        # no duplicates for a count to bound.
        due = now >= self._next_commit or (not self.delivery.transactional
                                           and self._since_commit >= self.settings.commit_every)
        if not force and not due:
            return
        # A producer with lazy_commits commits between forced ones what has been acknowledged so far, without
        # waiting for the rest (bert_stream/kafka/: which, and why). Exactly-once always flushes: a
        # transaction's offsets have to cover every record in it.
        flush = force or self.delivery.transactional or not self.producer.lazy_commits
        self._commit(self._acknowledged(flush=flush))
        if now >= self._next_lag:
            self._next_lag = now + LAG_EVERY_S
            self._update_lag()

    def _acknowledged(self, flush: bool = True) -> dict:
        """The offsets whose outputs (and all before them) the broker acknowledged: after flushing the
        producer (every send acked or failed), or with ``flush=False`` as far as the acks have come. Even then
        it flushes when a send from before the previous commit is still unacknowledged (a broker down or
        slow): what a crash or a lost membership publishes twice stays within two commits' worth, and the
        loop stops feeding a producer that cannot deliver, as a flushing client's does."""
        self._next_commit = time.monotonic() + self.settings.commit_interval_ms / 1000
        self._since_commit = 0
        if not flush:
            self.producer.serve()  # the delivery reports that have arrived
            self._drain_acks()
            flush = self._acked + len(self._send_errors) < self._sent_at_last_commit
        if flush:
            try:
                self.producer.flush(self.delivery.flush_timeout_s)  # all sent are now acked (or failed)
            except FlushTimeout as exc:  # exactly-once only: sends stuck behind a transaction that hangs
                self.delivery.mark_broken()
                self._send_errors.append((self._epoch, None, -1, exc))  # -> _commit aborts (a new producer)
        self._drain_acks()
        self._sent_at_last_commit = self._sent
        return self.tracker.committable()

    def _drain_acks(self) -> None:
        while self._acks:
            epoch, tp, offset = self._acks.popleft()
            self._acked += 1
            if epoch == self._epoch:
                self.tracker.ack(tp, offset)

    def _commit(self, offsets: dict) -> None:
        """Commit ``offsets`` (from :meth:`_acknowledged`) by the delivery mode's rules. A failed send: under
        at-least-once, commit what was acknowledged and exit 1 (a restart re-delivers the rest); under
        exactly-once, abort the transaction and rewind."""
        while self._send_errors and self._send_errors[0][0] != self._epoch:
            self._send_errors.popleft()  # from a transaction already aborted
        if self._send_errors:
            _epoch, tp, offset, exc = self._send_errors[0]
            if self.delivery.transactional:
                self._abort(f"publish failed for {tp} at offset {offset}: {exc}")
                return
            if self._failure is None:
                self._failure = f"publish failed for {tp} at offset {offset}: {type(exc).__name__}: {exc}"[:1000]
                log.error("publish_failed", partition=str(tp), offset=offset, error=str(exc)[:300],
                          action="committing what was acknowledged and exiting; a restart re-delivers the rest")
            self.exit_code = 1
            self.stop.set()
        if not offsets and not self.delivery.pending():
            return
        try:
            self.delivery.commit(offsets)
        except delivery.TransactionFailed as exc:
            self._abort(str(exc))
            return
        except Exception as exc:  # noqa: BLE001
            if self.delivery.transactional:
                raise  # fenced or unauthorised: this producer can never commit again; exit 1
            self.metrics.commits.labels("failed").inc()  # e.g. a rebalance in progress: committed on revocation
            log.warning("commit_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return
        self.tracker.mark_committed(offsets)
        self._aborting_since = None
        self.metrics.commits.labels("ok").inc()
        if self.delivery.transactional:
            self.metrics.transactions.labels("committed").inc()

    def _abort(self, reason: str) -> None:
        """Abort the open transaction (none of its records become visible to read_committed readers) and go
        back to the group's committed offsets. Everything between poll and publish is dropped; batches still
        in the classifier are discarded when they come back (their epoch is over)."""
        now = time.monotonic()
        if self._aborting_since is None:
            self._aborting_since = now
        elif now - self._aborting_since > 2 * self.settings.transaction_timeout_ms / 1000:
            # every transaction since then failed (a topic gone, a record the broker always refuses): replaying
            # them again would loop forever
            raise PublishFailing(f"no transaction committed for {now - self._aborting_since:.0f} s, each "
                                 f"aborted; the last because {reason}"[:1000])
        self.delivery.abort()
        self.producer = self.delivery.producer  # a new one when the old one could not abort
        self.metrics.transactions.labels("aborted").inc()
        self._epoch += 1
        dropped = self.batcher.drop(lambda job: True)
        self.tracker.revoke(self.tracker.partitions())
        self._acks.clear()
        self._sent = self._acked = self._sent_at_last_commit = 0  # the old epoch's outcomes are dropped
        self._send_errors.clear()
        owned = self.consumer.assignment()
        self.consumer.rewind(owned)  # only marks them: also allowed inside a rebalance
        log.warning("transaction_aborted", reason=reason[:300], dropped=len(dropped),
                    partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in owned),
                    action="rewinding to the committed offsets")

    def _update_lag(self) -> None:
        """``bert_stream_consumer_lag`` per assigned partition: end offset minus the group's committed offset
        (ours; else an earlier owner's, one OffsetFetch; else the log start), i.e. what a restart would
        still have to process. Not the fetch position: fetched but unpublished messages are not done."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            marks = self.consumer.watermarks(assigned)
            committed = {tp: self.tracker.committed(tp) for tp in marks}
            unknown = [tp for tp, offset in committed.items() if offset is None]
            if unknown:
                committed.update(self.consumer.committed(unknown))
        except Exception as exc:  # noqa: BLE001 - only a gauge
            log.debug("lag_unavailable", error=str(exc))
            return
        for tp, (start, end) in marks.items():
            done = committed.get(tp)
            done = start if done is None else done  # a restart begins at the log start (earliest)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - done))

    # ---- rebalance (this worker is the consumer's GroupListener) and shutdown -----------------------------
    def on_assigned(self, partitions: set) -> None:
        """Partitions assigned (all of them, or the ones added: cooperative protocols; the log line names
        what is owned now). Each starts at the group's committed offset; the adapter sees to it."""
        if self._closing:
            return
        owned = self.consumer.assignment()
        self.health.assigned = len(owned)
        self.metrics.rebalances.labels("assigned").inc()
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in owned),
                 added=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))

    def on_revoking(self, partitions: set, lost: bool) -> dict:
        """Before partitions go: publish what the model holds, then commit it. Under exactly-once the
        transaction commits here (on the producer's side: allowed inside a rebalance), and a member the group
        already dropped (``lost``: no valid generation to fence its offsets with) aborts instead, so nothing
        more of those partitions commits. Under at-least-once the offsets are returned for the consumer to
        commit. A model that does not finish within ``inference_stall_s`` ends the worker (the partitions'
        next owner re-reads what was not committed)."""
        self._revoking = {}
        if self._closing or not partitions:
            return {}
        if lost and self.delivery.transactional:
            self._abort("the group dropped this member: nothing more of its partitions may commit")
            return {}
        self._publish(self.classifier.drain(self.settings.inference_stall_s))
        offsets = self._acknowledged()
        if self.delivery.transactional:
            self._commit(offsets)
            return {}
        self._revoking = offsets
        return offsets

    def on_revoked(self, partitions: set, commit_error: Exception | None) -> None:
        """Drop what was not started for the revoked partitions: whoever owns them next (this worker too)
        reads it again from the committed offset."""
        if self._closing:
            return
        offsets, self._revoking = self._revoking, {}
        if commit_error is not None:  # membership already lost: the next owner re-reads from the last commit
            self.metrics.commits.labels("failed").inc()
            log.warning("revocation_commit_failed", error=str(commit_error)[:300])
        elif offsets:
            self.tracker.mark_committed(offsets)
            self.metrics.commits.labels("ok").inc()
        if not partitions:
            return
        dropped = self.batcher.drop(lambda job: _tp(job.message.source.topic, job.message.source.partition)
                                    in partitions)
        self.tracker.revoke(partitions)
        self.health.assigned = len(self.consumer.assignment() - partitions)
        self.metrics.rebalances.labels("revoked").inc()
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions),
                 dropped=len(dropped))

    def _finish(self) -> None:
        """Publish what is held, within ``shutdown_timeout_s``; then commit what was acknowledged. What did not
        finish in time is handed back: not committed, so the partitions' next owner reads it again."""
        log.info("worker_draining", queued=self._queued())
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while len(self.batcher) or self.classifier.batches_in_flight:
            if time.monotonic() > deadline:
                log.warning("shutdown_timeout", handed_back=self._queued(),
                            timeout_s=self.settings.shutdown_timeout_s,
                            action="committing what was published; the rest is read again by the next owner")
                break
            self._submit_ready(flush=True)
            self._publish(self.classifier.completed(timeout=0.5))
        self._maybe_commit(force=True)


@functools.lru_cache(maxsize=65_536)
def _tp(topic: str, partition: int) -> TopicPartition:
    """The TopicPartition of a partition, made once: building the named tuple cost ~3 us, twice per message
    (track at poll, ack at publish), a tenth of a cached worker's time."""
    return TopicPartition(topic, partition)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(WorkerSettings, argv, prog="python -m worker.run", description=__doc__.split("\n")[0])
    configure_logging(settings.log_level)
    if settings.processes > 1:
        from worker import processes

        return processes.supervise(settings, list(sys.argv[1:] if argv is None else argv))
    if os.environ.get("BERT_STREAM_PROCESS_INDEX"):  # one of several (worker.processes): which, on every line
        bind_process(process=int(os.environ["BERT_STREAM_PROCESS_INDEX"]))
    worker = Worker(settings, freeze_heap=True)

    def on_signal(signum, _frame):
        if worker.stop.is_set():
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name, action="finishing the batch, then exit")
        worker.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return worker.run()  # logs its own failure (worker_failed) and returns 1
    except Exception:  # closing the clients failed after that: logged as what it is, status 1
        log.exception("worker_cleanup_failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
