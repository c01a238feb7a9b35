"""The message schema: input decoding/validation, the output record, the dead-letter record.

Everything that reads or writes the worker's topics (the worker, ``worker.publish``, ``worker.tail``, the
tests, the benchmarks) goes through this module, so the wire format is decided once.

Input value (``input_format``):
- ``text``: the whole value is UTF-8 text.
- ``json``: a JSON object ``{"id": ..., "text": ..., ...}``; extra fields are ignored.
- ``auto``: a value whose first non-blank byte is ``{`` is JSON, anything else is text.

Output value (JSON, UTF-8, keyed like the input)::

    {"id": "...", "label": "体育", "label_id": 3, "score": 0.97,
     "top_k": [{"label": "体育", "score": 0.97}, ...], "truncated": false,
     "model_version": "20261128T174501Z-3f9a1c", "cached": false,
     "source": {"topic": "...", "partition": 0, "offset": 42},
     "timing": {"queue_ms": 3.1, "infer_ms": 12.0}}

Dead-letter record: the original value, key and headers, plus headers ``error`` (one of :data:`REASONS`),
``error.detail`` and ``source.topic`` / ``source.partition`` / ``source.offset``.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

INPUT_FORMATS = ("auto", "text", "json")

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"
TOO_LARGE = "too_large"
INVALID_TEXT = "invalid_text"            # decodes, but holds what UTF-8 cannot encode (an escaped lone surrogate)
INVALID_HEADER = "invalid_header"        # a header key that is not UTF-8 (kept, escaped, in the dead letter)
UNREADABLE_RECORD = "unreadable_record"  # the client could not parse the record at all (no value to keep)
INFERENCE_FAILED = "inference_failed"
REASONS = (INVALID_UTF8, INVALID_JSON, MISSING_TEXT, EMPTY_TEXT, TOO_LARGE, INVALID_TEXT, INVALID_HEADER,
           UNREADABLE_RECORD, INFERENCE_FAILED)

# Key and headers of one input, together: an output copies them, so past this the output could exceed the
# producer's request size and fail on every retry. Such an input is too_large (the dead letter is cut to fit).
MAX_KEY_AND_HEADERS_BYTES = 65_536
# The text is cut to this many characters per model token before it is normalised: NFC of long runs of
# combining marks is quadratic, and the model reads at most max_length tokens anyway (the cut is marked
# truncated). Under one character per token is rare (a long run of spaces, which normalising removes).
CHARS_PER_TOKEN = 4

Headers = list[tuple[str, bytes]]

class Source(NamedTuple):
    """Where a message came from; also its identity for offsets and for the default id.

    The per-message records of this module are named tuples: immutable like frozen dataclasses, and built
    in C (a frozen dataclass sets each field through ``object.__setattr__``, per message)."""

    topic: str
    partition: int
    offset: int

    @property
    def default_id(self) -> str:
        return f"{self.topic}-{self.partition}-{self.offset}"


class InputMessage(NamedTuple):
    """A decoded, valid input: the normalised text to classify, plus what the output must carry."""

    id: str
    text: str
    key: bytes | None
    headers: Headers
    source: Source
    value: bytes = b""  # the original bytes, for the DLQ (left out of repr)
    cut: bool = False   # the text was cut before normalising (max_text_chars): the output says truncated

    def __repr__(self) -> str:
        return f"InputMessage(id={self.id!r}, text={self.text!r}, key={self.key!r}, source={self.source!r})"


class Rejected(NamedTuple):
    """An input that cannot be classified; it goes to the DLQ with ``reason``."""

    reason: str
    detail: str
    value: bytes | None
    key: bytes | None
    headers: Headers
    source: Source


class DecodeError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def normalize_text(text: str, max_chars: int | None = None) -> str:
    """What the model sees and the cache hashes: the first ``max_chars`` characters (all if None), NFC,
    whitespace runs collapsed to one space, stripped. Two values that normalise alike get the same label and
    share a cache entry. Cost: linear in the length, but quadratic in the longest run of combining marks
    that NFC has to reorder: decode cuts the text first (``max_chars``; see :data:`CHARS_PER_TOKEN`)."""
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
    if not unicodedata.is_normalized("NFC", text):  # the check is a scan; most texts arrive in NFC
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())  # split() cuts at the runs of what str.isspace() (and re's \s) calls space


def parse_value(value: bytes | None, input_format: str, max_message_bytes: int,
                max_text_chars: int | None = None) -> tuple[str | None, str]:
    """(id or None, normalised text) of a message value; raises DecodeError with a DLQ reason, and nothing
    else, for any value."""
    msg_id, text, _cut = _parse(value, input_format, max_message_bytes, max_text_chars)
    return msg_id, text


def _parse(value: bytes | None, input_format: str, max_message_bytes: int,
           max_text_chars: int | None) -> tuple[str | None, str, bool]:
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}")
    if value is None:
        raise DecodeError(EMPTY_TEXT, "the value is null (a tombstone)")
    if len(value) > max_message_bytes:
        raise DecodeError(TOO_LARGE, f"{len(value)} bytes > max_message_bytes={max_message_bytes}")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(INVALID_UTF8, str(exc)) from None
    is_json = input_format == "json" or (input_format == "auto" and decoded.lstrip().startswith("{"))
    if not is_json:
        text, msg_id = decoded, None
    else:
        text, msg_id = _parse_json(decoded)
    cut = max_text_chars is not None and len(text) > max_text_chars
    text = normalize_text(text, max_text_chars)
    if not text:
        raise DecodeError(EMPTY_TEXT, "the text is empty or only whitespace")
    if not text.isascii():
        try:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer, hash or producer takes
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DecodeError(INVALID_TEXT, f"the text cannot be encoded as UTF-8: {exc}") from None
    return msg_id, text, cut


def _parse_json(decoded: str) -> tuple[str, str | None]:
    try:
        obj = orjson.loads(decoded)  # orjson: the stdlib's json is the slower parser on the hot path
    except orjson.JSONDecodeError:
        obj = _UNPARSED  # what orjson refuses and the stdlib takes (NaN, lone surrogates) or refuses too:
    if isinstance(obj, dict) and isinstance(obj.get("id"), float):
        obj = _UNPARSED  # orjson reads integers past 64 bits as floats; the stdlib keeps every digit of an id
    try:  # the stdlib decides the rest, so verdicts, ids and messages stay as they were
        return _fields(json.loads(decoded) if obj is _UNPARSED else obj)
    except json.JSONDecodeError as exc:
        raise DecodeError(INVALID_JSON, str(exc)) from None
    except RecursionError:  # deeply nested arrays/objects: json and str() recurse per level
        raise DecodeError(INVALID_JSON, "nested too deeply") from None
    except DecodeError:
        raise
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits (int()'s limit on str conversion)
        raise DecodeError(INVALID_JSON, f"{exc}"[:300]) from None


def _fields(obj: Any) -> tuple[str, str | None]:
    if not isinstance(obj, dict):
        raise DecodeError(INVALID_JSON, f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj or obj["text"] is None:
        raise DecodeError(MISSING_TEXT, "the JSON object has no 'text' field")
    if not isinstance(obj["text"], str):
        raise DecodeError(MISSING_TEXT, f"'text' is a {type(obj['text']).__name__}, not a string")
    msg_id = obj.get("id")
    return obj["text"], (None if msg_id is None else str(msg_id))


def decode(record: Any, input_format: str = "auto", max_message_bytes: int = 65_536,
           max_text_chars: int | None = None) -> InputMessage | Rejected:
    """Decode one consumer record (anything with topic/partition/offset/key/value/headers; ``unreadable``,
    when present, is the (DLQ reason, detail) of a client that could not read it whole). Never raises,
    whatever the record holds: the result is either a message to classify or a rejection for the DLQ.
    ``max_text_chars`` cuts the text before it is normalised (see :data:`CHARS_PER_TOKEN`)."""
    source = Source(record.topic, record.partition, record.offset)
    headers = record.headers
    headers = [(k, bytes(v) if v is not None else b"") for k, v in headers] if headers else []
    value, key = record.value, record.key
    unreadable = getattr(record, "unreadable", None)  # (reason, detail) from a client that could not read it
    if unreadable is not None:
        return Rejected(*unreadable, value, key, headers, source)
    if headers or (key is not None and len(key) > MAX_KEY_AND_HEADERS_BYTES):
        rejected = _check_envelope(key, headers, source, value)
        if rejected is not None:
            return rejected
    fields = _plain_json(value, input_format, max_message_bytes, max_text_chars)
    if fields is None:
        try:
            fields = _parse(value, input_format, max_message_bytes, max_text_chars)
        except DecodeError as exc:
            return Rejected(exc.reason, exc.detail, value, key, headers, source)
        except Exception as exc:  # noqa: BLE001 - a parser's surprise must not stop the partition
            return Rejected(INVALID_JSON, f"{type(exc).__name__}: {exc}"[:300], value, key, headers, source)
    msg_id, text, cut = fields
    return InputMessage(msg_id or source.default_id, text, key, headers, source, value, cut)


def _check_envelope(key: bytes | None, headers: Headers, source: Source, value: bytes | None) -> Rejected | None:
    """A rejection for a header key that is not UTF-8 (a client hands it over escaped, with its bytes as
    ``raw``: :class:`bert_stream.kafka.UndecodableKey`), or for a key and headers too large to copy into an
    output; else None."""
    size = len(key or b"")
    for k, v in headers:
        size += len(k) + len(v)
        if type(k) is not str and getattr(k, "raw", None) is not None:
            return Rejected(INVALID_HEADER, f"header key {k.raw!r} is not UTF-8", value, key, headers, source)
    if size > MAX_KEY_AND_HEADERS_BYTES:
        return Rejected(TOO_LARGE, f"key and headers are {size} bytes > {MAX_KEY_AND_HEADERS_BYTES}",
                        value, key, headers, source)
    return None


def _plain_json(value: bytes | None, input_format: str, max_message_bytes: int,
                max_text_chars: int | None = None) -> tuple[str | None, str, bool] | None:
    """:func:`parse_value`'s answer for the common input, a JSON object with a string ``text`` (and a string
    ``id``, or none) whose value starts with ``{``, read straight from the bytes (orjson checks the UTF-8
    itself); None for anything else, which :func:`parse_value` then decides. Half of decoding's cost."""
    if input_format == "text" or not value or value[0] != 0x7B or len(value) > max_message_bytes:  # b"{"
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    text, msg_id = obj.get("text"), obj.get("id")
    if type(text) is not str or (msg_id is not None and type(msg_id) is not str):
        return None
    cut = max_text_chars is not None and len(text) > max_text_chars
    text = normalize_text(text, max_text_chars)
    return (msg_id, text, cut) if text else None


# ---- output -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Prediction:
    """What the model (or the cache) says about one text. ``json`` is its part of the output record, encoded
    once when the prediction is made: the cache stores exactly these bytes, and every output of the text
    splices them in (encoding the record per message was a fifth of the cached worker's own time)."""

    label: str
    label_id: int
    score: float
    top_k: tuple[tuple[str, float], ...]
    truncated: bool = False
    json: bytes = dataclasses.field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.json:
            object.__setattr__(self, "json", orjson.dumps({
                "label": self.label, "label_id": self.label_id, "score": round(self.score, 6),
                "top_k": [{"label": label, "score": round(p, 6)} for label, p in self.top_k],
                "truncated": self.truncated}))

    def to_cache(self) -> bytes:
        return self.json

    @classmethod
    def batch(cls, labels: Sequence[str], top_i: list[list[int]], top_p: list[list[float]],
              truncated: list[bool]) -> list[Prediction]:
        """One prediction per row of top-k label ids and probabilities, their ``json`` written from
        fragments (each label's JSON once, every score by one orjson call): the same object
        ``__post_init__`` writes, at a fraction of its cost per message."""
        names = [orjson.dumps(label) for label in labels]
        entry = [b'{"label":%b,"score":' % name for name in names]  # a top-k entry up to its score
        flat = [round(p, 6) for row in top_p for p in row]
        scores = orjson.dumps(flat)[1:-1].split(b",") if flat else []
        k, out, at = len(top_i[0]) if top_i else 0, [], 0
        for ids, probs, cut in zip(top_i, top_p, truncated):
            top = b"},".join([entry[i] + scores[at + j] for j, i in enumerate(ids)])
            out.append(cls(labels[ids[0]], ids[0], probs[0], tuple(zip([labels[i] for i in ids], probs)), cut,
                           _PREDICTION % (names[ids[0]], ids[0], scores[at], top, b"true" if cut else b"false")))
            at += k
        return out

    @classmethod
    def from_cache(cls, raw: bytes) -> Prediction:
        """The prediction a cache entry holds; raises ValueError (the cache reads it as a miss) for anything
        but the object :attr:`json` writes, so what is spliced into outputs is always that object."""
        try:
            obj = orjson.loads(raw)
            if len(obj) != len(_PREDICTION_KEYS) or obj.keys() != _PREDICTION_KEYS:
                raise ValueError(f"keys {sorted(obj)}")
            top_k = tuple((str(entry["label"]), float(entry["score"])) for entry in obj["top_k"])
            return cls(str(obj["label"]), int(obj["label_id"]), float(obj["score"]), top_k,
                       bool(obj["truncated"]), raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # orjson's error is a ValueError
            raise ValueError(f"unreadable cache entry: {type(exc).__name__}: {exc}"[:200]) from None


_PREDICTION_KEYS = {"label", "label_id", "score", "top_k", "truncated"}
_PREDICTION = b'{"label":%b,"label_id":%d,"score":%b,"top_k":[%b}],"truncated":%b}'


def output_value(message: InputMessage, prediction: Prediction, *, model_version: str, cached: bool,
                 queue_ms: float, infer_ms: float) -> bytes:
    """The output record's value: compact UTF-8 JSON, the prediction's fields spliced in as encoded."""
    return OutputEncoder(model_version, infer_ms)(message, prediction, cached, queue_ms)


class OutputEncoder:
    """Output values for one batch (:func:`output_value`, with what all of them share encoded once: the model
    version, the inference time, the input topics)."""

    __slots__ = ("_version", "_infer", "_topics")

    def __init__(self, model_version: str, infer_ms: float):
        self._version = orjson.dumps(model_version)
        self._infer = orjson.dumps(round(infer_ms, 3))
        self._topics: dict[str, bytes] = {}

    def __call__(self, message: InputMessage, prediction: Prediction, cached: bool, queue_ms: float) -> bytes:
        try:
            ident = orjson.dumps(message.id)
        except TypeError:  # a lone surrogate in an id: only the stdlib writes it (escaped)
            ident = json.dumps(message.id).encode()
        source = message.source
        topic = self._topics.get(source.topic)
        if topic is None:
            topic = self._topics[source.topic] = orjson.dumps(source.topic)
        fields = prediction.json[1:-1]
        if message.cut and not prediction.truncated:  # the model saw all of the cut text, not all of the input
            fields = fields.replace(b'"truncated":false', b'"truncated":true')
        return _OUTPUT % (ident, fields, self._version, b"true" if cached else b"false", topic,
                          source.partition, source.offset, orjson.dumps(round(queue_ms, 3)), self._infer)


_OUTPUT = (b'{"id":%b,%b,"model_version":%b,"cached":%b,"source":{"topic":%b,"partition":%d,"offset":%d},'
           b'"timing":{"queue_ms":%b,"infer_ms":%b}}')


def parse_output(value: bytes) -> dict:
    """An output record back as a dict (tail CLI, tests)."""
    return json.loads(value)


_UNPARSED = object()


# ---- dead letters -------------------------------------------------------------------------------------------
def rejected_for_failure(message: InputMessage, detail: str) -> Rejected:
    """The DLQ entry for a valid message whose inference failed twice."""
    return Rejected(INFERENCE_FAILED, detail, message.value, message.key, message.headers, message.source)


def dlq_headers(rejected: Rejected) -> Headers:
    """The original headers plus the reason and where the message came from."""
    src = rejected.source
    return [
        *rejected.headers,
        ("error", rejected.reason.encode()),
        ("error.detail", rejected.detail[:1000].encode("utf-8", "replace")),
        ("source.topic", src.topic.encode()),
        ("source.partition", str(src.partition).encode()),
        ("source.offset", str(src.offset).encode()),
    ]


def dead_letter(rejected: Rejected, max_bytes: int) -> tuple[bytes | None, bytes | None, Headers]:
    """(value, key, headers) of the dead letter for ``rejected``, at most ``max_bytes`` together: the
    original value, key and headers are cut, in that order, so a dead letter can always be published (an
    input may be near the broker's limit, and the dead letter adds headers). A cut is marked by a header
    ``error.truncated`` naming the parts cut. A null value without a key becomes an empty value."""
    value, key, headers = rejected.value, rejected.key, dlq_headers(rejected)
    ours = headers[len(rejected.headers):]
    size = lambda: (len(value or b"") + len(key or b"")  # noqa: E731
                    + sum(len(k.encode("utf-8", "replace")) + len(v or b"") for k, v in headers))
    cut = []
    over = size() + 64 - max_bytes  # 64: room for the marker header itself
    if over > 0 and value:
        cut.append("value")
        value = value[:max(0, len(value) - over)]
        over = size() + 64 - max_bytes
    if over > 0 and key:
        cut.append("key")
        key = key[:max(0, len(key) - over)]
        over = size() + 64 - max_bytes
    if over > 0 and len(headers) > len(ours):
        cut.append("headers")
        headers = list(ours)  # the original headers go; the reason and the source stay
    if cut:
        headers = [*headers, ("error.truncated", ",".join(cut).encode())]
    if value is None and key is None:  # a keyless tombstone, an unreadable record: producers need one of them
        value = b""
    return value, key, headers


def parse_dlq_headers(headers: Headers) -> dict[str, str]:
    """The DLQ headers this module added, as text (the last value of each wins)."""
    names = {"error", "error.detail", "source.topic", "source.partition", "source.offset"}
    return {k: v.decode("utf-8", "replace") for k, v in headers if k in names}
