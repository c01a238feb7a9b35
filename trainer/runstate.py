"""Resumable run state, shared by the fine-tuner (``trainer.run``) and the pretrainer (``trainer.pretrain``).

A run folder holds ``state/``: accelerate's state (weights as safetensors, optimizer, scheduler, the RNGs of
every process), the run's own ``progress.json`` and any extra tensor files (the fine-tuner's best weights so
far). It is written as ``state.tmp/`` and swapped in whole, so a crash while saving leaves the previous
snapshot usable; ``--resume`` reads ``state/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from bert_stream import checkpoint
from bert_stream.logs import get_logger, quieted

if TYPE_CHECKING:
    from trainer.data import Splits
    from trainer.settings import Hyperparameters, TrainSettings

RUNS_DIR = ".runs"  # under the output dir: one folder per unfinished run
STATE, PROGRESS = "state", "progress.json"

log = get_logger("trainer.runstate")


def save(accelerator: Accelerator, run_dir: Path, progress, extra: dict[str, dict] | None = None) -> None:
    """Snapshot into ``state.tmp/`` then swap it in. ``progress``: a dataclass; ``extra``: file name ->
    tensors, written next to accelerate's files (main process only). Every process must call this."""
    tmp, final, old = run_dir / "state.tmp", run_dir / STATE, run_dir / "state.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with quieted("accelerate.utils.other"):  # warns that it drops a tied embedding copy (MLM heads); loading re-ties it
        accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for name, tensors in (extra or {}).items():
            save_file(tensors, tmp / name)
        (tmp / PROGRESS).write_text(json.dumps(dataclasses.asdict(progress)))
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_progress(run_dir: Path) -> dict:
    """The saved ``progress.json`` of a run, as a dict (the caller builds its own dataclass)."""
    return json.loads((run_dir / STATE / PROGRESS).read_text())


def run_fingerprint(settings: TrainSettings, hyper: Hyperparameters, splits: Splits, accelerator) -> str:
    """What must match for a saved state to be continued: same model, data, hyperparameters, layout."""
    identity = {"model": settings.model, "scratch_preset": settings.scratch_preset, "pooling": settings.pooling,
                **({"student_layers": settings.student_layers} if settings.student_layers else {}),
                **({"teacher": settings.teacher} if settings.teacher else {}),
                "hyper": dataclasses.asdict(hyper), "data": splits.fingerprint,
                "mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def open_run(settings: TrainSettings, accelerator: Accelerator, fingerprint: str) -> Path:
    """The run folder: the newest unfinished one with this fingerprint under --resume, else a new one.
    Decided on the main process and broadcast, so every process uses the same folder."""
    choice = None
    if accelerator.is_main_process:
        runs = Path(settings.output_dir) / RUNS_DIR
        candidates = sorted(p for p in runs.glob(f"*-{fingerprint}") if (p / "state" / "progress.json").is_file())
        if settings.resume and candidates:
            choice = str(candidates[-1])
            log.info("train.resume", run=choice)
        else:
            if settings.resume:
                log.warning("train.resume_nothing", reason="no unfinished run with these settings and data",
                            fingerprint=fingerprint, looked_in=str(runs))
            path = runs / f"{checkpoint.new_version_id()}-{fingerprint}"
            path.mkdir(parents=True)
            choice = str(path)
    return Path(broadcast_object_list([choice])[0])
