"""The hybrid's second half: a character n-gram linear model whose scores are added to the transformer's.

On small, skewed sets the fine-tuned transformer and TF-IDF character n-grams + a linear SVM make different
mistakes (bench/TRAINING.md, the generalisation suite): the SVM keys on rare surface strings (a name, a
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

import json
import math
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
        """[len(texts), labels] float32: the linear model's decision function."""
        x = self._hasher.transform(list(texts)).astype(np.float32)
        x.data *= self._idf[x.indices]
        norms = np.sqrt(np.add.reduceat(x.data**2, x.indptr[:-1])) if x.nnz else np.zeros(x.shape[0])
        norms = np.where(np.diff(x.indptr) > 0, norms, 1.0).astype(np.float32)  # an empty text scores 0
        return np.asarray((x @ self._weights).todense(), dtype=np.float32) / norms[:, None] + self.intercept

    def combine(self, logits, texts: Sequence[str]):
        """The hybrid's logits from the transformer's (a torch tensor, any device/dtype) for ``texts``."""
        import torch

        ngram = torch.from_numpy(self.scores(texts)).to(logits.device)
        return self.model_scale * torch.log_softmax(logits.float(), dim=-1) + self.ngram_scale * ngram

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
