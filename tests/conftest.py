"""Shared fixtures: one local stack per test run, unique names per test, broker-quirk tolerant settings.

The broker implementation comes from ``BROKER``: Apache Kafka by default (``make test`` runs the whole suite
on it, then the kafka-marked tests again with ``BROKER=tansu``, the broker for machines without Java). A test
that needs what Tansu gets wrong uses :func:`xfail_on_broker`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import pytest

from bert_stream.kafka import KafkaSettings
from deploy.local import DEFAULT_BROKER, LocalStack

BROKER = os.environ.get("BROKER") or DEFAULT_BROKER

# Tansu completes a group join in about half the session timeout: keep it short but not tiny. (Apache Kafka
# joins at once, and expires a kill -9'd member after it.)
TEST_SESSION_TIMEOUT_MS = 6000


def xfail_on_broker(broker: str, reason: str, strict: bool = True):
    """Mark a test as an expected failure on one broker implementation, with the reason: strict (a pass
    fails the run, so the mark goes when the broker is fixed) unless the broker's behaviour depends on
    timing the test cannot fix."""
    return pytest.mark.xfail(BROKER == broker, reason=f"{broker}: {reason}", strict=strict)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> LocalStack:
    """A real broker and our own Redis (not a shared one: outage tests stop it), up for the whole run. A
    broker that cannot start here (no Java, no Maven) fails the run with the one-line reason."""
    state_dir = tmp_path_factory.mktemp("stack")
    saved = os.environ.pop("REDIS_URL", None)  # always start our own Redis
    try:
        local = LocalStack(state_dir, BROKER).up()
    finally:
        if saved is not None:
            os.environ["REDIS_URL"] = saved
    yield local
    local.down()


@pytest.fixture
def kafka_settings(stack) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=stack.bootstrap_servers, session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
                         max_poll_interval_ms=60_000, request_timeout_ms=20_000)


@dataclasses.dataclass(frozen=True)
class Names:
    """Per-test topic names, consumer group and Redis key prefix: tests never see each other's data."""

    input_topic: str
    output_topic: str
    dlq_topic: str
    group_id: str
    redis_prefix: str


@pytest.fixture
def names(request) -> Names:
    tag = f"{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"
    tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in tag)
    return Names(f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}", f"test:{tag}:")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# Arguments of the shared trained model: a scratch "mini" BERT on 2000 thucnews-titles examples, 2 epochs,
# evaluated at epoch ends only, one torch thread (robust when other processes share the cores). Small on
# purpose (fast inference keeps the worker and fault tests quick): ~30 s of CPU, test accuracy 0.47 on the
# 10 topics (chance 0.10), which is all those tests need from a model.
TRAINED_CHECKPOINT_ARGS = ("--model", "scratch", "--scratch-preset", "mini", "--data", "thucnews-titles",
                           "--max-train-examples", "2000", "--epochs", "2", "--max-length", "32",
                           "--eval-steps", "1000", "--early-stopping-patience", "0", "--torch-threads", "1",
                           "--log-level", "WARNING")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint store (``LATEST`` + one published version) holding a real model trained once per test
    run by ``python -m trainer.run``; pass it as the worker's ``--model-dir``. Treat it as read-only: copy it
    (``shutil.copytree``) before publishing into it or moving ``LATEST``."""
    from trainer import run

    store = tmp_path_factory.mktemp("trained-checkpoint")
    status = run.main(["--output-dir", str(store), *TRAINED_CHECKPOINT_ARGS])
    assert status == run.EXIT_OK, f"training the shared test model failed with exit status {status}"
    return store
