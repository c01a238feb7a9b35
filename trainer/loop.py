"""The fine-tuner's loop: accumulate gradients, evaluate and snapshot every ``eval_steps``, stop early or on a
signal at an optimizer step that every process agrees on.

Resumable: a snapshot (``trainer.runstate``) holds the weights, optimizer, scheduler, RNGs, this loop's
:class:`Progress`, the best weights so far and the weight average. A resumed run continues in the middle of
its epoch with the same batches, so its model equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from trainer import metrics, runstate
from trainer.batches import Data
from trainer.evaluate import predict
from trainer.losses import (adversarial_backward, adversarial_rdrop_backward, classification_loss,
                            distillation_loss, rdrop_loss)
from trainer.prepare import Prepared
from trainer.settings import EARLY_STOPPING_AFTER, Hyperparameters

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, no graceful stop
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        best = cpu_copy(accelerator.unwrap_model(p.evaluated).state_dict())
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


def save_state(accelerator: Accelerator, run: Path, progress: Progress, best: dict | None,
               ema: AveragedModel | None) -> None:
    extra = {}
    if best is not None:
        extra["best.safetensors"] = best
    if ema is not None:
        extra["ema.safetensors"] = cpu_copy(ema.state_dict())
    runstate.save(accelerator, run, progress, extra)


def load_state(accelerator: Accelerator, run: Path, ema: AveragedModel | None) -> tuple[Progress, dict | None]:
    state = run / runstate.STATE
    accelerator.load_state(str(state))
    progress = Progress(**runstate.load_progress(run))
    best = load_file(state / "best.safetensors") if (state / "best.safetensors").exists() else None
    if ema is not None:  # the fingerprint includes the decay: a state saved with --ema has the file
        ema.load_state_dict(load_file(state / "ema.safetensors", device=str(accelerator.device)))
    return progress, best


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
