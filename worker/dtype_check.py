"""``python -m worker.dtype_check``: do bf16 labels agree with fp32 labels on a test set? And how much faster?

The worker serves in bf16 where the hardware computes it natively and faster (``--dtype auto``; see
:mod:`bert_stream.precision`); this is the check that doing so does not change answers: the same
checkpoint is loaded in fp32 and in bf16, both classify the same texts, and the label agreement is printed
with each dtype's throughput and the dtype ``auto`` picks here. Texts come from ``--texts``
(plain lines or JSONL with a ``text`` field), else from the version's ``test_predictions.jsonl`` (the
trainer's held-out test split). Exit status 1 when agreement is below ``--min-agreement``.

    python -m worker.dtype_check --model-dir checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from bert_stream import checkpoint
from bert_stream.logs import configure_logging
from bert_stream.settings import parse_settings, require, setting


@dataclasses.dataclass(frozen=True)
class DtypeCheckSettings:
    model_dir: str = setting("checkpoints", env="BERT_STREAM_MODEL_DIR", help="Checkpoint store or model folder.")
    texts: str | None = setting(None, help="Text or JSONL file; default: the version's test_predictions.jsonl.")
    limit: int = setting(2000, help="Classify at most this many texts (more: a tighter estimate, slower).")
    max_length: int = setting(128, env="BERT_STREAM_MAX_LENGTH", help="Tokens per text, as the worker uses.")
    batch_size: int = setting(64, help="Texts per forward pass.")
    min_agreement: float = setting(0.995, help="Exit 1 below this fraction of identical labels.")

    def __post_init__(self) -> None:
        require(self.limit >= 1 and self.batch_size >= 1, "--limit and --batch-size must be at least 1")


def read_texts(path: Path, limit: int) -> list[str]:
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        texts.append(json.loads(line)["text"] if line.startswith("{") else line)
        if len(texts) >= limit:
            break
    return texts


def classify_all(model, texts: list[str], batch_size: int) -> tuple[list[int], float]:
    start = time.perf_counter()
    labels = []
    for i in range(0, len(texts), batch_size):
        labels += [p.label_id for p in model.predict(texts[i:i + batch_size])]
    return labels, len(texts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(DtypeCheckSettings, argv, prog="python -m worker.dtype_check",
                       description=__doc__.split("\n")[0])
    configure_logging("WARNING")
    from worker.engine import Engine, choose_device, choose_dtype

    version, folder = checkpoint.resolve(s.model_dir)
    source = Path(s.texts) if s.texts else folder / "test_predictions.jsonl"
    if not source.is_file():
        print(f"python -m worker.dtype_check: error: no texts: {source} does not exist (give --texts)", file=sys.stderr)
        return 2
    texts = read_texts(source, s.limit)
    results = {}
    for dtype in ("fp32", "bf16"):
        model = Engine(s.model_dir, dtype=dtype, max_length=s.max_length).start().acquire()
        results[dtype] = classify_all(model, texts, s.batch_size)
    same = sum(a == b for a, b in zip(results["fp32"][0], results["bf16"][0]))
    agreement = same / len(texts)
    print(json.dumps({"model_version": version, "texts": len(texts), "source": str(source),
                      "agreement": round(agreement, 5), "disagreements": len(texts) - same,
                      "fp32_msgs_per_s": round(results["fp32"][1], 1),
                      "bf16_msgs_per_s": round(results["bf16"][1], 1),
                      "auto_dtype": str(choose_dtype("auto", choose_device("auto"))).removeprefix("torch.")},
                     ensure_ascii=False))
    return 0 if agreement >= s.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
