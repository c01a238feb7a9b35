"""Where downloaded data sets and converted models are cached (``BERT_STREAM_CACHE``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str = "") -> Path:
    """``$BERT_STREAM_CACHE`` (default ``~/.cache/bert-stream``), created on first use."""
    root = Path(os.environ.get("BERT_STREAM_CACHE") or Path.home() / ".cache" / "bert-stream").expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path
