"""The worker's settings: one frozen object from flags and environment variables.

Every setting can be given as ``--flag`` or as the environment variable named beside it (the Kubernetes
ConfigMap sets the variables). Each help text states the trade-off the setting controls.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re

from bert_stream.kafka import CLIENTS, KafkaSettings
from bert_stream.settings import require, setting
from worker.delivery import DELIVERY_MODES

INPUT_FORMATS = ("auto", "text", "json")
BACKENDS = ("auto", "packed", "padded")  # how worker.engine runs a batch


def _backend(value: str) -> str:
    if value.strip().lower() == "standin":
        raise argparse.ArgumentTypeError("standin is the benchmarks' stand-in for a GPU forward pass, not a "
                                         "model; it runs only under python -m bench.standin")
    return value
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")  # what brokers accept (Kafka's Topic.validate)
DEVICES_HELP = "auto (cuda:0 when a GPU is present, else cpu), cpu, cuda, or cuda:N (one process per GPU)"


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)

    # ---- topics and group ---------------------------------------------------------------------------------
    input_topic: str = setting("bert-stream.input", env="BERT_STREAM_INPUT_TOPIC",
                               help="Topic of messages to classify.")
    output_topic: str = setting("bert-stream.output", env="BERT_STREAM_OUTPUT_TOPIC",
                                help="Topic the labels are published to, keyed like the input.")
    dlq_topic: str = setting("bert-stream.dlq", env="BERT_STREAM_DLQ_TOPIC",
                             help="Dead-letter topic for messages that cannot be classified, with the reason.")
    group_id: str = setting("bert-stream-worker", env="BERT_STREAM_GROUP_ID",
                            help="Consumer group; workers in one group share the input partitions.")
    input_format: str = setting("auto", env="BERT_STREAM_INPUT_FORMAT", choices=INPUT_FORMATS,
                                help="auto: a value that starts with '{' is JSON {id, text, ...}, else plain "
                                     "UTF-8 text; json/text force one (json sends non-JSON to the DLQ).")
    max_message_bytes: int = setting(65_536, env="BERT_STREAM_MAX_MESSAGE_BYTES",
                                     help="Larger values go to the DLQ (too_large) instead of the model.")

    # ---- model ----------------------------------------------------------------------------------------------
    model_dir: str = setting("checkpoints", env="BERT_STREAM_MODEL_DIR",
                             help="Checkpoint store (follows its LATEST) or one model folder.")
    device: str = setting("auto", env="BERT_STREAM_DEVICE", help=DEVICES_HELP + ".")
    dtype: str = setting("auto", env="BERT_STREAM_DTYPE", choices=("auto", "bf16", "fp32"),
                         help="auto: bf16 on CUDA, and on CPUs with AMX/AVX512-BF16 where a startup probe "
                              "measures bf16 faster than fp32 (2-4x on some; labels agree with fp32 on "
                              ">99.5% of messages); fp32 elsewhere.")
    backend: str = setting("auto", env="BERT_STREAM_BACKEND", choices=BACKENDS, parse=_backend,
                           help="How a batch runs through the model. packed: padding-free (linear layers on "
                                "the real tokens only, attention per group of similar-length messages; "
                                "1.6x padded on a mixed title/review stream on CPU, labels as padded's); "
                                "padded: the transformers forward on length-sorted chunks. auto: packed on "
                                "the CPU for BERT classifiers, padded on CUDA and for other models.")
    max_length: int = setting(128, env="BERT_STREAM_MAX_LENGTH",
                              help="Tokens per message; longer texts are truncated and marked truncated=true.")
    torch_threads: int = setting(0, env="BERT_STREAM_TORCH_THREADS",
                                 help="CPU threads for inference; 0 keeps torch's default (all cores).")
    allow_label_change: bool = setting(False, env="BERT_STREAM_ALLOW_LABEL_CHANGE",
                                       help="Serve a new version whose labels differ from the served one's "
                                            "(names or order). Off: such a version is refused and logged, "
                                            "since label_id and label would change meaning for consumers.")
    model_failure_retries: int = setting(3, env="BERT_STREAM_MODEL_FAILURE_RETRIES",
                                         help="A batch whose every message fails while a known-good probe "
                                              "text fails too means a broken model (CUDA error, out of "
                                              "memory), not bad input: it is retried this many times with "
                                              "backoff, then the worker exits 1 with nothing of it committed.")
    inference_stall_s: float = setting(120.0, env="BERT_STREAM_INFERENCE_STALL_S",
                                       help="/healthz fails once one batch has been in the model this long (a "
                                            "hung device or thread): the pod is restarted, the batch "
                                            "re-read. Must exceed the slowest real batch, a model swap "
                                            "included.")
    model_poll_s: float = setting(5.0, env="BERT_STREAM_MODEL_POLL_S",
                                  help="How often LATEST is checked for a new version (the Redis announcement "
                                       "makes it immediate); 0 disables hot reload.")

    # ---- micro-batching -------------------------------------------------------------------------------------
    max_batch_size: int = setting(64, env="BERT_STREAM_MAX_BATCH_SIZE",
                                  help="Items per batch: larger amortises per-batch overhead, raises latency.")
    max_batch_tokens: int = setting(8192, env="BERT_STREAM_MAX_BATCH_TOKENS",
                                    help="Padded tokens per batch: bounds a batch's memory and inference time.")
    max_wait_ms: float = setting(20.0, env="BERT_STREAM_MAX_WAIT_MS",
                                 help="Longest a message waits for its batch to fill: the latency floor "
                                      "under light load.")
    max_queued_messages: int = setting(1024, env="BERT_STREAM_MAX_QUEUED_MESSAGES",
                                       help="Messages held between poll and publish (bounded memory): at it the "
                                            "worker stops taking records, and pauses its partitions if it stays "
                                            "full for a second (a slow model); they resume at half of it.")
    top_k: int = setting(3, env="BERT_STREAM_TOP_K", help="Probabilities of the k best labels in each output.")

    # ---- cache ----------------------------------------------------------------------------------------------
    redis_url: str | None = setting(None, env="REDIS_URL",
                                    help="Redis for the result cache (redis://, rediss:// for TLS, "
                                         "redis://:password@host); unset disables the cache.")
    cache_prefix: str = setting("bert-stream:cache:", env="BERT_STREAM_CACHE_PREFIX",
                                help="Key prefix, so several deployments can share one Redis.")
    cache_ttl_s: int = setting(86_400, env="BERT_STREAM_CACHE_TTL_S",
                               help="Lifetime of a cached result: longer saves more inference, uses more memory.")
    cache_timeout_ms: int = setting(100, env="BERT_STREAM_CACHE_TIMEOUT_MS",
                                    help="A slower Redis is treated as down for the batch (the model runs).")

    kafka_client: str = setting("kafka-python", env="BERT_STREAM_KAFKA_CLIENT", choices=CLIENTS,
                                help="The worker's Kafka client; both do everything (both delivery modes). kafka-python: "
                                     "the default. confluent-kafka (librdkafka; pip install "
                                     "'bert-stream[confluent]'): consumes and produces for a fraction of the CPU "
                                     "(for a GPU worker that the path around the model holds back), and speaks "
                                     "the KIP-848 group protocol (KAFKA_GROUP_PROTOCOL=consumer).")

    # ---- delivery and commits -------------------------------------------------------------------------------
    delivery: str = setting("at-least-once", env="BERT_STREAM_DELIVERY", choices=DELIVERY_MODES,
                            help="at-least-once: a crash may publish the last commit interval's outputs again. "
                                 "exactly-once: outputs, dead letters and offsets in one Kafka transaction per "
                                 "commit; read_committed consumers see each input once, and see it only when "
                                 "its transaction commits (latency + up to commit_interval_ms). Needs a broker "
                                 "with transactions (Apache Kafka 2.5+).")
    commit_interval_ms: int = setting(1000, env="BERT_STREAM_COMMIT_INTERVAL_MS",
                                      help="Commit published offsets at least this often: shorter shrinks "
                                           "the re-delivery window after a crash (at-least-once) or the wait "
                                           "of read_committed readers (exactly-once), costs a round trip or "
                                           "a transaction each time.")
    commit_every: int = setting(1000, env="BERT_STREAM_COMMIT_EVERY",
                                help="at-least-once: also commit after this many messages are published (bounds "
                                     "what a crash publishes twice). Exactly-once commits by the interval "
                                     "alone: each commit is a transaction.")
    instance_id: str | None = setting(None, env="BERT_STREAM_INSTANCE_ID",
                                      help="exactly-once: this worker's part of its transactional id "
                                           "(<group_id>-<instance_id>); default <hostname>-<pid>. A stable "
                                           "name (a StatefulSet pod's) lets a restarted worker abort its "
                                           "predecessor's open transaction at once; two live workers must "
                                           "never share one.")
    transaction_timeout_ms: int = setting(30_000, env="BERT_STREAM_TRANSACTION_TIMEOUT_MS",
                                          help="exactly-once: the broker aborts a crashed worker's open "
                                               "transaction after this long; until then read_committed "
                                               "readers of its partitions wait. Must exceed the longest "
                                               "transaction (a commit interval plus a drain).")

    # ---- operations -----------------------------------------------------------------------------------------
    processes: int = setting(1, env="BERT_STREAM_PROCESSES",
                             help="Worker processes to run, one consumer group member each, sharing the device: "
                                  "more than one where a single process cannot keep a GPU busy (ops ports "
                                  "http_port, +1, ...; worker/processes.py).")
    http_port: int = setting(8000, env="BERT_STREAM_HTTP_PORT",
                             help="Port of /metrics, /healthz and /readyz; 0 picks a free port, -1 disables.")
    quality_window: int = setting(2000, env="BERT_STREAM_QUALITY_WINDOW",
                                  help="Outputs the label-drift and low-confidence gauges look back over "
                                       "(worker/quality.py): longer is steadier and slower to react; 0 turns "
                                       "the model-quality metrics off.")
    # ---- the feedback loop (worker/review.py, worker/shadow.py) ---------------------------------------------
    review_topic: str | None = setting(None, env="BERT_STREAM_REVIEW_TOPIC",
                                       help="Send uncertain and sampled outputs (with their text) here for people "
                                            "to label; unset: no reviews.")
    review_score_below: float | None = setting(None, env="BERT_STREAM_REVIEW_SCORE_BELOW",
                                               help="A top score below this is uncertain; unset: the serving "
                                                    "version's validation p10 (its quality.json), else 0.5.")
    review_margin_below: float = setting(0.0, env="BERT_STREAM_REVIEW_MARGIN_BELOW",
                                         help="A top-1 minus top-2 score below this is uncertain too; 0: off.")
    review_sample_rate: float = setting(0.01, env="BERT_STREAM_REVIEW_SAMPLE_RATE",
                                        help="Share of model outputs also sent for review at random (an unbiased "
                                             "sample of the stream); 0: only the uncertain ones.")
    shadow_sample_rate: float = setting(0.0, env="BERT_STREAM_SHADOW_SAMPLE_RATE",
                                        help="Share of outputs the CANDIDATE version (trainer.run --stage "
                                             "candidate) also classifies, off the critical path, for the agreement "
                                             "metrics; 0: no shadow.")
    shadow_max_share: float = setting(0.2, env="BERT_STREAM_SHADOW_MAX_SHARE",
                                      help="The most of its wall time the shadow thread may compute; samples that "
                                           "find it busy are dropped (counted), never queued without bound.")
    shadow_topic: str | None = setting(None, env="BERT_STREAM_SHADOW_TOPIC",
                                       help="Also publish the candidate's predictions here (best effort, outside "
                                            "any transaction); unset: metrics only.")
    shutdown_timeout_s: float = setting(25.0, env="BERT_STREAM_SHUTDOWN_TIMEOUT_S",
                                        help="After SIGTERM: how long the worker may finish what it holds "
                                             "before committing what is published and exiting; what is left "
                                             "is handed back (re-read by the partitions' next owner). Keep it "
                                             "under the pod's terminationGracePeriodSeconds minus ~15 s.")
    log_level: str = setting("INFO", env="LOG_LEVEL", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                             parse=str.upper,
                             help="Log level; DEBUG also shows the Kafka client's own logs.")

    def __post_init__(self) -> None:
        require(self.max_batch_size >= 1, "max_batch_size must be at least 1")
        require(self.quality_window >= 0, "quality_window must not be negative")
        for name in ("review_sample_rate", "shadow_sample_rate", "review_margin_below"):
            require(0 <= getattr(self, name) <= 1, f"{name} must be between 0 and 1")
        require(self.review_score_below is None or 0 <= self.review_score_below <= 1,
                "review_score_below must be between 0 and 1")
        require(0 < self.shadow_max_share <= 1, "shadow_max_share must be above 0 and at most 1")
        require(self.max_length >= 8, "max_length must be at least 8")
        require(self.max_batch_tokens >= self.max_length,
                "max_batch_tokens must be at least max_length (one full-length message must fit)")
        require(self.max_wait_ms >= 0, "max_wait_ms must not be negative")
        require(self.max_queued_messages >= self.max_batch_size,
                "max_queued_messages must be at least max_batch_size")
        require(self.max_message_bytes >= 16, "max_message_bytes must be at least 16")
        require(self.top_k >= 1, "top_k must be at least 1")
        require(1 <= self.processes <= 64, "processes must be between 1 and 64")
        if self.kafka.group_protocol == "consumer":
            require(self.kafka_client == "confluent-kafka",
                    "group_protocol=consumer (KIP-848) needs kafka_client=confluent-kafka: kafka-python speaks "
                    "only the classic protocol")
        if self.kafka_client == "confluent-kafka":
            require(importlib.util.find_spec("confluent_kafka") is not None,
                    "kafka_client=confluent-kafka needs the confluent-kafka package: "
                    "pip install 'bert-stream[confluent]'")
        require(len({self.input_topic, self.output_topic, self.dlq_topic}) == 3,
                "input, output and DLQ topics must differ")
        for topic in (self.input_topic, self.output_topic, self.dlq_topic):
            require(bool(_TOPIC_NAME.fullmatch(topic)) and topic not in (".", ".."),
                    f"topic {topic!r} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                f"device must be {DEVICES_HELP}")
        require(self.cache_ttl_s >= 1, "cache_ttl_s must be at least 1")
        require(self.commit_interval_ms >= 1 and self.commit_every >= 1, "commit interval and count must be >= 1")
        require(self.transaction_timeout_ms >= max(1000, 2 * self.commit_interval_ms),
                "transaction_timeout_ms must be at least 1000 and twice commit_interval_ms")
        require(self.model_failure_retries >= 0, "model_failure_retries must not be negative")
        require(self.inference_stall_s >= 1, "inference_stall_s must be at least 1")
        require(self.shutdown_timeout_s >= 1, "shutdown_timeout_s must be at least 1")
        if self.delivery == "exactly-once":  # the last transaction is open for the whole drain
            require(self.shutdown_timeout_s * 1000 + self.commit_interval_ms < self.transaction_timeout_ms,
                    "exactly-once: shutdown_timeout_s plus commit_interval_ms must be under "
                    "transaction_timeout_ms (the broker would abort the last transaction mid-drain)")
