"""The classifier's decisions (pure logic: a counting stand-in model, no Kafka): which messages the model runs
on, given the cache's answers from poll time, and when a batch needs no model at all."""

from __future__ import annotations

import time

import pytest

from tests.worker.conftest import PredictOnly
from worker.batcher import Batch
from worker.messages import InputMessage, Prediction, Rejected, Source
from worker.metrics import WorkerMetrics
from worker.classifier import Classifier, Job


class Model(PredictOnly):
    def __init__(self, version: str):
        self.version, self.dtype, self.device = version, "torch.float32", "cpu"
        self.seen: list[list[str]] = []

    def predict(self, texts):
        self.seen.append(list(texts))
        return [Prediction(f"{self.version}:{t}", 0, 0.9, ((f"{self.version}:{t}", 0.9),)) for t in texts]


class Engine:
    def __init__(self, model: Model):
        self.current = model

    def acquire(self) -> Model:
        return self.current


def _answer(text: str, version: str = "v1") -> Prediction:
    return Prediction(f"cache:{version}:{text}", 1, 0.8, ((f"cache:{version}:{text}", 0.8),))


def _batch(*items) -> Batch:
    batch = Batch()
    for offset, item in enumerate(items):
        if item is None:
            message = Rejected("invalid_utf8", "bad", b"\xff", None, [], Source("in", 0, offset))
            batch.append(Job(message, 0.0), 1, 0.0)
        else:
            text, cached, version = (item if isinstance(item, tuple) else (item, None, ""))
            message = InputMessage(f"id-{offset}", text, None, [], Source("in", 0, offset))
            batch.append(Job(message, 0.0, 0, cached, version), len(text) + 2, 0.0)
    return batch


class Cache:
    """The cache as the classifier sees it after poll time: up or down, and where results are stored."""

    enabled, up = True, True

    def __init__(self):
        self.stored = []

    def store(self, version, items):
        self.stored += [(version, text) for text, _ in items]


@pytest.fixture
def classifier():
    model = Model("v1")
    c = Classifier(Engine(model), Cache(), WorkerMetrics())
    c.model = model
    yield c
    c.close()


def test_the_model_runs_only_on_what_the_cache_did_not_answer_at_poll(classifier):
    done = classifier.classify(_batch(("北京", _answer("北京"), "v1"), "上海", None, "上海", "广州"))
    assert classifier.model.seen == [["上海", "广州"]]  # a repeat inside the batch runs once
    labels = [r.prediction.label if r.prediction else None for r in done.results]
    assert labels == ["cache:v1:北京", "v1:上海", None, "v1:上海", "v1:广州"]  # input order, rejected in place
    assert [r.cached for r in done.results] == [True, False, False, False, False]
    assert done.version == "v1"


def test_answers_for_another_model_version_are_not_served(classifier):
    """The cache was asked for v0 at poll time; the classifier serves v1 now: the model runs."""
    done = classifier.classify(_batch(("北京", _answer("北京", "v0"), "v0")))
    assert classifier.model.seen == [["北京"]]
    assert done.results[0].prediction.label == "v1:北京" and not done.results[0].cached


def test_a_repeat_polled_while_its_twin_was_in_flight_is_not_run_again(classifier):
    classifier.classify(_batch(("深圳", None, "v1")))
    done = classifier.classify(_batch(("深圳", None, "v1"), ("杭州", None, "v1")))  # cache misses at poll time
    assert classifier.model.seen == [["深圳"], ["杭州"]]
    assert [r.cached for r in done.results] == [True, False]
    assert classifier.metrics.cache_lookups.labels("recent")._value.get() == 1


def test_recent_results_stand_in_only_for_what_redis_could_not_have_had(classifier):
    """A result stored before a job was polled was in Redis at poll time (if Redis kept it): the job's miss
    means Redis lost it, and the model answers, as when the lookup ran on this thread; so it does while Redis
    is down, or without a cache."""
    classifier.classify(_batch(("深圳", None, "v1")))
    late = _batch(("深圳", None, "v1"))
    late.items[0].received = time.monotonic() + 1  # polled after the result was stored
    classifier.classify(late)
    assert classifier.model.seen == [["深圳"], ["深圳"]]
    classifier.cache.up = False
    classifier.classify(_batch(("深圳", None, "v1")))  # polled before, but Redis is down
    assert classifier.model.seen == [["深圳"], ["深圳"], ["深圳"]]
    assert classifier.cache.stored == [("v1", "深圳")] * 3


