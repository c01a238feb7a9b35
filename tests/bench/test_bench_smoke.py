"""The benchmark end to end at toy sizes, against the session's stack and trained model: every part runs, and
results.json holds every headline key with a positive number (the figures themselves mean nothing here)."""

from __future__ import annotations

import json

import pytest

from bench import common, report
from bench.run import run_all
from bench.summary import summarize
from tests.conftest import BROKER

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

# one and two processes, and one in exactly-once mode, on each Kafka client the worker offers
CEILING_VARIANTS = {"1 process", "2 processes", "1 process, exactly-once", "1 process, confluent-kafka",
                    "2 processes, confluent-kafka", "1 process, confluent-kafka, exactly-once"}


def test_bench_parts_write_every_headline_key(stack, trained_checkpoint, tmp_path):
    with common.open_workspace(trained_checkpoint, tmp_path / "work", stack=stack) as ws:
        results = run_all(
            ws,
            messages=120,
            steady_seconds=2.0,
            pipeline_seconds=2.0,
            scale_messages=40,
            seconds_per_point=0.02,
            batch_sizes=[1, 16],
            scale=0.02,
            # the broker comparison starts Tansu beside Apache Kafka, and the KIP-848 group protocol is
            # Apache Kafka's: both in the Apache Kafka pass
            parts={"model_only", "e2e", "pipeline_baseline", "cache", "scale_out", "delivery",
                   "ceiling", "standin", *(["brokers", "rebalance_gap"] if BROKER == "kafka" else [])},
            delivery_sizes={"unique": 20, "repeat": 3, "rate": 100.0, "seconds": 1.0,
                            "variants": (("at-least-once", 100), ("exactly-once", 100))},
            ceiling_sizes={"messages": 200, "unique": 20, "profile_messages": 0, "quality_pairs": 1},
            gap_sizes={"rate": 100.0, "seconds": 1.0, "unique": 20},
            standin_sizes={"messages": 200, "processes": (1,), "profile_messages": 0},
        )
        settings = {"model_version": ws.checkpoint_folder()[0], "broker": ws.broker, "messages": 120}
    assert results["errors"] == {}
    summary = summarize(results, settings, common.machine_info())
    summary.update(started_at="now", duration_s=1.0)
    out = tmp_path / "out"
    report.write_all(summary, out)

    data = json.loads((out / "results.json").read_text())
    for key in report.HEADLINE:
        assert isinstance(data[key], (int, float)) and data[key] > 0, key
    assert data["machine"]["cpu"]["flags"] and data["machine"]["versions"]["torch"]
    assert data["parts"]["cache"]["cached"]["cached_fraction"] == 1.0
    assert data["parts"]["e2e"]["backlog"]["cached_fraction"] == 0.0
    assert set(data["parts"]["scale_out"]["variants"]) == {"1", "2"}
    if BROKER == "kafka":
        brokers = data["parts"]["brokers"]
        assert brokers["broker"] == "tansu" and brokers["backlog"]["msgs_per_s"] > 0
        assert brokers["cached"]["cached_fraction"] == 1.0 and brokers["backlog"]["cached_fraction"] == 0.0
        gaps = data["parts"]["rebalance_gap"]["variants"]
        assert {(v["client"], v["protocol"]) for v in gaps} == {
            ("kafka-python", "classic"), ("confluent-kafka", "classic"), ("confluent-kafka", "consumer")}
        assert all(v["lost"] == 0 and v["join_gap_ms"] > 0 for v in gaps)
    variants = data["parts"]["delivery"]["variants"]
    assert {(v["client"], v["mode"]) for v in variants} == {
        (c, m) for c in ("kafka-python", "confluent-kafka") for m in ("at-least-once", "exactly-once")}
    assert all(v["steady"]["transactions"] >= 1 for v in variants if v["mode"] == "exactly-once")
    assert all(v["backlog"]["duplicates"] == 0 and v["backlog"]["cached_fraction"] == 1.0 for v in variants)
    assert data["ratios"]["eos_over_alos_100ms"] > 0 and data["ratios"]["eos_over_alos_confluent_100ms"] > 0
    assert "## Targets" in (out / "RESULTS.md").read_text() and not (out / "ANALYSIS.md").exists()
    ceiling = data["parts"]["ceiling"]
    assert set(ceiling["variants"]) == CEILING_VARIANTS
    assert all(v["cached_fraction"] == 1.0 for v in ceiling["variants"].values())
    assert "## 8. Ceiling" in (out / "RESULTS.md").read_text()
    quality = ceiling["quality_cost"]  # with and without the quality metrics, per client, and in process
    assert set(quality["drains"]) == {"kafka-python", "confluent-kafka"} and quality["in_process"]["us_per_msg"] > 0
    assert "What the model-quality metrics cost" in (out / "RESULTS.md").read_text()
    standin = data["parts"]["standin"]  # the stand-in forward: distinct messages, none from the cache
    assert set(standin["variants"]) == {"1 process", "1 process, exactly-once"}
    assert all(v["cached_fraction"] == 0.0 for v in standin["variants"].values())
    # its ceiling is its own: every message of its stream, all from the cache (not part 8's topics)
    assert standin["ceiling"]["cached_fraction"] == 1.0 and standin["ceiling"]["messages"] == 200
    assert data["ratios"]["standin_over_ceiling"] > 0 and "## 9. The uncached path" in (out / "RESULTS.md").read_text()
    md = (out / "RESULTS.md").read_text()
    assert "## Targets" in md and "e2e_msgs_per_s" in md
    assert (out / "model_only.png").stat().st_size > 0
    assert json.loads((out / "gpu_inputs.json").read_text())["token_lengths"]["titles"]


def test_gpu_check_script_runs_on_cpu(stack, tmp_path):
    """The end-to-end GPU check, on the CPU at toy sizes against the session's stack: every part runs."""
    from bench import gpu_check

    texts = gpu_check.stream(50)
    assert len(set(texts)) == 50 and all("\u4e00" <= c <= "\u9fa5" for t in texts for c in t)
    r = gpu_check.run(device="cpu", budgets=[512], dtypes=["fp32"], messages=60, model_seconds=0.1,
                      standin_messages=200, processes=[1, 2], backends=["padded", "packed"],
                      work_dir=tmp_path / "work", stack=stack)
    assert r["model_only"][0]["msgs_per_s"] > 0 and r["e2e"][0]["msgs_per_s"] > 0
    assert {row["backend"] for row in r["model_only"]} == {"padded", "packed"}
    assert r["e2e"][0]["latency_ms"]["n"] == 60 and "samples" in r["e2e"][0]["gpu"]
    assert [(row["client"], row["processes"]) for row in r["e2e"]] == [("confluent-kafka", 1), ("confluent-kafka", 2)]
    assert all(row["msgs_per_s"] > 0 and row["latency_ms"]["n"] == 60 for row in r["e2e"])
    assert set(r["standin"]["variants"]) == {"1 process", "2 processes"} and r["standin"]["standin_over_ceiling"] > 0
    json.dumps(r)
