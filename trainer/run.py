"""``python -m trainer.run``: fine-tune a Chinese BERT classifier with accelerate and publish an evaluated,
versioned checkpoint into the store the workers read.

Shape: parse -> data -> model -> ``prepare`` -> loop with ``accumulate`` (evaluating and saving resumable
state every ``eval_steps``) -> evaluate the best weights on validation and test -> quality gate -> publish
atomically (``bert_stream.checkpoint``) -> announce. The same code runs on one CPU process or under
``accelerate launch -m trainer.run`` / ``torchrun --nproc-per-node N -m trainer.run`` on several
processes/GPUs: every process trains and evaluates its shard, only the main process writes the checkpoint.
(On CPUs ``accelerate launch --cpu`` starts one process unless MPI is set up; torchrun, or ``accelerate
launch --multi_gpu --num_processes N``, starts N, joined over gloo: tests/trainer/test_launch.py.)

A smaller, faster model for CPU workers is the same program: ``--student-layers N`` cuts the base model's
encoder to N evenly spaced layers, and ``--teacher <checkpoint>`` adds the teacher's soft predictions to the
loss (its logits for the training set are computed once, through the worker's engine, before training).
With ``--model`` set to the teacher too, the student starts from the fine-tuned weights.

Exit status: 0 published; 2 bad flags, data or model (one line on stderr, no traceback); 3 refused by the
quality gate (the model is kept in ``<output-dir>/.rejected/<version>`` and ``LATEST`` is untouched);
130/143 interrupted by SIGINT/SIGTERM after saving resumable state (continue with ``--resume``).

Resumable state lives in ``<output-dir>/.runs/<run-id>/state/`` (``accelerator.save_state``: weights as
safetensors, optimizer, scheduler, RNG states, plus ``progress.json`` and the best weights so far). A run is
identified by a fingerprint of its resolved hyperparameters, model and data; ``--resume`` picks the newest
unfinished run with the same fingerprint. Finished runs (published or refused) delete their run folder.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file
from torch.optim import AdamW
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from bert_stream import precision
from bert_stream.logs import configure_logging, get_logger
from bert_stream.ngram import NgramModel
from bert_stream.settings import SettingsError, parse_settings, public_view
from bert_stream import checkpoint
from trainer import baseline, metrics, plots, runstate
from trainer.data import DataError, DataSpec, Example, Splits, load_splits
from trainer.models import ModelSourceError, keep_layers, load_for_classification
from trainer.settings import (DISTILL_ALPHA, DISTILL_TEMPERATURE, EARLY_STOPPING_AFTER,
                              HYBRID_MAX_MACRO_F1_DROP, Hyperparameters, TrainSettings, max_train_examples,
                              resolve)

PROG = "python -m trainer.run"
EXIT_OK, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
RUNS_DIR, REJECTED_DIR = ".runs", ".rejected"

log = get_logger("trainer.run")


# ---------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(TrainSettings, argv, prog=PROG, description=__doc__.split("\n\n")[0])
    configure_logging(settings.log_level)
    threads = torch.get_num_threads()
    try:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        return train(settings)
    except (DataError, ModelSourceError, SettingsError, checkpoint.CheckpointError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the last saved state is still resumable
        log.warning("train.interrupted", saved="last evaluation's state", resume=f"{PROG} --resume")
        return EXIT_SIGNAL[signal.SIGINT]
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests): leave torch as it was


def train(settings: TrainSettings) -> int:
    """The whole program after parsing; returns the exit status."""
    started = time.monotonic()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # "Loading weights"/"Writing model shards" bars are noise in a log
    accelerator = make_accelerator(settings)
    say = _main_logger(accelerator)
    say("train.start", **public_view(settings), mixed_precision_resolved=accelerator.mixed_precision,
        processes=accelerator.num_processes, device=str(accelerator.device))
    set_seed(settings.seed)  # before the model exists: the classifier head (or a scratch model) is random
    with accelerator.main_process_first():  # downloads and conversions happen once, the others read the cache
        splits = load_splits(data_spec(settings))
        model, tokenizer = load_for_classification(
            settings.model, splits.labels, corpus=[e.text for e in splits.train],
            scratch_preset=settings.scratch_preset, pooling=settings.pooling, text_prefix=settings.text_prefix)
    if settings.student_layers:
        keep_layers(model, settings.student_layers)
    data = build_data(settings, splits, tokenizer, getattr(model.config, "max_position_embeddings", 512),
                      accelerator.num_processes)
    say("train.data", **splits.describe()["sizes"], labels=len(splits.labels), max_length=data.hyper.max_length,
        steps_per_epoch=data.steps_per_epoch, eval_steps=data.hyper.eval_steps)

    run = open_run(settings, accelerator, fingerprint=run_fingerprint(settings, data.hyper, splits, accelerator))
    teacher = teacher_logits(settings, splits, data.hyper.max_length, say) if settings.teacher else None
    prepared = prepare(accelerator, model, data, teacher)
    with StopSignals() as stop:
        fit = fit_model(accelerator, prepared, data, run, stop, say)
    if fit.stopped_by is not None:
        if accelerator.is_main_process:
            log.warning("train.interrupted", signal=fit.stopped_by.name, step=fit.progress.step, state=str(run),
                        resume=f"{PROG} --resume (same flags)", latest="unchanged")
        return EXIT_SIGNAL[fit.stopped_by]
    say("train.done", steps=fit.progress.step, best_step=fit.progress.best_step,
        best_macro_f1=round(fit.progress.best_macro_f1, 5), early_stopped=fit.progress.early_stopped,
        fit_s=round(fit.progress.fit_seconds, 1), examples_per_s=fit.progress.examples_per_s(accelerator.num_processes))

    final = final_evaluation(accelerator, prepared, data, fit)
    say("train.final_eval", validation_accuracy=round(final.validation["accuracy"], 5),
        validation_macro_f1=round(final.validation["macro_f1"], 5), test_accuracy=round(final.test["accuracy"], 5),
        test_macro_f1=round(final.test["macro_f1"], 5), eval_s=round(final.eval_seconds, 1))
    status = EXIT_OK
    if accelerator.is_main_process:
        hybrid = add_ngram_half(settings, splits, final)
        if hybrid is not None:
            say("train.hybrid", **hybrid, validation_accuracy=round(final.validation["accuracy"], 5),
                validation_macro_f1=round(final.validation["macro_f1"], 5),
                test_accuracy=round(final.test["accuracy"], 5), test_macro_f1=round(final.test["macro_f1"], 5))
        final.baseline = baseline.versus(final.test, baseline.fit_and_score(splits.train, splits.test))
        say("train.baseline", model="tfidf-char-1-3+linear-svc", test_accuracy=final.baseline["accuracy"],
            test_macro_f1=final.baseline["macro_f1"], gain_accuracy=final.baseline["gain_accuracy"],
            gain_macro_f1=final.baseline["gain_macro_f1"], fit_s=final.baseline["fit_s"])
        status = save_and_publish(settings, accelerator, prepared.model, tokenizer, data, fit, final,
                                  time.monotonic() - started)
        shutil.rmtree(run, ignore_errors=True)  # finished: nothing left to resume
        with contextlib.suppress(OSError):
            run.parent.rmdir()  # .runs/ itself, when no other run is unfinished
    accelerator.wait_for_everyone()
    # No end_training(): it destroys the process group while the DDP model still holds it, and rank 0
    # then hung at exit under torchrun (gloo); the launcher tears the group down when the processes end.
    return broadcast_object_list([status])[0]


def _main_logger(accelerator: Accelerator):
    """Info events from the main process only: N processes logging the same eval is noise."""

    def say(event: str, **fields) -> None:
        if accelerator.is_main_process:
            log.info(event, **fields)

    return say


# ---------------------------------------------------------------------------------------------------------
# Accelerator and precision


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


# ---------------------------------------------------------------------------------------------------------
# Data: tokenised once, dynamic padding, length-grouped batches


def data_spec(settings: TrainSettings) -> DataSpec:
    return DataSpec(
        data=None if settings.train_file else settings.data, train_file=settings.train_file,
        validation_file=settings.validation_file, test_file=settings.test_file,
        text_column=settings.text_column, label_column=settings.label_column,
        validation_fraction=settings.validation_fraction, test_fraction=settings.test_fraction,
        seed=settings.seed, max_train_examples=max_train_examples(settings))


class LengthGroupedBatchSampler:
    """Batches of texts of similar length, in a seeded random order that changes with the epoch.

    Padding is paid for in full (a padded token costs as much as a real one), so similar lengths per batch
    make an epoch much cheaper. Randomness is kept where it matters: the indices are shuffled, cut into
    mega-batches of ``batch_size * 50``, each sorted by length and cut into batches, and the batches shuffled
    (the scheme of transformers' LengthGroupedSampler). Depends only on (seed, epoch): a resumed run replays
    the same order. ``batch_size`` is public because accelerate shards batch samplers by it."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50):
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        # Not named set_epoch on purpose: accelerate calls set_epoch(<its own iteration count>) on every
        # pass, which restarts at 0 after skip_first_batches and would replay epoch 0's order on resume.
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), size):
            group = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


