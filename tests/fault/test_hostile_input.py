"""Hostile input: whatever bytes arrive, each message ends on the output topic or on the DLQ with a reason,
exactly once, and the worker neither crashes nor stalls; good messages around the bad ones are unaffected.

One worker process serves the whole run: the hostile values, keys and headers are generated up front
(hypothesis, seeded and bounded) plus a hand-picked list, published interleaved with good messages in batches
that are uncompressed or compressed with each codec, and matched to their output or dead letter by
(partition, offset), since most of them carry no id. Redis is on; the model runs in fp32, so a good text's
label can be compared with the label it got in a clean run before the hostile part.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fault import harness as h
from tests.fault.test_crash import _topics
from worker import messages as m

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

MAX_BYTES = 65_536  # the worker's default max_message_bytes
HYPOTHESIS_EXAMPLES = 300
CODECS = (None, "gzip", "snappy", "lz4", "zstd")  # a fifth of the hostile part each


def hand_picked() -> list[tuple[str, bytes | None, set[str] | None]]:
    """(name, value, acceptable outcomes): a DLQ reason, "output", or None for "either, but exactly once".
    Headers and keys that matter are in :func:`hand_picked_envelopes`."""
    nested_ok = '{"id": "nested", "text": "嵌套的合法消息", "meta": ' + "[" * 50 + "]" * 50 + "}"
    return [
        ("invalid-utf8", b"\xff\xfe\xfa\xc3\x28 bad", {m.INVALID_UTF8}),
        ("lone-surrogate", b"\xed\xa0\x80\xe4\xb8\xad", {m.INVALID_UTF8}),
        ("truncated-utf8", "中文".encode()[:-1], {m.INVALID_UTF8}),
        ("utf16", "中文新闻标题".encode("utf-16"), {m.INVALID_UTF8}),
        ("empty", b"", {m.EMPTY_TEXT}),
        ("tombstone", None, {m.EMPTY_TEXT}),
        ("whitespace", b" \t\r\n  \xe3\x80\x80 ", {m.EMPTY_TEXT}),  # includes U+3000 ideographic space
        ("json-empty-text", b'{"id": "e", "text": "   "}', {m.EMPTY_TEXT}),
        ("json-text-int", b'{"id": "i", "text": 5}', {m.MISSING_TEXT}),
        ("json-text-null", b'{"id": "n", "text": null}', {m.MISSING_TEXT}),
        ("json-text-list", b'{"id": "l", "text": ["a", "b"]}', {m.MISSING_TEXT}),
        ("json-text-object", b'{"id": "o", "text": {"text": "x"}}', {m.MISSING_TEXT}),
        ("json-no-text", b'{"id": "x", "body": "hi"}', {m.MISSING_TEXT}),
        ("json-broken", b'{"id": "b", "text": "unterminated', {m.INVALID_JSON}),
        ("json-nan", b'{"id": NaN, "text": "NaN id"}', None),
        ("json-list", b'[1, 2, {"text": "x"}]', None),  # not an object: text mode in auto, but either is fine
        ("json-deep-array", ('{"id": "deep", "text": "深", "x": ' + "[" * 20_000 + "]" * 20_000 + "}").encode(),
         None),
        ("json-deep-object", ('{"text": "深", "x": ' + '{"a": ' * 9_000 + "1" + "}" * 9_000 + "}").encode(),
         None),
        ("json-nested-ok", nested_ok.encode(), {"output"}),
        ("json-enormous-ok", json.dumps({"id": "big", "text": "体育新闻", "blob": list(range(9000))}).encode(),
         {"output"}),
        ("json-huge-number", b'{"id": 1e999999, "text": "huge number id"}', None),
        ("json-dup-keys", b'{"text": "first", "text": "second"}', {"output"}),
        ("too-large", ("超长文本" * 6000).encode(), {m.TOO_LARGE}),
        ("much-too-large", b"x" * 300_000, {m.TOO_LARGE}),
        ("just-under-limit", ("长" * ((MAX_BYTES - 10) // 3)).encode(), {"output"}),  # truncated by the model
        ("control-chars", "".join(map(chr, range(1, 32))).encode() + "控制字符\x7f\x00".encode(), {"output"}),
        ("nul-only", b"\x00\x00\x00", {"output"}),
        ("zero-width", "\u200b\u200c\u200d\ufeff".encode(), None),
        ("bom-json", b"\xef\xbb\xbf" + b'{"id": "bom", "text": "BOM"}', None),
        ("emoji", "😀🎉👍🏽👨‍👩‍👧‍👦 好消息".encode(), {"output"}),
        ("mixed-scripts", "北京 Beijing Пекин بكين 北京 ペキン 베이징 ∑∫√".encode(), {"output"}),
        ("rtl-override", "\u202e新闻\u202d标题".encode(), {"output"}),
        ("combining-marks", ("a" + "\u0301" * 5000).encode(), {"output"}),
        ("non-chinese", b"The quick brown fox jumps over the lazy dog.", {"output"}),
        ("number-only", b"12345", {"output"}),
        ("html", b"<script>alert(1)</script><b>\xe6\x96\xb0\xe9\x97\xbb</b>", {"output"}),
        ("path-like-id", b'{"id": "../../etc/passwd", "text": "\xe8\xb7\xaf\xe5\xbe\x84"}', {"output"}),
        ("format-string", b"%s%s%n{0}{text}${jndi:ldap://x}", {"output"}),
        ("json-escaped-surrogate", b'{"text": "\\ud800\\u4e2d\\u6587"}', {m.INVALID_TEXT}),
        ("json-escaped-low-surrogate", b'{"id": "s", "text": "\\u4e2d \\udc00"}', {m.INVALID_TEXT}),
        ("json-surrogate-id", b'{"id": "\\udc00", "text": "\\u4e2d\\u6587"}', {"output"}),
        ("json-huge-int", b'{"text": "x", "n": ' + b"9" * 5000 + b"}", {m.INVALID_JSON}),
        ("json-huge-int-id", b'{"id": 1' + b"0" * 5000 + b', "text": "x"}', None),
        ("combining-run-64k", ("a" + "\u0301\u0316" * 16_000).encode()[:MAX_BYTES - 100], {"output"}),
    ]


def hand_picked_envelopes() -> list[tuple[str, bytes, bytes | None, list, set[str]]]:
    """(name, value, key, headers, acceptable outcomes) where the key or headers are what is hostile."""
    fine = "中文新闻标题".encode()
    return [
        ("header-key-not-utf8", fine, None, [(h.RawKey(b"\xff\xfe"), b"v")], {m.INVALID_HEADER}),
        ("header-key-lone-continuation", fine, None, [("ok", b"1"), (h.RawKey(b"a\x80b"), b"")], {m.INVALID_HEADER}),
        ("header-key-cesu-surrogate", fine, None, [(h.RawKey(b"\xed\xa0\x80"), b"x")], {m.INVALID_HEADER}),
        ("header-values-binary", fine, None, [("bin", bytes(range(256))), ("empty", b"")], {"output"}),
        ("header-key-unicode", fine, None, [("键😀\u200b", b"v")], {"output"}),
        ("key-over-limit", fine, b"k" * (m.MAX_KEY_AND_HEADERS_BYTES + 1), [], {m.TOO_LARGE}),
        ("headers-over-limit", fine, None, [("big", b"h" * (m.MAX_KEY_AND_HEADERS_BYTES + 1))], {m.TOO_LARGE}),
        ("key-near-broker-limit", fine, b"k" * 950_000, [], {m.TOO_LARGE}),  # its dead letter is cut to fit
    ]


def _json_values():
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=15)


def hostile_strategy():
    """Values a producer could send: bytes, text of every Unicode category, JSON of any shape, and JSON
    objects whose ``text`` has the wrong type or odd content."""
    odd_text = st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "So", "Co"]),
                       max_size=50)
    scripts = st.text(alphabet=st.sampled_from(list("新闻体育财经 abcXYZ😀ПриветمرحباＡＢ１２\u3000\t\n")), max_size=200)
    any_json = _json_values().map(lambda v: json.dumps(v, ensure_ascii=False).encode())
    bad_text_field = st.builds(
        lambda msg_id, text, extra: json.dumps({"id": msg_id, "text": text, **extra}, ensure_ascii=False).encode(),
        _json_values(), _json_values() | odd_text | scripts, st.dictionaries(st.text(max_size=5), _json_values(),
                                                                            max_size=3))
    return st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        odd_text.map(str.encode),
        scripts.map(str.encode),
        any_json,
        bad_text_field,
        st.binary(max_size=40).map(lambda b: b'{"text": "' + b + b'"}'),
    )


def header_strategy():
    """Headers as producers in any language send them: keys of any text, or bytes that need not be UTF-8."""
    key = st.text(max_size=12) | st.binary(max_size=12).map(h.RawKey)
    return st.lists(st.tuples(key, st.binary(max_size=24)), max_size=3)


def surrogate_and_number_strategy():
    """JSON that once escaped decode: escaped surrogates anywhere in the text, numbers of thousands of digits."""
    escapes = st.lists(st.sampled_from(["\\ud800", "\\udfff", "\\udbff\\udc00", "\\u4e2d", "x", " "]),
                       min_size=1, max_size=8).map("".join)
    digits = st.integers(4000, 6000).map(lambda n: "7" * n)
    return st.one_of(
        escapes.map(lambda t: ('{"text": "' + t + '"}').encode()),
        digits.map(lambda d: ('{"text": "数字", "n": ' + d + "}").encode()),
        digits.map(lambda d: ('{"text": "数字", "n": -' + d + ".5e3}").encode()),
    )


def draw_hostile(n: int) -> list[tuple[bytes, bytes | None, list]]:
    """``n`` (value, key, headers) triples from hypothesis, deterministic (derandomize): generated once, up
    front."""
    drawn: list[tuple[bytes, bytes | None, list]] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(value=hostile_strategy() | surrogate_and_number_strategy(), key=st.none() | st.binary(max_size=30),
           headers=header_strategy())
    def collect(value, key, headers):
        drawn.append((value, key, headers))

    collect()
    return drawn


def _good(i: int) -> tuple[str, bytes]:
    texts = ("国足世预赛主场两球击败对手，出线形势明朗", "央行宣布下调存款准备金率0.5个百分点", "今秋流行色彩搭配指南",
             "这本书内容空洞，翻了几页就看不下去了，完全不值这个价格。", "电影节闭幕，最佳影片揭晓")
    msg_id = f"good-{i:04d}"
    return msg_id, json.dumps({"id": msg_id, "text": texts[i % len(texts)]}, ensure_ascii=False).encode()


def _outcome(records: list) -> str:
    r = records[0]
    return "output" if isinstance(r, dict) else r.reason


@pytest.mark.parametrize("delivery, client", h.matrix())
def test_hostile_input_ends_on_output_or_dlq_and_never_stalls(kafka_settings, names, model_store, stack,
                                                              workers, delivery, client):
    """Also under exactly-once: dead letters are part of the transactions, in input order with the outputs."""
    _topics(kafka_settings, names)
    reader = h.TopicReader(kafka_settings, names.output_topic, names.dlq_topic, h.isolation(delivery))
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, dtype="fp32", http_port=0, delivery=delivery,
                       kafka_client=client)
    started = time.monotonic()
    w = workers.start("worker", env)  # loads its model while hypothesis generates
    picked = hand_picked()
    drawn = draw_hostile(HYPOTHESIS_EXAMPLES)
    try:
        # 1. a clean run of the good texts: the reference labels
        baseline = [_good(i) for i in range(10)]
        clean = h.publish_messages(kafka_settings, names.input_topic, baseline)
        reader.wait_all(clean, timeout=180, diagnostics=workers.tails, alive=w.alive)

        # 2. the hostile values, keys and headers, each followed by a good message; a fifth of them in batches
        # of each codec
        values, ids, keys, headers, kinds = [], [], [], [], []
        hostile = [(name, value, None, [], want) for name, value, want in picked]
        hostile += [(name, value, key, hdrs, want) for name, value, key, hdrs, want in hand_picked_envelopes()]
        hostile += [(f"hypothesis-{i}", value, key, hdrs, None) for i, (value, key, hdrs) in enumerate(drawn)]
        for j, (name, value, key, hdrs, want) in enumerate(hostile):
            gid, gvalue = _good(100 + j)
            values += [value, gvalue]
            ids += [None, gid]
            # kafka-python cannot send a tombstone without a key (test_poison_records sends one with librdkafka)
            keys += [key if key is not None or value is not None else b"tombstone", gid.encode()]
            headers += [hdrs, None]
            kinds += [(name, want), ("good", {"output"})]
        mixed, chunk = h.Sent(), -(-len(values) // len(CODECS))
        for i, codec in enumerate(CODECS):
            part = slice(i * chunk, (i + 1) * chunk)
            h.publish(kafka_settings, names.input_topic, values[part], ids=ids[part], keys=keys[part],
                      headers=headers[part], sent=mixed, compression_type=codec)
        after, stopped = h.Sent(), None
        try:
            reader.wait_all(mixed, timeout=240, diagnostics=workers.tails, stall_s=45, alive=w.alive)
            # 3. good messages after all of it: the worker still serves
            after = h.publish_messages(kafka_settings, names.input_topic, [_good(10_000 + i) for i in range(10)])
            reader.wait_all(after, timeout=60, diagnostics=workers.tails, stall_s=45, alive=w.alive)
        except AssertionError as exc:  # counted and reported below, then failed
            stopped = str(exc)
        reader.drain()
        everything = h.Sent(clean.ids + mixed.ids + after.ids, clean.sources + mixed.sources + after.sources)
        counts = h.count(everything, reader)
        outcomes = [_outcome(reader.by_source[s]) if s in reader.by_source else "none" for s in mixed.sources]
        hostile_outcomes = [o for o, (name, _) in zip(outcomes, kinds) if name != "good"]
        unanswered = [name for o, (name, _) in zip(outcomes, kinds) if o == "none" and name != "good"]
        h.report(f"hostile-input({h.variant(delivery, client)})", counts, hostile=len(hostile),
                 hand_picked=len(picked) + len(hand_picked_envelopes()), hypothesis=len(drawn),
                 hostile_to_output=hostile_outcomes.count("output"),
                 hostile_to_dlq=len(hostile_outcomes) - hostile_outcomes.count("output") - len(unanswered),
                 worker_alive=w.alive(), unanswered_hostile=",".join(unanswered[:3]) or None,
                 seconds=round(time.monotonic() - started, 1))
        assert stopped is None, stopped
        assert w.alive(), f"the worker died\n{w.tail()}"
        assert w.get("/healthz")[0] == 200
        assert w.terminate() == 0
    finally:
        reader.close()

    assert counts.lost == 0 and counts.duplicates == 0
    wrong = []
    for source, (name, want), outcome in zip(mixed.sources, kinds, outcomes):
        records = reader.by_source[source]
        if isinstance(records[0], h.DeadLetter):
            assert records[0].reason in m.REASONS and records[0].detail, (name, records[0])
        if want is not None and outcome not in want:
            wrong.append((name, outcome, sorted(want)))
    assert not wrong, f"unexpected outcomes (name, got, wanted): {wrong}"

    # good messages between hostile ones: one output each, labelled as in the clean run
    reference = {json.loads(v)["text"]: reader.outputs[i][0] for i, v in baseline}
    for msg_id, value in [_good(100 + j) for j in range(len(hostile))] + [_good(10_000 + i) for i in range(10)]:
        (out,) = reader.outputs[msg_id]
        ref = reference[json.loads(value)["text"]]
        assert abs(out["score"] - ref["score"]) < 1e-3, (msg_id, out, ref)
        assert out["label"] == ref["label"] or abs(ref["top_k"][0]["score"] - ref["top_k"][1]["score"]) < 1e-3
