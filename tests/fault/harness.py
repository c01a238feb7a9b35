"""Fault-injection harness: real ``python -m worker.run`` processes, inputs and outputs counted by id.

What a fault test is made of:
- :class:`WorkerProcess`: one worker subprocess configured by environment variables (the way Kubernetes runs
  it), JSON log lines in a file, kill -9 / SIGTERM, its events and its /metrics.
- :func:`make_messages` / :func:`publish` / :class:`RatePublisher`: inputs with ids, published through
  :mod:`bert_stream.kafka`; every send's (partition, offset) is recorded, so even inputs without an id
  (hostile bytes) can be matched to their output or dead letter by ``source``.
- :class:`TopicReader`: reads the output and DLQ topics from the beginning (no group) into dicts by id and by
  source (partition, offset), incrementally.
- :func:`wait_until`: every wait has a deadline and says what it waited for, with the worker logs' tails.
- :class:`Counts` / :func:`report`: sent, output, dlq, duplicates, lost; printed by every test and collected
  for the "fault counts" section of the terminal summary (tests/fault/conftest.py).

Counting rules. ``duplicates`` = records on the output and DLQ topics beyond the first one per input;
``lost`` = inputs with no record on either topic. At-least-once allows duplicates only for what was
published but not yet committed when a worker died (:func:`uncommitted_window`); it never allows a loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from bert_stream.kafka import CLIENTS, KafkaSettings, adapter, make_consumer, make_producer
from tests.conftest import BROKER

REPO = Path(__file__).resolve().parents[2]

# Worker settings the fault tests run with: small batches and frequent commits keep the re-delivery window
# (what a crash may publish twice) small and easy to bound.
MAX_BATCH_SIZE = 16
COMMIT_EVERY = 64
COMMIT_INTERVAL_MS = 200
MAX_WAIT_MS = 10
# exactly-once: a killed worker's open transaction is aborted by the broker after this long (its partitions'
# next owner waits for it: KIP-447's stable offsets); short, so the fault tests stay quick
TRANSACTION_TIMEOUT_MS = 10_000
# ...and then its output partitions are readable again (read_committed stops at the first record of the
# oldest open transaction): the timeout, the local broker's one-second abort check, the markers, and slack
DEAD_TRANSACTION_S = TRANSACTION_TIMEOUT_MS / 1000 + 5
DELIVERY_MODES = ("at-least-once", "exactly-once")


def isolation(delivery: str) -> str:
    """How the fault tests read a worker's outputs: as a downstream consumer of that mode would."""
    return "read_committed" if delivery == "exactly-once" else "read_uncommitted"


def _in_flight_batches() -> int:
    """worker.classifier.MAX_IN_FLIGHT_BATCHES, read from the source (importing it would import torch)."""
    source = (REPO / "worker" / "classifier.py").read_text()
    found = re.search(r"^MAX_IN_FLIGHT_BATCHES\s*=\s*(\d+)", source, re.MULTILINE)
    return int(found.group(1)) if found else 2


def uncommitted_window(client: str = "kafka-python") -> int:
    """The most outputs a worker can have published but not committed at one moment.

    The loop checks ``commit_every`` once per iteration, and one iteration publishes at most the batches in
    flight; so published-but-uncommitted < commit_every + in_flight * max_batch_size. A kill -9 re-delivers
    at most that many messages (a failed commit would widen it; the worker logs commit_failed then). With
    librdkafka the worker commits between flushes what the broker has acknowledged so far (``lazy_commits``),
    so what was still unacknowledged at a commit, at most what was sent since the one before, stays
    uncommitted until the next: one more commit_every."""
    lazy = adapter(client).Producer.lazy_commits
    return (2 if lazy else 1) * COMMIT_EVERY + _in_flight_batches() * MAX_BATCH_SIZE


# ---- waiting ---------------------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               diagnostics: Callable[[], str] | None = None, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


