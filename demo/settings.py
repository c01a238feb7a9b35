"""The demo's settings: flags and environment variables, parsed by the shared settings helper."""

from __future__ import annotations

import dataclasses

from bert_stream.settings import require, setting
from trainer.data import BUILTINS


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    messages: int = setting(
        300, env="BERT_STREAM_DEMO_MESSAGES",
        help="News titles from the held-out test split to stream through the worker: more gives steadier "
             "accuracy and throughput figures, takes longer.")
    duplicates: int = setting(
        10, env="BERT_STREAM_DEMO_DUPLICATES",
        help="Exact repeats of already classified titles, sent afterwards: they come back from the Redis "
             "cache without running the model.")
    retrain_messages: int = setting(
        30, env="BERT_STREAM_DEMO_RETRAIN_MESSAGES",
        help="Fresh titles sent around the retrain (half while it trains, half after it publishes), to show "
             "the worker switching to the new model version without a restart.")
    retrain_examples: int = setting(
        400, env="BERT_STREAM_DEMO_RETRAIN_EXAMPLES",
        help="Training examples of the short retrain (continuing from the current model): fewer is faster. "
             "It is published with --force, past the quality gate.")
    skip_retrain: bool = setting(False, env="BERT_STREAM_DEMO_SKIP_RETRAIN",
                                 help="Leave out the retrain and hot reload (saves about a minute).")
    keep_retrained: bool = setting(
        False, env="BERT_STREAM_DEMO_KEEP_RETRAINED",
        help="Keep the short retrain's version as LATEST. By default the demo points LATEST back at the "
             "model it started with and deletes the one it made, so repeated demos neither fill the disk "
             "nor drift away from the fully trained model.")
    model_dir: str = setting(
        "checkpoints", env="BERT_STREAM_MODEL_DIR",
        help="Checkpoint store: its LATEST model is used, or one is trained into it first.")
    data: str = setting(
        "thucnews-titles", env="BERT_STREAM_DATA", choices=BUILTINS,
        help="Built-in data set the titles (and a first model, when none is published) come from.")
    quiet_table: bool = setting(False, env="BERT_STREAM_DEMO_QUIET_TABLE",
                                help="Print only the summaries, not one row per result.")
    work_dir: str = setting(
        ".local/demo", env="BERT_STREAM_DEMO_DIR",
        help="Where the demo writes its logs and message files; the local stack's state goes beside it "
             "(<work-dir>-stack).")
    timeout_s: float = setting(
        180.0, env="BERT_STREAM_DEMO_TIMEOUT_S",
        help="Longest wait for the worker to be ready or for one phase's results before the demo gives up "
             "(exit 1, with the worker log's tail).")
    seed: int = setting(
        0, env="BERT_STREAM_DEMO_SEED",
        help="Which test titles are picked (the split itself is the model's, from its training_args.json).")

    def __post_init__(self) -> None:
        require(1 <= self.messages <= 100_000, "messages must be in [1, 100000]")
        require(0 <= self.duplicates <= self.messages, "duplicates must be in [0, messages]")
        require(self.retrain_messages >= 1, "retrain_messages must be at least 1")
        require(self.retrain_examples >= 20, "retrain_examples must be at least 20")
        require(self.timeout_s > 0, "timeout_s must be positive")
