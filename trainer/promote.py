"""``python -m trainer.promote --model-dir STORE``: serve the CANDIDATE version when it beats the serving one.

A candidate (``trainer.run --feedback-topic T --stage candidate``) carries the labels it held out of its own
training (``feedback_holdout.jsonl``: the recent stream, labelled by reviewers). Promotion asks, in order:

1. on those held-out labels, does the candidate's accuracy beat the serving version's by ``--min-gain``?
   (the serving version is scored now, on the same examples, as a worker serves it, unless the candidate
   recorded the score of this very version when it was trained);
2. where both were tested on the same base test split, did the candidate lose at most ``--max-base-drop``
   of its accuracy there (what the stream taught must not cost what the base data taught)?
3. with ``--min-agreement``: over the workers' shadow samples (``--metrics-url``, each worker's /metrics),
   does the candidate agree with the serving model on at least that share, over at least
   ``--min-samples`` samples? A candidate that disagrees a lot is one a person should look at first.

Yes to all: ``PREVIOUS`` := the serving version, ``LATEST`` := the candidate, ``CANDIDATE`` removed; the
workers swap as they do for any new LATEST (polling, or the Redis announcement with ``--redis-url``).
Otherwise one line says why, and the exit status is 3. ``--rollback`` points LATEST back at PREVIOUS.

Exit status: 0 promoted (or rolled back); 2 bad flags or store; 3 refused.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.request
from pathlib import Path

from bert_stream import checkpoint
from bert_stream.logs import configure_logging, get_logger
from bert_stream.settings import SettingsError, parse_settings, require, setting

PROG = "python -m trainer.promote"
EXIT_OK, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 2, 3

log = get_logger("trainer.promote")


@dataclasses.dataclass(frozen=True)
class PromoteSettings:
    model_dir: str = setting("checkpoints", env="BERT_STREAM_MODEL_DIR", help="The checkpoint store.")
    min_gain: float = setting(0.01, env="BERT_STREAM_PROMOTE_MIN_GAIN",
                              help="Accuracy on the held-out feedback the candidate must gain over the serving "
                                   "version (0.01: one point).")
    max_base_drop: float = setting(0.02, env="BERT_STREAM_PROMOTE_MAX_BASE_DROP",
                                   help="Accuracy on the base test split the candidate may lose, when both were "
                                        "tested on the same split.")
    min_agreement: float | None = setting(None, env="BERT_STREAM_PROMOTE_MIN_AGREEMENT",
                                          help="Live agreement with the serving model the candidate must keep in "
                                               "shadow (0-1); needs --metrics-url. Unset: not checked.")
    metrics_url: str = setting("", env="BERT_STREAM_PROMOTE_METRICS_URL",
                               help="Comma-separated /metrics URLs of workers running the candidate in shadow.")
    min_samples: int = setting(100, help="Shadow samples the agreement must rest on at least.")
    rollback: bool = setting(False, help="Point LATEST back at PREVIOUS (the version the last promotion replaced).")
    redis_url: str | None = setting(None, env="REDIS_URL",
                                    help="Announce the new LATEST on this Redis so workers swap at once.")
    log_level: str = setting("WARNING", env="LOG_LEVEL", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                             parse=str.upper, help="Log level.")

    def __post_init__(self) -> None:
        require(0 <= self.min_gain <= 1 and 0 <= self.max_base_drop <= 1, "--min-gain and --max-base-drop: 0-1")
        require(self.min_agreement is None or 0 <= self.min_agreement <= 1, "--min-agreement must be 0-1")
        require(self.min_agreement is None or bool(self.metrics_url), "--min-agreement needs --metrics-url")
        require(self.min_samples >= 1, "--min-samples must be at least 1")


class Refused(Exception):
    """Promotion refused; the message is the one line the operator reads."""


def shadow_agreement(urls: list[str], candidate: str) -> tuple[int, int]:
    """(agreeing, total) shadow samples of ``candidate`` over the workers' /metrics pages."""
    from prometheus_client.parser import text_string_to_metric_families

    agree = total = 0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        except OSError as exc:
            raise Refused(f"cannot read the shadow metrics at {url}: {exc}") from None
        for family in text_string_to_metric_families(text):
            if family.name != "bert_stream_shadow_predictions":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("candidate") == candidate:
                    total += int(sample.value)
                    agree += int(sample.value) if sample.labels.get("result") == "agree" else 0
    return agree, total


