"""The model engine: load a published checkpoint, choose dtype and device, tokenize, classify, hot-swap.

- Loading follows the checkpoint store's ``LATEST`` (:func:`trainer.checkpoint.resolve`) and checks the
  folder with :func:`trainer.checkpoint.validate` first, so a truncated or incomplete copy is refused.
- dtype ``auto``: bf16 on CUDA, and on CPUs with bf16 instructions where bf16 measured faster than fp32
  (:mod:`bert_stream.precision`: 2-4x on AMD Zen 4, slower than fp32 on an Intel VM hiding AMX); fp32
  elsewhere.
- Attention is PyTorch SDPA; every forward pass runs under ``torch.inference_mode``.
- A batch is tokenized with truncation to ``max_length`` (the output says ``truncated``) and sorted by
  length. Backend ``packed`` (:mod:`worker.packed`, ``auto``'s choice on the CPU) runs it padding-free;
  ``padded`` cuts it into chunks padded only to their own longest item, so one long message does not pad
  the rest (``auto``'s choice on CUDA, and for models packed does not support).
- Hot reload: :class:`ModelWatcher` notices a new ``LATEST`` (polling, or woken by the trainer's Redis
  announcement), loads and warms the new version in its own thread and offers it; :meth:`Engine.acquire`
  swaps it in between batches. A version that fails to load or validate is refused, logged, and the
  serving model is kept.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow (seconds, GBs) if present
os.environ.setdefault("USE_FLAX", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bert_stream import precision  # noqa: E402
from bert_stream.ngram import NgramModel  # noqa: E402
from bert_stream.logs import get_logger  # noqa: E402
from trainer import checkpoint  # noqa: E402
from worker import packed  # noqa: E402
from worker.messages import Prediction  # noqa: E402

log = get_logger("worker.engine")

# Padded tokens per forward pass inside a batch. Sorting by length and cutting here bounds padding waste;
# past ~2k tokens a CPU forward pass gains nothing per token from being larger.
CHUNK_TOKENS = 2048
# On a GPU every forward pass costs ~150 kernel launches and the Python around them whatever its size, so a
# batch is one pass (up to this many padded tokens): cut at the CPU's 2048, an H200 ran 1-4k msgs/s at 2% busy.
CUDA_CHUNK_TOKENS = 131072
# Real tokens per packed forward pass (worker.packed): bounds its activations; a batch of the worker's
# defaults (max_batch_tokens 8192) is one pass.
PACKED_TOKENS = 8192
WARMUP_TEXTS = ("预热", "今天天气很好，适合出去走走。", "北京时间昨晚，国家队在世界杯预选赛中以二比零战胜对手。" * 8)


def choose_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting} requested but CUDA is not available")
    return device


def choose_backend(setting: str, model: torch.nn.Module, device: torch.device) -> tuple[str, str | None]:
    """("packed" or "padded", why packed is not used). auto: packed on the CPU where the model supports it.
    On CUDA the padded path stays the default: packed has not been measured on a GPU yet."""
    if setting == "padded":
        return "padded", None
    if setting == "auto" and device.type != "cpu":
        return "padded", f"auto keeps the padded path on {device.type}"
    why = packed.unsupported(model)
    return ("padded", why) if why else ("packed", None)


def choose_dtype(setting: str, device: torch.device, cpuinfo: str | None = None) -> torch.dtype:
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp32":
        return torch.float32
    if setting != "auto":
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {setting!r}")
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if precision.cpu_prefers_bf16(cpuinfo) else torch.float32


class LoadedModel:
    """One model version, ready to classify."""

    def __init__(self, version: str, folder: Path, device: torch.device, dtype: torch.dtype, max_length: int,
                 top_k: int, backend: str = "auto"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress bars on stderr would break the JSON log lines

        config = checkpoint.validate(folder)  # refuses incomplete/corrupt folders before touching weights
        self.version, self.folder, self.device, self.dtype = version, folder, device, dtype
        self.max_length, self.top_k = max_length, top_k
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if not self.tokenizer.is_fast:
            raise checkpoint.CheckpointError(f"{folder}: a fast tokenizer (tokenizer.json) is required")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        id2label = self.model.config.id2label or config["id2label"]
        self.labels = [str(id2label[i]) for i in range(len(id2label))]
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.backend, why_not_packed = choose_backend(backend, self.model, device)
        if backend == "packed" and why_not_packed:
            log.warning("packed_backend_unavailable", model_version=version, reason=why_not_packed)
        self.packed = packed.PackedBert(self.model) if self.backend == "packed" else None
        self.chunk_tokens = CHUNK_TOKENS if device.type == "cpu" else CUDA_CHUNK_TOKENS
        # A hybrid checkpoint (trainer --hybrid) carries a char n-gram model whose scores join every prediction.
        self.ngram = NgramModel.load(folder)
        if self.ngram is not None and self.ngram.labels != len(self.labels):
            raise checkpoint.CheckpointError(f"{folder}: the n-gram model has {self.ngram.labels} labels, the "
                                             f"transformer {len(self.labels)}")

    def token_budget(self, texts: Sequence[str]) -> list[int]:
        """What the batcher budgets for each text, without tokenizing it: its characters plus two special
        tokens, capped at max_length. An upper bound for a character-level vocabulary (bert-base-chinese:
        one token per CJK character at most) and above e5's sentencepiece count for Chinese (titles: 19
        characters, 17.3 tokens on average). Tokenizing here cost ~60 us a message on the main thread, and
        the cached ones never reach the model; ``predict`` tokenizes the misses, once."""
        cap = self.max_length
        return [min(cap, len(t) + 2) for t in texts]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text will occupy (truncated to max_length): what a forward pass costs."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [len(ids) for ids in enc["input_ids"]]

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Classify ``texts`` (in order). Sorted by length, then run packed (padding-free) or in chunks padded
        to their own longest row."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        truncated = [bool(e.overflowing) for e in enc.encodings]
        out: list[Prediction | None] = [None] * len(truncated)
        for chunk, rows in self._chunks(enc["input_ids"]):
            for i, pred in zip(chunk, self._forward(rows, [texts[i] for i in chunk])):
                out[i] = Prediction(pred[0], pred[1], pred[2], pred[3], truncated[i])
        return out  # type: ignore[return-value]

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), labels] float32 logits in input order (what a distilled student learns from)."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        out = torch.empty((len(ids), len(self.labels)), dtype=torch.float32)
        with torch.inference_mode():
            for chunk, rows in self._chunks(ids):
                out[chunk] = self._logits(rows, [texts[i] for i in chunk]).float().cpu()
        return out

    def _chunks(self, ids: list[list[int]]):
        """(row indices, their token ids) per forward pass, shortest first; a chunk's cost (packed: real
        tokens, padded: rows x longest) stays within budget."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start = 0
        while start < len(order):
            end = start + 1
            if self.packed is not None:
                tokens = len(ids[order[start]])
                while end < len(order) and tokens + len(ids[order[end]]) <= PACKED_TOKENS:
                    tokens += len(ids[order[end]])
                    end += 1
            else:
                while end < len(order) and (end - start + 1) * len(ids[order[end]]) <= self.chunk_tokens:
                    end += 1
            chunk = order[start:end]
            yield chunk, [ids[i] for i in chunk]
            start = end

    def _logits(self, rows: list[list[int]], texts: Sequence[str] | None = None) -> torch.Tensor:
        """The checkpoint's logits for token rows: the transformer's, plus the n-gram half of a hybrid (which
        reads ``texts``, the rows' texts; None only in warm-up)."""
        logits = self._transformer_logits(rows)
        if self.ngram is not None and texts is not None:
            logits = self.ngram.combine(logits, texts)
        return logits

    def _transformer_logits(self, rows: list[list[int]]) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.logits(rows)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        attention = np.arange(lengths.max()) < lengths[:, None]  # rows are padded on the right
        input_ids = np.full(attention.shape, self.pad_id, dtype=np.int64)
        input_ids[attention] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=lengths.sum())
        return self.model(input_ids=torch.from_numpy(input_ids).to(self.device),
                          attention_mask=torch.from_numpy(attention).to(self.device, torch.long)).logits

    def _forward(self, rows: list[list[int]], texts: Sequence[str] | None = None) -> list[tuple[str, int, float, tuple]]:
        with torch.inference_mode():
            probs = torch.softmax(self._logits(rows, texts).float(), dim=-1)
            k = min(self.top_k, probs.shape[-1])
            top_p, top_i = probs.topk(k, dim=-1)
        top_p, top_i = top_p.cpu().tolist(), top_i.cpu().tolist()  # one device sync per chunk
        return [(self.labels[ti[0]], ti[0], tp[0], tuple((self.labels[i], p) for i, p in zip(ti, tp)))
                for tp, ti in zip(top_p, top_i)]

    def warm_up(self) -> float:
        """Run a few batches so the first real one does not pay for kernel selection; returns seconds."""
        t0 = time.perf_counter()
        for n in (1, 4, 16):
            self.predict([WARMUP_TEXTS[i % len(WARMUP_TEXTS)] for i in range(n)])
        if self.device.type == "cuda":
            # A GPU loads a kernel the first time a shape needs it: on an H200 the first pass over a stream of
            # mixed shapes ran at 1/7 to 1/2 of the second. So every shape class a batch can take, once, here.
            token = self.tokenizer.unk_token_id or 0
            for rows in (1, 8, 64, 512, 4096):
                for length in sorted({min(n, self.max_length) for n in (16, 32, 64, self.max_length)}):
                    if rows * length <= self.chunk_tokens:
                        self._forward([[token] * length] * rows)
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


