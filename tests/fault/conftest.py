"""Fixtures of the fault-injection suite: a model store, worker processes that never outlive a test, and a
"fault counts" section at the end of the run with every test's sent/output/dlq/duplicates/lost line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fault import harness


@pytest.fixture(scope="session")
def fault_store(request, tmp_path_factory) -> Path:
    """A read-only checkpoint store: the session's trained classifier when tests/conftest.py offers one
    (``trained_checkpoint``), else a tiny random BERT published exactly as the trainer publishes."""
    try:
        return Path(request.getfixturevalue("trained_checkpoint"))
    except pytest.FixtureLookupError:
        from tests.worker.conftest import publish_tiny_model

        store = tmp_path_factory.mktemp("fault-store")
        publish_tiny_model(store)
        return store


@pytest.fixture
def model_store(fault_store, tmp_path) -> Path:
    """A private copy of the store, for tests that publish (or corrupt) versions."""
    store = tmp_path / "store"
    shutil.copytree(fault_store, store, ignore=shutil.ignore_patterns(".staging-*"))
    return store


@pytest.fixture
def workers(tmp_path):
    """Start worker processes with ``workers.start(name, env)``; all are killed when the test ends."""
    running = harness.Workers(tmp_path / "logs")
    yield running
    running.cleanup()


def pytest_terminal_summary(terminalreporter):
    if harness.REPORTS:
        terminalreporter.section("fault counts")
        for _, line in harness.REPORTS:
            terminalreporter.write_line(line)
