"""The feedback loop's pure logic: record formats, latest-label-wins, review routing, the merge into the
training data and the promotion pointers (no Kafka, no model)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from bert_stream import checkpoint, feedback
from bert_stream.reference import Reference
from trainer.data import Example, Splits
from trainer.feedback import held_out, merge
from worker.messages import InputMessage, Prediction, Source
from worker.review import FALLBACK_SCORE, ReviewRouter, review_value


def _prediction(probs: dict[str, float]) -> Prediction:
    top = sorted(probs.items(), key=lambda kv: -kv[1])
    return Prediction(top[0][0], 0, top[0][1], tuple(top))


def test_a_label_record_round_trips_and_bad_ones_are_named():
    key, value = feedback.label_record("m-1", "屏幕很好", "positive")
    assert key == b"m-1" and feedback.parse_label(key, value, {"positive", "negative"}) == ("m-1", "屏幕很好",
                                                                                              "positive")
    cases = {b"{not json": "not_json", b'["x"]': "not_json", b'{"id": "a", "label": "positive"}': "no_text",
             b'{"id": "a", "text": " ", "label": "positive"}': "no_text", b'{"id": "a", "text": "t"}': "no_label",
             b'{"id": "a", "text": "t", "label": "neutral"}': "unknown_label"}
    for raw, reason in cases.items():
        with pytest.raises(feedback.BadLabel) as info:
            feedback.parse_label(b"k", raw, {"positive", "negative"})
        assert info.value.reason == reason, raw
    assert feedback.parse_label(b"from-key", b'{"text": "t", "label": "x"}')[0] == "from-key"
    with pytest.raises(feedback.BadLabel):
        feedback.label_record(None, "t", "x")


def test_the_latest_label_of_an_id_wins_and_a_tombstone_withdraws_it():
    labels = feedback.Labels("t", {}, {0: 5})
    known = {"positive", "negative"}
    for key, value in [(b"a", feedback.label_record("a", "好", "positive")[1]),
                       (b"b", feedback.label_record("b", "差", "negative")[1]),
                       (b"a", feedback.label_record("a", "好", "negative")[1]),  # a correction
                       (b"b", None),                                              # withdrawn
                       (b"c", b'{"id": "c", "text": "x", "label": "meh"}')]:
        feedback._apply(labels, key, value, known)
    assert labels.examples == {"a": ("好", "negative")}
    assert labels.bad == Counter(unknown_label=1)
    assert labels.provenance()["per_label"] == {"negative": 1} and labels.provenance()["end_offsets"] == {"0": 5}


def test_review_records_carry_what_a_reviewer_needs():
    message = InputMessage("id-7", "电脑一般", b"k", [], Source("in", 2, 41))
    record = json.loads(review_value(message, _prediction({"positive": 0.55, "negative": 0.45}), "uncertain", "v1"))
    assert record["id"] == "id-7" and record["text"] == "电脑一般" and record["reason"] == "uncertain"
    assert record["model_version"] == "v1" and record["margin"] == pytest.approx(0.1)
    assert [t["label"] for t in record["top_k"]] == ["positive", "negative"]
    assert record["source"] == {"topic": "in", "partition": 2, "offset": 41}


class _Model:
    version = "v1"
    reference = Reference(labels=["negative", "positive"], label_prior=None,
                          score_quantiles={0.05: 0.6, 0.1: 0.8, 0.25: 0.9, 0.5: 0.95}, margin_quantiles={})


def test_the_review_threshold_is_the_versions_validation_p10_unless_set():
    router = ReviewRouter(None, 0.0, 0.0)
    router.use("v1", _Model())
    assert router.threshold == 0.8
    assert router.reason(_prediction({"positive": 0.79, "negative": 0.21})) == "uncertain"
    assert router.reason(_prediction({"positive": 0.81, "negative": 0.19})) is None
    router.use("v-without-reference", None)
    assert router.threshold == FALLBACK_SCORE
    fixed = ReviewRouter(0.6, 0.3, 0.0)
    fixed.use("v1", _Model())
    assert fixed.threshold == 0.6
    assert fixed.reason(_prediction({"a": 0.62, "b": 0.35, "c": 0.03})) == "uncertain"  # by its margin


def test_the_review_sample_is_drawn_at_its_rate_from_confident_outputs_too():
    router = ReviewRouter(0.5, 0.0, 0.05, seed=1)
    reasons = Counter(router.reason(_prediction({"a": 0.99, "b": 0.01})) for _ in range(20_000))
    assert reasons["uncertain"] == 0 and 800 < reasons["sampled"] < 1200


def _splits() -> Splits:
    rng = random.Random(0)
    make = lambda n, tag: [Example(f"{tag}{i}", rng.choice(["negative", "positive"])) for i in range(n)]  # noqa
    return Splits(make(100, "train"), make(20, "val"), make(20, "test"), ["negative", "positive"], "base", "f", "t")


def test_feedback_joins_train_wins_over_the_base_and_its_holdout_is_stable():
    base = _splits()
    examples = {f"id{i}": (f"新{i}", "positive") for i in range(300)}
    examples["dup"] = ("新７", "negative")  # NFKC: the same text as id7's, labelled later: this label wins
    examples["fix"] = ("test3", "negative" if base.test[3].label == "positive" else "positive")  # relabels a test text
    labels = feedback.Labels("t", examples, {0: 302})
    merged, fed = merge(base, labels, 0.2, seed=0)
    assert "test3" not in {e.text for e in merged.test}  # the feedback's label won: the base example left
    assert fed.replaced == 1
    assert 30 < len(fed.holdout) < 90 and len(fed.train) + len(fed.holdout) == 301
    assert [e.label for e in fed.train + fed.holdout if e.text in ("新7", "新７")] == ["negative"]
    texts = {e.text for e in merged.train}
    assert all(e.text in texts for e in fed.train) and not any(e.text in texts for e in fed.holdout)
    assert merged.fingerprint != base.fingerprint and merged.validation == base.validation
    # the same text stays on its side when the topic grows
    assert all(held_out(k, 0.2, 0) == held_out(k, 0.2, 0) for k in ("a", "b"))
    bigger = feedback.Labels("t", {**examples, **{f"more{i}": (f"更{i}", "positive") for i in range(100)}}, {0: 402})
    _, fed2 = merge(base, bigger, 0.2, seed=0)
    assert {e.text for e in fed.holdout} <= {e.text for e in fed2.holdout}


def test_pointers_are_set_read_and_cleared(tmp_path):
    for version in ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"):
        (tmp_path / version).mkdir()
    checkpoint.set_latest(tmp_path, "20260101T000000Z-aaaaaa")
    checkpoint.set_pointer(tmp_path, checkpoint.CANDIDATE, "20260102T000000Z-bbbbbb")
    assert checkpoint.read_pointer(tmp_path, checkpoint.CANDIDATE) == "20260102T000000Z-bbbbbb"
    assert checkpoint.latest_version(tmp_path) == "20260101T000000Z-aaaaaa"
    checkpoint.clear_pointer(tmp_path, checkpoint.CANDIDATE)
    assert checkpoint.read_pointer(tmp_path, checkpoint.CANDIDATE) is None
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.clear_pointer(tmp_path, checkpoint.LATEST)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.set_pointer(tmp_path, checkpoint.CANDIDATE, "20260103T000000Z-cccccc")  # no such version
