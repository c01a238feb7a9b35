"""Operations: Prometheus metrics, and one small HTTP server for /metrics, /healthz and /readyz.

- ``/metrics``: the worker's own registry (several workers in one test process do not collide).
- ``/healthz``: 200 while the main loop is alive (an iteration within ``stale_after_s``). A loop stuck in
  a call that never returns fails it, and Kubernetes restarts the pod; an idle loop still iterates.
- ``/readyz``: 200 once the model is loaded and the group has assigned this worker partitions.

The metric names mirror the per-batch log line (size, tokens, queue_ms, infer_ms, cache hits).
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bert_stream.logs import get_logger
from worker.quality import WINDOW, BatchHistogram, QualityMonitor

log = get_logger("worker.metrics")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_END_TO_END_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkerMetrics:
    def __init__(self, quality_window: int = WINDOW) -> None:
        self.registry = r = CollectorRegistry()
        # model quality and drift per version (worker/quality.py); None when turned off
        self.quality = QualityMonitor(quality_window) if quality_window else None
        if self.quality is not None:
            r.register(self.quality)
        # observed once per published batch (worker/loop.py), not per message
        self.end_to_end = BatchHistogram("bert_stream_end_to_end_seconds", "From the input record's timestamp "
                                         "(the producer's clock) to its output's send (the worker's).",
                                         _END_TO_END_BUCKETS)
        r.register(self.end_to_end)
        self.messages = Counter("bert_stream_messages", "Input messages by outcome: output, cached (output "
                                "served from Redis), dlq (with reason).", ["outcome", "reason"], registry=r)
        self.batch_size = Histogram("bert_stream_batch_size", "Messages per batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("bert_stream_batch_padded_tokens", "Padded tokens per batch (items x longest).",
                                      buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768), registry=r)
        self.queue_seconds = Histogram("bert_stream_queue_seconds", "Time from poll to the start of inference.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.infer_seconds = Histogram("bert_stream_inference_seconds", "Model time per batch (uncached items).",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.cache_lookups = Counter("bert_stream_cache_lookups", "Cache lookups by outcome: hit, miss, "
                                     "unavailable (Redis down or slow; the model ran), recent (a miss answered by "
                                     "the worker's own recent results: a repeat polled while its twin was being "
                                     "classified).", ["outcome"], registry=r)
        self.cache_outages = Counter("bert_stream_cache_outages", "Times Redis went from up to down.", registry=r)
        self.cache_up = Gauge("bert_stream_cache_up", "1 while the cache answers, 0 while it is skipped.", registry=r)
        self.cache_up.set(1)
        self.queued = Gauge("bert_stream_queued_messages", "Messages between poll and publish.", registry=r)
        self.paused = Gauge("bert_stream_partitions_paused", "1 while input partitions are paused (backpressure).",
                            registry=r)
        self.lag = Gauge("bert_stream_consumer_lag", "End offset minus the group's committed offset (the log "
                         "start where nothing is committed), per input partition: what is still to process. "
                         "KEDA scales on it. (Tansu, the no-JVM test broker, reports end offsets wrong.)",
                         ["topic", "partition"], registry=r)
        self.commits = Counter("bert_stream_commits", "Offset commits by result.", ["result"], registry=r)
        self.transactions = Counter("bert_stream_transactions", "exactly-once: transactions committed or "
                                    "aborted (an abort rewinds to the committed offsets).", ["result"], registry=r)
        self.rebalances = Counter("bert_stream_rebalances", "Partition assignments and revocations (lost ones too).",
                                  ["event"], registry=r)
        self.model_info = Gauge("bert_stream_model_info", "The model version being served (value 1), with its "
                                "labels (comma-separated, cut at 200 characters).",
                                ["version", "dtype", "device", "backend", "labels"], registry=r)
        self.model_swaps = Counter("bert_stream_model_swaps", "Hot reloads: swapped in, or refused.", ["result"],
                                   registry=r)
        self.ready = Gauge("bert_stream_ready", "1 while /readyz answers 200 (a model loaded and partitions "
                           "assigned).", registry=r)
        self.reviews = Counter("bert_stream_reviews", "Outputs also sent to the review topic, by reason "
                               "(uncertain, sampled), and review sends that failed.", ["reason"], registry=r)
        # every known outcome exported from the start, at 0: an alert on increase() then sees the first one
        for result in ("swapped", "refused"):
            self.model_swaps.labels(result)
        for result in ("committed", "aborted"):
            self.transactions.labels(result)

    def set_model(self, model) -> None:
        """A model version starts serving: its info series, and its quality series (bounded: the previous
        version's stay until the next swap, so both sides of this one can be compared)."""
        labels = [str(label) for label in getattr(model, "labels", ())]
        self.model_info.clear()
        self.model_info.labels(model.version, str(model.dtype).removeprefix("torch."), str(model.device),
                               str(getattr(model, "backend", "")), ",".join(labels)[:200]).set(1)
        if self.quality is not None:
            self.quality.set_model(model.version, labels, getattr(model, "reference", None))


class Health:
    """What /healthz and /readyz report; updated by the main loop."""

    def __init__(self, stale_after_s: float = 60.0):
        self.stale_after_s = stale_after_s
        self.stall_after_s = float("inf")
        self.stalled_for: Callable[[], float] = lambda: 0.0  # how long the model has held its batch
        self.last_iteration = time.monotonic()
        self.model_loaded = False
        self.assigned = 0

    def beat(self) -> None:
        self.last_iteration = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        """Dead when the main loop stopped iterating, or when one batch has been in the model longer than
        ``stall_after_s`` (a hung device or inference thread: the loop still polls, the partitions stay
        paused, nothing is published)."""
        age = time.monotonic() - self.last_iteration
        stalled = self.stalled_for()
        if stalled > self.stall_after_s:
            return False, f"one batch has been in the model for {stalled:.1f} s (> {self.stall_after_s:g} s)"
        return age < self.stale_after_s, f"last loop iteration {age:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        if not self.model_loaded:
            return False, "model not loaded"
        if not self.assigned:
            return False, "no partitions assigned"
        return True, f"model loaded, {self.assigned} partitions assigned"


class OpsServer:
    """One small threaded HTTP server; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(self, metrics: WorkerMetrics, health: Health, port: int, host: str = "0.0.0.0"):
        handler = _handler(metrics, health)
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("http_listening", port=self.port, paths=["/metrics", "/healthz", "/readyz"])
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: WorkerMetrics, health: Health):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, why = health.alive() if path == "/healthz" else health.ready()
                self._send(200 if ok else 503, (("ok: " if ok else "not ok: ") + why + "\n").encode())
            else:
                self._send(404, b"not found: try /metrics, /healthz, /readyz\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: not worth a log line each
            pass

    return Handler
