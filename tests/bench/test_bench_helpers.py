"""Fast unit tests of the benchmark's pure helpers: percentiles, FLOP counting, throughput windows, targets."""

from __future__ import annotations

import itertools
import random

import pytest

from bench import common
from bench.summary import _target

E5_SMALL = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "id2label": {str(i): f"l{i}" for i in range(10)},
}


@pytest.mark.parametrize("q", [0, 1, 25, 50, 75, 95, 99, 100])
def test_percentile_matches_numpy_linear(q):
    np = pytest.importorskip("numpy")
    rng = random.Random(q)
    values = [rng.expovariate(1 / 30) for _ in range(257)]
    assert common.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert common.percentile([5.0], 99) == 5.0
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    with pytest.raises(ValueError):
        common.percentile([], 50)
    with pytest.raises(ValueError):
        common.percentile([1], 101)


def test_latency_summary():
    s = common.latency_summary([float(i) for i in range(1, 101)])
    assert s["n"] == 100 and s["max"] == 100
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert common.latency_summary([]) == {"n": 0}


def test_model_shape_from_config():
    shape = common.ModelShape.from_config(E5_SMALL)
    assert (shape.hidden, shape.layers, shape.heads, shape.intermediate, shape.labels) == (
        384,
        12,
        12,
        1536,
        10,
    )
    # 4 H^2 + 2 H I per layer: 589,824 + 1,179,648
    assert shape.layer_params == 1_769_472
    assert shape.params_nonembedding == 12 * 1_769_472
    assert shape.gemm_shapes(100) == [(100, 384, 384)] * 4 + [(100, 384, 1536), (100, 1536, 384)]


def test_flops_per_message_by_hand():
    shape = common.ModelShape.from_config(E5_SMALL)
    tokens = 20
    dense = 2 * 12 * 1_769_472 * tokens
    attention = 12 * 4 * tokens * tokens * 384
    head = 2 * (384 * 384 + 384 * 10)
    assert common.flops_per_message(shape, tokens) == dense + attention + head
    # the dense term dominates short messages: ~0.85 GFLOP for a 20-token title
    assert 0.8e9 < common.flops_per_message(shape, tokens) < 0.9e9


def test_flops_grow_faster_than_linear_with_length():
    shape = common.ModelShape.from_config(E5_SMALL)
    f = [common.flops_per_message(shape, n) for n in (16, 32, 64, 128)]
    assert all(b > 2 * a - 1e6 for a, b in itertools.pairwise(f))  # attention is quadratic
    assert common.mean_flops_per_message(shape, [16, 128]) == pytest.approx((f[0] + f[3]) / 2)
    with pytest.raises(ValueError):
        common.flops_per_message(shape, 0)


def _out(i, ts, queue=0.0, infer=0.0, cached=False):
    return common.OutputRecord(f"m{i}", ts, cached, queue, infer, "x")


def test_stream_throughput_counts_from_the_first_poll():
    # 100 outputs between t=1,000 and t=2,000 ms; the first was polled 100 ms before its output
    outputs = [_out(i, 1000 + i * 10, queue=60, infer=40) for i in range(101)]
    t = common.stream_throughput(outputs)
    assert t["messages"] == 101
    assert t["seconds"] == pytest.approx(1.1)
    assert t["msgs_per_s"] == pytest.approx(101 / 1.1)
    assert common.stream_throughput([])["msgs_per_s"] == 0


def test_latencies_take_the_first_output_of_an_id():
    sent = {"m0": 1000, "m1": 1005}
    outputs = [_out(0, 1030), _out(1, 1050), _out(0, 1500)]  # m0 re-delivered later: not its latency
    assert sorted(common.latencies_ms(outputs, sent)) == [30.0, 45.0]


def test_targets():
    assert _target(7.0, 6, ">=")["met"] is True
    assert _target(0.2, 0.15, "<=")["met"] is False
    assert _target(None, 5000, ">=")["met"] is None
    assert common.ratio(10, 0) is None and common.ratio(10, 4) == 2.5


def test_cpu_description_reads_flags():
    info = common.cpu_description("model name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n")
    assert info["flags"]["amx_bf16"] and info["flags"]["avx2"] and not info["flags"]["amx_int8"]


def test_message_encoding_is_the_workers_json():
    from worker.messages import parse_value

    value = common.encode_message("id-1", "北京 今天  晴")
    assert parse_value(value, "auto", 65_536) == ("id-1", "北京 今天 晴")


