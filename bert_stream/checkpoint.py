"""The checkpoint store: version folders, the ``LATEST`` pointer, atomic publish, and the announcement.

Layout of a store (``--output-dir`` of the trainer, ``--model-dir`` of the worker)::

    checkpoints/
      20261128T174501Z-3f9a1c/      one published version: a standard transformers folder
        config.json                 (with id2label / label2id)
        model.safetensors           (weights: safetensors only, never pickle)
        tokenizer.json, tokenizer_config.json, special_tokens_map.json, ...
        ngram.json, ngram.safetensors   (a hybrid only: the char n-gram half, bert_stream.ngram)
        metrics.json, training_args.json, data_fingerprint.json, *.png
        quality.json                (the label prior and validation confidence: bert_stream.reference)
      LATEST                        the name of the version workers serve
      CANDIDATE                     a version workers run in shadow beside it (trainer.run --stage candidate)
      PREVIOUS                      what LATEST named before the last promotion (trainer.promote --rollback)
      .staging-*/                   runs in progress (never read by workers)

Atomicity: a run writes into ``.staging-<version>/``, renames it to ``<version>/`` (one rename on one file
system), then replaces ``LATEST`` by writing ``LATEST.tmp`` and ``os.replace``-ing it. A crash before the
final replace leaves ``LATEST`` on the old version; a reader never sees a half-written folder.

Versions sort by name: ``<UTC timestamp>-<random hex>``. The announcement on Redis (``SET`` of the version
under ``<prefix>latest`` and ``PUBLISH`` on ``<prefix>announce``) only tells workers to look again; they
still read the version from this store and validate it, so nothing from Redis is used as a path.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from bert_stream import ngram

LATEST = "LATEST"
CANDIDATE = "CANDIDATE"
PREVIOUS = "PREVIOUS"
POINTERS = (LATEST, CANDIDATE, PREVIOUS)
ANNOUNCE_PREFIX = "bert-stream:model:"
VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
REQUIRED_FILES = ("config.json", "model.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint store or version folder that cannot be used (missing, incomplete, corrupt)."""


def new_version_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def staging_dir(root: Path | str, version: str) -> Path:
    """A fresh folder to write version ``version`` into before :func:`publish`."""
    path = Path(root) / f".staging-{version}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish_pretrained(root: Path | str, model, tokenizer) -> str:
    """Save a transformers ``model`` and ``tokenizer`` as a new version of the store (staged, then
    :func:`publish`); returns the version. For models made outside the trainer (tests, benchmarks)."""
    version = new_version_id()
    while (Path(root) / version).exists():
        version = new_version_id()
    staged = staging_dir(root, version)
    model.save_pretrained(staged, safe_serialization=True)
    tokenizer.save_pretrained(staged)
    publish(root, staged, version)
    return version


def publish(root: Path | str, staged: Path, version: str, *, update_latest: bool = True,
            classifier: bool = True) -> Path:
    """Move a fully written staging folder into place as ``version``, then point ``LATEST`` at it.
    ``classifier=False`` publishes a model without labels (a pretrained encoder for fine-tuning)."""
    root = Path(root)
    if not VERSION_RE.match(version):
        raise CheckpointError(f"not a version id: {version!r}")
    validate(staged, classifier=classifier)
    _readable_by_all(staged)
    final = root / version
    if final.exists():
        raise CheckpointError(f"version {version} already exists in {root}")
    os.replace(staged, final)
    if update_latest:
        set_latest(root, version)
    return final


def _readable_by_all(folder: Path) -> None:
    """Some writers (safetensors via a temp file) create 0600 files; workers may run as another user."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def set_latest(root: Path | str, version: str) -> None:
    """Atomically point ``LATEST`` at an existing version (also how an operator rolls back)."""
    set_pointer(root, LATEST, version)


def set_pointer(root: Path | str, name: str, version: str) -> None:
    """Atomically point ``name`` (one of POINTERS) at an existing version."""
    root = Path(root)
    if name not in POINTERS:
        raise CheckpointError(f"not a pointer: {name!r}")
    if not VERSION_RE.match(version) or not (root / version).is_dir():
        raise CheckpointError(f"no version {version!r} in {root}")
    tmp = root / f"{name}.tmp-{secrets.token_hex(4)}"
    tmp.write_text(version + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / name)


def clear_pointer(root: Path | str, name: str) -> None:
    """Remove ``name`` (a candidate promoted or withdrawn); LATEST is never cleared."""
    if name == LATEST or name not in POINTERS:
        raise CheckpointError(f"cannot clear {name!r}")
    try:
        os.remove(Path(root) / name)
    except FileNotFoundError:
        pass


def latest_version(root: Path | str) -> str | None:
    """The version ``LATEST`` names, or None for an empty store. A malformed pointer is an error."""
    return read_pointer(root, LATEST)


def read_pointer(root: Path | str, name: str) -> str | None:
    """The version pointer ``name`` holds, or None when it is absent. A malformed pointer is an error."""
    pointer = Path(root) / name
    try:
        version = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not VERSION_RE.match(version):
        raise CheckpointError(f"{pointer} holds {version!r}, not a version id")
    return version


def list_versions(root: Path | str) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def resolve(path: Path | str) -> tuple[str, Path]:
    """(version, folder) for a store (follows ``LATEST``) or for a model folder given directly."""
    path = Path(path)
    if (path / "config.json").exists():
        return (path.name if VERSION_RE.match(path.name) else f"local-{path.name}"), path
    version = latest_version(path)
    if version is None:
        raise CheckpointError(f"no published model in {path} (no {LATEST}); train one: python -m trainer.run")
    return version, path / version


def validate(folder: Path | str, *, classifier: bool = True) -> dict:
    """Check a version folder is complete and loadable without loading the weights; returns its config.

    Refuses: missing files, a config without labels, a safetensors file whose header does not parse or
    whose size does not match the header (a truncated copy)."""
    folder = Path(folder)
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}/config.json is not valid JSON: {exc}") from None
    if classifier and not config.get("id2label"):
        raise CheckpointError(f"{folder}/config.json has no id2label")
    _check_safetensors(folder / "model.safetensors")
    if (folder / ngram.CONFIG_FILE).exists():  # a hybrid: its n-gram half must be whole too
        if not (folder / ngram.WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{folder} is incomplete: {ngram.WEIGHTS_FILE} is missing")
        _check_safetensors(folder / ngram.WEIGHTS_FILE)
    return config


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(f"{path} is truncated or padded: {size} bytes, header says {8 + header_len + end}")


def announce(redis_url: str, version: str, prefix: str = ANNOUNCE_PREFIX) -> None:
    """Tell running workers a new version is published. Best effort: workers also watch ``LATEST``."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        with client.pipeline() as pipe:
            pipe.set(f"{prefix}latest", version)
            pipe.publish(f"{prefix}announce", version)
            pipe.execute()
    finally:
        client.close()
