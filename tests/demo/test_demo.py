"""The demo: its pure helpers (CJK-aware columns, summary figures), and one end-to-end run against the
session's broker and Redis with a trained checkpoint."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.display import Column, Table, display_width, fit, short_version
from demo.stats import Result, format_summary, percentile, summarize
from demo.stream import malformed_messages


# ---- display -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, width", [("", 0), ("abc", 3), ("体育", 4), ("NBA季后赛", 9), ("，。", 4),
                                         ("e\u0301", 1), ("ｆｕｌｌ", 8)])
def test_display_width_counts_wide_and_fullwidth_as_two_cells(text, width):
    assert display_width(text) == width


@pytest.mark.parametrize("text", ["短", "中国足球队3:0胜泰国", "Apple 发布 iPhone 新品，售价 5999 元起",
                                  "plain ascii"])
@pytest.mark.parametrize("width", [1, 2, 5, 10, 17])
def test_fit_is_exactly_width_cells(text, width):
    out = fit(text, width)
    assert display_width(out) == width
    if display_width(text) <= width:
        assert out.rstrip() == text
    else:
        assert out.rstrip().endswith("…")


def test_fit_never_splits_a_wide_character_over_the_edge():
    # 4 cells available: "体育" would need 4 plus the ellipsis, so only one character fits before it
    assert fit("体育新闻", 4) == "体… "
    assert fit("体育新闻", 5) == "体育…"


def test_fit_right_aligns_and_flattens_newlines():
    assert fit("42", 5, align="right") == "   42"
    assert fit("a\nb\tc", 6) == "a b c "


def test_table_rows_align_in_cells_whatever_the_script():
    columns = [Column("#", 3, "right"), Column("text", 0), Column("label", 6)]
    table = Table(columns, flex="text", total_width=40)
    rows = [table.row("1", "中国足球队3:0胜泰国，晋级下一轮", "体育"), table.row("22", "stocks fall", "财经")]
    # every column starts at the same cell offset: the label column begins at 40 - 6
    for row in rows:
        assert display_width(row[: row.rindex("  ") + 2]) == 40 - 6
    assert table.header().splitlines()[1].startswith("───")


def test_short_version():
    assert short_version("20261128T174501Z-3f9a1c") == "17:45:01 3f9a1c"
    assert short_version("local-model") == "local-model"


# ---- statistics --------------------------------------------------------------------------------------------
def test_percentile_matches_linear_interpolation():
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 0) == 15
    assert percentile(values, 50) == 35
    assert percentile(values, 100) == 50
    assert percentile(values, 40) == pytest.approx(29.0)  # numpy.percentile(values, 40)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_percentile_ignores_input_order():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 25) == percentile(sorted(values), 25) == 2.0


def _result(i: int, label: str, truth: str | None, produced: int, output: int, cached=False, version="v1"):
    return Result(f"t{i}", label, 0.9, cached, version, produced, output, truth)


def test_summary_figures():
    results = [
        _result(0, "体育", "体育", 1000, 1010),
        _result(1, "财经", "体育", 1000, 1030),
        _result(2, "体育", "体育", 1500, 1520, cached=True),
        _result(3, "科技", None, 1900, 2000, version="v2"),
    ]
    summary = summarize(results, ["too_large", "invalid_utf8", "too_large"])
    assert (summary.results, summary.scored, summary.correct) == (4, 3, 2)
    assert summary.accuracy == pytest.approx(2 / 3)
    assert summary.messages_per_s == pytest.approx(4 / 1.0)  # 4 results from t=1000 ms to t=2000 ms
    assert summary.p50_ms == pytest.approx(25.0)  # latencies 10, 30, 20, 100
    assert summary.p99_ms == pytest.approx(97.9)
    assert summary.cache_hits == 1
    assert summary.versions == {"v1": 3, "v2": 1}
    assert summary.dead_letters == {"invalid_utf8": 1, "too_large": 2}
    assert summary.dlq_total == 3
    text = "\n".join(format_summary(summary, labels=10))
    assert "66.7% (2/3 correct) (chance: 10%)" in text
    assert "invalid_utf8 1, too_large 2" in text


def test_summary_of_nothing_is_nan_not_an_error():
    summary = summarize([])
    assert summary.results == 0 and math.isnan(summary.accuracy) and math.isnan(summary.p99_ms)


def test_malformed_messages_cover_each_input_failure_once():
    reasons = [reason for _, _, reason in malformed_messages()]
    assert sorted(reasons) == ["empty_text", "invalid_json", "invalid_utf8", "too_large"]


# ---- end to end --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.kafka
def test_demo_runs_end_to_end_and_leaves_nothing_running(stack, trained_checkpoint, tmp_path, repo_root):
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers, "REDIS_URL": stack.redis_url,
           "LOG_FORMAT": "json"}
    argv = [sys.executable, "-m", "demo", "--messages", "40", "--duplicates", "5", "--skip-retrain",
            "--model-dir", str(trained_checkpoint), "--work-dir", str(tmp_path / "demo"), "--timeout-s", "90"]
    started = time.monotonic()
    done = subprocess.run(argv, env=env, cwd=repo_root, capture_output=True, text=True, timeout=170,
                          check=False)
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"demo failed:\n{out[-3000:]}\n{done.stderr[-3000:]}"
    assert "started: nothing" in out  # it used the session's broker and Redis, started none of its own
    accuracy = re.search(r"accuracy\s+([\d.]+)% \((\d+)/(\d+) correct\)", out)
    assert accuracy, out[-2000:]
    assert int(accuracy.group(3)) == 45  # 40 titles + 5 repeats, each with a known true label
    assert re.search(r"cache hits\s+5\b", out), out[-2000:]
    dead = re.search(r"dead letters\s+(\d+) \(", out)
    assert dead and int(dead.group(1)) == len(malformed_messages())
    pid = int(re.search(r"worker pid (\d+)", out).group(1))
    assert not Path(f"/proc/{pid}").exists(), "the worker outlived the demo"
    assert elapsed < 120, f"the demo took {elapsed:.0f} s"


@pytest.mark.kafka
def test_without_java_the_demo_says_so_in_one_line_and_uses_tansu(stack, tmp_path, monkeypatch, capsys):
    from contextlib import ExitStack

    from demo.stream import start_servers
    from deploy.local.stack import kafka_answers

    bin_dir = tmp_path / "bin"  # a PATH without java (and without mvn)
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    for name in ("BROKER", "JAVA_HOME", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", stack.redis_url)
    with ExitStack() as cleanup:
        servers = start_servers(tmp_path / "demo-stack", cleanup)
        said = capsys.readouterr().out.strip().splitlines()
        assert servers.started == ("tansu broker",)
        host, port = servers.bootstrap_servers.split(":")
        assert kafka_answers(host, int(port))
    assert len(said) == 1 and "Apache Kafka cannot run here" in said[0] and "java" in said[0], said
    assert "falling back to Tansu" in said[0]
    assert not kafka_answers(host, int(port))  # stopped with the cleanup


# ---- child processes ---------------------------------------------------------------------------------------
def test_run_streamed_copies_output_to_the_log_and_returns_the_status(tmp_path):
    from demo.processes import StopFlag, run_streamed

    code = "import sys; print('训练 progress\\r50%\\r100%'); sys.exit(3)"
    log = tmp_path / "child.log"
    rc = run_streamed([sys.executable, "-c", code], os.environ, log, StopFlag(), echo=False)
    assert rc == 3
    assert (tmp_path / "child.log").read_bytes().decode() == "训练 progress\r50%\r100%\n"


def test_an_interrupt_stops_the_child_before_unwinding(tmp_path):
    import signal

    from demo.processes import Interrupted, StopFlag, run_streamed

    flag = StopFlag()
    flag.handle(signal.SIGINT, None)  # as if Ctrl-C arrived while the child runs
    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(Interrupted):
        run_streamed([sys.executable, "-c", code], os.environ, tmp_path / "child.log", flag, echo=False)
    assert time.monotonic() - started < 10
    if marker.exists():  # the child may not even have started: either way it is gone
        assert not Path(f"/proc/{marker.read_text()}").exists()


# ---- the trainer command lines the demo runs ---------------------------------------------------------------
def test_the_trainer_accepts_the_demo_command_lines(tmp_path):
    from bert_stream.settings import parse_settings
    from demo.model import retrain_command, train_command
    from trainer.settings import TrainSettings

    first = parse_settings(TrainSettings, train_command(tmp_path, "thucnews-titles", 0)[3:], prog="t", env={})
    assert first.quick and not first.resume and first.output_dir == str(tmp_path)
    (tmp_path / ".runs" / "interrupted").mkdir(parents=True)
    assert "--resume" in train_command(tmp_path, "thucnews-titles")
    argv = retrain_command(tmp_path, tmp_path / "v1", "thucnews-titles", 0, 600, "redis://x:1/0")
    retrain = parse_settings(TrainSettings, argv[3:], prog="t", env={})
    assert retrain.force and retrain.redis_url == "redis://x:1/0" and retrain.max_train_examples == 600
    assert retrain.model == str(tmp_path / "v1")
    # the same held-out test split
    assert retrain.test_fraction == first.test_fraction and retrain.seed == first.seed


def test_an_interrupted_retrain_leaves_no_resumable_state_behind(tmp_path):
    from demo.model import RUNS_DIR, discard_unfinished_runs

    kept = tmp_path / RUNS_DIR / "someone-elses-run"
    kept.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt), discard_unfinished_runs(tmp_path):
        (tmp_path / RUNS_DIR / "the-retrain" / "state").mkdir(parents=True)
        raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / RUNS_DIR).iterdir()] == ["someone-elses-run"]


@pytest.mark.slow  # imports torch
def test_the_runs_folder_name_matches_the_trainer():
    from demo.model import RUNS_DIR
    from trainer.runstate import RUNS_DIR as TRAINER_RUNS_DIR

    assert RUNS_DIR == TRAINER_RUNS_DIR
