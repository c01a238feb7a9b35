"""``python -m trainer.run``: fine-tune a Chinese BERT classifier with accelerate and publish an evaluated,
versioned checkpoint into the store the workers read.

This module orchestrates; each stage has its own module:

    parse       trainer.settings   flags and variables -> TrainSettings -> resolved Hyperparameters
    data        trainer.data       built-in sets or files -> splits;  trainer.batches: tokenised loaders
    feedback    trainer.feedback   reviewers' labels from Kafka merged in, a share held out (--feedback-topic)
    model       trainer.models     e5-small, scratch, a path or a hub id -> a classifier and its tokenizer
    prepare     trainer.prepare    Accelerator, precision, optimizer, schedule, weight average, teacher
    fit         trainer.loop       accumulate, evaluate and snapshot every ``eval_steps`` (trainer.losses)
    evaluate    trainer.evaluate   the best weights on validation and test, the hybrid rule
    gate        trainer.gate       the floors a model must clear
    publish     trainer.publish    staged, published atomically (bert_stream.checkpoint), announced; or
                                   published as the CANDIDATE (--stage candidate) for trainer.promote

The same code runs on one CPU process or under
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

import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from transformers.utils import logging as hf_logging

from bert_stream import checkpoint
from bert_stream.logs import configure_logging, get_logger
from bert_stream.settings import SettingsError, parse_settings, public_view
from trainer import baseline, feedback
from trainer.batches import build_data, data_spec
from trainer.data import DataError, load_splits
from trainer.evaluate import add_ngram_half, final_evaluation
from trainer.loop import StopSignals, fit_model
from trainer.models import ModelSourceError, keep_layers, load_for_classification
from trainer.prepare import make_accelerator, prepare, teacher_logits
from trainer.publish import save_and_publish
from trainer.runstate import open_run, run_fingerprint
from trainer.settings import TrainSettings

PROG = "python -m trainer.run"
EXIT_OK, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}

log = get_logger("trainer.run")


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
    splits, fed = with_feedback(settings, accelerator, splits)
    with accelerator.main_process_first():
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

    final = final_evaluation(accelerator, prepared, data, fit.best)
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
        published = save_and_publish(settings, accelerator, prepared.model, tokenizer, data, fit, final,
                                     time.monotonic() - started, fed)
        status = EXIT_OK if published else EXIT_REFUSED
        shutil.rmtree(run, ignore_errors=True)  # finished: nothing left to resume
        with contextlib.suppress(OSError):
            run.parent.rmdir()  # .runs/ itself, when no other run is unfinished
    accelerator.wait_for_everyone()
    # No end_training(): it destroys the process group while the DDP model still holds it; the launcher
    # tears the group down when the processes end.
    return broadcast_object_list([status])[0]


def with_feedback(settings: TrainSettings, accelerator: Accelerator, splits):
    """The splits with the labels topic merged in (trainer.feedback), read once by the main process and
    shared: labels arriving meanwhile must not give two processes different data."""
    if not settings.feedback_topic:
        return splits, None
    merged = list(feedback.load(settings, splits)) if accelerator.is_main_process else [None, None]
    if accelerator.num_processes > 1:
        merged = broadcast_object_list(merged)
    return merged[0], merged[1]


def _main_logger(accelerator: Accelerator):
    """Info events from the main process only: N processes logging the same eval is noise."""

    def say(event: str, **fields) -> None:
        if accelerator.is_main_process:
            log.info(event, **fields)

    return say


if __name__ == "__main__":
    sys.exit(main())
