"""The classical baseline a fine-tuned transformer must clearly beat: TF-IDF character 1-3-grams + LinearSVC.

Every ``trainer.run`` fits it on the run's own training split and scores it on the same test split (a few
seconds), so metrics.json and the log say at once whether the transformer earns its cost, and the quality
gate can demand a margin over it (``--min-gain-over-baseline``). ``experiments.baseline`` uses the same model
for its table. Vectoriser and SVM use scikit-learn's defaults on purpose: a baseline tuned on the test split is
not one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from trainer.data import Example

MODEL = "TfidfVectorizer(analyzer='char', ngram_range=(1, 3)) + LinearSVC() (scikit-learn defaults otherwise)"


def fit_and_score(train: Sequence[Example], test: Sequence[Example]) -> dict:
    """Fit on ``train``, score on ``test``: accuracy, macro-F1 and the fit time (vectorising included)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.svm import LinearSVC

    started = time.perf_counter()
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3))
    classifier = LinearSVC()
    classifier.fit(vectorizer.fit_transform([e.text for e in train]), [e.label for e in train])
    fit_s = time.perf_counter() - started
    predicted = classifier.predict(vectorizer.transform([e.text for e in test]))
    truth = [e.label for e in test]
    return {
        "train": len(train),
        "test": len(test),
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
        "fit_s": round(fit_s, 2),
    }


def versus(test: dict, baseline: dict) -> dict:
    """The baseline's test scores beside the model's, and the model's gain over it (positive: better)."""
    return {
        "model": MODEL,
        "accuracy": round(baseline["accuracy"], 5),
        "macro_f1": round(baseline["macro_f1"], 5),
        "fit_s": baseline["fit_s"],
        "gain_accuracy": round(test["accuracy"] - baseline["accuracy"], 5),
        "gain_macro_f1": round(test["macro_f1"] - baseline["macro_f1"], 5),
    }
