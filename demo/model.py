"""The demo's view of the checkpoint store: is a model published, what was it trained on, and the trainer
command lines for the first model and for the short retrain."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from bert_stream import checkpoint
from demo.display import shown

# trainer.runstate.RUNS_DIR: resumable state of unfinished runs (not imported: it loads torch)
RUNS_DIR = ".runs"


class DemoError(RuntimeError):
    """Something the demo cannot go on without; the message says what and where to look."""


def published_version(store: Path) -> str | None:
    """The version LATEST names, checked complete; None for an empty store."""
    try:
        version = checkpoint.latest_version(store)
        if version is not None:
            checkpoint.validate(store / version)
        return version
    except checkpoint.CheckpointError as exc:
        raise DemoError(f"{exc} (fix or move {store}, or pass --model-dir)") from None


def model_labels(folder: Path) -> set[str]:
    config = json.loads((folder / "config.json").read_text())
    return set(config["id2label"].values())


def trained_seed(folder: Path, default: int = 0) -> int:
    """The seed the model's data split was made with, so the demo's titles come from its held-out test split.
    ``training_args.json`` records it (a missing or older file: the default seed)."""
    try:
        args = json.loads((folder / "training_args.json").read_text())
    except (OSError, json.JSONDecodeError):
        return default
    for scope in (args, args.get("settings", {}), args.get("hyperparameters", {})):
        if isinstance(scope, dict) and isinstance(scope.get("seed"), int):
            return scope["seed"]
    return default


def _trainer(store: Path, data: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "trainer.run", "--quick", "--data", data, "--seed", str(seed),
            "--output-dir", shown(store)]  # the trainer's log then shows the path as the user would type it


def train_command(store: Path, data: str, seed: int = 0) -> list[str]:
    """The trainer's demo preset (about 3 minutes on 2 CPU cores). With ``--resume`` when a run was left
    unfinished: a first demo stopped with Ctrl-C during training continues from its last evaluation."""
    unfinished = (store / RUNS_DIR).is_dir() and any((store / RUNS_DIR).iterdir())
    return [*_trainer(store, data, seed), *(["--resume"] if unfinished else [])]


def retrain_command(store: Path, base: Path, data: str, seed: int, examples: int,
                    redis_url: str) -> list[str]:
    """A short retrain that continues from the published model ``base`` (what a team does when new labelled
    data arrives): a low learning rate on a few hundred examples, one evaluation at the end, a smaller
    validation split. The test split is carved out first, so the same seed keeps the same test split (the
    demo's titles stay held out) whatever the validation fraction. ``--force``: a model a little worse on the
    test split must not be refused by the quality gate, since the point is to show the swap;
    ``--redis-url``: running workers are told at once."""
    return [*_trainer(store, data, seed), "--model", shown(base), "--max-train-examples", str(examples),
            "--learning-rate", "2e-5", "--validation-fraction", "0.02", "--eval-steps", "1000000",
            "--early-stopping-patience", "0", "--force", "--redis-url", redis_url]


def roll_back(store: Path, keep: str, remove: str) -> None:
    """Point LATEST back at ``keep`` and delete version ``remove`` (one the demo published itself)."""
    checkpoint.set_latest(store, keep)
    if remove != keep and (store / remove).is_dir():
        shutil.rmtree(store / remove)


@contextlib.contextmanager
def discard_unfinished_runs(store: Path) -> Iterator[None]:
    """Delete the resumable state a run started inside this block leaves behind (an interrupted or failed
    short retrain: nobody resumes it, and an e5-small state is ~450 MB). A finished run removes its own."""
    runs = store / RUNS_DIR
    existing = set(runs.iterdir()) if runs.is_dir() else set()
    try:
        yield
    finally:
        for leftover in (set(runs.iterdir()) if runs.is_dir() else set()) - existing:
            shutil.rmtree(leftover, ignore_errors=True)
