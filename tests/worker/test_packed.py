"""The padding-free forward computes what the padded transformers forward computes, minus the padding."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification)

from tests.worker.conftest import chinese_messages
from trainer.models import add_mean_pooling_layer
from worker.engine import Engine, choose_backend
from worker.packed import PackedBert, unsupported


def tiny_bert(seed: int = 0, layers: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=160, num_labels=5)
    return BertForSequenceClassification(config).eval()


def padded_logits(model, rows: list[list[int]]) -> torch.Tensor:
    longest = max(map(len, rows))
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def random_rows(n: int, seed: int, lengths=(1, 2, 5, 17, 17, 17, 40, 90, 150)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(rng.choice(lengths))] for _ in range(n)]


@pytest.mark.parametrize("attention_tokens", [1, 64, 256, 100_000])
def test_packed_logits_equal_the_padded_model(attention_tokens):
    model = tiny_bert()
    rows = sorted(random_rows(40, seed=attention_tokens), key=len)
    packed = PackedBert(model, attention_tokens=attention_tokens).logits(rows)
    torch.testing.assert_close(packed, padded_logits(model, rows), atol=2e-5, rtol=1e-4)


def test_unsorted_rows_single_rows_and_equal_lengths():
    model = tiny_bert(seed=1)
    packed = PackedBert(model, attention_tokens=128)
    for rows in (random_rows(25, seed=7), [[5, 6, 7]], [[9] * 12] * 6, [[3]]):
        torch.testing.assert_close(packed.logits(rows), padded_logits(model, rows), atol=2e-5, rtol=1e-4)


def test_the_trainers_mean_pooling_layer_runs_packed():
    """The pooling layer's queries and keys are zero (a uniform average over each row's real tokens): the last
    layer's [CLS]-only computation must average over the row's own tokens and none of another's."""
    model = tiny_bert(seed=2, layers=2)
    add_mean_pooling_layer(model)
    model.eval()
    rows = sorted(random_rows(30, seed=3), key=len)
    torch.testing.assert_close(PackedBert(model, attention_tokens=64).logits(rows), padded_logits(model, rows),
                               atol=2e-5, rtol=1e-4)


def test_models_packed_does_not_know_keep_the_padded_path():
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2,
                                                                  hidden_dim=64))
    assert "not a BertForSequenceClassification" in unsupported(distil)
    with pytest.raises(ValueError, match="cannot run packed"):
        PackedBert(distil)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", distil, cpu)[0] == "padded"
    assert choose_backend("packed", distil, cpu)[0] == "padded"  # asked for, impossible: falls back
    bert = tiny_bert()
    assert choose_backend("auto", bert, cpu) == ("packed", None)
    assert choose_backend("auto", bert, cuda)[0] == "padded"  # not measured on a GPU yet
    assert choose_backend("packed", bert, cuda) == ("packed", None)
    assert choose_backend("padded", bert, cpu) == ("padded", None)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_engine_serves_packed_by_default_on_cpu_with_the_padded_answers(model_store, dtype):
    texts = chinese_messages(48, seed=11)
    auto = Engine(model_store, max_length=64, dtype=dtype).start().acquire()
    padded = Engine(model_store, max_length=64, dtype=dtype, backend="padded").start().acquire()
    assert (auto.backend, padded.backend) == ("packed", "padded")
    a, p = auto.predict(texts), padded.predict(texts)
    assert [x.truncated for x in a] == [x.truncated for x in p]
    if dtype == "fp32":
        assert [x.label for x in a] == [x.label for x in p]
        for x, y in zip(a, p):
            assert x.score == pytest.approx(y.score, abs=1e-4)
    else:  # bf16 rounds differently with and without padding: near-ties may flip
        assert sum(x.label == y.label for x, y in zip(a, p)) >= 0.95 * len(texts)
