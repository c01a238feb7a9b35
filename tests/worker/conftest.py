"""Worker test fixtures: a small real checkpoint store, Chinese test messages, a worker run in a thread.

``model_store`` is the session fixture ``trained_checkpoint`` from tests/conftest.py when it exists (a small
classifier really trained by the trainer); until then a tiny randomly initialised BERT (2 layers, hidden 64)
with the bert-base-chinese vocabulary, published through bert_stream.checkpoint exactly as the trainer does.
Mechanically real (tokenizer.json, safetensors, LATEST); its labels are not meaningful.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("USE_TF", "0")

LABELS = ("体育", "财经", "房产", "家居", "教育", "科技", "时尚", "时政", "游戏", "娱乐")


def vocab_file() -> Path:
    from trainer.models import bert_base_chinese_vocab

    return bert_base_chinese_vocab()


def publish_tiny_model(store: Path, seed: int = 0, labels: tuple[str, ...] = LABELS) -> str:
    """Publish a tiny random BERT classifier into ``store`` (a new version, LATEST moved); return its version."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from bert_stream import checkpoint

    torch.manual_seed(seed)
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512,
                        id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})
    return checkpoint.publish_pretrained(store, BertForSequenceClassification(config), tokenizer)


@pytest.fixture(scope="session")
def _tiny_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("tiny-store")
    publish_tiny_model(store)
    return store


@pytest.fixture(scope="session")
def session_model_store(request, _tiny_store) -> Path:
    """A read-only checkpoint store shared by the session: the trainer's ``trained_checkpoint`` when that
    fixture exists, else the tiny random one. ``BERT_STREAM_TEST_TINY_MODEL=1`` forces the tiny one (quick
    iterations on the worker alone: no training)."""
    if os.environ.get("BERT_STREAM_TEST_TINY_MODEL", "") not in ("", "0"):
        return _tiny_store
    try:
        return Path(request.getfixturevalue("trained_checkpoint"))
    except pytest.FixtureLookupError:
        return _tiny_store


@pytest.fixture(scope="session")
def model_labels(session_model_store) -> set[str]:
    """The label names of the session's model."""
    import json

    from bert_stream import checkpoint

    _, folder = checkpoint.resolve(session_model_store)
    return set(json.loads((folder / "config.json").read_text())["id2label"].values())


@pytest.fixture
def model_store(session_model_store, tmp_path) -> Path:
    """A private copy of the store: tests that publish new versions do not disturb the others."""
    store = tmp_path / "store"
    shutil.copytree(session_model_store, store, ignore=shutil.ignore_patterns(".staging-*"))
    return store


# ---- messages -------------------------------------------------------------------------------------------
_TITLES = (
    "国足世预赛主场两球击败对手，出线形势明朗", "央行宣布下调存款准备金率0.5个百分点", "北京二手房成交量连续三个月回升",
    "小户型客厅如何装修显得更宽敞", "教育部：严禁中小学组织有偿补课", "国产大模型发布新版本，推理速度提升一倍",
    "今秋流行色彩搭配指南", "国务院常务会议部署稳就业举措", "年度最受期待的角色扮演游戏今日上线", "电影节闭幕，最佳影片揭晓",
    "姚明出席篮球公益活动", "上证指数收涨1.2%，券商板块领涨", "房贷利率下调后首套房需求明显释放", "这款智能手机续航长达两天",
)
_REVIEWS = (
    "酒店位置很好，离地铁站很近，房间干净整洁，服务员态度也非常热情，下次还会再来。",
    "这本书内容空洞，翻了几页就看不下去了，完全不值这个价格。",
    "笔记本电脑散热不太好，玩游戏的时候风扇声音很大，不过屏幕色彩还是不错的。",
)


class PredictOnly:
    """For a test model that overrides ``predict``: its ``launch`` defers to that ``predict``, so the
    worker's classifier (launch on one thread, result on the other) goes through the override, and what it
    raises or waits for happens where a device's would: when the result is taken."""

    def launch(self, texts):
        return _Later(lambda: self.predict(texts))