def _metrics(folder: Path) -> dict:
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Refused(f"{folder}: no readable metrics.json ({exc})") from None


def decide(settings: PromoteSettings) -> str:
    """Promote the candidate (the line to print), or raise Refused."""
    from trainer import feedback

    root = Path(settings.model_dir)
    candidate = checkpoint.read_pointer(root, checkpoint.CANDIDATE)
    serving = checkpoint.latest_version(root)
    if candidate is None:
        raise Refused(f"no CANDIDATE in {root}: publish one with trainer.run --stage candidate")
    if serving is None or serving == candidate:
        checkpoint.set_latest(root, candidate)
        checkpoint.clear_pointer(root, checkpoint.CANDIDATE)
        return f"promoted {candidate}: nothing was serving"
    new, old = _metrics(root / candidate), _metrics(root / serving)
    holdout = feedback.read_holdout(root / candidate)
    if not holdout:
        raise Refused(f"the candidate {candidate} has no held-out feedback to be judged on "
                      "(train it with --feedback-topic)")
    scores = new.get("feedback", {}).get("holdout", {})
    mine = scores.get("candidate") or feedback.score_served(root / candidate, candidate, holdout)
    theirs = scores.get("serving")
    if not theirs or theirs.get("version") != serving:
        theirs = feedback.score_served(root / serving, serving, holdout)
    gain = mine["accuracy"] - theirs["accuracy"]
    judged = (f"held-out feedback accuracy {mine['accuracy']:.4f} against the serving {serving}'s "
              f"{theirs['accuracy']:.4f} on {len(holdout)} labels")
    if gain < settings.min_gain:
        raise Refused(f"{judged}: a gain of {gain:+.4f} < --min-gain {settings.min_gain:.4f}")
    if new.get("test_fingerprint") == old.get("test_fingerprint"):
        drop = old["test"]["accuracy"] - new["test"]["accuracy"]
        if drop > settings.max_base_drop:
            raise Refused(f"base test accuracy {new['test']['accuracy']:.4f} is {drop:.4f} below the serving "
                          f"version's {old['test']['accuracy']:.4f} (> --max-base-drop {settings.max_base_drop})")
    agreement = ""
    if settings.min_agreement is not None:
        urls = [u.strip() for u in settings.metrics_url.split(",") if u.strip()]
        agree, total = shadow_agreement(urls, candidate)
        if total < settings.min_samples:
            raise Refused(f"only {total} shadow samples of {candidate} (< --min-samples {settings.min_samples}): "
                          "let the workers shadow it longer, or raise BERT_STREAM_SHADOW_SAMPLE_RATE")
        if agree / total < settings.min_agreement:
            raise Refused(f"live agreement {agree / total:.4f} over {total} shadow samples < --min-agreement "
                          f"{settings.min_agreement}")
        agreement = f", live agreement {agree / total:.4f} over {total} samples"
    checkpoint.set_pointer(root, checkpoint.PREVIOUS, serving)
    checkpoint.set_latest(root, candidate)
    checkpoint.clear_pointer(root, checkpoint.CANDIDATE)
    return f"promoted {candidate} over {serving}: {judged} ({gain:+.4f}){agreement}"


def rollback(settings: PromoteSettings) -> str:
    root = Path(settings.model_dir)
    previous, serving = checkpoint.read_pointer(root, checkpoint.PREVIOUS), checkpoint.latest_version(root)
    if previous is None:
        raise Refused(f"no PREVIOUS in {root}: nothing was promoted here to roll back")
    checkpoint.set_latest(root, previous)
    checkpoint.clear_pointer(root, checkpoint.PREVIOUS)
    return f"rolled back to {previous} (was {serving})"


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(PromoteSettings, argv, prog=PROG, description=__doc__.split("\n\n")[0])
    configure_logging(settings.log_level)
    try:
        line = rollback(settings) if settings.rollback else decide(settings)
    except Refused as exc:
        print(f"{PROG}: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (checkpoint.CheckpointError, SettingsError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if settings.redis_url:
        version = checkpoint.latest_version(settings.model_dir)
        try:
            checkpoint.announce(settings.redis_url, version)
        except Exception as exc:  # noqa: BLE001 - best effort: workers also poll LATEST
            log.warning("promote.announce_failed", version=version, error=str(exc)[:300])
    print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
