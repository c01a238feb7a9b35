"""The hybrid's second half: a character n-gram linear model whose scores are added to the transformer's.

On small, skewed sets the fine-tuned transformer and TF-IDF character n-grams + a linear SVM make different
mistakes (``experiments/train_suite.py`` measures it): the SVM keys on rare surface strings (a name, a
brand, a product code), the transformer on meaning. Their sum, weighted on the validation split, beat both.
The trainer fits it (``--hybrid``), the checkpoint carries it (``ngram.json`` + ``ngram.safetensors``) and the
worker's engine adds it to every prediction, so the published model is the one evaluated::

    logits = model_scale * log_softmax(transformer logits) + ngram_scale * (tfidf(text) @ coef.T + intercept)

Features are hashed (scikit-learn's ``HashingVectorizer``: MurmurHash3 of each character 1-3-gram into
``n_features`` buckets) so the checkpoint holds numbers only: the buckets seen in training, their IDF and
their weights, in safetensors. No pickle, no vocabulary of strings. ``model_scale`` also calibrates the
transformer's confidences (a temperature); both scales are fitted by validation log-loss.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIG_FILE, WEIGHTS_FILE = "ngram.json", "ngram.safetensors"
N_FEATURES = 2**20  # buckets: thucnews' 8,000 titles hold ~150k distinct 1-3-grams; few share a bucket
NGRAM_RANGE = (1, 3)
KIND = "tfidf-char-hashed+linear-svc"
MIN_SCALE = 0.01  # an n-gram weight below this changes no prediction worth a second model (margins are ~1)


def _vectorizer(n_features: int, ngram_range: tuple[int, int]):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer="char", ngram_range=ngram_range, n_features=n_features,
                             alternate_sign=False, norm=None)


_WHITE_SPACES = re.compile(r"\s\s+")  # scikit-learn's analyzer="char" collapses runs of white space
_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def murmur3_32(words: Sequence[np.ndarray], length: np.ndarray) -> np.ndarray:
    """MurmurHash3_x86_32 (seed 0, signed) of byte strings of up to 12 bytes, given as three little-endian
    uint32 words zero-padded past ``length``: scikit-learn's feature hash, for many strings in one pass."""
    words = [w.astype(np.uint32) for w in words]
    h = np.zeros(len(length), dtype=np.uint32)
    full = length >> 2
    for j, word in enumerate(words[:max(1, int(full.max(initial=0)))]):
        k = _rotl(word * _C1, 15) * _C2
        h = np.where(full > j, _rotl(h ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64), h)
    tail = np.select([full == j for j in range(len(words))], words, np.uint32(0))  # its last 1-3 bytes
    h = np.where(length & 3, h ^ (_rotl(tail * _C1, 15) * _C2), h)
    h ^= length.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h.view(np.int32)