def test_a_batch_the_cache_answered_needs_no_model(classifier):
    answered = _batch(("北京", _answer("北京"), "v1"), None)
    assert classifier.answer(answered) is None  # before the first batch of a version: through classify
    classifier.classify(_batch("上海"))
    done = classifier.answer(answered)
    assert done is not None and classifier.model.seen == [["上海"]]
    assert [r.prediction.label if r.prediction else None for r in done.results] == ["cache:v1:北京", None]
    assert classifier.answer(_batch(("北京", _answer("北京"), "v1"), "广州")) is None  # one needs the model
    assert classifier.answer(_batch(("北京", _answer("北京", "v0"), "v0"))) is None  # another version's


def test_a_failing_classifier_thread_ends_the_worker_instead_of_hanging_it(classifier):
    classifier.engine.acquire = lambda: (_ for _ in ()).throw(AttributeError("a bug"))
    classifier.submit(_batch("北京"))
    deadline = time.monotonic() + 5
    with pytest.raises(RuntimeError, match="classifier thread failed"):
        while time.monotonic() < deadline:
            classifier.completed(timeout=0.05)
    assert isinstance(classifier.failure, AttributeError)


class FailingModel(Model):
    """Fails on the texts in ``poison``, or on everything (the probe text too) while ``broken``."""

    def __init__(self, version: str, poison=(), broken=False):
        super().__init__(version)
        self.poison, self.broken = set(poison), broken

    def predict(self, texts):
        if self.broken or self.poison & set(texts):
            raise RuntimeError("CUDA error: an illegal memory access" if self.broken else "poison")
        return super().predict(texts)


def test_poison_input_is_a_dead_letter_but_a_broken_model_stops_the_worker(classifier, monkeypatch):
    from worker import classifier as inference

    monkeypatch.setattr(inference, "MODEL_RETRY_BACKOFF_S", 0.01)
    classifier.engine.current = classifier.model = FailingModel("v1", poison={"毒", "药"})
    done = classifier.classify(_batch("毒", "药"))  # every item fails, the probe text classifies: bad input
    assert [r.prediction for r in done.results] == [None, None] and all(r.error for r in done.results)

    classifier.engine.current = FailingModel("v1", broken=True)
    classifier.model_failure_retries = 2
    with pytest.raises(inference.ModelBroken, match="failed every message of a batch 3 times"):
        classifier.classify(_batch("北京", "上海"))  # nothing comes back: nothing is published or committed

    recovering = FailingModel("v1", broken=True)
    classifier.engine.current = recovering
    monkeypatch.setattr(inference.time, "sleep", lambda _s: setattr(recovering, "broken", False))  # back after a pause
    done = classifier.classify(_batch("北京"))
    assert done.results[0].prediction is not None


def test_a_batch_stuck_in_the_model_shows_in_stalled_for(classifier):
    import threading

    release = threading.Event()
    model = classifier.model
    model.predict = lambda texts: (release.wait(5), Model.predict(model, texts))[1]
    classifier.submit(_batch("北京"))
    time.sleep(0.3)
    assert classifier.stalled_for() >= 0.25  # /healthz fails once this passes inference_stall_s
    with pytest.raises(TimeoutError):
        classifier.drain(timeout_s=0.2)
    release.set()
    assert len(classifier.drain(timeout_s=5)) == 1 and classifier.stalled_for() == 0.0


def test_results_of_the_old_version_never_answer_for_the_new_one(classifier):
    """A swap between one batch's launch and its finish (the classifier's two stages): the old version's
    results are remembered for that version only."""
    launched = classifier.launch(_batch(("深圳", None, "v1")))  # launched on v1, not finished yet
    classifier.engine.current = Model("v2")
    classifier.classify(_batch(("北京", None, "v2")))  # the first batch on v2
    classifier.finish(launched)  # v1's answer for 深圳 arrives after the swap
    done = classifier.classify(_batch(("深圳", None, "v2")))
    assert done.results[0].prediction.label == "v2:深圳" and not done.results[0].cached