# ---- the worker process ------------------------------------------------------------------------------------
def worker_env(*, bootstrap_servers: str, names, model_dir: Path | str, redis_url: str | None,
               session_timeout_ms: int = 6000, delivery: str = "at-least-once", **settings: object) -> dict[str, str]:
    """Environment for ``python -m worker.run``: the test's topics, group, Redis prefix and model store, with
    the harness' batching/commit settings. ``settings`` override by WorkerSettings field name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BERT_STREAM_", "KAFKA_"))}
    env.pop("REDIS_URL", None)
    env.update({
        "PYTHONUNBUFFERED": "1",
        "LOG_FORMAT": "json",
        "USE_TF": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "KAFKA_SESSION_TIMEOUT_MS": str(session_timeout_ms),
        "KAFKA_MAX_POLL_INTERVAL_MS": "60000",
        "KAFKA_REQUEST_TIMEOUT_MS": "20000",
    })
    values: dict[str, object] = {
        "input_topic": names.input_topic, "output_topic": names.output_topic, "dlq_topic": names.dlq_topic,
        "group_id": names.group_id, "cache_prefix": names.redis_prefix, "model_dir": str(model_dir),
        "device": "cpu", "torch_threads": 1, "max_batch_size": MAX_BATCH_SIZE, "max_wait_ms": MAX_WAIT_MS,
        "commit_every": COMMIT_EVERY, "commit_interval_ms": COMMIT_INTERVAL_MS, "http_port": -1,
        "model_poll_s": 0.5, "max_queued_messages": 256,
        "delivery": delivery, "transaction_timeout_ms": TRANSACTION_TIMEOUT_MS, "shutdown_timeout_s": 8,
    }
    values.update(settings)
    for field, value in values.items():
        env[_ENV_NAMES[field]] = str(value)
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


_ENV_NAMES = {  # WorkerSettings field -> its environment variable (worker/settings.py)
    "input_topic": "BERT_STREAM_INPUT_TOPIC", "output_topic": "BERT_STREAM_OUTPUT_TOPIC",
    "dlq_topic": "BERT_STREAM_DLQ_TOPIC", "group_id": "BERT_STREAM_GROUP_ID",
    "input_format": "BERT_STREAM_INPUT_FORMAT", "max_message_bytes": "BERT_STREAM_MAX_MESSAGE_BYTES",
    "model_dir": "BERT_STREAM_MODEL_DIR", "device": "BERT_STREAM_DEVICE", "dtype": "BERT_STREAM_DTYPE",
    "max_length": "BERT_STREAM_MAX_LENGTH", "torch_threads": "BERT_STREAM_TORCH_THREADS",
    "model_poll_s": "BERT_STREAM_MODEL_POLL_S", "max_batch_size": "BERT_STREAM_MAX_BATCH_SIZE",
    "max_batch_tokens": "BERT_STREAM_MAX_BATCH_TOKENS", "max_wait_ms": "BERT_STREAM_MAX_WAIT_MS",
    "max_queued_messages": "BERT_STREAM_MAX_QUEUED_MESSAGES", "top_k": "BERT_STREAM_TOP_K",
    "cache_prefix": "BERT_STREAM_CACHE_PREFIX", "cache_ttl_s": "BERT_STREAM_CACHE_TTL_S",
    "cache_timeout_ms": "BERT_STREAM_CACHE_TIMEOUT_MS", "commit_interval_ms": "BERT_STREAM_COMMIT_INTERVAL_MS",
    "commit_every": "BERT_STREAM_COMMIT_EVERY", "http_port": "BERT_STREAM_HTTP_PORT", "log_level": "LOG_LEVEL",
    "delivery": "BERT_STREAM_DELIVERY", "instance_id": "BERT_STREAM_INSTANCE_ID",
    "group_protocol": "KAFKA_GROUP_PROTOCOL",
    "transaction_timeout_ms": "BERT_STREAM_TRANSACTION_TIMEOUT_MS", "processes": "BERT_STREAM_PROCESSES",
    "kafka_client": "BERT_STREAM_KAFKA_CLIENT", "shutdown_timeout_s": "BERT_STREAM_SHUTDOWN_TIMEOUT_S",
    "model_failure_retries": "BERT_STREAM_MODEL_FAILURE_RETRIES", "inference_stall_s": "BERT_STREAM_INFERENCE_STALL_S",
    "allow_label_change": "BERT_STREAM_ALLOW_LABEL_CHANGE", "quality_window": "BERT_STREAM_QUALITY_WINDOW",
    "review_topic": "BERT_STREAM_REVIEW_TOPIC", "review_score_below": "BERT_STREAM_REVIEW_SCORE_BELOW",
    "review_sample_rate": "BERT_STREAM_REVIEW_SAMPLE_RATE", "shadow_sample_rate": "BERT_STREAM_SHADOW_SAMPLE_RATE",
    "shadow_max_share": "BERT_STREAM_SHADOW_MAX_SHARE", "shadow_topic": "BERT_STREAM_SHADOW_TOPIC",
}


class WorkerProcess:
    """One ``python -m worker.run`` subprocess; its log (JSON lines) goes to ``log_path``."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker.run"], cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.started = time.monotonic()

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll()

    def events(self, event: str | None = None) -> list[dict]:
        """The worker's structlog events (JSON lines), optionally only those named ``event``."""
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by kill -9
            if event is None or item.get("event") == event:
                out.append(item)
        return out

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 25) -> str:
        lines = self.log_text().splitlines()[-n:]
        state = "running" if self.alive() else f"exited {self.returncode()}"
        return f"--- {self.name} (pid {self.pid}, {state}) log tail:\n" + "\n".join(line[:400] for line in lines)

    def wait_event(self, event: str, timeout: float, where: Callable[[dict], bool] | None = None,
                   allow_exit: bool = False) -> dict:
        """The first ``event`` (matching ``where``); fails early when the process exits."""

        def found():
            for item in self.events(event):
                if where is None or where(item):
                    return item
            if not allow_exit and not self.alive():
                raise AssertionError(f"worker {self.name} exited ({self.returncode()}) before {event}\n"
                                     f"{self.tail()}")
            return None

        return wait_until(found, timeout, f"{self.name}: {event}", self.tail, interval=0.1)

    def wait_assigned(self, timeout: float = 90.0) -> dict:
        return self.wait_event("partitions_assigned", timeout, where=lambda e: bool(e.get("partitions")))

    @property
    def http_port(self) -> int:
        return int(self.wait_event("http_listening", 60)["port"])

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, labels: str = "") -> float | None:
        """One sample from /metrics (``labels`` as printed, e.g. ``outcome="hit"``), or None."""
        _, body = self.get("/metrics")
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in body.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    # ---- signals -----------------------------------------------------------------------------------------
    def kill9(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit; returns the exit status (a hang is a failure, then kill -9)."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"worker {self.name} did not exit within {timeout:.0f} s of SIGTERM\n"
                                 f"{self.tail()}") from None

    def cleanup(self) -> None:
        """Make sure nothing outlives the test (kill -9: the test is over either way)."""
        if self.alive():
            self.kill9()


