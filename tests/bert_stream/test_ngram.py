"""The hybrid's char n-gram half: the same decision function as scikit-learn's pipeline, a checkpoint of
numbers only, and scales fitted by validation log-loss."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from bert_stream import ngram
from bert_stream.ngram import NgramModel

TOPICS = {0: "苹果香蕉橘子葡萄西瓜草莓", 1: "汽车火车飞机轮船地铁公交", 2: "足球篮球排球网球乒乓羽毛"}


def corpus(n: int, seed: int = 0, topics=TOPICS) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % len(topics)
        texts.append("".join(rng.choice(topics[label]) for _ in range(rng.randint(3, 12))) + "今天")
        labels.append(label)
    return texts, labels


def sklearn_decision(texts, labels, queries) -> np.ndarray:
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.svm import LinearSVC

    hasher = HashingVectorizer(analyzer="char", ngram_range=(1, 3), n_features=ngram.N_FEATURES,
                               alternate_sign=False, norm=None)
    tfidf = TfidfTransformer().fit(hasher.transform(texts))
    svm = LinearSVC().fit(tfidf.transform(hasher.transform(texts)), labels)
    return svm.decision_function(tfidf.transform(hasher.transform(queries)))


def test_scores_are_scikit_learns_decision_function():
    texts, labels = corpus(90)
    queries = corpus(20, seed=1)[0] + ["", "完全没见过的字"]  # an empty text and one with no known n-gram
    model = NgramModel.fit(texts, labels, 3)
    np.testing.assert_allclose(model.scores(queries), sklearn_decision(texts, labels, queries), rtol=1e-4, atol=1e-5)
    assert model.scores(corpus(30, seed=2)[0]).argmax(1).tolist() == corpus(30, seed=2)[1]


def test_two_classes_split_one_decision_function_in_halves():
    texts, labels = corpus(60, topics={0: TOPICS[0], 1: TOPICS[1]})
    queries = corpus(10, seed=3, topics={0: TOPICS[0], 1: TOPICS[1]})[0]
    scores = NgramModel.fit(texts, labels, 2).scores(queries)
    np.testing.assert_allclose(scores[:, 1] - scores[:, 0], sklearn_decision(texts, labels, queries), rtol=1e-4,
                               atol=1e-5)


def test_a_label_missing_from_training_scores_zero():
    texts, labels = corpus(60)
    model = NgramModel.fit(texts, labels, 4)  # label 3 exists (the transformer knows it) but has no examples
    assert model.labels == 4 and np.all(model.scores(texts)[:, 3] == 0)


def test_save_and_load_keep_every_score_and_write_no_pickle(tmp_path):
    texts, labels = corpus(90)
    model = NgramModel.fit(texts, labels, 3)
    model.model_scale, model.ngram_scale = 1.5, 0.7
    model.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {ngram.CONFIG_FILE, ngram.WEIGHTS_FILE}
    config = json.loads((tmp_path / ngram.CONFIG_FILE).read_text())
    assert config["kind"] == ngram.KIND and config["ngram_scale"] == 0.7
    again = NgramModel.load(tmp_path)
    np.testing.assert_array_equal(again.scores(texts), model.scores(texts))
    logits = torch.randn(len(texts), 3)
    assert torch.equal(again.combine(logits, texts), model.combine(logits, texts))
    expected = 1.5 * torch.log_softmax(logits, -1) + 0.7 * torch.from_numpy(model.scores(texts))
    torch.testing.assert_close(model.combine(logits, texts), expected)
    assert NgramModel.load(tmp_path / "elsewhere") is None  # a transformer-only checkpoint


def test_an_unknown_kind_is_refused(tmp_path):
    NgramModel.fit(*corpus(30), 3).save(tmp_path)
    config = json.loads((tmp_path / ngram.CONFIG_FILE).read_text())
    (tmp_path / ngram.CONFIG_FILE).write_text(json.dumps({**config, "kind": "word-bigrams"}))
    with pytest.raises(ValueError, match="unknown kind 'word-bigrams'"):
        NgramModel.load(tmp_path)


def test_calibration_weighs_the_half_that_knows():
    texts, labels = corpus(90)
    held_texts, held_labels = corpus(60, seed=5)
    rng = np.random.default_rng(0)
    # A transformer that guesses (noise) next to n-grams that know: the n-grams get the weight.
    model = NgramModel.fit(texts, labels, 3)
    fit = model.calibrate(rng.normal(size=(60, 3)), held_texts, held_labels)
    assert model.ngram_scale > 0.5 and fit["log_loss_hybrid"] < fit["log_loss_transformer"] - 0.3
    # A transformer that mostly knows next to n-grams fitted on shuffled labels: it keeps the weight.
    shuffled = NgramModel.fit(texts, random.Random(1).sample(labels, len(labels)), 3)
    mostly = np.eye(3)[held_labels] * 2.0 + rng.normal(size=(60, 3))
    fit = shuffled.calibrate(mostly, held_texts, held_labels)
    assert shuffled.model_scale > 0.5 and shuffled.ngram_scale < 0.2 * shuffled.model_scale, fit
    assert fit["log_loss_hybrid"] <= fit["log_loss_transformer"]


ODD_TEXTS = ["", " ", "A  B\t\tc", "ΣΑΣ ΟΔΟΣ", "İstanbul", "a\u3000\u3000b", "😀😀x", "\n", "ab", "Ǆ", "é" * 300,
             "Ab\r\n\r\nCD", "价格\u00a0\u00a0合理", "一"]


@pytest.mark.parametrize("texts", [ODD_TEXTS, ["a\x00b", "好"], ["\ud800孤"], ["一"]],
                         ids=["odd", "nul", "lone-surrogate", "one"])
def test_numpy_hashing_buckets_every_ngram_as_scikit_learn_does(texts):
    """The worker's vectorised hashing (any script, 1-4 byte UTF-8, case, white-space runs) gives the
    buckets scikit-learn's HashingVectorizer gives; what it cannot split (NUL, a lone surrogate) falls back."""
    hasher = ngram._vectorizer(ngram.N_FEATURES, ngram.NGRAM_RANGE)
    hashed = ngram.char_ngram_hashes(texts, ngram.NGRAM_RANGE)
    if "\x00" in "".join(texts) or "\ud800" in "".join(texts):
        assert hashed is None
        return
    doc, h = hashed
    ours = [sorted(np.abs(h[doc == i].astype(np.int64)) % ngram.N_FEATURES) for i in range(len(texts))]
    x = hasher.transform(texts)
    theirs = [sorted(np.repeat(x[i].indices, x[i].data.astype(int))) for i in range(len(texts))]
    assert [list(map(int, o)) for o in ours] == [list(map(int, t)) for t in theirs]


def test_numpy_scores_match_the_scikit_learn_path():
    texts, labels = corpus(60)
    model = NgramModel.fit(texts, labels, 3)
    queries = corpus(20, seed=5)[0] + ODD_TEXTS + ["a\x00b"]
    np.testing.assert_allclose(model.scores(queries), model._scores_sklearn(queries), rtol=1e-5, atol=1e-6)
