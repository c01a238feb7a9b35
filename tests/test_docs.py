"""The docs a newcomer reads: the README's shape, links that resolve, and settings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md",
        REPO / "experiments" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
VARIABLE = re.compile(r"`((?:BERT_STREAM|KAFKA)_[A-Z0-9_]+)`")


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    first_block = text.split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    for target, _anchor in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"


def test_the_configuration_names_only_settings_the_code_reads():
    """A variable in the configuration page that no module reads is a typo or a setting that was removed."""
    sources = "\n".join(p.read_text() for folder in ("bert_stream", "worker", "trainer", "deploy")
                        for p in (REPO / folder).rglob("*.py"))
    named = set(VARIABLE.findall((REPO / "docs" / "configuration.md").read_text()))
    assert len(named) > 10
    assert {v for v in named if f'"{v}' not in sources} == set()


def test_the_docs_name_no_development_machine_paths():
    for doc in DOCS:
        assert "/work/" not in doc.read_text(), doc


@pytest.mark.parametrize("message, accepted", [
    ("worker: one line that says what changed\n\nWhy, in the body.\n", True),
    ("x" * 72 + "\n", True),
    ("x" * 73 + "\n", False),
    ("subject\nbody without a blank line\n", False),
    ("# only a comment\n", False),
])
def test_the_commit_hook_keeps_subjects_short(tmp_path, message, accepted):
    import subprocess

    path = tmp_path / "COMMIT_EDITMSG"
    path.write_text(message)
    result = subprocess.run([str(REPO / ".githooks" / "commit-msg"), str(path)], capture_output=True, text=True)
    assert (result.returncode == 0) == accepted, result.stderr
