"""The results table: plain aligned columns that stay aligned with Chinese text.

A terminal draws East Asian wide and full-width characters (``east_asian_width`` W or F: Han characters,
full-width punctuation) in two cells, combining marks in none, everything else in one. ``len()`` counts
characters, so padding with ``str.ljust`` misaligns every row holding Chinese; :func:`display_width` counts
cells instead. Rows are printed one by one as results arrive, so a streaming-friendly plain table is used
rather than a library that renders a whole table at the end.
"""

from __future__ import annotations

import dataclasses
import shutil
import unicodedata
from pathlib import Path

ELLIPSIS = "…"  # one cell in the terminals we target (east_asian_width "A", drawn narrow outside CJK locales)


def char_width(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Terminal cells ``text`` occupies."""
    return sum(char_width(ch) for ch in text)


def fit(text: str, width: int, *, align: str = "left") -> str:
    """``text`` on one line, cut with an ellipsis when wider than ``width``, padded to exactly ``width``."""
    text = " ".join(text.split())  # newlines and tabs would break the row
    if display_width(text) > width:
        out, used = [], 0
        for ch in text:
            w = char_width(ch)
            if used + w > width - 1:
                break
            out.append(ch)
            used += w
        text = "".join(out) + ELLIPSIS
    pad = " " * (width - display_width(text))
    return pad + text if align == "right" else text + pad


@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    width: int
    align: str = "left"


class Table:
    """Fixed columns, one of them (``flex``) taking whatever the terminal width leaves."""

    def __init__(self, columns: list[Column], flex: str, total_width: int | None = None, gap: str = "  "):
        total = total_width or shutil.get_terminal_size((110, 24)).columns
        fixed = sum(c.width for c in columns if c.title != flex) + len(gap) * (len(columns) - 1)
        self.columns = [dataclasses.replace(c, width=max(12, total - fixed)) if c.title == flex else c
                        for c in columns]
        self.gap = gap

    def row(self, *cells: str) -> str:
        if len(cells) != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} cells, got {len(cells)}")
        fitted = (fit(str(value), c.width, align=c.align) for value, c in zip(cells, self.columns))
        return self.gap.join(fitted).rstrip()

    def header(self) -> str:
        titles = self.row(*(c.title for c in self.columns))
        return titles + "\n" + self.gap.join("─" * c.width for c in self.columns)


def short_version(version: str) -> str:
    """``20261128T174501Z-3f9a1c`` -> ``17:45:01 3f9a1c``: enough to see a version change in a row."""
    stamp, _, tag = version.partition("-")
    if len(stamp) == 16 and stamp[8] == "T" and tag:
        return f"{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]} {tag}"
    return version


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
