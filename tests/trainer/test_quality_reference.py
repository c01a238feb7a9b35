"""The quality reference (bert_stream/reference.py): the trainer writes it into every version, and
``python -m trainer.quality`` rebuilds the same one for a version published without it."""

from __future__ import annotations

import json
import shutil

import pytest

from bert_stream import checkpoint, reference
from trainer import quality

pytestmark = pytest.mark.slow


def test_backfill_rebuilds_the_trainers_reference(trained_checkpoint, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(trained_checkpoint, store)
    folder = store / checkpoint.latest_version(store)
    written = json.loads((folder / reference.FILE).read_text())
    assert sum(written["label_prior"]) == pytest.approx(1, abs=1e-6)
    assert written["score_quantiles"]["0.05"] <= written["score_quantiles"]["0.5"] <= 1
    assert quality.main(["--model-dir", str(store)]) == 2  # there already
    assert "exists" in capsys.readouterr().err
    (folder / reference.FILE).unlink()
    assert quality.main(["--model-dir", str(store)]) == 0
    rebuilt = json.loads((folder / reference.FILE).read_text())
    assert rebuilt["label_prior"] == written["label_prior"] and rebuilt["examples"] == written["examples"]
    for key in ("score_quantiles", "margin_quantiles"):
        assert rebuilt[key] == pytest.approx(written[key], abs=1e-4)


def test_backfill_refuses_a_version_whose_data_changed(trained_checkpoint, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(trained_checkpoint, store)
    folder = store / checkpoint.latest_version(store)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["data_fingerprint"] = "0" * 64
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert quality.main(["--model-dir", str(store), "--force"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the data's log lines: one line, no traceback
    assert last.startswith("trainer.quality: ") and "data changed" in last
