"""Model swap under load: a new checkpoint published mid-stream is served without loss, each output names
the version that produced it, and a corrupt or incomplete checkpoint published as LATEST is refused (the
worker keeps its model and logs why).

Versions are published the way the trainer does it (bert_stream.checkpoint: staging folder -> publish -> LATEST,
then the Redis announcement). The corrupt ones cannot pass ``publish`` (it validates), so they are written
the way a broken copy or a careless operator would: a folder put in place by hand and ``set_latest``.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.fault import harness as h
from tests.fault.test_crash import _topics
from bert_stream import checkpoint

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

SEED = 13


def republish(store: Path, version: str) -> str:
    """Publish a copy of ``version`` as a new version (staging -> publish -> LATEST); returns the new id."""
    new = checkpoint.new_version_id()
    staged = checkpoint.staging_dir(store, new)
    shutil.copytree(store / version, staged, dirs_exist_ok=True)
    checkpoint.publish(store, staged, new)
    return new


def place_broken(store: Path, version: str, damage) -> str:
    """A damaged copy of ``version`` put in place by hand and made LATEST (what publish would refuse)."""
    new = checkpoint.new_version_id()
    shutil.copytree(store / version, store / new)
    damage(store / new)
    checkpoint.set_latest(store, new)
    return new


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def drop_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def test_new_checkpoint_mid_stream_and_broken_ones_refused(kafka_settings, names, model_store, stack, workers):
    _topics(kafka_settings, names)
    v0 = checkpoint.latest_version(model_store)
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic)
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, http_port=0, model_poll_s=1.0)
    publisher = h.RatePublisher(kafka_settings, names.input_topic, h.make_messages(20_000, seed=SEED), rate=50)
    started = time.monotonic()

    def outputs():
        reader.poll()
        return [r for rs in reader.outputs.values() for r in rs]

    try:
        w = workers.start("worker", env)
        w.wait_assigned()
        publisher.start()
        h.wait_until(lambda: len(outputs()) >= 100, 90, "100 outputs from the first version", workers.tails)

        v1 = republish(model_store, v0)
        checkpoint.announce(stack.redis_url, v1)
        h.wait_until(lambda: any(r["model_version"] == v1 for r in outputs()), 90, f"outputs from {v1}",
                     workers.tails)

        broken = {}
        for damage in (truncate_weights, drop_config):
            bad = place_broken(model_store, v1, damage)
            checkpoint.announce(stack.redis_url, bad)
            broken[bad] = w.wait_event("model_refused", 60, where=lambda e, v=bad: e.get("model_version") == v)
        n_after_refusals = len(outputs())
        h.wait_until(lambda: len(outputs()) >= n_after_refusals + 100, 90, "outputs after the refusals",
                     workers.tails)
        assert publisher.is_alive(), "the stream ended before the swaps were exercised"
        sent = publisher.join_ok()
        reader.wait_all(sent, timeout=120, diagnostics=workers.tails, alive=w.alive)
        reader.drain()
        swaps = w.metric("bert_stream_model_swaps_total", 'result="swapped"')
        refusals = w.metric("bert_stream_model_swaps_total", 'result="refused"')
        info = w.get("/metrics")[1]
        assert w.terminate() == 0
        counts = h.count(sent, reader)
        records = outputs()
        versions = defaultdict(int)
        for r in records:
            versions[r["model_version"]] += 1
        h.report("model-swap", counts, versions=dict(versions), swaps_metric=swaps, refused_metric=refusals,
                 seconds=round(time.monotonic() - started, 1))
    finally:
        publisher.stop.set()
        reader.close()

    assert counts.lost == 0 and counts.dlq == 0 and counts.duplicates == 0 and counts.output == len(sent)
    assert set(versions) == {v0, v1}, versions  # only real, published versions; never a broken one
    # per input partition, in offset order: the old version, then the new one, never back
    by_partition = defaultdict(list)
    for r in records:
        by_partition[r["source"]["partition"]].append((r["source"]["offset"], r["model_version"]))
    for p, items in by_partition.items():
        seq = [v for _, v in sorted(items)]
        first_new = seq.index(v1) if v1 in seq else len(seq)
        assert all(v == v0 for v in seq[:first_new]) and all(v == v1 for v in seq[first_new:]), p
        assert seq[-1] == v1, f"partition {p} did not end on the new version"
    # the refusals say why, and the served version stayed v1
    (truncated, missing) = broken.items()
    assert "truncated" in truncated[1]["error"] and truncated[1]["kept_version"] == v1
    assert "config.json" in missing[1]["error"] and missing[1]["kept_version"] == v1
    swapped_to = [e.get("model_version") for e in w.events("model_swapped")]
    assert swapped_to == [v1]
    assert swaps == 1 and refusals == 2
    served = [line for line in info.splitlines() if line.startswith("bert_stream_model_info{")]
    assert len(served) == 1 and f'version="{v1}"' in served[0]
    # the quality series keep both sides of the swap (worker/quality.py MAX_VERSIONS), and only those
    quality_versions = set(re.findall(r'^bert_stream_prediction_score_count\{version="([^"]+)"\}', info, re.MULTILINE))
    assert quality_versions == {v0, v1}
