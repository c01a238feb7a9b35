"""Decoding never raises on bad input, and every rejection carries the right reason."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import messages as m


def rec(value, key=b"k", headers=(("trace", b"1"),), offset=7):
    return SimpleNamespace(topic="in", partition=2, offset=offset, key=key, value=value, headers=list(headers))


@pytest.mark.parametrize("value, fmt, reason", [
    (b"\xff\xfe\x00", "auto", m.INVALID_UTF8),
    (b"{not json", "auto", m.INVALID_JSON),
    (b"plain text", "json", m.INVALID_JSON),
    (b"[1, 2]", "json", m.INVALID_JSON),
    (b'{"id": 1}', "auto", m.MISSING_TEXT),
    (b'{"id": 1, "text": 5}', "auto", m.MISSING_TEXT),
    (b'{"text": "   "}', "auto", m.EMPTY_TEXT),
    (b"  \n\t ", "text", m.EMPTY_TEXT),
    (None, "auto", m.EMPTY_TEXT),
    ("长".encode() * 100, "auto", m.TOO_LARGE),
])
def test_rejections_have_reasons(value, fmt, reason):
    out = m.decode(rec(value), fmt, max_message_bytes=200)
    assert isinstance(out, m.Rejected) and out.reason == reason
    assert out.value == value and out.key == b"k" and out.headers == [("trace", b"1")]
    headers = m.parse_dlq_headers(m.dlq_headers(out))
    assert headers["error"] == reason
    assert (headers["source.topic"], headers["source.partition"], headers["source.offset"]) == ("in", "2", "7")


def test_json_and_text_are_auto_detected():
    j = m.decode(rec(json.dumps({"id": "a1", "text": " 国足  获胜 ", "x": 1}, ensure_ascii=False).encode()))
    assert (j.id, j.text) == ("a1", "国足 获胜")
    t = m.decode(rec("{ 不是 JSON".encode()), "text")
    assert t.text == "{ 不是 JSON" and t.id == "in-2-7"
    assert m.decode(rec(b'{"text": "x"}'), "text").text == '{"text": "x"}'


def test_output_record_round_trips():
    msg = m.decode(rec('{"id": 9, "text": "好"}'.encode()))
    pred = m.Prediction("体育", 0, 0.9, (("体育", 0.9), ("财经", 0.1)), truncated=True)
    assert m.Prediction.from_cache(pred.to_cache()) == pred
    out = m.parse_output(m.output_value(msg, pred, model_version="v1", cached=True, queue_ms=1, infer_ms=2))
    assert out["id"] == "9" and out["label"] == "体育" and out["label_id"] == 0 and out["cached"] is True
    assert out["truncated"] is True and out["model_version"] == "v1"
    assert out["top_k"] == [{"label": "体育", "score": 0.9}, {"label": "财经", "score": 0.1}]
    assert out["source"] == {"topic": "in", "partition": 2, "offset": 7}
    assert set(out["timing"]) == {"queue_ms", "infer_ms"}


def test_a_cached_prediction_publishes_the_same_bytes_as_a_fresh_one():
    msg = m.decode(rec("  央行 降准 ".encode()))
    fresh = m.Prediction("财经", 1, 0.123456789, (("财经", 0.123456789), ("体育", 0.0000004)))
    cached = m.Prediction.from_cache(fresh.to_cache())
    assert cached.json == fresh.json and cached.label == "财经" and cached.top_k[1] == ("体育", 0.0)
    kw = dict(model_version="v1", cached=False, queue_ms=1.23456, infer_ms=0.0)
    assert m.output_value(msg, cached, **kw) == m.output_value(msg, fresh, **kw)
    out = m.parse_output(m.output_value(msg, cached, **kw))
    assert out == {"id": "in-2-7", "label": "财经", "label_id": 1, "score": 0.123457,
                   "top_k": [{"label": "财经", "score": 0.123457}, {"label": "体育", "score": 0.0}],
                   "truncated": False, "model_version": "v1", "cached": False,
                   "source": {"topic": "in", "partition": 2, "offset": 7},
                   "timing": {"queue_ms": 1.235, "infer_ms": 0.0}}


@pytest.mark.parametrize("raw", [
    '["体育", 0, 0.9, [["体育", 0.9]], false]'.encode(),  # the entry format before the JSON object
    b'{"label": "x", "label_id": 0, "score": 0.9, "top_k": [], "truncated": false, "extra": 1}',
    b'{"label": "x", "label_id": 0, "score": 0.9, "top_k": [{"label": "x"}], "truncated": false}',
    b'{"label": "x", "label_id": "zero", "score": 0.9, "top_k": [], "truncated": false}',
    b"not json", b"", b"[]", b"null",
])
def test_a_cache_entry_of_another_shape_is_unreadable(raw):
    with pytest.raises(ValueError, match="unreadable cache entry"):
        m.Prediction.from_cache(raw)


def test_an_id_with_a_lone_surrogate_still_gives_valid_json():
    msg = m.decode(rec(rb'{"id": "a\ud800b", "text": "\u597d"}'))  # JSON escapes: the stdlib decodes them
    assert msg.id == "a\ud800b"
    pred = m.Prediction("体育", 0, 0.9, (("体育", 0.9),))
    out = json.loads(m.output_value(msg, pred, model_version="v1", cached=True, queue_ms=0, infer_ms=0))
    assert out["id"] == "a\ud800b" and out["label"] == "体育"


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=100).map(str.encode)),
       fmt=st.sampled_from(m.INPUT_FORMATS))
def test_decode_never_raises(value, fmt):
    out = m.decode(rec(value), fmt, max_message_bytes=256)
    if isinstance(out, m.Rejected):
        assert out.reason in m.REASONS
    else:
        assert out.text and out.text == m.normalize_text(out.text)


_JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                        st.lists(st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["id", "text", "other"]), _JSON_VALUES, max_size=3)
       | st.fixed_dictionaries({"id": _JSON_VALUES, "text": st.text(max_size=30)}),
       spaces=st.sampled_from(["", " ", "\n"]), fmt=st.sampled_from(m.INPUT_FORMATS))
def test_the_fast_json_path_decides_as_parse_value_does(obj, spaces, fmt):
    """decode() reads the common JSON input straight from the bytes; whatever it takes that way, it must
    decide exactly as parse_value, the reference, does."""
    value = (spaces + json.dumps(obj, ensure_ascii=bool(len(spaces) % 2))).encode("utf-8", "surrogatepass")
    out = m.decode(rec(value), fmt, max_message_bytes=256)
    try:
        msg_id, text = m.parse_value(value, fmt, 256)
    except m.DecodeError as exc:
        assert isinstance(out, m.Rejected) and out.reason == exc.reason
    else:
        assert isinstance(out, m.InputMessage) and (out.id, out.text) == (msg_id or "in-2-7", text)


@given(st.text(max_size=50))
def test_normalize_is_idempotent(text):
    assert m.normalize_text(m.normalize_text(text)) == m.normalize_text(text)


def test_deeply_nested_json_is_a_dead_letter_not_a_crash():
    import pytest

    from worker.messages import DecodeError, parse_value

    deep = b'{"text":' + b"[" * 20000 + b"]" * 20000 + b"}"
    with pytest.raises(DecodeError) as exc:
        parse_value(deep, "auto", 65536)
    assert exc.value.reason == "invalid_json"
    deep_id = b'{"text":"\xe4\xbd\xa0\xe5\xa5\xbd","id":' + b"[" * 900 + b"]" * 900 + b"}"
    msg_id, text = parse_value(deep_id, "auto", 65536)  # parses (under the recursion limit): a string id
    assert text == "你好" and msg_id.startswith("[[")


# ---- what a producer can send that once escaped decode or cost the main thread seconds ---------------------
@pytest.mark.parametrize("value, reason", [
    (b'{"text": "x", "n": ' + b"1" * 5000 + b"}", m.INVALID_JSON),   # past int()'s 4,300-digit limit
    (b'{"text": "\\ud800abc"}', m.INVALID_TEXT),                      # an escaped lone surrogate
    (b'{"id": "a", "text": "ok \\udc80"}', m.INVALID_TEXT),
])
def test_values_the_parsers_refuse_are_dead_letters_with_their_own_reason(value, reason):
    out = m.decode(rec(value))
    assert isinstance(out, m.Rejected) and out.reason == reason and out.detail
    assert out.value == value


def test_a_text_is_cut_before_it_is_normalised_and_the_cut_is_marked_truncated():
    import time

    marks = ("a" + "\u0301\u0316" * 16_000).encode()[:65_000]  # NFC reorders each pair: quadratic in the run
    started = time.perf_counter()
    out = m.decode(rec(marks), max_text_chars=512)
    assert time.perf_counter() - started < 0.05  # uncut it took ~0.5 s; the bound is 10x the cut's cost
    assert isinstance(out, m.InputMessage) and out.cut and len(out.text) <= 512
    short = m.decode(rec("短文本".encode()), max_text_chars=512)
    assert not short.cut
    prediction = m.Prediction("体育", 0, 0.9, (("体育", 0.9),), truncated=False)
    assert m.parse_output(m.output_value(out, prediction, model_version="v", cached=False, queue_ms=1,
                                         infer_ms=1))["truncated"] is True
    assert m.parse_output(m.output_value(short, prediction, model_version="v", cached=False, queue_ms=1,
                                         infer_ms=1))["truncated"] is False


def test_header_keys_that_are_not_utf8_and_oversized_envelopes_are_dead_letters():
    from bert_stream.kafka import UndecodableKey

    out = m.decode(rec(b"fine text", headers=[(UndecodableKey(b"\xff\xfekey"), b"v"), ("ok", b"1")]))
    assert isinstance(out, m.Rejected) and out.reason == m.INVALID_HEADER
    value, key, headers = m.dead_letter(out, 900_000)
    assert value == b"fine text" and key == b"k"
    assert headers[0] == ("\\xff\\xfekey", b"v")  # escaped, so every producer takes it
    assert all(k.encode("utf-8") for k, _ in headers)
    big = m.decode(rec(b"fine text", key=b"k" * (m.MAX_KEY_AND_HEADERS_BYTES + 1)))
    assert isinstance(big, m.Rejected) and big.reason == m.TOO_LARGE


def test_unreadable_records_from_a_client_become_dead_letters():
    record = SimpleNamespace(topic="in", partition=1, offset=9, key=None, value=None, headers=[],
                             unreadable=(m.UNREADABLE_RECORD, "CorruptRecordError: crc"))
    out = m.decode(record)
    assert isinstance(out, m.Rejected) and out.reason == m.UNREADABLE_RECORD and "crc" in out.detail


def test_a_keyless_tombstone_has_a_dead_letter_a_producer_accepts():
    out = m.decode(rec(None, key=None, headers=()))
    value, key, _headers = m.dead_letter(out, 900_000)
    assert out.reason == m.EMPTY_TEXT and key is None and value == b""


def _size(value, key, headers):
    return len(value or b"") + len(key or b"") + sum(len(k.encode()) + len(v) for k, v in headers)


@given(value=st.integers(0, 3_000), key=st.integers(0, 3_000), header=st.integers(0, 3_000))
@settings(max_examples=60, deadline=None)
def test_a_dead_letter_always_fits_and_says_what_was_cut(value, key, header):
    rejected = m.Rejected(m.TOO_LARGE, "x" * 50, b"v" * value, b"k" * key, [("h", b"h" * header)],
                          m.Source("in", 0, 1))
    limit = 2_000
    out_value, out_key, headers = m.dead_letter(rejected, limit)
    assert _size(out_value, out_key, headers) <= limit
    names = dict(m.parse_dlq_headers(headers))
    assert names["error"] == m.TOO_LARGE and names["source.offset"] == "1"
    cut = dict(headers).get("error.truncated", b"").decode()
    assert ("value" in cut) == (len(out_value) < value)
    if not cut:
        assert (out_value, out_key) == (rejected.value, rejected.key)
