"""Pretraining data as pure functions over token ids: word groups for whole-word masking, packing lines into
fixed-length rows, sentence pairs for next-sentence prediction, and BERT's 15% / 80-10-10 masking.

No model, no files, no tokenizer objects: ``trainer.pretrain`` tokenizes and calls these, the tests call
them directly. A *line* here is ``(token_ids, word_ids)``: ``word_ids[i]`` numbers the word token ``i``
belongs to (0, 1, ... within the line), so whole-word masking can pick words instead of tokens. Rows carry
word ids renumbered to be unique within the row, ``-1`` on special tokens and padding.

Masking happens per batch inside the training loop (dynamic masking, as RoBERTa does): a sequence is seen
with a different mask each epoch, and each batch's mask comes from a generator seeded by (seed, batch
number), so a resumed run masks exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Iterable, Sequence

import torch

IGNORE_INDEX = -100  # the label of a position that is not predicted (torch's cross_entropy default)
NO_WORD = -1  # word id of special tokens and padding: never part of a maskable word

Line = tuple[list[int], list[int]]  # (token ids, word ids), no special tokens


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """BERT's recipe: choose ``mlm_probability`` of the maskable tokens (or of the words, with whole-word
    masking); of those, ``mask_fraction`` become ``[MASK]``, ``random_fraction`` a random token from
    ``[random_low, random_high)``, the rest stay as they were (the model must still predict them)."""

    mask_token_id: int
    random_low: int
    random_high: int
    mlm_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError("mask_fraction and random_fraction must be >= 0 and sum to at most 1")
        if not 0 <= self.random_low < self.random_high:
            raise ValueError(f"empty random-token range [{self.random_low}, {self.random_high})")


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    config: MaskingConfig,
    generator: torch.Generator,
    word_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_input_ids, labels)`` for a batch ``[B, T]``.

    ``maskable`` is False on special tokens and padding: those are never chosen. With ``word_ids`` (same
    shape, ``NO_WORD`` outside words) each word is chosen with ``mlm_probability`` and all of its tokens are
    masked together, so the expected share of masked tokens is the same as token-level masking. ``labels``
    hold the original id where a token was chosen and ``IGNORE_INDEX`` elsewhere. A batch where chance
    chose nothing gets one chosen token, so the loss is always defined.
    """
    if input_ids.shape != maskable.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and maskable {tuple(maskable.shape)} differ")
    maskable = maskable.bool()
    if word_ids is None:
        chosen = torch.rand(input_ids.shape, generator=generator) < config.mlm_probability
    else:
        if word_ids.shape != input_ids.shape:
            raise ValueError("word_ids must have the shape of input_ids")
        n_words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
        word_draw = torch.rand((input_ids.shape[0], max(n_words, 1)), generator=generator) < config.mlm_probability
        chosen = torch.gather(word_draw, 1, word_ids.clamp(min=0).long()) & (word_ids >= 0)
    chosen &= maskable
    if not chosen.any() and maskable.any():
        candidates = maskable.nonzero()
        row, col = candidates[torch.randint(len(candidates), (1,), generator=generator)][0]
        if word_ids is None or word_ids[row, col] < 0:
            chosen[row, col] = True
        else:  # the whole word of the picked token
            chosen[row] = maskable[row] & (word_ids[row] == word_ids[row, col])

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (action < config.mask_fraction)
    to_random = chosen & (action >= config.mask_fraction) & (action < config.mask_fraction + config.random_fraction)
    random_ids = torch.randint(config.random_low, config.random_high, input_ids.shape, generator=generator,
                               dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, config.mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def word_ids_from_offsets(offsets: Sequence[tuple[int, int]], word_starts: Sequence[int]) -> list[int]:
    """Number each token by the word its first character falls in.

    ``offsets`` are the tokens' character spans in the text; ``word_starts`` the sorted start offsets of the
    segmenter's words (which cover the text). Word pieces of one word (``hell``, ``##o``) and the
    characters of a Chinese word share a number. Returned numbers are renumbered 0, 1, ... in order."""
    out: list[int] = []
    renumber: dict[int, int] = {}
    for start, _end in offsets:
        word = max(bisect.bisect_right(word_starts, start) - 1, 0)
        out.append(renumber.setdefault(word, len(renumber)))
    return out


def pack_lines(lines: Iterable[Line], max_length: int, cls_id: int, sep_id: int,
               min_tokens: int = 8) -> list[Line]:
    """Concatenate lines (``[SEP]`` after each) into one stream and cut it into rows of ``max_length``,
    each ``[CLS]`` + ``max_length - 1`` stream tokens: no padding wasted on short lines such as titles.

    A word cut by a row boundary becomes two words. The last, shorter row is kept if it has at least
    ``min_tokens`` tokens. Word ids are renumbered to be unique within a row; specials get ``NO_WORD``."""
    if max_length < 8:
        raise ValueError(f"max_length must be at least 8, got {max_length}")
    body = max_length - 1
    rows: list[Line] = []
    ids: list[int] = []
    wids: list[int] = []
    offset = 0  # added to the line's word ids so that they stay unique within the stream

    def flush() -> None:
        for start in range(0, len(ids) - body + 1, body):
            rows.append(_row(ids[start:start + body], wids[start:start + body], cls_id))
        kept = len(ids) - len(ids) % body
        del ids[:kept], wids[:kept]

    for line_ids, line_wids in lines:
        if not line_ids:
            continue
        ids.extend(line_ids)
        wids.extend(w + offset for w in line_wids)
        offset += (max(line_wids) + 1) if line_wids else 0
        ids.append(sep_id)
        wids.append(NO_WORD)
        if len(ids) >= body:
            flush()
    if len(ids) >= min_tokens:
        rows.append(_row(ids, wids, cls_id))
    return rows


def _row(ids: list[int], wids: list[int], cls_id: int) -> Line:
    return [cls_id, *ids], [NO_WORD, *_renumber(wids)]


def _renumber(wids: Sequence[int]) -> list[int]:
    mapping: dict[int, int] = {}
    return [NO_WORD if w < 0 else mapping.setdefault(w, len(mapping)) for w in wids]


@dataclasses.dataclass(frozen=True)
class PairExample:
    """One next-sentence-prediction row: ``[CLS] A [SEP] B [SEP]``; ``is_random`` is the NSP label
    (0: B follows A in its document, 1: B was drawn from elsewhere, as in BertForPreTraining)."""

    input_ids: list[int]
    token_type_ids: list[int]
    word_ids: list[int]
    is_random: int


def sentence_pairs(documents: Sequence[Sequence[Line]], max_length: int, cls_id: int, sep_id: int,
                   rng: random.Random) -> list[PairExample]:
    """BERT's pairs: walk each document, fill segment A with consecutive lines up to about half the budget,
    then B with the lines that follow (50%) or with lines from a random other place (50%, and the lines
    that would have been B are not skipped). Documents of one line give no pair (the caller packs those
    for MLM alone). The pair is truncated longest-first to ``max_length - 3`` tokens."""
    budget = max_length - 3
    if budget < 4:
        raise ValueError(f"max_length must be at least 7 for sentence pairs, got {max_length}")
    multi = [i for i, d in enumerate(documents) if len(d) >= 2]
    out: list[PairExample] = []
    for d in multi:
        doc = documents[d]
        i = 0
        while i < len(doc) - 1:
            a, j = _take(doc, i, budget // 2, stop=len(doc) - 1)
            if rng.random() < 0.5:
                b, k = _take(doc, j, budget - len(a[0]), stop=len(doc))
                is_random, i = 0, k
            else:
                other_doc, start = _random_elsewhere(documents, multi, d, j, rng)
                b, _ = _take(documents[other_doc], start, budget - len(a[0]), stop=len(documents[other_doc]))
                is_random, i = 1, j
            out.append(_pair(a, b, budget, cls_id, sep_id, is_random))
    return out


def _take(doc: Sequence[Line], start: int, budget: int, stop: int) -> tuple[Line, int]:
    """Concatenate lines ``start, start+1, ...`` (at least one, never past ``stop``) while they fit."""
    ids: list[int] = []
    wids: list[int] = []
    j = start
    while j < stop and (not ids or len(ids) + len(doc[j][0]) <= budget):
        offset = (max(wids) + 1) if wids else 0
        ids.extend(doc[j][0])
        wids.extend(w + offset for w in doc[j][1])
        j += 1
    return (ids, wids), j


def _random_elsewhere(documents: Sequence[Sequence[Line]], multi: Sequence[int], d: int, j: int,
                      rng: random.Random) -> tuple[int, int]:
    """A (document, line) that is not the true continuation: another document when there is one,
    else a line of the same document at least two lines away from ``j``."""
    others = [o for o in range(len(documents)) if o != d and documents[o]]
    if others:
        o = rng.choice(others)
        return o, rng.randrange(len(documents[o]))
    n = len(documents[d])
    far = [x for x in range(n) if abs(x - j) > 1]
    return d, rng.choice(far) if far else (j + 1) % n


def _pair(a: Line, b: Line, budget: int, cls_id: int, sep_id: int, is_random: int) -> PairExample:
    a_ids, a_w = list(a[0]), list(a[1])
    b_ids, b_w = list(b[0]), list(b[1])
    while len(a_ids) + len(b_ids) > budget:  # longest first; from the end, which keeps A's start and B's start
        if len(a_ids) >= len(b_ids):
            a_ids.pop(), a_w.pop()
        else:
            b_ids.pop(), b_w.pop()
    b_offset = (max(a_w) + 1) if a_w else 0
    ids = [cls_id, *a_ids, sep_id, *b_ids, sep_id]
    wids = [NO_WORD, *a_w, NO_WORD, *(w + b_offset for w in b_w), NO_WORD]
    types = [0] * (len(a_ids) + 2) + [1] * (len(b_ids) + 1)
    return PairExample(ids, types, _renumber(wids), is_random)