def _utf8(cps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each code point's UTF-8 bytes as a little-endian uint64 (zero past them) and their count."""
    c = cps.astype(np.uint64)
    one, two, three = c < 0x80, c < 0x800, c < 0x10000
    length = np.where(one, 1, np.where(two, 2, np.where(three, 3, 4))).astype(np.uint64)
    low6, mid6, high6 = 0x80 | (c & 0x3F), 0x80 | ((c >> 6) & 0x3F), 0x80 | ((c >> 12) & 0x3F)
    b0 = np.where(one, c, np.where(two, 0xC0 | (c >> 6), np.where(three, 0xE0 | (c >> 12), 0xF0 | (c >> 18))))
    b1 = np.where(two, low6, np.where(three, mid6, high6))
    b2 = np.where(three, low6, mid6)
    word = b0 | (b1 << 8) | (b2 << 16) | (low6 << 24)
    return word & ((np.uint64(1) << (length * 8)) - 1), length


@functools.cache
def _unigram_hashes() -> np.ndarray:
    """The hash of every code point as a one-character n-gram (4.4 MB; surrogates never reach it)."""
    word, length = _utf8(np.arange(0x110000, dtype=np.uint32))
    return murmur3_32([word & np.uint64(0xFFFFFFFF)], length)


def char_ngram_hashes(texts: Sequence[str], ngram_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(text index, signed MurmurHash3) of every character n-gram scikit-learn's ``HashingVectorizer(
    analyzer="char")`` extracts (lowercased, runs of white space collapsed), computed in numpy for the whole
    batch. None for what this path cannot split exactly (a text holding NUL, a lone surrogate): the caller
    then asks scikit-learn, which decides as it always did."""
    lo, hi = ngram_range
    if not texts or hi > 3 or lo < 1:  # an n-gram of at most 3 characters fits the 12-byte hash below
        return None
    joined = _WHITE_SPACES.sub(" ", "\x00".join(texts).lower())  # NUL: neither white space nor cased
    try:
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:
        return None
    bounds = np.flatnonzero(cps == 0)
    if len(bounds) != len(texts) - 1:
        return None
    doc = np.zeros(len(cps), dtype=np.int64)
    doc[bounds + 1] = 1
    doc = np.cumsum(doc)
    inside = cps != 0
    word, length = _utf8(cps)
    docs, hashes = [], []
    mask32 = np.uint64(0xFFFFFFFF)
    for n in range(lo, hi + 1):
        starts = np.flatnonzero(inside[:len(cps) - n + 1])
        for k in range(1, n):
            starts = starts[inside[starts + k]]
        docs.append(doc[starts])
        if n == 1:  # a character's hash is looked up: the commonest n-grams, hashed once per process
            hashes.append(_unigram_hashes()[cps[starts]])
            continue
        low, high, size = word[starts], np.zeros(len(starts), dtype=np.uint64), length[starts]
        for k in range(1, n):  # append the next character's bytes at byte offset `size` (<= 8)
            nxt, shift = word[starts + k], size * 8
            low = low | np.where(shift < 64, nxt << np.minimum(shift, 63), 0).astype(np.uint64)
            high = high | (nxt >> (np.uint64(64) - shift))  # its bytes past the eighth (none while shift <= 32)
            size = size + length[starts + k]
        hashes.append(murmur3_32([low & mask32, low >> np.uint64(32), high & mask32][:n], size))
    return np.concatenate(docs), np.concatenate(hashes)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclass
class NgramModel:
    buckets: np.ndarray  # int64 [k]: the hashed features seen in training, sorted
    idf: np.ndarray  # float32 [k]: their inverse document frequency
    unseen_idf: float  # the IDF of a bucket no training text had (counts towards a text's norm)
    coef: np.ndarray  # float32 [k, labels]
    intercept: np.ndarray  # float32 [labels]
    model_scale: float = 1.0
    ngram_scale: float = 0.0
    n_features: int = N_FEATURES
    ngram_range: tuple[int, int] = NGRAM_RANGE

    def __post_init__(self) -> None:
        from scipy import sparse

        self._hasher = _vectorizer(self.n_features, tuple(self.ngram_range))
        self._idf = np.full(self.n_features, self.unseen_idf, dtype=np.float32)
        self._idf[self.buckets] = self.idf
        self._weights = sparse.csr_matrix(
            (self.coef.ravel(), (np.repeat(self.buckets, self.coef.shape[1]),
                                 np.tile(np.arange(self.coef.shape[1]), len(self.buckets)))),
            shape=(self.n_features, self.coef.shape[1]), dtype=np.float32)
        # bucket -> its row of coef, or len(buckets) for a bucket no training text had
        self._row_of = np.full(self.n_features, len(self.buckets), dtype=np.int32)
        self._row_of[self.buckets] = np.arange(len(self.buckets), dtype=np.int32)
        self._idf_rows = np.append(self.idf, np.float32(self.unseen_idf)).astype(np.float32)

    @property
    def labels(self) -> int:
        return int(self.intercept.shape[0])

    # ---- fitting ---------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, texts: Sequence[str], label_ids: Sequence[int], n_labels: int) -> NgramModel:
        """TF-IDF (smooth IDF, L2 rows) + LinearSVC with scikit-learn's defaults, as ``trainer.baseline``."""
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.svm import LinearSVC

        counts = _vectorizer(N_FEATURES, NGRAM_RANGE).transform(list(texts))
        tfidf = TfidfTransformer()
        x = tfidf.fit_transform(counts)
        y = np.asarray(label_ids)
        present = np.unique(y)
        svm = LinearSVC().fit(x, y)
        buckets = np.unique(counts.indices).astype(np.int64)  # a weight elsewhere has no feature to meet
        coef = np.zeros((len(buckets), n_labels), dtype=np.float32)
        intercept = np.zeros(n_labels, dtype=np.float32)
        if len(present) == 2:  # one decision function: +half to the second class, -half to the first
            w, b = svm.coef_[0, buckets] / 2, svm.intercept_[0] / 2
            coef[:, present[0]], coef[:, present[1]] = -w, w
            intercept[present[0]], intercept[present[1]] = -b, b
        else:
            coef[:, present] = svm.coef_[:, buckets].T
            intercept[present] = svm.intercept_
        unseen = float(math.log((1 + counts.shape[0]) / 1) + 1)  # TfidfTransformer's smooth IDF at df = 0
        return cls(buckets=buckets, idf=tfidf.idf_[buckets].astype(np.float32), unseen_idf=unseen,
                   coef=coef, intercept=intercept)

    def calibrate(self, logits: np.ndarray, texts: Sequence[str], label_ids: Sequence[int]) -> dict:
        """Fit ``model_scale`` and ``ngram_scale`` by log-loss on held-out texts (the validation split);
        returns the fit's figures. ``ngram_scale`` 0 means the n-grams did not help there."""
        from scipy.optimize import minimize

        model = _log_softmax(np.asarray(logits, dtype=np.float64))
        ngram = self.scores(texts).astype(np.float64)
        y = np.asarray(label_ids)
        rows = np.arange(len(y))

        def loss(scales: np.ndarray) -> float:
            return float(-_log_softmax(scales[0] * model + scales[1] * ngram)[rows, y].mean())

        before = loss(np.array([1.0, 0.0]))
        best = min((minimize(loss, np.array(start), method="L-BFGS-B", bounds=[(0.05, 20.0), (0.0, 20.0)])
                    for start in ([1.0, 0.0], [1.0, 1.0])), key=lambda r: r.fun)
        self.model_scale, self.ngram_scale = (round(float(s), 4) for s in best.x)
        if self.ngram_scale < MIN_SCALE:  # no help: the caller keeps the transformer alone
            self.ngram_scale = 0.0
        return {"log_loss_transformer": round(before, 5), "log_loss_hybrid": round(float(best.fun), 5),
                "model_scale": self.model_scale, "ngram_scale": self.ngram_scale}

    # ---- scoring ---------------------------------------------------------------------------------------------
    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), labels] float32: the linear model's decision function. The features are hashed in
        numpy for the whole batch (:func:`char_ngram_hashes`; scikit-learn's analyzer is a Python loop per
        n-gram, the largest cost of an uncached message); what that cannot split goes to scikit-learn."""
        hashed = char_ngram_hashes(texts, tuple(self.ngram_range))
        if hashed is None:
            return self._scores_sklearn(texts)
        doc, h = hashed
        n, f = len(texts), self.n_features
        index = np.abs(h.astype(np.int64))  # scikit-learn's bucket is this mod f, INT_MIN included
        from scipy import sparse

        bits = f.bit_length() - 1
        power_of_two = f == 1 << bits  # then masks and shifts instead of divisions
        keys = np.sort((doc << bits) | (index & (f - 1)) if power_of_two else doc * f + index % f)
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # each (text, bucket) pair once ...
        counts = np.diff(np.r_[first, len(keys)]).astype(np.float32)  # ... and how often it occurs
        pairs = keys[first]
        doc, index = (pairs >> bits, pairs & (f - 1)) if power_of_two else (pairs // f, pairs % f)
        rows = self._row_of[index]
        values = counts * self._idf_rows[rows]  # TF-IDF, sorted by text
        starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        norms = np.ones(n, dtype=np.float32)  # an empty text scores its intercept
        norms[doc[starts]] = np.sqrt(np.add.reduceat(values * values, starts))
        weighted = rows < len(self.buckets)  # only buckets seen in training carry weights
        doc, rows, values = doc[weighted], rows[weighted], values[weighted]
        x = sparse.csr_matrix((values, rows, np.searchsorted(doc, np.arange(n + 1))), shape=(n, len(self.buckets)))
        return np.asarray(x @ self.coef, dtype=np.float32) / norms[:, None] + self.intercept

    def _scores_sklearn(self, texts: Sequence[str]) -> np.ndarray:
        x = self._hasher.transform(list(texts)).astype(np.float32)
        x.data *= self._idf[x.indices]
        norms = np.sqrt(np.add.reduceat(x.data**2, x.indptr[:-1])) if x.nnz else np.zeros(x.shape[0])
        norms = np.where(np.diff(x.indptr) > 0, norms, 1.0).astype(np.float32)  # an empty text scores 0
        return np.asarray((x @ self._weights).todense(), dtype=np.float32) / norms[:, None] + self.intercept

    def add(self, logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The hybrid's logits from the transformer's ([texts, labels] float32) and :meth:`scores` of the
        same texts: what the worker serves."""
        return self.model_scale * _log_softmax(logits) + self.ngram_scale * scores

    def combine(self, logits, texts: Sequence[str]):
        """:meth:`add` for a torch tensor of logits (any device/dtype) and ``texts``; on the logits' device."""
        import torch

        summed = self.add(logits.detach().float().cpu().numpy(), self.scores(texts))
        return torch.from_numpy(summed).to(logits.device)

    # ---- the checkpoint's files ------------------------------------------------------------------------------
    def save(self, folder: Path | str) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        save_file({"buckets": self.buckets, "idf": self.idf, "coef": self.coef, "intercept": self.intercept},
                  str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps({
            "kind": KIND, "n_features": self.n_features, "ngram_range": list(self.ngram_range),
            "unseen_idf": self.unseen_idf, "model_scale": self.model_scale, "ngram_scale": self.ngram_scale,
            "combine": "model_scale * log_softmax(transformer logits) + ngram_scale * ngram scores",
        }, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path | str) -> NgramModel | None:
        """The folder's n-gram half, or None for a transformer-only checkpoint."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists():
            return None
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("kind") != KIND:
            raise ValueError(f"{folder / CONFIG_FILE}: unknown kind {config.get('kind')!r} (expected {KIND!r})")
        t = load_file(str(folder / WEIGHTS_FILE))
        return cls(buckets=t["buckets"], idf=t["idf"], unseen_idf=float(config["unseen_idf"]), coef=t["coef"],
                   intercept=t["intercept"], model_scale=float(config["model_scale"]),
                   ngram_scale=float(config["ngram_scale"]), n_features=int(config["n_features"]),
                   ngram_range=tuple(config["ngram_range"]))
