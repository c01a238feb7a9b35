"""Other Kafka clients on either side of the worker: Debian's ``kcat`` and ``confluent-kafka`` (both
librdkafka) produce the inputs and consume the labels, keys and headers intact. Real broker, real model."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from bert_stream.kafka import ensure_topics
from tests.conftest import xfail_on_broker
from worker import messages as m

pytestmark = pytest.mark.kafka

TEXTS = ["国足世预赛主场两球击败对手", "央行宣布下调存款准备金率", "这本书内容空洞，完全不值这个价格。",
         "年度最受期待的角色扮演游戏今日上线", "北京二手房成交量连续三个月回升", "酒店位置很好，房间干净整洁。"]


def _inputs(client: str) -> list[tuple[str, str]]:
    """(key, JSON value) per message; the id names the client that produced it."""
    return [(f"{client}-k{i}", json.dumps({"id": f"{client}-{i}", "text": t}, ensure_ascii=False))
            for i, t in enumerate(TEXTS * 3)]


def _check(outputs: list[tuple[str, dict, dict]], inputs: list[tuple[str, str]], labels: set[str]) -> None:
    """Every input has exactly one output, keyed as the input, with a label of the model's."""
    by_id = {value["id"]: (key, value, headers) for key, value, headers in outputs}
    assert len(outputs) == len(inputs) == len(by_id)
    for key, raw in inputs:
        out_key, value, headers = by_id[json.loads(raw)["id"]]
        assert out_key == key and value["label"] in labels and 0 < value["score"] <= 1
        assert headers.get("trace") == "from-" + key.split("-")[0]  # the input's headers travel along


@pytest.mark.skipif(shutil.which("kcat") is None, reason="Debian's kcat is not installed (apt-get install kcat)")
@xfail_on_broker("tansu", "Debian's kcat (librdkafka 2.0.2) fails with 'ApiVersionRequest failed: Read underflow'")
def test_kcat_feeds_the_worker_and_reads_its_labels(stack, kafka_settings, names, worker_settings, start_worker,
                                                     model_labels):
    ensure_topics(kafka_settings, {names.input_topic: 2})
    inputs = _inputs("kcat")
    subprocess.run(["kcat", "-P", "-b", stack.bootstrap_servers, "-t", names.input_topic, "-K", "\t",
                    "-H", "trace=from-kcat"], input="".join(f"{k}\t{v}\n" for k, v in inputs), text=True,
                   check=True, timeout=30)
    worker = start_worker(worker_settings())
    outputs, deadline = [], time.monotonic() + 90
    while len(outputs) < len(inputs) and time.monotonic() < deadline:
        # -e: exit at the end of every partition; read again until the worker has answered everything
        lines = subprocess.run(["kcat", "-C", "-b", stack.bootstrap_servers, "-t", names.output_topic, "-o",
                                "beginning", "-e", "-q", "-f", "%k\t%h\t%s\n"], capture_output=True, text=True,
                               timeout=60).stdout.splitlines()
        outputs = [(k, m.parse_output(v.encode()), dict(h.split("=", 1) for h in hs.split(",") if "=" in h))
                   for k, hs, v in (line.split("\t", 2) for line in lines if line.count("\t") >= 2)]
        time.sleep(0.5)
    assert worker.stop() == 0
    _check(outputs, inputs, model_labels)


def test_confluent_kafka_feeds_the_worker_and_reads_its_labels(stack, kafka_settings, names, worker_settings,
                                                               start_worker, model_labels):
    confluent = pytest.importorskip("confluent_kafka")
    # the output topic too: a librdkafka consumer subscribed to a missing topic looks again only after
    # topic.metadata.refresh.interval.ms
    ensure_topics(kafka_settings, {names.input_topic: 2, names.output_topic: 2})
    inputs = _inputs("confluent")
    producer = confluent.Producer({"bootstrap.servers": stack.bootstrap_servers})
    for key, value in inputs:
        producer.produce(names.input_topic, key=key, value=value.encode(), headers=[("trace", b"from-confluent")])
    assert producer.flush(30) == 0
    worker = start_worker(worker_settings())
    consumer = confluent.Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": names.group_id + "-read",
                                   "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    consumer.subscribe([names.output_topic])
    outputs, deadline = [], time.monotonic() + 90
    try:
        while len(outputs) < len(inputs) and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                headers = {k: v.decode() for k, v in msg.headers() or []}
                outputs.append((msg.key().decode(), m.parse_output(msg.value()), headers))
    finally:
        consumer.close()
    assert worker.stop() == 0
    _check(outputs, inputs, model_labels)
