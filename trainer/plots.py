"""The two figures every checkpoint carries: training_curve.png and confusion_matrix.png.

Chinese label names need a font with CJK glyphs. The first installed one is used (Noto CJK, WenQuanYi,
Droid Sans Fallback, ... whatever matplotlib finds that has them); without one the axes show label numbers
and the figure says so, instead of rendering boxes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402

_PROBE = "中文"


@functools.cache
def cjk_font() -> str | None:
    """Family name of an installed font that has CJK glyphs, or None."""
    from matplotlib.ft2font import FT2Font

    preferred = ("Noto Sans CJK", "Noto Sans SC", "Source Han Sans", "WenQuanYi", "Droid Sans Fallback",
                 "SimHei", "Microsoft YaHei", "PingFang", "AR PL")
    fonts = sorted(font_manager.fontManager.ttflist,
                   key=lambda f: not any(f.name.startswith(p) for p in preferred))
    for entry in fonts:
        try:
            face = FT2Font(entry.fname)
            if all(face.get_char_index(ord(ch)) for ch in _PROBE):
                return entry.name
        except (OSError, RuntimeError, ValueError):
            continue
    return None


def _needs_cjk(texts: Sequence[str]) -> bool:
    return any(ord(ch) > 0x2E7F for text in texts for ch in text)


def _tick_labels(labels: Sequence[str]) -> tuple[list[str], str | None, dict]:
    """(tick labels, a note for the title, rcParams): the names when they can be drawn, else their ids."""
    if not _needs_cjk(labels):
        return list(labels), None, {}
    font = cjk_font()
    if font is not None:
        return list(labels), None, {"font.family": "sans-serif",
                                    "font.sans-serif": [font, *plt.rcParams["font.sans-serif"]]}
    return ([str(i) for i in range(len(labels))],
            "no CJK font installed: labels by id, see config.json id2label", {})


def training_curve(history: Sequence[dict], train_losses: Sequence[tuple[int, float]], path: Path) -> None:
    """Training loss per optimizer step (left axis) and validation accuracy / macro-F1 per evaluation."""
    fig, ax_loss = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train_losses:
        steps, losses = zip(*train_losses)
        ax_loss.plot(steps, losses, color="tab:gray", linewidth=1, label="train loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("train loss")
    ax_metric = ax_loss.twinx()
    if history:
        steps = [h["step"] for h in history]
        ax_metric.plot(steps, [h["accuracy"] for h in history], "o-", color="tab:blue", label="val accuracy")
        ax_metric.plot(steps, [h["macro_f1"] for h in history], "s--", color="tab:orange", label="val macro-F1")
    ax_metric.set_ylim(0, 1)
    ax_metric.set_ylabel("validation")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_metric.get_legend_handles_labels()[0]
    ax_metric.legend(handles=handles, loc="center right")
    ax_loss.set_title("Training curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (colour = share of the true class), counts written in the cells."""
    names, note, rc = _tick_labels(labels)
    with plt.rc_context(rc):
        _draw_confusion(matrix, names, path, title if note is None else f"{title}\n({note})")


def _draw_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str) -> None:
    n = len(names)
    size = max(4.5, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    shares = [[c / max(1, sum(row)) for c in row] for row in matrix]
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