class Workers:
    """Starts workers for one test and kills whatever is left at the end (the ``workers`` fixture)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.all: list[WorkerProcess] = []

    def start(self, name: str, env: dict[str, str]) -> WorkerProcess:
        w = WorkerProcess(name, env, self.log_dir)
        self.all.append(w)
        return w

    def tails(self) -> str:
        return "\n".join(w.tail() for w in self.all)

    def cleanup(self) -> None:
        for w in self.all:
            w.cleanup()


# ---- inputs ----------------------------------------------------------------------------------------------
_TITLES = (
    "国足世预赛主场两球击败对手，出线形势明朗", "央行宣布下调存款准备金率0.5个百分点", "北京二手房成交量连续三个月回升",
    "小户型客厅如何装修显得更宽敞", "教育部：严禁中小学组织有偿补课", "国产大模型发布新版本，推理速度提升一倍",
    "今秋流行色彩搭配指南", "国务院常务会议部署稳就业举措", "年度最受期待的角色扮演游戏今日上线", "电影节闭幕，最佳影片揭晓",
    "姚明出席篮球公益活动", "上证指数收涨1.2%，券商板块领涨", "房贷利率下调后首套房需求明显释放", "这款智能手机续航长达两天",
    "酒店位置很好，离地铁站很近，房间干净整洁，服务员态度也非常热情，下次还会再来。",
    "这本书内容空洞，翻了几页就看不下去了，完全不值这个价格。",
    "笔记本电脑散热不太好，玩游戏的时候风扇声音很大，不过屏幕色彩还是不错的。",
)


def chinese_text(rng: random.Random, i: int, repeat_ratio: float = 0.3) -> str:
    """A Chinese text; ``repeat_ratio`` of them repeat a fixed set (cache hits), the rest are unique."""
    if rng.random() < repeat_ratio:
        return rng.choice(_TITLES)
    parts = rng.randint(1, 4)
    return "".join(rng.choice(_TITLES) for _ in range(parts)) + f"（第{i}条）"


def make_messages(n: int, seed: int, prefix: str = "m", repeat_ratio: float = 0.3) -> list[tuple[str, bytes]]:
    """``n`` (id, JSON value) pairs ``{"id": "<prefix>-00042", "text": ...}``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msg_id = f"{prefix}-{i:05d}"
        value = json.dumps({"id": msg_id, "text": chinese_text(rng, i, repeat_ratio)}, ensure_ascii=False)
        out.append((msg_id, value.encode()))
    return out