class SortedBatchSampler:
    """Evaluation batches: longest first, no randomness (fastest; predictions do not depend on order)."""

    def __init__(self, lengths: Sequence[int], batch_size: int):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        self.batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


@dataclasses.dataclass
class Data:
    hyper: Hyperparameters
    train: DataLoader
    validation: DataLoader
    test: DataLoader
    sampler: LengthGroupedBatchSampler
    splits: Splits
    steps_per_epoch: int  # optimizer steps per epoch on each process


def encode(tokenizer, examples: Sequence[Example], label_ids: dict[str, int], max_length: int) -> list[dict]:
    encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": label_ids[e.label], "idx": i}
            for i, e in enumerate(examples)]


def build_data(settings: TrainSettings, splits: Splits, tokenizer, model_max: int, num_processes: int) -> Data:
    lengths = [len(ids) for ids in tokenizer([e.text for e in splits.train])["input_ids"]]
    model_max = min(model_max, tokenizer.model_max_length)
    global_batches = math.ceil(len(splits.train) / settings.batch_size)
    steps_per_epoch = math.ceil(math.ceil(global_batches / num_processes) / settings.gradient_accumulation_steps)
    label_ids = {label: i for i, label in enumerate(splits.labels)}
    counts = collections.Counter(label_ids[e.label] for e in splits.train)
    hyper = resolve(settings, token_lengths=lengths, model_max_length=model_max, steps_per_epoch=steps_per_epoch,
                    label_counts=[counts[i] for i in range(len(label_ids))])
    # pad_to_multiple_of=8: tensor-core / AMX tile friendly shapes for a few padded tokens
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    train_set = encode(tokenizer, splits.train, label_ids, hyper.max_length)
    sampler = LengthGroupedBatchSampler([len(f["input_ids"]) for f in train_set], hyper.batch_size, hyper.seed)

    def loader(features: list[dict], batches) -> DataLoader:
        # Its own generator: a DataLoader draws a base seed whenever an iteration starts, and from torch's
        # global RNG that would shift dropout, so evaluating (or resuming) would change the trained model.
        return DataLoader(features, batch_sampler=batches, collate_fn=collate, generator=torch.Generator())

    def eval_loader(examples: Sequence[Example]) -> DataLoader:
        features = encode(tokenizer, examples, label_ids, hyper.max_length)
        return loader(features, SortedBatchSampler([len(f["input_ids"]) for f in features], 2 * hyper.batch_size))

    return Data(hyper=hyper, train=loader(train_set, sampler),
                validation=eval_loader(splits.validation), test=eval_loader(splits.test), sampler=sampler,
                splits=splits, steps_per_epoch=steps_per_epoch)


