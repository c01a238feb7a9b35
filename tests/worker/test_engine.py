"""The engine loads through the checkpoint store, picks its dtype from the hardware, and hot-swaps safely."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bert_stream import precision
from tests.worker.conftest import chinese_messages, publish_tiny_model
from bert_stream import checkpoint
from worker.engine import Engine, choose_dtype, length_buckets


def test_dtype_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.5)  # bf16 units that pay (AMD Zen 4)
    assert choose_dtype("auto", cpu, "flags\t: amx_bf16\n") == torch.bfloat16
    assert choose_dtype("auto", cpu, "flags\t: avx2\n") == torch.float32
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.6)  # bf16 units slower than fp32 (Intel VM)
    assert choose_dtype("auto", cpu, "flags\t: avx512_bf16\n") == torch.float32
    assert choose_dtype("bf16", cpu, "flags\t: avx2\n") == torch.bfloat16  # explicit wins
    assert choose_dtype("fp32", torch.device("cuda")) == torch.float32
    assert choose_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):  # not silently the default
        choose_dtype("fp16", torch.device("cuda"))


def test_predictions_keep_order_and_mark_truncation(model_store, model_labels):
    engine = Engine(model_store, max_length=32, top_k=2, dtype="fp32").start()
    model = engine.acquire()
    texts = chinese_messages(16, seed=3)
    preds = model.predict(texts)
    one_by_one = [model.predict([t])[0] for t in texts]  # sorting/chunking/padding must not change answers
    assert [p.label for p in preds] == [p.label for p in one_by_one]
    for p, q in zip(preds, one_by_one):
        assert p.score == pytest.approx(q.score, abs=1e-4)
    assert all(p.label in model_labels and len(p.top_k) == 2 for p in preds)
    padded = Engine(model_store, max_length=32, top_k=2, dtype="fp32", backend="padded").start().acquire()
    assert padded.backend == "padded" and padded.chunk_tokens == 2048  # a CPU pass; a GPU's takes a whole batch
    for chunk_tokens in (32, 2048):  # one row per pass; all 16 rows in one
        padded.chunk_tokens = chunk_tokens
        assert [p.score for p in padded.predict(texts)] == pytest.approx([p.score for p in preds], abs=1e-4)
    # CUDA's shapes: each pass padded to a length bucket, one bucket per pass (on the CPU: equal outputs only)
    padded.buckets = length_buckets(32)
    assert padded.buckets == (16, 32)
    passes = padded.passes(*_ids(padded, texts))
    assert {p.ids.shape[1] for p in passes} <= {16, 32} and len(passes) >= 2
    assert sorted(np.concatenate([p.rows for p in passes]).tolist()) == list(range(len(texts)))
    assert [p.score for p in padded.predict(texts)] == pytest.approx([p.score for p in preds], abs=1e-4)
    lengths = model.token_lengths(texts)
    assert [p.truncated for p in preds] == [len(model.tokenizer(t)["input_ids"]) > 32 for t in texts]
    assert any(p.truncated for p in preds) and not all(p.truncated for p in preds)
    assert max(lengths) == 32
    # the batcher's estimate (no tokenizing) never under-counts this character-level vocabulary, and is capped
    budget = model.token_budget(texts)
    assert all(b >= n for b, n in zip(budget, lengths)) and max(budget) == 32


def _ids(model, texts):
    ids = [e.ids for e in model._rust.encode_batch_fast(texts)]
    return ids, np.array([len(i) for i in ids])


def test_new_version_is_swapped_in_and_a_corrupt_one_refused(model_store):
    engine = Engine(model_store, dtype="fp32").start()
    v1 = engine.version
    assert not engine.try_update()  # nothing new

    bad = checkpoint.new_version_id()  # a truncated copy, made to look published
    shutil.copytree(model_store / v1, model_store / bad)
    weights = model_store / bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    checkpoint.set_latest(model_store, bad)
    assert not engine.try_update()
    assert bad in engine.refused and engine.acquire().version == v1
    assert not engine.try_update()  # refused once, not reloaded in a loop

    v2 = publish_tiny_model(model_store, seed=1)  # other labels than v1's: refused unless allowed
    labels_v1 = engine.current.labels
    assert not engine.try_update()
    assert "differ from the served model's" in engine.refused[v2] and engine.acquire().version == v1
    engine.allow_label_change = True  # BERT_STREAM_ALLOW_LABEL_CHANGE=true
    engine.refused.pop(v2)
    assert engine.try_update()
    assert engine.version == v1  # offered, not yet swapped: swaps happen between batches
    assert engine.acquire().version == v2 and engine.version == v2
    assert engine.current.labels != labels_v1


def test_dtype_check_compares_bf16_with_fp32_on_real_texts(model_store, tmp_path, capsys):
    from worker import dtype_check

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(chinese_messages(40, seed=5)) + "\n", encoding="utf-8")
    status = dtype_check.main(["--model-dir", str(model_store), "--texts", str(texts), "--min-agreement", "0"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0 and report["texts"] == 40
    assert 0 <= report["agreement"] <= 1 and report["disagreements"] == round(40 * (1 - report["agreement"]))
    assert report["fp32_msgs_per_s"] > 0 and report["bf16_msgs_per_s"] > 0
    assert report["auto_dtype"] == str(choose_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert dtype_check.main(["--model-dir", str(model_store), "--texts", str(tmp_path / "none.txt")]) == 2
    assert "no texts" in capsys.readouterr().err


def test_a_hybrid_checkpoint_adds_its_ngram_half_to_every_prediction(model_store, model_labels):
    """An n-gram half that knows the texts and outweighs the transformer decides; its scores reach predict(),
    logits() and every backend and chunking alike; without it the transformer's answers come back."""
    from bert_stream.ngram import NgramModel

    texts = list(dict.fromkeys(chinese_messages(40, seed=5)))
    _, folder = checkpoint.resolve(model_store)  # a private copy: the session's model may be a hybrid already
    for name in ("ngram.json", "ngram.safetensors"):
        (folder / name).unlink(missing_ok=True)
    plain = Engine(model_store, dtype="fp32").start().acquire()
    assert plain.ngram is None
    labels = plain.labels
    half = NgramModel.fit(texts, [(i * 7) % len(labels) for i in range(len(texts))], len(labels))
    half.model_scale, half.ngram_scale = 1.0, 50.0
    half.save(folder)
    expected = [labels[i] for i in half.scores(texts).argmax(1)]
    assert sum(e != p.label for e, p in zip(expected, plain.predict(texts))) > 0  # the half changes answers
    for backend in ("packed", "padded"):
        hybrid = Engine(model_store, dtype="fp32", backend=backend).start().acquire()
        assert hybrid.ngram is not None
        assert [p.label for p in hybrid.predict(texts)] == expected
        assert [p.label for p in hybrid.predict(texts[:1])] == expected[:1]  # one at a time, the same
        combined = half.combine(plain.logits(texts), texts)
        torch.testing.assert_close(hybrid.logits(texts), combined, atol=1e-3, rtol=1e-3)
    for name in ("ngram.json", "ngram.safetensors"):
        (folder / name).unlink()
    again = Engine(model_store, dtype="fp32").start().acquire()
    assert again.ngram is None and [p.label for p in again.predict(texts)] == [p.label for p in plain.predict(texts)]