class _Later:
    def __init__(self, compute):
        self.result = compute


def chinese_messages(n: int, seed: int = 0) -> list[str]:
    """``n`` real-looking Chinese texts of mixed lengths, with repeats (for the cache)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.6:
            out.append(rng.choice(_TITLES))  # short, repeated often
        elif kind < 0.9:
            out.append(rng.choice(_REVIEWS) + f"（第{i}条评论）")
        else:
            out.append("".join(rng.choice(_TITLES + _REVIEWS) for _ in range(rng.randint(5, 12))))  # long
    return out


# ---- Kafka helpers ----------------------------------------------------------------------------------------
def produce(kafka_settings, topic: str, values, keys=None, headers=None) -> None:
    """Send values (bytes or str) with kafka-python and wait for the acks."""
    from bert_stream.kafka import make_producer

    producer = make_producer(kafka_settings, linger_ms=20)
    try:
        for i, value in enumerate(values):
            producer.send(topic, value=value.encode() if isinstance(value, str) else value,
                          key=keys[i] if keys else None, headers=headers[i] if headers else None)
        producer.flush()
    finally:
        producer.close()


def read_topic(kafka_settings, topic: str, expect: int, timeout: float = 60.0, settle: float = 0.0,
               distinct=None) -> list:
    """Every record of ``topic`` from the beginning, once at least ``expect`` arrived (or the timeout);
    then ``settle`` seconds more to catch extras (duplicates). ``distinct(record)``: count distinct values
    of it instead of records (duplicates do not count)."""
    import time

    from kafka import TopicPartition

    from bert_stream.kafka import make_consumer

    consumer = make_consumer(kafka_settings, None)
    try:
        deadline = time.monotonic() + timeout
        while not (parts := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
            time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        settle_until = None
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                out.extend(records)
            if (len(out) if distinct is None else len(set(map(distinct, out)))) >= expect:
                settle_until = settle_until or time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
        return out
    finally:
        consumer.close()


def committed_offsets(kafka_settings, group_id: str, topic: str) -> dict[int, int | None]:
    from kafka import TopicPartition

    from bert_stream.kafka import make_consumer

    consumer = make_consumer(kafka_settings, group_id)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        consumer.close()


@pytest.fixture
def worker_settings(kafka_settings, stack, names, model_store):
    """Settings for a worker on this test's topics, group, Redis prefix and private model store."""
    from worker.settings import WorkerSettings

    def make(**overrides):
        values = dict(kafka=kafka_settings, input_topic=names.input_topic, output_topic=names.output_topic,
                      dlq_topic=names.dlq_topic, group_id=names.group_id, model_dir=str(model_store),
                      redis_url=stack.redis_url, cache_prefix=names.redis_prefix, http_port=0, model_poll_s=0.5,
                      commit_interval_ms=200, max_wait_ms=10)
        values.update(overrides)
        return WorkerSettings(**values)

    return make


class RunningWorker:
    """A worker run on a thread of the test process (shares the loaded torch with the tests)."""

    def __init__(self, settings, engine=None):
        import threading

        from worker.loop import Worker

        self.worker = Worker(settings, engine=engine)
        self.exit_code = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)
        self.thread.start()

    def _run(self):
        self.exit_code = self.worker.run()

    def wait_assigned(self, timeout: float = 60.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not self.worker.health.assigned:
            assert self.thread.is_alive(), "worker thread died"
            assert time.monotonic() < deadline, "worker got no partitions"
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int:
        self.worker.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        return self.exit_code


@pytest.fixture
def start_worker():
    running: list[RunningWorker] = []

    def start(settings, engine=None) -> RunningWorker:
        w = RunningWorker(settings, engine)
        running.append(w)
        return w

    yield start
    for w in running:
        if w.thread.is_alive():
            w.stop()
