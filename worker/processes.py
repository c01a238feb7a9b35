"""``python -m worker.run --processes N``: N worker processes on one machine (one GPU), in one consumer group.

Why: one process carries a bounded rate around the model (poll, decode, batch, cache, publish, commit: the
ceiling that ``bench/ceiling.py`` measures), while one GPU classifies far more than that. N processes that share the device
feed it N times as much; each is an ordinary worker (its own consumer group member, producer, copy of the
model, ops port), so every guarantee and fault test of one worker holds for each of them. The GPU is shared
by time-slicing between the processes' CUDA contexts; e5-small in bf16 needs well under 1 GB per copy.

The parent only supervises:
- it starts the N children (``--processes 1``; ops port ``http_port + i`` when a port is set; instance id
  ``<instance_id>-<i>`` when one is set, since two live transactional producers must never share an id);
- SIGTERM/SIGINT are passed on to every child (each finishes its batches, commits and exits 0), a second
  one kills them at once;
- when a child exits by itself (a crash: status 1, or a signal), the others are stopped gracefully and the
  parent exits 1, so the process supervisor (Kubernetes) restarts the whole set rather than leaving a pod
  that looks alive with part of its capacity gone. A restart loses nothing (at-least-once, or exactly-once);
- the children get SIGTERM if the parent dies (Linux ``PR_SET_PDEATHSIG``), so none outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from bert_stream.logs import get_logger
from worker.settings import WorkerSettings

log = get_logger("worker.processes")

CHECK_EVERY_S = 0.2
INDEX_ENV = "BERT_STREAM_PROCESS_INDEX"  # set in each child: its index, for its logs


def child_args(settings: WorkerSettings, argv: Sequence[str], index: int) -> list[str]:
    """The command line of child ``index``: the parent's own flags, then the ones that must differ (argparse
    takes the last of a repeated flag)."""
    extra = ["--processes", "1"]
    if settings.http_port > 0:
        extra += ["--http-port", str(settings.http_port + index)]
    if settings.instance_id:
        extra += ["--instance-id", f"{settings.instance_id}-{index}"]
    return [sys.executable, "-m", "worker.run", *argv, *extra]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: the parent's signal forwarding still applies
        pass


def supervise(settings: WorkerSettings, argv: Sequence[str]) -> int:
    """Run ``settings.processes`` workers until all have exited; the exit status of the set."""
    n = settings.processes
    children: list[subprocess.Popen] = []
    stopping = {"signals": 0}

    def on_signal(signum, _frame):
        stopping["signals"] += 1
        forward = signal.SIGTERM if stopping["signals"] == 1 else signal.SIGKILL
        log.info("signal_received", signal=signal.Signals(signum).name,
                 action="stopping every worker process" if forward == signal.SIGTERM else "killing them")
        _signal_all(children, forward)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(n):
        if stopping["signals"]:
            break  # stopped while starting: the ones started so far have been told
        env = {**os.environ, INDEX_ENV: str(i)}
        children.append(subprocess.Popen(child_args(settings, argv, i), env=env, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent))
    log.info("worker_processes_started", processes=n, pids=[c.pid for c in children])
    status = 0
    while any(c.poll() is None for c in children):
        for i, child in enumerate(children):
            code = child.poll()
            if code is not None and code != 0 and status == 0:
                status = 1
                if not stopping["signals"]:
                    log.error("worker_process_exited", index=i, pid=child.pid, status=code,
                              action="stopping the others; the set exits 1 for its supervisor to restart it")
                    stopping["signals"] = 1
                    _signal_all(children, signal.SIGTERM)
        time.sleep(CHECK_EVERY_S)
    codes = [c.returncode for c in children]
    if any(code != 0 for code in codes):
        status = 1
    log.info("worker_processes_stopped", statuses=codes, exit_code=status)
    return status


def _signal_all(children: list[subprocess.Popen], signum: int) -> None:
    for child in children:
        if child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass
