"""The model engine: load a published checkpoint, choose dtype and device, tokenize, classify, hot-swap.

- Loading follows the checkpoint store's ``LATEST`` (:func:`bert_stream.checkpoint.resolve`) and checks the
  folder with :func:`bert_stream.checkpoint.validate` first, so a truncated or incomplete copy is refused.
- dtype ``auto``: bf16 on CUDA, and on CPUs with bf16 instructions where bf16 measured faster than fp32
  (:mod:`bert_stream.precision` times both once per process); fp32 elsewhere.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow (seconds, GBs) if present
os.environ.setdefault("USE_FLAX", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from bert_stream import checkpoint, precision, reference  # noqa: E402
from bert_stream.logs import get_logger  # noqa: E402
from bert_stream.ngram import NgramModel  # noqa: E402
from worker import packed  # noqa: E402
from worker.messages import Prediction  # noqa: E402

log = get_logger("worker.engine")

# Padded tokens per forward pass inside a batch. Sorting by length and cutting here bounds padding waste;
# past ~2k tokens a CPU forward pass gains nothing per token from being larger.
CHUNK_TOKENS = 2048
# On a GPU every forward pass costs its kernel launches and the Python around them whatever its size, so a
# batch is one pass (up to this many padded tokens): cut at the CPU's chunk, the device would sit idle.
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


def length_buckets(max_length: int) -> tuple[int, ...]:
    """The padded lengths a CUDA pass may take: powers of two from 16, and max_length. A bucket wastes at most
    half its tokens on padding (a quarter on average), and a handful of shapes is what kernel selection,
    the warm-up and CUDA graphs can cover."""
    out, n = [], 16
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


class Pass(NamedTuple):
    """One forward pass: the batch positions of its rows, and their ids (padded: [rows, width] int64 with
    ``mask`` True on real tokens; packed: one list per row, ``mask`` None)."""

    rows: np.ndarray
    ids: np.ndarray | list[list[int]]
    mask: np.ndarray | None


class Pending:
    """A launched batch. :meth:`result` waits for the device once and builds every prediction from one
    [rows, labels] array: softmax, top-k and the hybrid's sum in numpy, then one Prediction per text."""

    __slots__ = ("model", "order", "truncated", "ngram", "wait", "tokens", "unknown")

    def __init__(self, model: LoadedModel, order: np.ndarray, truncated: np.ndarray, ngram: np.ndarray | None,
                 wait: Callable[[], np.ndarray], tokens: int = 0, unknown: int = 0):
        self.model, self.order, self.truncated, self.ngram, self.wait = model, order, truncated, ngram, wait
        self.tokens, self.unknown = tokens, unknown  # what the model read, and how much of it was [UNK]

    def logits(self) -> np.ndarray:
        """[texts, labels] float32 in input order: the transformer's, or a hybrid's sum."""
        z = np.empty((len(self.order), len(self.model.labels)), dtype=np.float32)
        z[self.order] = self.wait()
        half = self.model.ngram
        return z if half is None else half.add(z, self.ngram)

    def result(self) -> list[Prediction]:
        z = self.logits()
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(self.model.top_k, probs.shape[1])
        top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(probs, top_i, axis=1).astype(np.float64)
        return Prediction.batch(self.model.labels, top_i.tolist(), top_p.tolist(), self.truncated.tolist())


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
        self.unk_id = self.tokenizer.unk_token_id
        # what the trainer saw (label prior, validation confidence): the quality metrics compare against it
        self.reference = reference.load(folder, self.labels)
        self.backend, why_not_packed = choose_backend(backend, self.model, device)
        if backend == "packed" and why_not_packed:
            log.warning("packed_backend_unavailable", model_version=version, reason=why_not_packed)
        self.packed = packed.PackedBert(self.model) if self.backend == "packed" else None
        self.chunk_tokens = CHUNK_TOKENS if device.type == "cpu" else CUDA_CHUNK_TOKENS
        # CUDA: each pass is padded to one of a few lengths, so the device sees a handful of shapes
        self.buckets = length_buckets(max_length) if device.type == "cuda" and self.packed is None else None
        # The Rust tokenizer itself, truncating: a batch is encoded in one call that releases the GIL, and
        # nothing is built per message but its list of ids.
        self._rust = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self._rust.no_padding()
        self._rust.enable_truncation(max_length)
        # A hybrid checkpoint (trainer --hybrid) carries a char n-gram model whose scores join every prediction.
        self.ngram = NgramModel.load(folder)
        if self.ngram is not None and self.ngram.labels != len(self.labels):
            raise checkpoint.CheckpointError(f"{folder}: the n-gram model has {self.ngram.labels} labels, the "
                                             f"transformer {len(self.labels)}")

    def token_budget(self, texts: Sequence[str]) -> list[int]:
        """What the batcher budgets for each text, without tokenizing it: its characters plus two special
        tokens, capped at max_length. An upper bound for a character-level vocabulary (bert-base-chinese:
        one token per CJK character at most) and above e5's sentencepiece count for Chinese (titles: 19
        characters, fewer tokens). Tokenizing here would cost the main thread a tokenizer call per message,
        and the cached ones never reach the model; ``predict`` tokenizes the misses, once."""
        cap = self.max_length
        return [min(cap, len(t) + 2) for t in texts]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text will occupy (truncated to max_length): what a forward pass costs."""
        return [len(e.ids) for e in self._rust.encode_batch_fast(list(texts))]

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Classify ``texts`` (in order): :meth:`launch`, then wait for the result."""
        return self.launch(texts).result()

    def launch(self, texts: Sequence[str]) -> Pending:
        """Tokenize ``texts`` and start their forward passes; :meth:`Pending.result` waits for them. On CUDA
        this returns while the device computes, so the caller can prepare the next batch meanwhile; the
        n-gram half of a hybrid is scored here, on the CPU, in that time."""
        if not texts:
            return Pending(self, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), None,
                           lambda: np.zeros((0, len(self.labels)), dtype=np.float32))
        ids, lengths, truncated = self.encode(texts)
        passes = self.passes(ids, lengths)
        ngram = self.ngram.scores(texts) if self.ngram is not None else None
        unknown = sum(row.count(self.unk_id) for row in ids) if self.unk_id is not None else 0
        return Pending(self, np.concatenate([p.rows for p in passes]), truncated, ngram, self.device_forward(passes),
                       int(lengths.sum()), unknown)

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        """Token ids per text (truncated to max_length), their lengths, and which were cut."""
        encs = self._rust.encode_batch_fast(list(texts))
        ids = [e.ids for e in encs]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        truncated = lengths >= self.max_length
        for i in np.flatnonzero(truncated):  # exactly max_length tokens is not necessarily a cut
            truncated[i] = bool(encs[i].overflowing)
        return ids, lengths, truncated

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), labels] float32 logits in input order (what a distilled student learns from); a
        hybrid's are the sum the served model takes its probabilities from."""
        return torch.from_numpy(self.launch(texts).logits())

    def passes(self, ids: list[list[int]], lengths: np.ndarray) -> list[Pass]:
        """The forward passes for token rows, shortest first: packed (real tokens within PACKED_TOKENS),
        or padded to a length bucket (CUDA) or to the pass's own longest row, rows x length within
        ``chunk_tokens``."""
        order = np.argsort(lengths, kind="stable")
        sorted_lengths = lengths[order].tolist()
        bounds, start, n = [], 0, len(order)
        while start < n:
            end = start + 1
            if self.packed is not None:
                tokens = sorted_lengths[start]
                while end < n and tokens + sorted_lengths[end] <= PACKED_TOKENS:
                    tokens += sorted_lengths[end]
                    end += 1
            else:
                width = self._width(sorted_lengths[start])
                while end < n:
                    next_width = self._width(sorted_lengths[end])
                    if (self.buckets and next_width != width) or (end - start + 1) * next_width > self.chunk_tokens:
                        break
                    end += 1
            bounds.append((start, end))
            start = end
        out = []
        for start, end in bounds:
            rows = order[start:end]
            if self.packed is not None:
                out.append(Pass(rows, [ids[i] for i in rows], None))
                continue
            width = self._width(sorted_lengths[end - 1])
            mask = np.arange(width) < lengths[rows][:, None]  # rows are padded on the right
            padded = np.full(mask.shape, self.pad_id, dtype=np.int64)
            padded[mask] = np.fromiter(itertools.chain.from_iterable(ids[i] for i in rows), dtype=np.int64,
                                       count=int(mask.sum()))
            out.append(Pass(rows, padded, mask))
        return out

    def _width(self, length: int) -> int:
        """A padded pass's length for a row of ``length`` tokens: its bucket on CUDA, else itself."""
        if self.buckets is None:
            return length
        return next(b for b in self.buckets if b >= length)

    def device_forward(self, passes: list[Pass]) -> Callable[[], np.ndarray]:
        """Start ``passes`` on the device; returns a function that waits for them and gives their logits,
        [rows, labels] float32 in pass order. On CUDA the inputs go up from pinned memory without blocking,
        and the logits of all passes come back in one copy (one synchronisation per batch); elsewhere the
        work is done before this returns. (bench/standin.py replaces this method to model a GPU.)"""
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            outs = [self._pass_logits(p, cuda) for p in passes]
            logits = (outs[0] if len(outs) == 1 else torch.cat(outs)).float()
            if not cuda:
                result = logits.numpy()
                return lambda: result
            host = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(logits, non_blocking=True)
            done = torch.cuda.Event()
            done.record()

        def wait() -> np.ndarray:
            done.synchronize()
            return host.numpy()
        return wait

    def _pass_logits(self, p: Pass, cuda: bool) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.logits(p.ids)
        ids, mask = torch.from_numpy(p.ids), torch.from_numpy(p.mask)
        if cuda:
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return self.model(input_ids=ids.to(self.device, non_blocking=cuda),
                          attention_mask=mask.to(self.device, torch.long, non_blocking=cuda)).logits

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
                for length in self.buckets or sorted({min(n, self.max_length) for n in (16, 32, 64, 128)}):
                    if rows * length <= self.chunk_tokens:
                        ids = [[token] * length] * rows
                        self.device_forward(self.passes(ids, np.full(rows, length)))()
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