# ---------------------------------------------------------------------------------------------------------
# Resumable runs: <output-dir>/.runs/<run-id>/


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


def save_state(accelerator: Accelerator, run: Path, progress: Progress, best: dict | None,
               ema: AveragedModel | None) -> None:
    extra = {}
    if best is not None:
        extra["best.safetensors"] = best
    if ema is not None:
        extra["ema.safetensors"] = _cpu_copy(ema.state_dict())
    runstate.save(accelerator, run, progress, extra)


def load_state(accelerator: Accelerator, run: Path, ema: AveragedModel | None) -> tuple[Progress, dict | None]:
    state = run / runstate.STATE
    accelerator.load_state(str(state))
    progress = Progress(**runstate.load_progress(run))
    best = load_file(state / "best.safetensors") if (state / "best.safetensors").exists() else None
    if ema is not None:  # the fingerprint includes the decay: a state saved with --ema has the file
        ema.load_state_dict(load_file(state / "ema.safetensors", device=str(accelerator.device)))
    return progress, best


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------
# Training


class StopSignals(contextlib.AbstractContextManager):
    """SIGINT/SIGTERM only set a flag: the loop saves resumable state at the next optimizer step and ends.
    A second SIGINT interrupts at once (the previous handler is back after the first)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        for sig in EXIT_SIGNAL:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, no graceful stop
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


@dataclasses.dataclass
class Progress:
    """Where a run stands; saved with every state snapshot (``progress.json``)."""

    epoch: int = 0  # epoch in progress
    batches_done: int = 0  # micro-batches of that epoch already trained on
    step: int = 0  # optimizer steps done
    examples: int = 0  # training examples seen by this process
    fit_seconds: float = 0.0  # wall time of the loop
    train_seconds: float = 0.0  # of which training steps (the rest: evaluating, saving state)
    best_macro_f1: float = -1.0
    best_step: int = 0
    evals_without_improvement: int = 0
    early_stopped: bool = False
    history: list = dataclasses.field(default_factory=list)  # one dict per evaluation
    losses: list = dataclasses.field(default_factory=list)  # [step, mean train loss since the last one]

    def examples_per_s(self, processes: int) -> float:
        return round(self.examples * processes / max(self.train_seconds, 1e-9), 1)

    def eta_s(self, total_steps: int) -> int | None:
        """Wall seconds still to go at the pace so far, evaluations included (early stopping may end the run
        sooner). Logged with every evaluation: off a terminal tqdm's bar is off, and a Job's operator reads
        the log."""
        if self.step == 0:
            return None
        return round((total_steps - self.step) * self.fit_seconds / self.step)


@dataclasses.dataclass
class Fit:
    progress: Progress
    best: dict[str, torch.Tensor] | None  # best weights (CPU copy), by validation macro-F1
    stopped_by: signal.Signals | None


class LossMeter:
    """Mean training loss between evaluations, summed on the device: ``.item()`` per step would be a
    host-device sync point on GPU."""

    def __init__(self, device: torch.device):
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.count += 1

    def take(self) -> float:
        mean = (self.total / max(self.count, 1)).item()
        self.total.zero_()
        self.count = 0
        return mean


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


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. (2015): cross-entropy on the labels, plus KL from the teacher's distribution at
    temperature T to the student's (times T^2, so its gradients keep their size as T changes)."""
    t = DISTILL_TEMPERATURE
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher.float() / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    return (1 - DISTILL_ALPHA) * F.cross_entropy(logits, labels, weight=weight) + DISTILL_ALPHA * kl


