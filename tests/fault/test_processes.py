"""``--processes N``: several worker processes under one parent, one consumer group (worker/processes.py).

Each child is an ordinary worker, so what is checked here is the supervision: both children own partitions
and answer every input; SIGTERM to the parent stops both cleanly with everything committed; a child that
dies takes the set down with status 1 (for Kubernetes to restart it), the other child stopping gracefully.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.fault import harness as h
from tests.fault.test_crash import _topics

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 4


def _owners(w: h.WorkerProcess) -> dict[int, set[str]]:
    """The latest assignment each child logged, by process index."""
    latest: dict[int, set[str]] = {}
    for e in w.events("partitions_assigned"):
        latest[e["process"]] = set(e["partitions"])
    return latest


def _settled(w: h.WorkerProcess, topic: str):
    owners = _owners(w)
    every = {f"{topic}:{p}" for p in range(PARTITIONS)}
    if len(owners) == 2 and all(owners.values()) and set.union(*owners.values()) == every \
            and not set.intersection(*owners.values()):
        return owners
    return None


def _child_pids(w: h.WorkerProcess) -> list[int]:
    return w.wait_event("worker_processes_started", 30)["pids"]


def _start_pair(kafka_settings, names, model_store, stack, workers):
    """``--processes 2`` on a 4-partition topic, once both children own partitions: (parent, pids, owners)."""
    _topics(kafka_settings, names, PARTITIONS)
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, processes=2)
    pair = workers.start("pair", env)
    pids = _child_pids(pair)
    owners = h.wait_until(lambda: _settled(pair, names.input_topic), 150, "both processes to own partitions",
                          pair.tail)
    return pair, pids, owners


def test_two_processes_share_the_partitions_and_stop_together(kafka_settings, names, model_store, stack, workers):
    pair, pids, owners = _start_pair(kafka_settings, names, model_store, stack, workers)
    assert len(pids) == 2
    messages = h.make_messages(400, seed=21)
    sent = h.publish(kafka_settings, names.input_topic, [v for _, v in messages], ids=[i for i, _ in messages])
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic)
    try:
        reader.wait_all(sent, timeout=180, diagnostics=pair.tail, alive=pair.alive)
        assert {p for p, _ in sent.sources} == set(range(PARTITIONS))  # every partition, so both children
        assert pair.terminate() == 0
        assert not any(_alive(pid) for pid in pids)
        stopped = pair.events("worker_stopped")
        assert sorted(e.get("process") for e in stopped) == [0, 1] and all(e["exit_code"] == 0 for e in stopped)
        committed = h.committed_offsets(kafka_settings, names.group_id, names.input_topic)
        assert sum(c or 0 for c in committed.values()) == len(sent)  # all of it committed on the way out
        assert len(owners) == 2
    finally:
        reader.close()


def test_a_child_that_dies_takes_the_set_down(kafka_settings, names, model_store, stack, workers):
    pair, pids, _ = _start_pair(kafka_settings, names, model_store, stack, workers)
    os.kill(pids[1], signal.SIGKILL)
    assert pair.proc.wait(timeout=60) == 1
    assert not any(_alive(pid) for pid in pids)
    gone = pair.wait_event("worker_process_exited", 5)
    assert gone["index"] == 1 and gone["status"] == -signal.SIGKILL
    assert [e.get("process") for e in pair.events("worker_stopped")] == [0]  # the other one stopped cleanly


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return False
