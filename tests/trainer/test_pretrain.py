"""Pretraining: the masking/packing/pairing logic as properties (trainer.mlm), and short real runs of
``python -m trainer.pretrain`` (tiny preset) whose output the fine-tuner's loader must accept."""

from __future__ import annotations

import json
import random
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import mlm
from trainer.pretrain import learning_rate

MASK, LOW, VOCAB = 103, 104, 21128
CFG = mlm.MaskingConfig(mask_token_id=MASK, random_low=LOW, random_high=VOCAB)
CLS, SEP, PAD = 101, 102, 0


def _batch(seed: int, rows: int, width: int):
    """Random ids with specials at the ends of each row and right padding: what collate produces."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(LOW, VOCAB, (rows, width), generator=g)
    lengths = torch.randint(2, width + 1, (rows,), generator=g)
    positions = torch.arange(width).expand(rows, width)
    inside = positions < lengths[:, None]
    ids[:, 0] = CLS
    ids[positions == (lengths[:, None] - 1)] = SEP
    ids[~inside] = PAD
    maskable = inside & (ids != CLS) & (ids != SEP)
    return ids, maskable


def _outcome(ids, maskable, masked, labels):
    chosen = labels != mlm.IGNORE_INDEX
    return {
        "chosen": chosen,
        "as_mask": chosen & (masked == MASK),
        "kept": chosen & (masked == ids),
        "randomised": chosen & (masked != MASK) & (masked != ids),
    }


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), whole_words=st.booleans())
def test_masking_proportions_15_80_10_10(seed, whole_words):
    ids, maskable = _batch(seed, rows=128, width=256)  # ~16k maskable tokens: std of the 15% share ~0.3%
    word_ids = None
    if whole_words:  # words of 1-4 tokens; specials and padding outside any word
        rng = random.Random(seed)
        word_ids = torch.full_like(ids, mlm.NO_WORD)
        for r in range(ids.shape[0]):
            w, left = 0, 0
            for c in range(ids.shape[1]):
                if not maskable[r, c]:
                    continue
                if left == 0:
                    w, left = w + 1, rng.randint(1, 4)
                word_ids[r, c] = w - 1
                left -= 1
    masked, labels = mlm.mask_tokens(ids, maskable, CFG, torch.Generator().manual_seed(seed), word_ids=word_ids)
    o = _outcome(ids, maskable, masked, labels)
    n_chosen = o["chosen"].sum().item()
    assert abs(n_chosen / maskable.sum().item() - 0.15) < (0.03 if whole_words else 0.02)
    assert abs(o["as_mask"].sum().item() / n_chosen - 0.8) < 0.04
    assert abs(o["randomised"].sum().item() / n_chosen - 0.1) < 0.03
    assert abs(o["kept"].sum().item() / n_chosen - 0.1) < 0.03
    # labels: the original id where chosen, ignored elsewhere; unchosen tokens are never changed
    assert torch.equal(labels[o["chosen"]], ids[o["chosen"]])
    assert torch.equal(masked[~o["chosen"]], ids[~o["chosen"]])
    # random replacements come from the ordinary vocabulary, never a special token
    assert (masked[o["randomised"]] >= LOW).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), width=st.integers(2, 40),
       p=st.floats(0.05, 0.95))
def test_specials_and_padding_are_never_masked(seed, rows, width, p):
    ids, maskable = _batch(seed, rows, width)
    cfg = mlm.MaskingConfig(mask_token_id=MASK, random_low=LOW, random_high=VOCAB, mlm_probability=p)
    masked, labels = mlm.mask_tokens(ids, maskable, cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(masked[~maskable], ids[~maskable])
    assert (labels[~maskable] == mlm.IGNORE_INDEX).all()
    # at least one prediction per batch whenever anything is maskable (the loss is never 0/0)
    assert (labels != mlm.IGNORE_INDEX).any() == maskable.any()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), word_lengths=st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_whole_word_masking_masks_all_tokens_of_a_word_or_none(seed, word_lengths):
    word_ids = [mlm.NO_WORD] + [w for w, n in enumerate(word_lengths) for _ in range(n)] + [mlm.NO_WORD]
    ids = torch.tensor([[CLS] + [LOW + 7] * (len(word_ids) - 2) + [SEP]])
    wids = torch.tensor([word_ids])
    maskable = wids != mlm.NO_WORD
    cfg = mlm.MaskingConfig(mask_token_id=MASK, random_low=LOW, random_high=VOCAB, mlm_probability=0.3)
    _, labels = mlm.mask_tokens(ids, maskable, cfg, torch.Generator().manual_seed(seed), word_ids=wids)
    chosen = (labels[0] != mlm.IGNORE_INDEX).tolist()
    for w in range(len(word_lengths)):
        states = {c for c, wid in zip(chosen, word_ids) if wid == w}
        assert len(states) == 1, f"word {w} partly masked"
    assert not chosen[0] and not chosen[-1]


def test_word_ids_follow_jieba_words():
    import jieba

    from trainer.models import chinese_char_tokenizer

    text = "我爱北京天安门, hello world"
    tok = chinese_char_tokenizer()
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    words = list(jieba.tokenize(text))
    wids = mlm.word_ids_from_offsets(enc["offset_mapping"], [start for _, start, _ in words])
    by_word: dict[int, str] = {}
    for (start, end), w in zip(enc["offset_mapping"], wids):
        by_word[w] = by_word.get(w, "") + text[start:end]
    segmented = [w for w, _, _ in words if w.strip() and w.strip() != ","]
    assert [s for s in by_word.values() if s != ","] == [w.lower() for w in segmented]
    assert wids == sorted(wids)  # numbered in order, 0, 1, ...


_SENTENCES = ["中华人民共和国成立以来，国民经济持续快速发展。", "我爱北京天安门", "今天的天气非常好，适合去公园散步",
              "人工智能技术在医疗领域的应用越来越广泛", "NBA季后赛：湖人队客场战胜勇士队"]


@pytest.fixture(scope="module")
def jieba_rows():
    """The corpus path of trainer.pretrain: tokenize with jieba word ids, pack into rows."""
    import jieba

    from trainer.models import chinese_char_tokenizer
    from trainer.pretrain import tokenize_documents

    tok = chinese_char_tokenizer()
    [doc] = tokenize_documents([_SENTENCES], tok, whole_words=True)
    rows = mlm.pack_lines(doc, 24, CLS, SEP, min_tokens=1)
    words = {w for s in _SENTENCES for w in jieba.lcut(s)}
    return tok, rows, words


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_whole_word_masking_masks_whole_jieba_words(jieba_rows, seed):
    tok, rows, words = jieba_rows
    ids = torch.tensor([r[0] + [PAD] * (24 - len(r[0])) for r in rows])
    wids = torch.tensor([r[1] + [mlm.NO_WORD] * (24 - len(r[1])) for r in rows])
    cfg = mlm.MaskingConfig(mask_token_id=MASK, random_low=LOW, random_high=VOCAB, mlm_probability=0.3)
    _, labels = mlm.mask_tokens(ids, wids != mlm.NO_WORD, cfg, torch.Generator().manual_seed(seed), word_ids=wids)
    for r in range(ids.shape[0]):
        groups: dict[int, list[int]] = {}
        for c, w in enumerate(wids[r].tolist()):
            if w != mlm.NO_WORD:
                groups.setdefault(w, []).append(c)
        for cols in groups.values():
            assert len({labels[r, c].item() != mlm.IGNORE_INDEX for c in cols}) == 1
            # a group is one jieba word (or the piece of one that a row boundary cut off)
            text = tok.decode(ids[r, cols]).replace(" ", "")
            assert any(text in w.lower() for w in words), text


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 50), min_size=1, max_size=40), max_length=st.integers(8, 64))
def test_pack_lines_cuts_the_separated_stream_into_full_rows(lengths, max_length):
    lines = [(list(range(1000 + 100 * i, 1000 + 100 * i + n)), [k // 2 for k in range(n)])
             for i, n in enumerate(lengths)]
    rows = mlm.pack_lines(lines, max_length, CLS, SEP, min_tokens=1)
    stream = [t for ids, _ in lines if ids for t in (*ids, SEP)]
    assert [t for ids, _ in rows for t in ids[1:]] == stream
    for ids, wids in rows[:-1]:
        assert len(ids) == max_length
    for ids, wids in rows:
        assert ids[0] == CLS and len(wids) == len(ids) and len(ids) <= max_length
        assert all((w == mlm.NO_WORD) == (t in (CLS, SEP)) for t, w in zip(ids, wids))
        # a word id names one word: its tokens sit next to each other
        seen = [w for w in wids if w != mlm.NO_WORD]
        assert seen == sorted(seen)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), doc_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6))
def test_sentence_pairs_are_well_formed(seed, doc_sizes):
    docs, next_id = [], 1000
    for size in doc_sizes:
        doc = []
        for _ in range(size):
            n = random.Random(next_id).randint(1, 15)
            doc.append((list(range(next_id, next_id + n)), list(range(n))))
            next_id += 100
        docs.append(doc)
    pairs = mlm.sentence_pairs(docs, 32, CLS, SEP, random.Random(seed))
    starts = {ids[0]: (d, i) for d, doc in enumerate(docs) for i, (ids, _) in enumerate(doc)}
    for p in pairs:
        assert len(p.input_ids) <= 32 and p.input_ids[0] == CLS and p.input_ids[-1] == SEP
        split = p.input_ids.index(SEP)
        assert p.token_type_ids == [0] * (split + 1) + [1] * (len(p.input_ids) - split - 1)
        a_first, b_first = p.input_ids[1], p.input_ids[split + 1]
        if p.is_random == 0:  # B starts at the line right after A's last line, in the same document
            (da, _), (db, ib) = starts[a_first], starts[b_first]
            a_last = max(i for t in p.input_ids[1:split] if t in starts for _, i in [starts[t]])
            assert da == db and ib == a_last + 1
    if any(n >= 2 for n in doc_sizes) and len(pairs) >= 40:
        assert 0.2 < sum(p.is_random for p in pairs) / len(pairs) < 0.8


def test_learning_rate_warms_up_then_decays_to_zero():
    assert learning_rate(1.0, 0.0, 0.1) == 0.0
    assert learning_rate(1.0, 0.05, 0.1) == pytest.approx(0.5)
    assert learning_rate(1.0, 0.1, 0.1) == pytest.approx(1.0)
    assert learning_rate(1.0, 0.55, 0.1) == pytest.approx(0.5)
    assert learning_rate(1.0, 1.0, 0.1) == 0.0
    assert learning_rate(1.0, 2.0, 0.1) == 0.0


def test_sinusoidal_position_init_orders_positions_at_the_token_embeddings_scale():
    from trainer.pretrain import PretrainSettings, build_model, sinusoidal_positions

    table = sinusoidal_positions(512, 128)
    assert torch.allclose(table[0, 0::2], torch.zeros(64)) and torch.allclose(table[0, 1::2], torch.ones(64))
    assert table.pow(2).mean().item() == pytest.approx(0.5, abs=1e-3)  # sin^2 + cos^2 = 1 per pair
    # nearby positions are more alike than distant ones: the word order the random init lacks
    similarity = torch.nn.functional.cosine_similarity(table[10:11], table, dim=-1)
    assert similarity[11] > similarity[20] > similarity[100]

    settings = PretrainSettings(preset="tiny", position_init="sinusoidal")
    model = build_model(settings, vocab_size=1000)
    positions = model.bert.embeddings.position_embeddings.weight.detach()
    words = model.bert.embeddings.word_embeddings.weight.detach()
    assert positions.std().item() == pytest.approx(words.std().item(), rel=0.1)
    scale = model.config.initializer_range / 0.5 ** 0.5  # the token embeddings' root mean square
    assert torch.allclose(positions, sinusoidal_positions(*positions.shape) * scale)
    random_init = build_model(PretrainSettings(preset="tiny", position_init="random"), vocab_size=1000)
    assert not torch.allclose(random_init.bert.embeddings.position_embeddings.weight.detach(), positions)


# --------------------------------------------------------------------------------------------------------
# Real runs (tiny preset, a few dozen steps)


def _args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--corpus-dir", str(corpus), "--no-builtin-corpus", "--preset", "tiny", "--max-length", "64",
            "--batch-size", "16", "--learning-rate", "1e-3", "--eval-every", "10", "--log-every", "5",
            "--output-dir", str(out), *extra]


@pytest.mark.slow
def test_pretrain_interrupted_resumed_loss_falls_and_fine_tuner_loads_it(corpus_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from trainer import pretrain
    from bert_stream.checkpoint import latest_version
    from trainer.models import load_for_classification

    out = tmp_path / "pretrained"
    args = _args(corpus_dir, out, "--max-steps", "20", "--save-every", "10")
    # An interruption after training but before publishing: state from step 10 survives, LATEST is unset.
    with mock.patch.object(pretrain, "_write_and_publish", side_effect=KeyboardInterrupt), \
            pytest.raises(KeyboardInterrupt):
        pretrain.main(args)
    assert latest_version(out) is None
    [run] = list((out / pretrain.RUNS).iterdir())
    assert json.loads((run / "state" / "progress.json").read_text())["step"] == 10

    folder = pretrain.main([*args, "--resume"])
    assert latest_version(out) == folder.name == run.name  # the resumed run keeps its version id
    assert not (out / pretrain.RUNS).exists()  # finished: no resumable state left behind
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 20
    assert metrics["final_mlm_loss"] < metrics["initial_mlm_loss"] - 0.3, metrics["history"]
    assert {h["step"] for h in metrics["history"] if "eval_loss" in h} == {0, 10, 20}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pretraining_curve.png", "pretrain_args.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    assert config["hidden_dropout_prob"] == 0.1  # pretrained without dropout, saved with the fine-tuning one

    labels = ["体育", "财经", "科技"]
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    for spec in (folder, out):  # the version folder, and the store (follows LATEST)
        clf, tokenizer = load_for_classification(str(spec), labels)
        assert clf.config.id2label == dict(enumerate(labels))
        assert torch.equal(clf.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
        logits = clf(**tokenizer(["中国队获得冠军"], return_tensors="pt")).logits
        assert logits.shape == (1, 3)


@pytest.mark.slow
def test_pretrain_with_nsp_and_whole_word_masking(corpus_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from trainer import pretrain

    folder = pretrain.main(_args(corpus_dir, tmp_path / "p", "--max-steps", "6", "--nsp", "--whole-word-masking"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    pooler = model.bert.pooler.dense.weight  # trained by NSP, so it is loaded rather than re-initialised
    from safetensors.torch import load_file

    assert torch.equal(pooler, load_file(folder / "model.safetensors")["bert.pooler.dense.weight"])


def test_cli_rejects_bad_flags_in_one_line(tmp_path, capsys):
    from trainer import pretrain

    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--no-builtin-corpus", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no corpus" in err