def symmetric_kl(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """R-Drop's distance between two predictions (logits): the mean of KL(p||q) and KL(q||p)."""
    log_p, log_q = F.log_softmax(first, -1), F.log_softmax(second, -1)
    return (F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
            + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")) / 2


def classification_loss(model, batch: dict, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the batch (each example weighted by its label's ``weight`` when given)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits.float(), batch["labels"], weight=weight)


def rdrop_loss(model, batch: dict, alpha: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """R-Drop: the batch twice in one forward pass (independent dropout masks), cross-entropy of both
    halves plus ``alpha`` times the symmetric KL divergence between their predicted distributions."""
    labels = batch["labels"]
    inputs = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
    first, second = model(**inputs).logits.float().chunk(2)
    ce = (F.cross_entropy(first, labels, weight=weight) + F.cross_entropy(second, labels, weight=weight)) / 2
    return ce + alpha * symmetric_kl(first, second)


@contextlib.contextmanager
def pushed_embeddings(accelerator: Accelerator, model, epsilon: float):
    """FGM (Miyato et al. 2017), after a backward pass: inside, the word embeddings are moved ``epsilon``
    (L2 norm) along the gradient the loss has on them; on exit they are put back. Yields whether they
    moved (not when the gradient is missing, zero or not finite). The table's gradient is nonzero only in
    this batch's rows, so only the batch's tokens move."""
    weight = accelerator.unwrap_model(model).get_input_embeddings().weight
    norm = weight.grad.norm() if weight.grad is not None else None
    if norm is None or not torch.isfinite(norm) or norm == 0:
        yield False
        return
    delta = (epsilon / norm) * weight.grad
    weight.data.add_(delta)
    try:
        yield True
    finally:
        weight.data.sub_(delta)


def adversarial_backward(accelerator: Accelerator, model, batch: dict, epsilon: float,
                         weight: torch.Tensor | None = None) -> None:
    """FGM after the clean backward pass: backpropagate the loss at the pushed embeddings too (gradients
    add up)."""
    with pushed_embeddings(accelerator, model, epsilon) as moved:
        if moved:
            accelerator.backward(classification_loss(model, batch, weight))


def adversarial_rdrop_backward(accelerator: Accelerator, model, batch: dict, alpha: float,
                               epsilon: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """R-Drop whose pair is the clean batch and its FGM copy (two passes where R-Drop + FGM take three):
    cross-entropy of the clean batch, backward; then at the pushed embeddings cross-entropy plus ``alpha``
    times the symmetric KL to the clean prediction, which is held fixed (the pushed one is pulled to it,
    as in virtual adversarial training), backward. Returns R-Drop's loss over the pair, for the log."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    clean = model(**inputs).logits.float()
    clean_ce = F.cross_entropy(clean, labels, weight=weight)
    accelerator.backward(clean_ce)
    clean = clean.detach()
    with pushed_embeddings(accelerator, model, epsilon):
        pushed = model(**inputs).logits.float()
        pushed_ce, kl = F.cross_entropy(pushed, labels, weight=weight), symmetric_kl(clean, pushed)
        accelerator.backward(pushed_ce + alpha * kl)
    return ((clean_ce + pushed_ce) / 2 + alpha * kl).detach()


def train_step(accelerator: Accelerator, p: Prepared, batch: dict, hyper: Hyperparameters,
               progress: Progress, losses: LossMeter) -> bool:
    """One micro-batch forward/backward; True when it completed an optimizer step."""
    p.model.train()
    idx = batch.pop("idx")
    with accelerator.accumulate(p.model):  # no_sync + loss scaling until the last micro-batch
        if p.teacher is not None:
            loss = distillation_loss(p.model(**batch).logits.float(), batch["labels"], p.teacher[idx],
                                     p.class_weights)
            accelerator.backward(loss)
        elif hyper.rdrop > 0 and hyper.adversarial > 0 and hyper.rdrop_pair == "adversarial":
            loss = adversarial_rdrop_backward(accelerator, p.model, batch, hyper.rdrop, hyper.adversarial,
                                              p.class_weights)
        else:
            loss = (rdrop_loss(p.model, batch, hyper.rdrop, p.class_weights) if hyper.rdrop > 0
                    else classification_loss(p.model, batch, p.class_weights))
            accelerator.backward(loss)
            if hyper.adversarial > 0:
                adversarial_backward(accelerator, p.model, batch, hyper.adversarial, p.class_weights)
        if accelerator.sync_gradients and hyper.max_grad_norm > 0:
            accelerator.clip_grad_norm_(p.model.parameters(), hyper.max_grad_norm)
        p.optimizer.step()  # skipped by accelerate until the gradients are synced
        p.scheduler.step()
        p.optimizer.zero_grad()
    if p.ema is not None and accelerator.sync_gradients:
        p.ema.update_parameters(accelerator.unwrap_model(p.model))
    losses.add(loss)
    progress.batches_done += 1
    progress.examples += len(batch["labels"])
    if accelerator.sync_gradients:
        progress.step += 1
    return accelerator.sync_gradients


def fit_model(accelerator: Accelerator, p: Prepared, data: Data, run: Path, stop: StopSignals, say) -> Fit:
    progress, best = Progress(), None
    if (run / "state" / "progress.json").is_file():
        progress, best = load_state(accelerator, run, p.ema)
        say("train.resumed", step=progress.step, epoch=progress.epoch, best_macro_f1=progress.best_macro_f1)
    bar = tqdm(total=p.total_steps, initial=progress.step, desc="train", unit="step",
               disable=None if accelerator.is_local_main_process else True)  # None: off when not a TTY
    clock = Clock(progress)
    losses = LossMeter(accelerator.device)
    log_every = max(1, data.hyper.eval_steps // 5)  # loss points for the training curve
    while progress.step < p.total_steps and not progress.early_stopped:
        data.sampler.use_epoch(progress.epoch)
        skip = progress.batches_done  # a resumed epoch continues where its state was saved
        for batch in accelerator.skip_first_batches(p.train, skip) if skip else p.train:
            if not train_step(accelerator, p, batch, data.hyper, progress, losses):
                continue
            bar.update(1)
            epoch_done = progress.batches_done == len(p.train)
            if epoch_done:
                progress.epoch, progress.batches_done = progress.epoch + 1, 0
            # Counted from the epoch's start: 250 steps an epoch and eval_steps 63 evaluate at 63, 126, 189,
            # 250, 313, ... (not again at 252, two steps after the epoch's own evaluation).
            in_epoch = progress.step % data.steps_per_epoch
            saved = epoch_done or in_epoch % data.hyper.eval_steps == 0 or progress.step == p.total_steps
            if saved or progress.step % log_every == 0:
                progress.losses.append([progress.step, round(losses.take(), 5)])  # .item(): a sync point
            if saved:
                clock.training_paused()
                best = evaluate_during_training(accelerator, p, data, progress, best, say)
                clock.save(accelerator, run, best, p.ema)
            if stop.received is not None:
                accelerator.set_trigger()
            if accelerator.check_trigger():  # any process got a signal: all stop at the same step
                if not saved:
                    clock.training_paused()
                    clock.save(accelerator, run, best, p.ema)
                bar.close()
                return Fit(progress, best, stop.received or signal.SIGTERM)
            if epoch_done or progress.step >= p.total_steps or progress.early_stopped:
                break
    bar.close()
    clock.training_paused()
    return Fit(progress, best, None)


class Clock:
    """Splits the loop's wall time into training steps and the rest (evaluation, saving), across resumes:
    examples/s must not count the evaluations."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.loop_started = time.monotonic() - progress.fit_seconds
        self.mark = time.monotonic()

    def training_paused(self) -> None:
        now = time.monotonic()
        self.progress.train_seconds += now - self.mark
        self.progress.fit_seconds = now - self.loop_started
        self.mark = now

    def save(self, accelerator: Accelerator, run: Path, best: dict | None, ema: AveragedModel | None) -> None:
        self.progress.fit_seconds = time.monotonic() - self.loop_started
        save_state(accelerator, run, self.progress, best, ema)
        self.mark = time.monotonic()


def evaluate_during_training(accelerator: Accelerator, p: Prepared, data: Data, progress: Progress,
                             best: dict | None, say) -> dict:
    """Validation accuracy/macro-F1 (mixed precision, as trained) and early-stopping bookkeeping; returns
    the best weights so far (a CPU copy, replaced when macro-F1 improves)."""
    label_ids = {label: i for i, label in enumerate(data.splits.labels)}
    refs = [label_ids[e.label] for e in data.splits.validation]
    scores = metrics.summary(refs, predict(accelerator, p.evaluated, p.validation).argmax(1).tolist(),
                             len(label_ids))
    improved = scores["macro_f1"] > progress.best_macro_f1
    if improved:
        progress.best_macro_f1, progress.best_step = scores["macro_f1"], progress.step
        progress.evals_without_improvement = 0
        best = _cpu_copy(accelerator.unwrap_model(p.evaluated).state_dict())
    else:
        progress.evals_without_improvement += 1
    patience = data.hyper.early_stopping_patience
    progress.early_stopped = (patience > 0 and progress.evals_without_improvement >= patience
                              and progress.step >= EARLY_STOPPING_AFTER * p.total_steps)
    entry = {"step": progress.step, "epoch": round(progress.step / data.steps_per_epoch, 3),
             "train_loss": progress.losses[-1][1], "accuracy": round(scores["accuracy"], 5),
             "macro_f1": round(scores["macro_f1"], 5), "lr": float(max(p.scheduler.get_last_lr()))}
    progress.history.append(entry)
    say("train.eval", **entry, improved=improved, best_macro_f1=round(progress.best_macro_f1, 5),
        examples_per_s=progress.examples_per_s(accelerator.num_processes), eta_s=progress.eta_s(p.total_steps),
        early_stop=progress.early_stopped)
    return best


def predict(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> np.ndarray:
    """[examples, labels] float32 logits in the order of the loader's examples, gathered from every process."""
    model.eval()
    by_index: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for batch in loader:
            idx = batch.pop("idx")
            batch.pop("labels")
            logits = model(**batch).logits.float()
            idx, logits = accelerator.gather_for_metrics((idx, logits))
            by_index.update(zip(idx.tolist(), logits.cpu().numpy()))
    n = len(loader.dataset)
    assert sorted(by_index) == list(range(n)), "evaluation lost or invented examples"
    return np.stack([by_index[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------------------
# Final evaluation, gate, publish


@dataclasses.dataclass
class Final:
    validation: dict
    test: dict
    test_predictions: list[int]
    eval_seconds: float
    validation_logits: np.ndarray | None = None  # the transformer's, fp32
    test_logits: np.ndarray | None = None
    baseline: dict | None = None  # trainer.baseline.versus: the classical model on the same split
    ngram: NgramModel | None = None  # the hybrid's n-gram half, when it was kept
    hybrid: dict | None = None  # its fit, and the transformer's own scores beside the published ones
    transformer_test_predictions: list[int] | None = None  # the transformer's alone, when a hybrid was kept


def final_evaluation(accelerator: Accelerator, p: Prepared, data: Data, fit: Fit) -> Final:
    """The best weights, in fp32 without autocast: the numbers (and labels) a plain
    ``AutoModelForSequenceClassification.from_pretrained`` of the checkpoint reproduces."""
    started = time.monotonic()
    plain = accelerator.unwrap_model(p.model, keep_fp32_wrapper=False)  # drops the autocast wrapper for good
    plain.load_state_dict(fit.best)
    labels = data.splits.labels
    ids = {label: i for i, label in enumerate(labels)}
    val_logits = predict(accelerator, plain, p.validation)
    test_logits = predict(accelerator, plain, p.test)
    test_pred = test_logits.argmax(1).tolist()
    return Final(
        validation=metrics.report([ids[e.label] for e in data.splits.validation], val_logits.argmax(1).tolist(), labels),
        test=metrics.report([ids[e.label] for e in data.splits.test], test_pred, labels),
        test_predictions=test_pred, eval_seconds=time.monotonic() - started,
        validation_logits=val_logits, test_logits=test_logits)


def add_ngram_half(settings: TrainSettings, splits: Splits, final: Final) -> dict | None:
    """``--hybrid auto``: fit the char n-gram model on the training split, scale it and the transformer by
    validation log-loss (bert_stream.ngram), and when the n-grams get a weight make the sum what is scored
    and published. Returns the log's fields (None with --hybrid off)."""
    if settings.hybrid == "off":
        return None
    started = time.monotonic()
    ids = {label: i for i, label in enumerate(splits.labels)}
    ngram = NgramModel.fit([e.text for e in splits.train], [ids[e.label] for e in splits.train], len(ids))
    val_texts, test_texts = [e.text for e in splits.validation], [e.text for e in splits.test]
    fitted = ngram.calibrate(final.validation_logits, val_texts, [ids[e.label] for e in splits.validation])
    fitted["transformer"] = {"validation": _scores(final.validation), "test": _scores(final.test)}
    kept = ngram.ngram_scale > 0
    if kept:
        def hybrid(logits: np.ndarray, texts: list[str]) -> list[int]:
            return ngram.combine(torch.from_numpy(logits), texts).argmax(-1).tolist()

        validation = metrics.report([ids[e.label] for e in splits.validation],
                                    hybrid(final.validation_logits, val_texts), splits.labels)
        dropped = hybrid_costs_rare_classes(final.validation["macro_f1"], validation["macro_f1"])
        if dropped:
            kept, fitted["dropped"], fitted["hybrid_validation"] = False, dropped, _scores(validation)
        else:
            final.transformer_test_predictions = final.test_predictions
            final.validation = validation
            final.test_predictions = hybrid(final.test_logits, test_texts)
            final.test = metrics.report([ids[e.label] for e in splits.test], final.test_predictions, splits.labels)
            final.ngram = ngram
    fitted["kept"] = kept
    fitted["fit_s"] = round(time.monotonic() - started, 2)
    final.hybrid = fitted
    return fitted


def hybrid_costs_rare_classes(transformer_macro_f1: float, hybrid_macro_f1: float) -> str | None:
    """Why a hybrid that log-loss kept is dropped after all, or None. Log-loss is ruled by the common classes, so
    on a skewed set it can buy its fit with the rare class's recall: on reviews with 10% negatives the sum kept
    accuracy and lost 0.10-0.17 of validation macro-F1 (test: the same). Dropped when validation macro-F1 falls
    by more than :data:`HYBRID_MAX_MACRO_F1_DROP`; smaller moves are a few texts of a small validation split."""
    if transformer_macro_f1 - hybrid_macro_f1 > HYBRID_MAX_MACRO_F1_DROP:
        return (f"validation macro-F1 {hybrid_macro_f1:.3f} with the n-grams against {transformer_macro_f1:.3f} "
                f"without (more than {HYBRID_MAX_MACRO_F1_DROP} lower)")
    return None


def _scores(report: dict) -> dict:
    return {"accuracy": round(report["accuracy"], 5), "macro_f1": round(report["macro_f1"], 5)}


def gate(settings: TrainSettings, test: dict, test_fingerprint: str,
         versus_baseline: dict | None = None) -> list[str]:
    """Reasons to refuse publishing (empty: publish). Against the --min-* floors, the classical baseline's
    accuracy plus --min-gain-over-baseline, and the published model when it was tested on the same split (a
    lower test macro-F1, the selection metric, is worse)."""
    reasons = []
    floor = settings.min_gain_over_baseline
    if floor is not None and versus_baseline is not None and versus_baseline["gain_accuracy"] < floor:
        reasons.append(f"test accuracy {test['accuracy']:.4f} beats the classical baseline's "
                       f"{versus_baseline['accuracy']:.4f} by {versus_baseline['gain_accuracy']:+.4f} < "
                       f"--min-gain-over-baseline {floor:.4f}")
    if settings.min_accuracy is not None and test["accuracy"] < settings.min_accuracy:
        reasons.append(f"test accuracy {test['accuracy']:.4f} < --min-accuracy {settings.min_accuracy:.4f}")
    if settings.min_macro_f1 is not None and test["macro_f1"] < settings.min_macro_f1:
        reasons.append(f"test macro-F1 {test['macro_f1']:.4f} < --min-macro-f1 {settings.min_macro_f1:.4f}")
    root = Path(settings.output_dir)
    try:
        current = checkpoint.latest_version(root)
        published = json.loads((root / current / "metrics.json").read_text()) if current else None
    except (checkpoint.CheckpointError, OSError, ValueError) as exc:
        log.warning("gate.no_comparison", reason=f"published model unreadable: {exc}")
        return reasons
    if published is None:
        return reasons
    if published.get("test_fingerprint") != test_fingerprint:
        log.info("gate.no_comparison", published=current,
                 reason="the published model was tested on a different test split; scores are not comparable")
    elif test["macro_f1"] < published["test"]["macro_f1"]:
        reasons.append(f"test macro-F1 {test['macro_f1']:.4f} is below the published {current}'s "
                       f"{published['test']['macro_f1']:.4f} on the same test split")
    return reasons


def save_and_publish(settings: TrainSettings, accelerator: Accelerator, model, tokenizer, data: Data, fit: Fit,
                     final: Final, total_seconds: float) -> int:
    """Main process only: write the version into a staging folder, then publish it (or set it aside)."""
    root, splits = Path(settings.output_dir), data.splits
    version = checkpoint.new_version_id()
    staged = checkpoint.staging_dir(root, version)
    try:
        write_checkpoint(staged, settings, accelerator, model, tokenizer, data, fit, final, version,
                         total_seconds)
        reasons = gate(settings, final.test, splits.test_fingerprint, final.baseline)
        if reasons and not settings.force:
            rejected = root / REJECTED_DIR / version
            rejected.parent.mkdir(exist_ok=True)
            os.replace(staged, rejected)
            log.error("gate.refused", reason="; ".join(reasons), latest=checkpoint.latest_version(root),
                      kept_at=str(rejected), hint="LATEST unchanged; --force publishes anyway")
            return EXIT_REFUSED
        if reasons:
            log.warning("gate.forced", reasons=reasons)
        final_dir = checkpoint.publish(root, staged, version)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already unless something failed
    log.info("checkpoint.published", version=version, path=str(final_dir),
             test_accuracy=round(final.test["accuracy"], 4), test_macro_f1=round(final.test["macro_f1"], 4),
             total_s=round(total_seconds, 1))
    if settings.redis_url:
        try:
            checkpoint.announce(settings.redis_url, version)
            log.info("checkpoint.announced", version=version)
        except Exception as exc:  # noqa: BLE001 - best effort: workers also poll LATEST
            log.warning("checkpoint.announce_failed", version=version, error=str(exc))
    return EXIT_OK


def write_checkpoint(folder: Path, settings: TrainSettings, accelerator: Accelerator, model, tokenizer,
                     data: Data, fit: Fit, final: Final, version: str, total_seconds: float) -> None:
    splits, progress = data.splits, fit.progress
    plain = accelerator.unwrap_model(model)
    plain.config.id2label = dict(enumerate(splits.labels))
    plain.config.label2id = {label: i for i, label in enumerate(splits.labels)}
    plain.save_pretrained(folder)  # model.safetensors + config.json
    tokenizer.save_pretrained(folder)
    _write_json(folder / "metrics.json", {
        "version": version, "model": settings.model, "data": splits.name, "labels": splits.labels,
        "data_fingerprint": splits.fingerprint, "test_fingerprint": splits.test_fingerprint,
        "validation": final.validation, "test": final.test, "baseline": final.baseline,
        "hybrid": final.hybrid,
        "best_step": progress.best_step, "steps": progress.step, "early_stopped": progress.early_stopped,
        "epochs": round(progress.step / data.steps_per_epoch, 3), "max_length": data.hyper.max_length,
        "mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes,
        "train_time_s": round(progress.fit_seconds, 2), "total_time_s": round(total_seconds, 2),
        "train_examples_per_s": progress.examples_per_s(accelerator.num_processes),
        "eval_examples_per_s": round((len(splits.validation) + len(splits.test)) / max(final.eval_seconds, 1e-9), 1),
        "history": progress.history,
    })
    _write_json(folder / "training_args.json", {
        "settings": public_view(settings), "hyperparameters": dataclasses.asdict(data.hyper),
        "mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes,
        "versions": _versions(), "argv": sys.argv[1:]})
    _write_json(folder / "data_fingerprint.json", splits.describe())
    if final.ngram is not None:
        final.ngram.save(folder)  # ngram.json + ngram.safetensors: the worker adds it to every prediction
    transformer = final.transformer_test_predictions or final.test_predictions
    with open(folder / "test_predictions.jsonl", "w", encoding="utf-8") as f:
        for example, pred, alone in zip(splits.test, final.test_predictions, transformer):
            f.write(json.dumps({"text": example.text, "label": example.label, "predicted": splits.labels[pred],
                                "transformer": splits.labels[alone]}, ensure_ascii=False) + "\n")
    plots.training_curve(progress.history, progress.losses, folder / "training_curve.png")
    plots.confusion(final.test["confusion_matrix"], splits.labels, folder / "confusion_matrix.png",
                    title=f"{splits.name} test: accuracy {final.test['accuracy']:.3f}, "
                          f"macro-F1 {final.test['macro_f1']:.3f}")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": sys.version.split()[0]}


if __name__ == "__main__":
    sys.exit(main())
