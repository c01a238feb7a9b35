"""Resumable run state, shared by the fine-tuner (``trainer.run``) and the pretrainer (``trainer.pretrain``).

A run folder holds ``state/``: accelerate's state (weights as safetensors, optimizer, scheduler, the RNGs of
every process), the run's own ``progress.json`` and any extra tensor files (the fine-tuner's best weights so
far). It is written as ``state.tmp/`` and swapped in whole, so a crash while saving leaves the previous
snapshot usable; ``--resume`` reads ``state/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file

from bert_stream.logs import quieted

STATE, PROGRESS = "state", "progress.json"


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
