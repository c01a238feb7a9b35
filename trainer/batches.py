"""The fine-tuner's data stage: the examples tokenised once, dynamic padding, length-grouped batches.

Padding is paid for in full (a padded token costs as much as a real one), so training batches hold texts of
similar length and evaluation batches are sorted by length. The training order depends only on (seed,
epoch), so a resumed run replays the same batches.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from trainer.data import DataSpec, Example, Splits
from trainer.settings import Hyperparameters, TrainSettings, max_train_examples, resolve


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