@dataclasses.dataclass
class Sent:
    """What was published: per input, its id (None for hostile values) and where it landed."""

    ids: list[str | None] = dataclasses.field(default_factory=list)
    sources: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (partition, offset)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, msg_id: str | None, source: tuple[int, int]) -> None:
        with self.lock:
            self.ids.append(msg_id)
            self.sources.append(source)

    def __len__(self) -> int:
        return len(self.sources)


def publish(settings: KafkaSettings, topic: str, values: Sequence[bytes | None],
            ids: Sequence[str | None] | None = None, keys: Sequence[bytes | None] | None = None,
            sent: Sent | None = None, headers: Sequence[list | None] | None = None,
            compression_type: str | None = None) -> Sent:
    """Publish ``values`` (acks=all, batches compressed with ``compression_type`` if given), recording each
    one's (partition, offset)."""
    sent = sent if sent is not None else Sent()
    producer = make_producer(settings, linger_ms=20, max_request_size=4_000_000, compression_type=compression_type)
    try:
        futures = []
        for i, value in enumerate(values):
            key = keys[i] if keys is not None else (ids[i].encode() if ids and ids[i] else None)
            futures.append(producer.send(topic, value=value, key=key,
                                         headers=(headers[i] if headers else None) or []))
        producer.flush(timeout=60)
        for i, future in enumerate(futures):
            meta = future.get(timeout=30)
            sent.add(ids[i] if ids else None, (meta.partition, meta.offset))
    finally:
        producer.close()
    return sent