def test_sized_caps_a_count_at_seconds_of_the_measured_rate():
    from bench.run import MIN_SIZED_MESSAGES, sized

    assert sized(20_000, 50.0, 150.0) == 7_500, "a slow model gets 150 s of messages"
    assert sized(20_000, 500.0, 150.0) == 20_000, "a fast one the full count"
    assert sized(20_000, 1.0, 150.0) == MIN_SIZED_MESSAGES, "never fewer than the floor"
    assert sized(300, 1.0, 150.0) == 300, "nor more than asked"
    assert sized(20_000, None, 150.0) == sized(20_000, 50.0, 0) == 20_000, "no rate or no cap: as asked"


def test_rerendering_the_committed_results_keeps_their_figures():
    """``python -m bench.report`` re-derives results.json with this version's rules: the committed run's
    headline, ratios and sizing come back unchanged (a re-render must not rewrite a measurement)."""
    import json

    from bench import report

    data = json.loads((common.REPO / "bench" / "results.json").read_text())
    again = report.rederive(json.loads(json.dumps(data)))
    assert again["sized"] == data["sized"]
    # a figure of a part the committed run predates comes back as None, never as a number
    assert {k: again.get(k) for k in report.HEADLINE} == {k: data.get(k) for k in report.HEADLINE}
    assert {k: v for k, v in again["ratios"].items() if k in data["ratios"] or v is not None} == data["ratios"]


def test_the_stand_in_forward_answers_by_the_ids_after_the_device_time():
    """bench/standin.py: logits of the right shape that depend on the ids alone, handed back once the pass's
    modelled device time has passed, passes queued one after another as on one CUDA stream."""
    import time

    import numpy as np

    from bench import standin
    from worker.engine import Pass

    model = standin.cost_model()
    assert model["flops_per_s"] == pytest.approx(0.3 * standin.H100_BF16_FLOPS)
    s = standin.StandIn(10, **{**model, "us_per_pass": 20_000.0})  # 20 ms a pass: measurable
    assert s.seconds(64, 32) > s.seconds(64, 16) > s.seconds(8, 16) > 0.02
    ids = np.arange(64 * 16, dtype=np.int64).reshape(64, 16)
    first = Pass(np.arange(64), ids, ids > 0)
    t0 = time.perf_counter()
    wait_a = s.device_forward([first])
    wait_b = s.device_forward([first])  # queued behind the first
    a, b = wait_a(), wait_b()
    assert time.perf_counter() - t0 >= 2 * s.seconds(64, 16) * 0.95
    assert a.shape == (64, 10) and a.dtype == np.float32 and np.array_equal(a, b)
    assert np.all((a >= -4) & (a < 4)) and len({row.argmax() for row in a}) > 1
    other = s.logits(ids[::-1].copy())
    assert not np.array_equal(other, a) and np.array_equal(other, a[::-1])  # a row's logits: its ids only


def test_the_feedback_part_renders_what_its_run_measured():
    """bench/feedback.py's result as RESULTS.md's part 10: every figure the issue asks for has its row."""
    from bench import feedback, report

    counts = {"agree": 90, "disagree": 10, "dropped": 3, "seconds": 1.5}
    result = {"model": "scratch", "date": "2026-12-07", "labels": 120, "promotion": "promoted v2 over v1: ...",
              "train_s": 30.0, "retrain_s": 35.5, "accuracy": {"before": 0.45, "after": 0.7,
                                                                "held_out_book_reviews": 300},
              "review_volume": {"hotel": {"outputs": 500, "uncertain": 0.1, "sampled": 0.01},
                                "book": {"outputs": 800, "uncertain": 0.17, "sampled": 0.008}},
              "shadow": {"median_off": 200.0, "rounds": 2, "rates": [
                  {"rate": 0.1, "median": 190.0, "ratio": 0.95, "counts": counts, "agreement": 0.9},
                  {"rate": 1.0, "median": 160.0, "ratio": 0.8, "counts": None, "agreement": None}]}}
    text = "\n".join(report._feedback_md(result))
    for expected in ("10.0% / 1.0% of 500", "17.0% / 0.8% of 800", "0.450 -> 0.700", "| 120 |", "30 / 36",
                     "190, 0.95x; 100 shadowed, 3 dropped", "agreement 0.900", "no shadow counts", "promoted v2"):
        assert expected in text, expected
    assert len(feedback.table_rows(result)) == 9