class Engine:
    """The serving model, and the one waiting to replace it. ``acquire`` is called by the inference thread
    at the start of each batch, so a swap always falls between batches."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: str = "auto", max_length: int = 128,
                 top_k: int = 3, torch_threads: int = 0, backend: str = "auto", allow_label_change: bool = False):
        self.model_dir = Path(model_dir)
        self.allow_label_change = allow_label_change
        if torch_threads > 0:  # first: the dtype probe times matmuls with the threads the worker will use
            torch.set_num_threads(torch_threads)
        self.device = choose_device(device)
        self.dtype = choose_dtype(dtype, self.device)
        self.max_length, self.top_k, self.backend = max_length, top_k, backend
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._pending: LoadedModel | None = None
        self.refused: dict[str, str] = {}  # version -> why, so a bad version is not retried in a loop

    @classmethod
    def from_settings(cls, settings) -> Engine:
        return cls(settings.model_dir, device=settings.device, dtype=settings.dtype,
                   max_length=settings.max_length, top_k=settings.top_k, torch_threads=settings.torch_threads,
                   backend=settings.backend, allow_label_change=settings.allow_label_change)

    def load(self, version_and_folder: tuple[str, Path] | None = None) -> LoadedModel:
        """Load (and warm up) the newest published version, or the given one."""
        version, folder = version_and_folder or checkpoint.resolve(self.model_dir)
        t0 = time.perf_counter()
        model = LoadedModel(version, folder, self.device, self.dtype, self.max_length, self.top_k,
                            self.backend)
        load_s = time.perf_counter() - t0
        warm_s = model.warm_up()
        log.info("model_loaded", model_version=version, folder=str(folder), device=str(self.device),
                 dtype=str(self.dtype).removeprefix("torch."), backend=model.backend, labels=len(model.labels),
                 hybrid=model.ngram is not None, load_s=round(load_s, 2), warmup_s=round(warm_s, 2))
        return model

    def start(self) -> Engine:
        self._current = self.load()
        return self

    @property
    def current(self) -> LoadedModel:
        if self._current is None:
            raise RuntimeError("engine not started")
        return self._current

    @property
    def version(self) -> str | None:
        return self._current.version if self._current else None

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def acquire(self) -> LoadedModel:
        """The model for the next batch; swaps in a pending version first."""
        with self._lock:
            if self._pending is not None:
                old, self._current, self._pending = self._current, self._pending, None
                log.info("model_swapped", old_version=old.version if old else None, model_version=self.version)
            return self.current

    def offer(self, model: LoadedModel) -> None:
        with self._lock:
            self._pending = model

    def wanted_version(self) -> str | None:
        """The version to serve now when it differs from the current/pending one, else None."""
        if (self.model_dir / "config.json").exists():
            return None  # a single model folder, not a store: nothing to follow
        latest = checkpoint.latest_version(self.model_dir)
        with self._lock:
            known = {v.version for v in (self._current, self._pending) if v is not None}
        if latest is None or latest in known or latest in self.refused:
            return None
        return latest

    def try_update(self) -> bool:
        """Load the version LATEST names if it is new; True when one was offered. Never raises."""
        try:
            version = self.wanted_version()
        except checkpoint.CheckpointError as exc:
            log.warning("model_pointer_unreadable", error=str(exc))
            return False
        if version is None:
            return False
        try:
            model = self.load((version, self.model_dir / version))
            self._check_labels(model)
        except Exception as exc:  # noqa: BLE001 - any failure: refuse this version, keep serving the old one
            self.refused[version] = str(exc)
            log.error("model_refused", model_version=version, kept_version=self.version, error=str(exc)[:500])
            return False
        self.offer(model)
        return True

    def _check_labels(self, model: LoadedModel) -> None:
        """A version whose labels (names or order: label_id is a position) differ from the served one's
        changes what every downstream consumer reads: refused unless ``allow_label_change``, logged both ways."""
        served = self._current.labels if self._current is not None else None
        if served is None or served == model.labels:
            return
        if not self.allow_label_change:
            raise checkpoint.CheckpointError(
                f"its labels {model.labels} differ from the served model's {served} (names or order); set "
                "BERT_STREAM_ALLOW_LABEL_CHANGE=true to serve it")
        log.warning("model_labels_changed", model_version=model.version, old_labels=served, labels=model.labels)


class ModelWatcher:
    """Checks LATEST every ``poll_s`` seconds, or at once when the trainer announces a version on Redis."""

    def __init__(self, engine: Engine, poll_s: float, redis_url: str | None, metrics=None):
        self.engine, self.poll_s, self.redis_url, self.metrics = engine, poll_s, redis_url, metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> ModelWatcher:
        if self.poll_s <= 0:
            return self
        self._threads.append(threading.Thread(target=self._watch, name="model-watcher", daemon=True))
        if self.redis_url:
            self._threads.append(threading.Thread(target=self._listen, name="model-announce", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if not self._stop.is_set():
                refused = len(self.engine.refused)
                self.engine.try_update()
                if self.metrics and len(self.engine.refused) > refused:
                    self.metrics.model_swaps.labels("refused").inc()

    def _listen(self) -> None:
        """Subscribe to the announcement channel; on any Redis trouble, retry with backoff (LATEST polling
        goes on regardless, so an outage only delays a reload by ``poll_s``)."""
        import redis

        channel = checkpoint.ANNOUNCE_PREFIX + "announce"
        backoff = 1.0
        while not self._stop.is_set():
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
                with contextlib.closing(client), client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(channel)
                    backoff = 1.0
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is not None:
                            log.info("model_announced", announced_version=message["data"].decode(errors="replace"))
                            self._wake.set()
            except Exception:  # noqa: BLE001 - Redis down: wait and resubscribe
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
