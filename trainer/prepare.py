"""The fine-tuner's model stage: the Accelerator and its precision, the optimizer and schedule, the weight
average, and the teacher's targets, everything handed to ``accelerator.prepare`` or computed before it.

The precision is decided once, by the main process, and broadcast: on a CPU ``auto`` rests on a timing, and
every process of a run must train in the same one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import broadcast_object_list
from torch.optim import AdamW
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from bert_stream import checkpoint, precision
from bert_stream.settings import SettingsError
from trainer.batches import Data
from trainer.data import Splits
from trainer.models import ModelSourceError
from trainer.settings import DISTILL_ALPHA, DISTILL_TEMPERATURE, Hyperparameters, TrainSettings


def resolve_mixed_precision(choice: str) -> str:
    if choice == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if precision.cpu_prefers_bf16() else "no"
    if choice == "fp16" and not torch.cuda.is_available():
        raise SettingsError("--mixed-precision fp16 needs a GPU; on CPU use bf16 (or auto)")
    return choice


def several_processes_on_cpu() -> bool:
    """Launched as one of several processes (torchrun or ``accelerate launch`` set WORLD_SIZE) on a machine
    without CUDA. accelerate joins such processes into one gloo group only when told ``cpu=True``; without
    it each would train alone on all the data and publish its own model."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def agreed_mixed_precision(choice: str) -> str:
    """:func:`resolve_mixed_precision` as the main process decides it, the same in every process of a run:
    on a CPU ``auto`` rests on a timing (bert_stream.precision), and two processes timing near the threshold
    could otherwise train one model in two precisions. Call after the process group exists
    (:func:`make_accelerator` creates it)."""
    decided = resolve_mixed_precision(choice)  # every process: a bad choice fails everywhere, none waits
    if PartialState().num_processes > 1:
        decided = broadcast_object_list([decided])[0]
    return decided


def make_accelerator(settings, **kwargs) -> Accelerator:
    """The run's Accelerator from ``settings.mixed_precision`` and ``settings.gradient_accumulation_steps``
    (the fine-tuner's or the pretrainer's settings); ``kwargs`` go to it."""
    # A fresh state per call: accelerate keeps it process-wide, and tests (or a notebook) train several times.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    cpu = several_processes_on_cpu()
    PartialState(cpu=cpu)  # the process group first: the precision is agreed over it
    return Accelerator(cpu=cpu, mixed_precision=agreed_mixed_precision(settings.mixed_precision),
                       gradient_accumulation_steps=settings.gradient_accumulation_steps, **kwargs)


@dataclasses.dataclass
class Prepared:
    """What ``accelerator.prepare`` returned, and the step count decided after it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train: DataLoader
    validation: DataLoader
    test: DataLoader
    total_steps: int  # optimizer steps of the whole run, per process
    ema: AveragedModel | None  # --ema: the moving average of the weights, what is evaluated and kept
    teacher: torch.Tensor | None = None  # --teacher: its logits for every training example (by "idx")
    class_weights: torch.Tensor | None = None  # --class-weights, resolved: the loss's weight per label id

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights validation selects and the checkpoint holds: the average under --ema."""
        return self.ema.module if self.ema is not None else self.model


def make_optimizer(model: torch.nn.Module, hyper: Hyperparameters) -> AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (1-d tensors: decaying them only hurts),
    and with ``layer_lr_decay`` < 1 a learning rate per depth (see :func:`layer_depth`)."""
    depth_of = layer_depth(model)
    top = max(depth_of.values(), default=0)
    groups: dict[tuple[int, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((depth_of[name], param.ndim >= 2), []).append(param)
    return AdamW([{"params": params, "weight_decay": hyper.weight_decay if decayed else 0.0,
                   "lr": hyper.learning_rate * hyper.layer_lr_decay ** (top - depth)}
                  for (depth, decayed), params in sorted(groups.items())], lr=hyper.learning_rate)


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def layer_depth(model: torch.nn.Module) -> dict[str, int]:
    """Depth of every parameter for layer-wise learning rates: 0 for the embeddings, i + 1 for encoder layer
    i, and one above the last layer for everything else (pooler, classifier head)."""
    layer_of = {name: int(m.group(1)) if (m := _LAYER.search(name)) else None
                for name, _ in model.named_parameters()}
    head = max((i for i in layer_of.values() if i is not None), default=-1) + 2
    return {name: i + 1 if i is not None else 0 if "embeddings" in name else head
            for name, i in layer_of.items()}


def prepare(accelerator: Accelerator, model: torch.nn.Module, data: Data,
            teacher: torch.Tensor | None = None) -> Prepared:
    hyper = data.hyper
    model, optimizer, train, validation, test = accelerator.prepare(
        model, make_optimizer(model, hyper), data.train, data.validation, data.test)
    # Step counts after prepare (the loader is now this process's shard): an invariant, checked early.
    steps_per_epoch = math.ceil(len(train) / hyper.gradient_accumulation_steps)
    assert steps_per_epoch == data.steps_per_epoch, f"{steps_per_epoch} != {data.steps_per_epoch} steps/epoch"
    total_steps = max(1, math.ceil(hyper.epochs * steps_per_epoch))
    # accelerate steps the scheduler once per process per optimizer step, hence the factor.
    scheduler = accelerator.prepare(get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(hyper.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes))
    # The average starts as a copy of the prepared model (its forward keeps the autocast of mixed precision,
    # so validation sees it as it sees the model) and is updated after every optimizer step.
    ema = (AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(hyper.ema))
           if hyper.ema > 0 else None)
    weights = (None if hyper.class_weights is None
               else torch.tensor(hyper.class_weights, dtype=torch.float32, device=accelerator.device))
    return Prepared(model, optimizer, scheduler, train, validation, test, total_steps, ema,
                    None if teacher is None else teacher.to(accelerator.device), weights)


def teacher_logits(settings: TrainSettings, splits: Splits, max_length: int, say) -> torch.Tensor:
    """The teacher's logits for every training example, columns in the student's label order. The teacher
    runs through the worker's engine (its dtype and padding-free forward): one pass, before training."""
    from worker.engine import Engine

    try:
        teacher = Engine(settings.teacher, max_length=max_length).start().current
    except (OSError, checkpoint.CheckpointError) as exc:
        raise ModelSourceError(f"--teacher {settings.teacher}: {exc}") from None
    missing = sorted(set(splits.labels) - set(teacher.labels))
    if missing:
        raise ModelSourceError(f"--teacher {settings.teacher} ({teacher.version}) does not know the labels "
                               f"{', '.join(missing[:5])}: distil from a model trained on the same labels")
    t0 = time.perf_counter()
    texts = [e.text for e in splits.train]
    logits = torch.cat([teacher.logits(texts[i:i + 512]) for i in tqdm(
        range(0, len(texts), 512), desc="teacher", unit="batch", disable=not sys.stderr.isatty())])
    logits = logits[:, [teacher.labels.index(label) for label in splits.labels]]
    gold = torch.tensor([splits.labels.index(e.label) for e in splits.train])
    say("train.teacher", teacher=settings.teacher, teacher_version=teacher.version,
        train_accuracy=round((logits.argmax(-1) == gold).float().mean().item(), 5),
        seconds=round(time.perf_counter() - t0, 1), alpha=DISTILL_ALPHA, temperature=DISTILL_TEMPERATURE)
    return logits
