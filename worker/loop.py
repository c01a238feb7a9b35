"""The worker loop: consume Chinese messages, micro-batch them through the model, publish labels.

The pipeline: poll -> decode -> cache lookup -> batch -> infer -> cache store -> publish -> commit.
Each step is a call into its owner: :mod:`worker.messages` (decode, records), :mod:`worker.batcher`,
:mod:`worker.cache`, :mod:`worker.classifier` (the inference thread, around :mod:`worker.engine`),
:mod:`worker.offsets`, :mod:`worker.delivery` (commits, transactions), :mod:`worker.rebalance` (partition
hand-over), :mod:`bert_stream.kafka` (clients).

The path around the model (what a GPU waits on)
    The cache is asked on the main thread, once per poll, and a batch it answered entirely is published
    there too when nothing is in flight: a cached message never changes threads. Only batches with work for
    the model go to the classifier thread, which also remembers its recent results for the repeats that were
    polled while their twin was being classified. ``bench/ceiling.py`` measures this path with every message
    a cache hit.

How inference never starves group membership
    The consumer lives on the main thread; inference runs in the background (:class:`Classifier`), handed
    at most ``MAX_IN_FLIGHT_BATCHES`` batches. The main loop keeps polling while a batch infers, so the gap between polls is a few
    milliseconds whatever the model costs. When ``max_queued_messages`` are between poll and publish the
    loop takes no more; if that lasts (a slow model), every assigned partition is paused and the polls go
    on, returning nothing but counting as polls, so memory stays bounded and the member stays in the group
    (:meth:`Worker._backpressure`). The alternative (one thread, batches small enough that a poll always
    comes in time) ties membership to hardware speed: a slow CPU, a cold GPU or a
    swapped-in larger model could exceed ``max.poll.interval.ms``. Here a slow batch only slows throughput.
    Tested by ``tests/worker/test_run.py::test_slow_batches_do_not_get_the_worker_evicted``.

Delivery guarantee: at-least-once (default) or exactly-once (:mod:`worker.delivery`)
    An input offset is committed only after the output (or DLQ) records of it and of every earlier message
    of its partition are acknowledged by the broker (``acks=all``): commit = flush the producer, take the
    acknowledged prefix (:class:`worker.offsets.OffsetTracker`), commit it. Commits happen every
    ``commit_interval_ms`` (at-least-once also every ``commit_every`` messages), on partition revocation
    (after the in-flight batches are published) and on shutdown. A crash at any point loses nothing;
    at-least-once publishes again what was published after the last commit, exactly-once puts the outputs and the offsets of one
    commit in one transaction, and a transaction that fails is aborted and the partitions rewound to the
    committed offsets (``_abort``). Outputs keep the input's key and go to the same partition number, so per
    input partition the output order is the input order and a replay is recognisable by ``source.offset``.
    The Redis cache stays outside any transaction (it is keyed by content, not by offset).

Shutdown: ``stop`` set (by a signal, :mod:`worker.run`), the loop stops polling, finishes and publishes what it
holds within ``shutdown_timeout_s``, flushes, commits, closes the clients and returns 0.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import deque

import numpy as np

from bert_stream.checkpoint import CheckpointError
from bert_stream.kafka import adapter, ensure_topics, make_producer, unwritable
from bert_stream.kafka.interface import ClientError, Fenced, FlushTimeout, topic_partition
from bert_stream.logs import get_logger
from bert_stream.settings import public_view
from worker import delivery
from worker.batcher import Batcher
from worker.cache import ResultCache
from worker.classifier import Classifier, DoneBatch, Job, ModelBroken
from worker.engine import Engine, ModelWatcher
from worker.messages import CHARS_PER_TOKEN, OutputEncoder, Rejected, Source, dead_letter, decode, rejected_for_failure
from worker.metrics import Health, OpsServer, WorkerMetrics
from worker.offsets import OffsetTracker
from worker.rebalance import Rebalancing
from worker.review import ReviewRouter, review_value
from worker.settings import WorkerSettings
from worker.shadow import Shadow

log = get_logger("worker.loop")

BUSY_POLL_MS = 5            # poll timeout while batches are in flight: how soon their outputs are published
IDLE_POLL_MS = 200          # poll timeout with nothing to do (also the shutdown reaction time)
LAG_EVERY_S = 10.0          # end-offset requests for the lag gauge (one round trip)
DLQ_MAX_BYTES = 900_000     # a dead letter's value, key and headers together: under the 1 MB request limit
PAUSE_AFTER_S = 1.0          # a queue full this long pauses the partitions (_backpressure)
PRODUCER_CLOSE_S = 10.0     # the producer's close at exit: what is not sent by then is re-delivered anyway


class TopicUnavailable(RuntimeError):
    """The output or DLQ topic cannot be written (missing, not authorised): the worker exits 1 at start."""


class PublishFailing(RuntimeError):
    """Exactly-once: transactions keep aborting for the same records; the worker exits 1 instead of looping."""


class Worker(Rebalancing):
    """One worker process' state. ``run()`` returns the exit status; ``stop`` ends it gracefully."""

    def __init__(self, settings: WorkerSettings, *, engine: Engine | None = None,
                 stop: threading.Event | None = None, freeze_heap: bool = False):
        self.settings = settings
        self.freeze_heap = freeze_heap
        self.stop = stop or threading.Event()
        self.engine = engine
        self.metrics = WorkerMetrics(settings.quality_window)
        self.health = Health()
        self.metrics.ready.set_function(lambda: float(self.health.ready()[0]))
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
        self.review: ReviewRouter | None = None  # the feedback loop's two taps (_open): reviews and shadow
        self.shadow: Shadow | None = None

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
        if s.review_topic:
            self.review = ReviewRouter(s.review_score_below, s.review_margin_below, s.review_sample_rate)
        if s.shadow_sample_rate > 0:
            shadow_producer = make_producer(s.kafka) if s.shadow_topic else None
            self.shadow = Shadow(self.engine, s.shadow_sample_rate, s.shadow_max_share, s.model_poll_s,
                                 self.metrics.registry, producer=shadow_producer, topic=s.shadow_topic).start()
            stack.callback(self.shadow.stop)
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
            # path's short-lived objects trigger. Only for a process of its own (main): in a host process it
            # would pin the host's later garbage too.
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
        roles = {"output": s.output_topic, "dead-letter": s.dlq_topic, "review": s.review_topic,
                 "shadow": s.shadow_topic if s.shadow_sample_rate else None}
        roles = {role: topic for role, topic in roles.items() if topic}
        try:
            ensure_topics(s.kafka, {topic: max(1, len(inputs)) for topic in roles.values()})
        except Exception as exc:  # noqa: BLE001
            log.warning("topic_creation_failed", error=str(exc)[:300])
        problems = unwritable(s.kafka, list(roles.values()))
        for role, topic in roles.items():
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
            self.tracker.track(topic_partition(record.topic, record.partition), record.offset)
            decoded.append(decode(record, s.input_format, s.max_message_bytes, self._max_text_chars))
        texts = [m.text for m in decoded if not isinstance(m, Rejected)]
        # acquire, not current: a version waiting to serve starts here too, or a stream the cache answers
        # entirely (never reaching the classifier's acquire) would be answered by the old version for good
        model, epoch, add = self.engine.acquire(), self._epoch, self.batcher.add
        # The cache is asked here, once per poll (one MGET for everything polled), not per batch on the
        # classifier thread: a cached stream then never hands its messages between threads, and no GIL
        # hand-off waits on a Redis round trip.
        lengths = iter(model.token_budget(texts) if texts else ())
        answers = iter(self.cache.lookup(model.version, texts) if texts else ())
        version = model.version
        stamps = [(getattr(r, "timestamp", None) or 0) / 1000 for r in records]
        for message, created in zip(decoded, stamps):  # in input order; a rejected one costs one token, no model
            if isinstance(message, Rejected):
                add(Job(message, now, epoch, created=created), 1, now)
            else:
                add(Job(message, now, epoch, next(answers), version, created), next(lengths), now)

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
            created, outputs, review = [], [], self.review
            if review is not None:
                review.use(done.version, self.engine.current)
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
                    created.append(r.job.created)
                    outputs.append((m, r.prediction))
                    if review is not None and not r.cached:
                        reason = review.reason(r.prediction)
                        if reason is not None:
                            self._send_review(m, r.prediction, reason, done.version)
            if self.shadow is not None and outputs:
                self.shadow.offer(outputs)
            for outcome, n in counts.items():  # once per batch: a labelled counter lookup is not free
                if n:
                    self.metrics.messages.labels(outcome, "").inc(n)
            if created:
                stamps = np.asarray(created)
                self.metrics.end_to_end.observe(np.maximum(time.time() - stamps[stamps > 0], 0.0))

    def _send_dlq(self, rejected: Rejected) -> None:
        value, key, headers = dead_letter(rejected, DLQ_MAX_BYTES)
        if not self._send(self.settings.dlq_topic, rejected.source, value, key, headers):
            return
        self.metrics.messages.labels("dlq", rejected.reason).inc()
        log.info("dead_letter", reason=rejected.reason, detail=rejected.detail[:200], topic=rejected.source.topic,
                 partition=rejected.source.partition, offset=rejected.source.offset)

    def _send_review(self, message, prediction, reason: str, version: str) -> None:
        """A review record beside the output (worker/review.py). Its ack does not gate the input's commit
        (the output's does): under exactly-once it is in the same transaction as the output; under
        at-least-once a review that fails is counted and logged, and the worker goes on."""
        topic = self.settings.review_topic
        partitions = self._partitions.get(topic) or self._partition_count(topic)
        try:
            self.delivery.before_send()
            self.producer.send(topic, message.source.partition % partitions,
                               review_value(message, prediction, reason, version), message.key, [],
                               self._review_delivered, reason)
        except ClientError as exc:
            self._review_delivered(reason, exc)

    def _review_delivered(self, reason: str, error: Exception | None) -> None:
        if error is None:
            self.metrics.reviews.labels(reason).inc()
            return
        self.metrics.reviews.labels("failed").inc()
        log.warning("review_failed", error=f"{type(error).__name__}: {error}"[:300])

    def _send(self, topic: str, source: Source, value: bytes | None, key: bytes | None, headers) -> bool:
        """Publish to the input's partition number (mod the topic's partitions): per input partition the
        output order is the input order. The ack is what lets the input offset be committed."""
        tp, offset = topic_partition(source.topic, source.partition), source.offset
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
            timeout_s = self.delivery.flush_timeout_s
            if self._failure is not None:  # on the way out: what is not acked by now is read again anyway
                timeout_s = min(timeout_s, PRODUCER_CLOSE_S)
            try:
                self.producer.flush(timeout_s)  # all sent are now acked (or failed)
            except FlushTimeout as exc:  # sends stuck behind a transaction that hangs, or never reported
                self.delivery.mark_broken()
                # -> _commit: exactly-once aborts (a new producer), at-least-once commits the acked and exits 1
                self._send_errors.append((self._epoch, None, -1, FlushTimeout(
                    f"the producer did not deliver within {timeout_s:.0f} s: {exc}")))
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
            where = f" for {tp} at offset {offset}" if tp is not None else ""
            if self.delivery.transactional:
                self._abort(f"publish failed{where}: {exc}")
                return
            if self._failure is None:
                self._failure = f"publish failed{where}: {type(exc).__name__}: {exc}"[:1000]
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

    # ---- shutdown ----------------------------------------------------------------------------------------
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
