"""Trainer test fixtures shared by several modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small pretraining corpus folder: People's Daily lines in two files, one nested, with a blank line
    between documents."""
    from trainer.data import peoples_daily_texts

    texts = peoples_daily_texts()[:500]
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text("\n".join(texts[:250]) + "\n\n" + "\n".join(texts[250:400]), encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("\n".join(texts[400:]), encoding="utf-8")
    return folder