class RawKey(str):
    """A header key whose bytes on the wire are ``raw`` (kafka-python's record builder calls ``encode``): how a
    producer in another language sends a key that is not UTF-8."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *_args, **_kwargs) -> bytes:
        return self.raw


def publish_messages(settings: KafkaSettings, topic: str, messages: Sequence[tuple[str, bytes]],
                     sent: Sent | None = None) -> Sent:
    return publish(settings, topic, [v for _, v in messages], ids=[i for i, _ in messages], sent=sent)


class RatePublisher(threading.Thread):
    """Publishes ``messages`` at about ``rate`` per second in the background (a stream, not a backlog), so a
    fault injected at second t hits messages still arriving. Stops early when ``stop`` is set (tests stop
    the stream once the fault has played out). ``error`` holds what stopped it early."""

    def __init__(self, settings: KafkaSettings, topic: str, messages: Sequence[tuple[str, bytes]], rate: float):
        super().__init__(name="rate-publisher", daemon=True)
        self.settings, self.topic, self.messages, self.rate = settings, topic, list(messages), rate
        self.sent = Sent()
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        producer = make_producer(self.settings, linger_ms=5)
        try:
            start = time.monotonic()
            pending = []
            for i, (msg_id, value) in enumerate(self.messages):
                if self.stop.is_set():
                    break
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pending.append((msg_id, producer.send(self.topic, value=value, key=msg_id.encode())))
                if len(pending) >= 50:
                    self._settle(producer, pending)
            self._settle(producer, pending)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            producer.close()

    def _settle(self, producer, pending: list) -> None:
        producer.flush(timeout=60)
        for msg_id, future in pending:
            meta = future.get(timeout=60)
            self.sent.add(msg_id, (meta.partition, meta.offset))
        pending.clear()

    def published(self) -> int:
        return len(self.sent)

    def join_ok(self, timeout: float = 120.0) -> Sent:
        """Stop (if still running), wait, and return what was published."""
        self.stop.set()
        self.join(timeout)
        assert not self.is_alive(), "the publisher did not finish"
        if self.error is not None:
            raise AssertionError(f"publishing failed: {self.error!r}")
        return self.sent


# ---- outputs ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DeadLetter:
    reason: str
    detail: str
    source: tuple[int, int]
    value: bytes | None
    key: bytes | None
    headers: list


class TopicReader:
    """Everything on a test's output and DLQ topics, read from the beginning without a group.

    ``outputs[id]`` lists the output records (parsed JSON) of an id; ``by_source[(partition, offset)]``
    lists both outputs and dead letters of one input. ``isolation_level="read_committed"`` reads as a
    consumer of an exactly-once worker does: only records of committed transactions."""

    def __init__(self, settings: KafkaSettings, output_topic: str, dlq_topic: str,
                 isolation_level: str = "read_uncommitted"):
        from kafka import TopicPartition

        self.output_topic, self.dlq_topic = output_topic, dlq_topic
        self.consumer = make_consumer(settings, None, isolation_level=isolation_level)
        tps = []
        for topic in (output_topic, dlq_topic):
            parts = wait_until(lambda t=topic: self.consumer.partitions_for_topic(t), 30, f"topic {topic}")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.outputs: dict[str, list[dict]] = defaultdict(list)
        self.dead: list[DeadLetter] = []
        self.by_source: dict[tuple[int, int], list] = defaultdict(list)
        self.n_output = 0

    def poll(self, timeout_ms: int = 200) -> int:
        """Read what arrived; returns how many records."""
        from worker.messages import parse_dlq_headers, parse_output

        n = 0
        for tp, records in self.consumer.poll(timeout_ms=timeout_ms, max_records=5000).items():
            for r in records:
                n += 1
                if tp.topic == self.output_topic:
                    value = parse_output(r.value)
                    value["_partition"], value["_key"], value["_ts"] = r.partition, r.key, r.timestamp
                    self.outputs[value["id"]].append(value)
                    self.by_source[(value["source"]["partition"], value["source"]["offset"])].append(value)
                    self.n_output += 1
                else:
                    h = parse_dlq_headers(r.headers or [])
                    source = (int(h.get("source.partition", -1)), int(h.get("source.offset", -1)))
                    dead = DeadLetter(h.get("error", ""), h.get("error.detail", ""), source, r.value, r.key,
                                      list(r.headers or []))
                    self.dead.append(dead)
                    self.by_source[source].append(dead)
        return n

    def drain(self, rounds: int = 3) -> None:
        """Read until a few polls in a row bring nothing."""
        quiet = 0
        while quiet < rounds:
            quiet = quiet + 1 if self.poll(300) == 0 else 0

    def have_all(self, sent: Sent) -> bool:
        self.poll()
        return all(s in self.by_source for s in sent.sources)

    def wait_all(self, sent: Sent, timeout: float, diagnostics: Callable[[], str] | None = None,
                 stall_s: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
        """Wait until every sent input has a record, failing after ``timeout``, after ``stall_s`` without a
        new record (a stuck worker should not cost the whole timeout), or as soon as ``alive()`` is false."""
        deadline, last_progress, seen = time.monotonic() + timeout, time.monotonic(), -1
        while True:
            if self.have_all(sent):
                return
            if alive is not None and not alive():
                self.poll(500)
                if self.have_all(sent):
                    return
                missing = [s for s in sent.sources if s not in self.by_source]
                extra = f"\n{diagnostics()}" if diagnostics else ""
                raise AssertionError(f"the worker died with {len(missing)} of {len(sent)} inputs unanswered "
                                     f"(partition, offset): {missing[:20]}{extra}")
            now = time.monotonic()
            done = len(self.by_source)
            if done != seen:
                seen, last_progress = done, now
            if now >= deadline or now - last_progress >= stall_s:
                missing = [s for s in sent.sources if s not in self.by_source]
                why = "timed out" if now >= deadline else f"no progress for {stall_s:.0f} s"
                extra = f"\n{diagnostics()}" if diagnostics else ""
                raise AssertionError(f"{why}: {len(missing)} of {len(sent)} inputs have no output or dead letter "
                                     f"(partition, offset): {missing[:20]}{extra}")
            time.sleep(0.1)

    def close(self) -> None:
        self.consumer.close()


@dataclasses.dataclass
class Counts:
    sent: int
    output: int      # inputs with at least one output record
    dlq: int         # inputs with at least one dead letter
    duplicates: int  # records beyond the first per input
    lost: int        # inputs with no record at all

    def line(self) -> str:
        return (f"sent={self.sent} output={self.output} dlq={self.dlq} duplicates={self.duplicates} "
                f"lost={self.lost}")


def count(sent: Sent, reader: TopicReader) -> Counts:
    reader.poll()
    output = dlq = dup = lost = 0
    for source in sent.sources:
        records = reader.by_source.get(source, [])
        if not records:
            lost += 1
            continue
        output += any(isinstance(r, dict) for r in records)
        dlq += any(isinstance(r, DeadLetter) for r in records)
        dup += len(records) - 1
    return Counts(len(sent), output, dlq, dup, lost)


def duplicated(sent: Sent, reader: TopicReader) -> str:
    """Where the duplicates are: per input partition, the offset range and count ("p0:512-552 x41"), for
    the report of a test that found some."""
    offsets: dict[int, list[int]] = defaultdict(list)
    for partition, offset in sent.sources:
        if len(reader.by_source.get((partition, offset), [])) > 1:
            offsets[partition].append(offset)
    return " ".join(f"p{p}:{min(o)}-{max(o)}x{len(o)}" for p, o in sorted(offsets.items())) or "-"


REPORTS: list[tuple[str, str]] = []  # (test, line) for the terminal summary


# what the Tansu pass runs of the client x mode matrix: the rest runs on Apache Kafka only (Tansu's quirks are
# the broker's, not the client's, and the matrix would double the pass's time)
ON_TANSU = {("at-least-once", "kafka-python"), ("exactly-once", "kafka-python"), ("at-least-once", "confluent-kafka")}


def matrix(marks: dict[tuple[str, str], object] | None = None) -> list:
    """``(delivery, client)`` parameters: every delivery mode on every client, ids such as
    ``exactly-once-confluent-kafka``; ``marks`` adds a mark to one combination."""
    import pytest

    params = []
    for client in CLIENTS:
        for delivery in DELIVERY_MODES:
            extra = [m for m in [(marks or {}).get((delivery, client))] if m is not None]
            if (delivery, client) not in ON_TANSU:
                extra.append(pytest.mark.skipif(BROKER == "tansu", reason="the client x mode matrix runs on Apache "
                                                                          "Kafka; on Tansu three of its four"))
            params.append(pytest.param(delivery, client, marks=extra, id=f"{delivery}-{client}"))
    return params


def variant(delivery: str, client: str = "kafka-python") -> str:
    """A fault-count label: the delivery mode, and the Kafka client when it is not the default."""
    return delivery if client == "kafka-python" else f"{delivery}, {client}"


def report(test: str, counts: Counts, **extra: object) -> str:
    """Print (and keep for the summary) one line of counts for ``test``."""
    tail = " ".join(f"{k}={v}" for k, v in extra.items())
    line = f"[{BROKER}] {test}: {counts.line()}" + (f" {tail}" if tail else "")
    print(f"FAULT-COUNTS {line}", flush=True)
    REPORTS.append((test, line))
    return line


# ---- a Redis the test owns ---------------------------------------------------------------------------------
class RedisServer:
    """A private redis-server on a fixed port (nothing on disk), optionally with ``requirepass``; stop() and
    start() again on the same port simulate an outage. (Not LocalStack's: its start_redis cannot restart a
    Redis it stopped, see the fault-suite report.)"""

    def __init__(self, work_dir: Path, password: str | None = None):
        from deploy.local.stack import free_port, redis_binary

        self.work_dir, self.password = Path(work_dir), password
        self.port = free_port()
        self.binary = str(redis_binary())
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        from deploy.local.stack import redis_answers

        self.work_dir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.work_dir)]
        if self.password:
            argv += ["--requirepass", self.password]
        with open(self.work_dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_until(lambda: redis_answers(self.url), 15, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


# ---- groups ----------------------------------------------------------------------------------------------
def committed_offsets(settings: KafkaSettings, group_id: str, topic: str,
                      isolation_level: str = "read_uncommitted") -> dict[int, int | None]:
    """The group's committed offset per partition of ``topic`` (an OffsetFetch: does not join the group).
    With ``read_committed`` it waits until no open transaction holds offsets for them (KIP-447)."""
    from kafka import TopicPartition

    consumer = make_consumer(settings, group_id, isolation_level=isolation_level)
    try:
        parts = wait_until(lambda: consumer.partitions_for_topic(topic), 30, f"partitions of {topic}")
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        consumer.close(autocommit=False)


def seed_group(settings: KafkaSettings, group_id: str, topic: str, offsets: dict[int, int | None]) -> None:
    """Commit ``offsets`` for a fresh, empty ``group_id`` (a hand-over: the new group starts where the old
    one committed; partitions without a commit start from the beginning)."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    todo = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items() if o is not None}
    if not todo:
        return
    consumer = make_consumer(settings, group_id)
    try:
        consumer.assign(list(todo))
        consumer.commit(todo)
    finally:
        consumer.close(autocommit=False)
