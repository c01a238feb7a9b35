"""The trainer and the pretrainer on two CPU processes (``torchrun``, the launcher ``accelerate launch``
uses): one process group, one run, one published model, every test row evaluated once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.trainer.test_pretrain import _args as pretrain_args
from tests.trainer.test_run import CLASSES, train_args, write_csv
from bert_stream import checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, *args: str) -> subprocess.CompletedProcess:
    """``module`` on two processes of this machine, as ``torchrun --nproc-per-node 2 -m module`` does."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, cwd=os.getcwd(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_and_publish_one_model(tmp_path):
    data = write_csv(tmp_path / "tiny.csv")
    out = tmp_path / "store"
    done = launch("trainer.run", *train_args(data, out), "--log-level", "INFO")
    assert done.returncode == 0, done.stderr[-3000:]

    versions = checkpoint.list_versions(out)
    assert len(versions) == 1 and checkpoint.latest_version(out) == versions[0], "one run, one model"
    folder = out / versions[0]
    checkpoint.validate(folder)
    assert (done.stdout + done.stderr).count('"event": "train.start"') == 1, "the main process speaks, once"

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["mixed_precision"] in {"no", "bf16"}
    rows = (folder / "test_predictions.jsonl").read_text().splitlines()
    # each process evaluates its shard; the gathered result holds every test row once, none padded twice
    assert metrics["test"]["n"] == len(rows) == len({json.loads(r)["text"] for r in rows})
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == metrics["test"]["n"]
    assert metrics["test"]["accuracy"] >= 0.8, metrics["test"]  # chance is 1/3
    assert set(json.loads((folder / "config.json").read_text())["label2id"]) == set(CLASSES)
    assert not (out / ".runs").exists()


@pytest.mark.slow
def test_two_processes_pretrain_one_model(corpus_dir, tmp_path):
    out = tmp_path / "pretrained"
    done = launch("trainer.pretrain", *pretrain_args(corpus_dir, out, "--max-steps", "10"))
    assert done.returncode == 0, done.stderr[-3000:]
    versions = checkpoint.list_versions(out)
    assert len(versions) == 1 and checkpoint.latest_version(out) == versions[0]
    metrics = json.loads((out / versions[0] / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 10
