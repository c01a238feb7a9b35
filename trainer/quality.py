"""Write the quality reference (``quality.json``, :mod:`bert_stream.reference`) into a version published
without one, so workers serving it export label drift and confidence without a retrain.

``python -m trainer.quality --model-dir STORE [--version VERSION] [--force]``

The version's own ``training_args.json`` names its data; the splits are rebuilt from it and must hash to the
``data_fingerprint`` in its ``metrics.json`` (else the data changed since, and the reference would describe
other data: refused). The validation split is classified by the served model, as a worker loads it (a
hybrid's n-gram half included), on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from bert_stream import checkpoint, reference
from bert_stream.logs import configure_logging, get_logger
from trainer.batches import data_spec
from trainer.data import DataError, load_splits
from trainer.settings import TrainSettings

log = get_logger("trainer.quality")
BATCH = 64


class Refused(RuntimeError):
    """The version cannot get a reference that would describe it (its data is gone or changed)."""


def _settings(raw: dict) -> TrainSettings:
    """The TrainSettings a published version was trained with, from its ``training_args.json``."""
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in raw.items() if k in names})


def backfill(store: Path, version: str, force: bool = False) -> Path:
    """Write ``quality.json`` into ``store/version``; returns its path."""
    import torch

    from worker.engine import LoadedModel

    folder = store / version
    target = folder / reference.FILE
    if target.exists() and not force:
        raise Refused(f"{target} exists (--force replaces it)")
    try:
        settings = json.loads((folder / "training_args.json").read_text(encoding="utf-8"))["settings"]
        fingerprint = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["data_fingerprint"]
    except (OSError, ValueError, KeyError) as exc:
        raise Refused(f"{folder}: no training_args.json / metrics.json to rebuild its data from ({exc})") from None
    try:
        splits = load_splits(data_spec(_settings(settings)))
    except (DataError, TypeError, ValueError) as exc:
        raise Refused(f"{folder}: its training data cannot be loaded: {exc}") from None
    if splits.fingerprint != fingerprint:
        raise Refused(f"{folder}: its data changed since it was trained (fingerprint {splits.fingerprint[:12]} "
                      f"!= {fingerprint[:12]}); a reference of today's data would not describe this model")
    model = LoadedModel(version, folder, torch.device("cpu"), torch.float32,
                        max_length=int(json.loads((folder / "metrics.json").read_text())["max_length"]), top_k=2)
    if model.labels != list(splits.labels):
        raise Refused(f"{folder}: the model's labels differ from its data's")
    texts = [e.text for e in splits.validation]
    top = np.zeros((len(texts), 2))
    for start in range(0, len(texts), BATCH):
        for i, p in enumerate(model.predict(texts[start:start + BATCH]), start):
            top[i] = [p.score, p.top_k[1][1] if len(p.top_k) > 1 else 0.0]
    ids = {label: i for i, label in enumerate(splits.labels)}
    reference.write(folder, reference.build_from_top(splits.labels, [ids[e.label] for e in splits.train], top))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="the checkpoint store")
    parser.add_argument("--version", default=None, help="the version to complete (default: LATEST)")
    parser.add_argument("--force", action="store_true", help="replace an existing quality.json")
    args = parser.parse_args(argv)
    configure_logging()
    store = Path(args.model_dir)
    try:
        version = args.version or checkpoint.latest_version(store)
        if version is None:
            raise Refused(f"{store}: no LATEST")
        path = backfill(store, version, args.force)
    except (Refused, checkpoint.CheckpointError) as exc:
        print(f"trainer.quality: {exc}", file=sys.stderr)
        return 2
    log.info("quality.written", version=version, path=str(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
