"""Records that once crash-looped the worker, on both clients: compressed batches from three producers, a header
key that is not UTF-8 in the middle of a compressed batch, and values the parsers refuse or that cost the main
thread seconds. Every input offset must end as exactly one output or dead letter, with the worker alive.

The input topic has one partition, so offsets 0..N-1 are the whole input whoever produced them (kcat gives no
offsets back); N is one past the offset of a last message produced with an ack (Tansu's end offsets are not
Kafka's).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from bert_stream.kafka import CLIENTS, ensure_topics, make_producer
from tests.conftest import BROKER
from tests.fault import harness as h
from worker import messages as m

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

CODECS = ("gzip", "snappy", "lz4", "zstd")
TEXTS = ("国足世预赛主场两球击败对手", "央行宣布下调存款准备金率", "这本书内容空洞，完全不值这个价格", "电影节闭幕，最佳影片揭晓")


def _good(tag: str, i: int) -> bytes:
    return json.dumps({"id": f"{tag}-{i}", "text": f"{TEXTS[i % len(TEXTS)]}（{tag} {i}）"}, ensure_ascii=False).encode()


@pytest.mark.parametrize("client", CLIENTS)
def test_compressed_batches_odd_headers_and_pathological_text_never_stop_a_partition(
        kafka_settings, names, model_store, stack, workers, client):
    ensure_topics(kafka_settings, {names.input_topic: 1, names.output_topic: 1, names.dlq_topic: 1})
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic)
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, http_port=0, kafka_client=client, max_length=32)
    w = workers.start("worker", env)
    want: dict[int, set[str]] = {}  # input offset -> acceptable outcomes
    try:
        # 1. kafka-python and librdkafka producers, each codec: one batch each, a bad header key in the middle
        for codec in CODECS:
            producer = make_producer(kafka_settings, compression_type=codec, linger_ms=50)
            for i in range(12):
                headers = [(h.RawKey(b"\xff\xfe-" + codec.encode()), b"v")] if i == 5 else [("trace", b"1")]
                producer.send(names.input_topic, value=_good(f"kp-{codec}", i), headers=headers, partition=0)
            producer.flush(30)
            producer.close()
        import confluent_kafka

        for codec in CODECS:
            producer = confluent_kafka.Producer({"bootstrap.servers": stack.bootstrap_servers,
                                                 "compression.type": codec, "linger.ms": 50})
            for i in range(12):
                producer.produce(names.input_topic, _good(f"ck-{codec}", i), partition=0, headers=[("h", b"1")])
            assert producer.flush(30) == 0
        tombstone = h.publish(kafka_settings, names.input_topic, [b"marker"]).sources[0][1] + 1
        producer.produce(names.input_topic, None, partition=0)  # no key, no value: its dead letter needs one
        assert producer.flush(30) == 0
        want[tombstone] = {m.EMPTY_TEXT}
        # 2. Debian's kcat (librdkafka as a command-line user runs it): a header key that is not UTF-8 on a whole
        # compressed batch, then plain ones (kcat cannot talk to Tansu)
        if shutil.which("kcat") and BROKER != "tansu":
            for codec in CODECS:
                lines = b"\n".join(_good(f"kcat-{codec}", i) for i in range(8)) + b"\n"
                subprocess.run([b"kcat", b"-P", b"-b", stack.bootstrap_servers.encode(), b"-t",
                                names.input_topic.encode(), b"-p", b"0", b"-z", codec.encode()],
                               input=lines, check=True, timeout=60)
            subprocess.run([b"kcat", b"-P", b"-b", stack.bootstrap_servers.encode(), b"-t", names.input_topic.encode(),
                            b"-p", b"0", b"-z", b"lz4", b"-H", b"\xc3\x28bad=1"],
                           input=b"\n".join(_good("kcat-badkey", i) for i in range(3)) + b"\n", check=True, timeout=60)
        # 3. values the parsers refuse, or that were quadratic on the main thread
        pathological = [
            (b'{"text": "x", "n": ' + b"1" * 5000 + b"}", {m.INVALID_JSON}),
            (b'{"id": "surrogate", "text": "\\ud800\\u4e2d"}', {m.INVALID_TEXT}),
            (("a" + "\u0301\u0316" * 16_000).encode()[:65_000], {"output"}),
            (b"key and headers too large", {m.TOO_LARGE}),
        ]
        sent = h.publish(kafka_settings, names.input_topic, [v for v, _ in pathological],
                         keys=[None, None, None, b"k" * (m.MAX_KEY_AND_HEADERS_BYTES + 10)])
        for (_, offset), (_, outcomes) in zip(sent.sources, pathological):
            want[offset] = outcomes
        last = h.publish_messages(kafka_settings, names.input_topic, [("after-0", _good("after", 0))])
        end = last.sources[0][1] + 1
        sent = h.Sent([None] * end, [(0, o) for o in range(end)])
        reader.wait_all(sent, timeout=240, diagnostics=workers.tails, stall_s=60, alive=w.alive)
        reader.drain()
        counts = h.count(sent, reader)
        assert w.alive() and w.get("/healthz")[0] == 200, w.tail()
        assert w.terminate() == 0
    finally:
        reader.close()

    outcomes = {o: (r[0].reason if isinstance(r[0], h.DeadLetter) else "output")
                for (p, o), r in reader.by_source.items()}
    h.report(f"poison-records({client})", counts, offsets=end, dead_letters=sum(v != "output" for v in outcomes.values()))
    assert counts.lost == 0 and counts.duplicates == 0
    bad_keys = [o for o, r in outcomes.items() if r == m.INVALID_HEADER]
    assert len(bad_keys) >= len(CODECS), outcomes  # one per kafka-python batch (+3 from kcat)
    for offset, allowed in want.items():
        assert outcomes[offset] in allowed, (offset, outcomes[offset], allowed)
    # everything else is a good message: an output with its label
    others = [o for o in range(end) if o not in want and outcomes[o] != m.INVALID_HEADER]
    assert all(outcomes[o] == "output" for o in others), {o: outcomes[o] for o in others if outcomes[o] != "output"}
    dead = [d for d in reader.dead if d.reason == m.INVALID_HEADER]
    assert all(d.value for d in dead)  # the record itself is kept for a replay


@pytest.mark.skipif(BROKER != "kafka", reason="corrupts Apache Kafka's segment file on disk")
def test_a_record_that_fails_its_crc_is_a_dead_letter_and_the_partition_moves_on(
        kafka_settings, names, model_store, stack, workers):
    """A record batch corrupted on the broker's disk (the broker does not check CRCs when it serves a fetch):
    kafka-python raises CorruptRecordError from poll() at the same offset forever. The worker dead-letters
    that offset as unreadable_record and reads on. (librdkafka does not check CRCs by default: it hands the
    corrupted bytes over as a value, which decode judges like any other.)"""
    from pathlib import Path

    ensure_topics(kafka_settings, {names.input_topic: 1, names.output_topic: 1, names.dlq_topic: 1})
    victim = _good("victim", 1)
    for value in (_good("before", 0), victim, _good("after", 2)):  # one batch each
        h.publish(kafka_settings, names.input_topic, [value])
    segment = next((Path(stack.services["broker"].data_dir) / f"{names.input_topic}-0").glob("*.log"))
    data = bytearray(segment.read_bytes())
    at = data.find(victim)
    assert at > 0, "the record is not in the segment file"
    data[at + 5] ^= 0xFF  # inside the value: the batch CRC no longer matches
    segment.write_bytes(bytes(data))

    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic)
    w = workers.start("worker", h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names,
                                             model_dir=model_store, redis_url=None, http_port=0))
    sent = h.Sent([None] * 3, [(0, 0), (0, 1), (0, 2)])
    try:
        reader.wait_all(sent, timeout=120, diagnostics=workers.tails, alive=w.alive)
        reader.drain()
        counts = h.count(sent, reader)
        assert w.alive() and w.terminate() == 0
    finally:
        reader.close()
    outcomes = [r[0].reason if isinstance(r[0], h.DeadLetter) else "output" for r in
                (reader.by_source[(0, o)] for o in range(3))]
    assert outcomes == ["output", m.UNREADABLE_RECORD, "output"], outcomes
    (dead,) = reader.dead
    assert "CorruptRecordError" in dead.detail and dead.source == (0, 1)
    assert counts.duplicates == 0 and counts.lost == 0
