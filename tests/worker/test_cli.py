"""The publish and tail CLIs: bad arguments exit 2 with one line; a file round-trips through the worker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bert_stream import feedback
from bert_stream.kafka import ensure_topics
from tests.worker.conftest import produce, read_topic
from worker import publish as publish_cli
from worker import tail as tail_cli
from worker.processes import child_args
from worker.settings import WorkerSettings


def run_cli(module: str, *args: str, stdin: str | None = None, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args", [["--rate", "-1"], ["--key", "a", "--key-field", "id"], ["--bogus"],
                                  ["--rate", "fast"]])
def test_publish_bad_args_exit_2_with_one_line(args):
    result = run_cli("worker.publish", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "error:" in result.stderr


def test_key_field_needs_json_lines():
    lines = ['{"id": 1, "text": "国足"}', "", "纯文本"]
    it = publish_cli.messages(lines, "id", None)
    assert next(it) == (b"1", '{"id": 1, "text": "国足"}'.encode())
    with pytest.raises(publish_cli.InputError, match="line 3"):
        next(it)
    assert list(publish_cli.messages(["a", "  ", "b"], None, "k")) == [(b"k", b"a"), (b"k", b"b")]


@pytest.mark.kafka
def test_publish_file_and_tail(kafka_settings, names, stack, tmp_path):
    ensure_topics(kafka_settings, {names.input_topic: 1})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"n{i}", "text": f"新闻{i}"}, ensure_ascii=False) + "\n"
                            for i in range(20)), encoding="utf-8")
    env = {"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers}
    result = run_cli("worker.publish", "--input", str(path), "--topic", names.input_topic, "--key-field", "id",
                     "--rate", "200", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    got = read_topic(kafka_settings, names.input_topic, expect=20, timeout=30)
    assert sorted(r.key for r in got) == sorted(f"n{i}".encode() for i in range(20))

    # tail formats outputs and dead letters (records shaped as the worker writes them)
    out_value = json.dumps({"id": "n1", "label": "体育", "label_id": 0, "score": 0.91, "cached": True,
                            "truncated": False, "model_version": "v1"}, ensure_ascii=False)
    produce(kafka_settings, names.output_topic, [out_value])
    produce(kafka_settings, names.dlq_topic, [b"{broken"], headers=[[("error", b"invalid_json")]])
    shown = run_cli("worker.tail", "--output-topic", names.output_topic, "--from-beginning", "--max", "1",
                    env=env)
    assert shown.returncode == 0 and "体育" in shown.stdout and "cached" in shown.stdout and "id=n1" in shown.stdout
    shown = run_cli("worker.tail", "--dlq-topic", names.dlq_topic, "--dlq", "--from-beginning", "--max", "1",
                    "--json", env=env)
    assert json.loads(shown.stdout)["error"] == "invalid_json"
    assert tail_cli  # imported: the module loads without a broker

    # the review topic, as a reviewer reads it; labels back, bad lines counted, the rest keyed by id
    review = names.output_topic.replace("out-", "review-")
    produce(kafka_settings, review, [feedback.review_value("n3", "屏幕一般", "uncertain", "v1",
                                                           [("positive", 0.54), ("negative", 0.46)], ("in", 0, 3))])
    shown = run_cli("worker.tail", "--review-topic", review, "--review", "--from-beginning", "--max", "1", env=env)
    assert shown.returncode == 0 and "REVIEW" in shown.stdout and "uncertain" in shown.stdout and "id=n3" in shown.stdout
    labels, topic = tmp_path / "labels.jsonl", names.output_topic.replace("out-", "labels-")
    labels.write_text('{"id": "n3", "text": "屏幕一般", "label": "negative"}\n{"id": "n4", "label": "positive"}\n'
                      "not json\n", encoding="utf-8")
    result = run_cli("worker.publish", "--labels", str(labels), "--labels-topic", topic, "--no-progress", env=env)
    assert result.returncode == 0 and "sent 1 labels" in result.stderr, result.stderr
    assert "skipped 2 bad lines (no_text: 1, not_json: 1)" in result.stderr
    read = feedback.read_labels(kafka_settings, topic, ["negative", "positive"])
    assert read.examples == {"n3": ("屏幕一般", "negative")} and read.records == 1


@pytest.mark.parametrize("args, code, says", [
    (["--min-gain", "2"], 2, "error:"),
    (["--min-agreement", "0.9"], 2, "--min-agreement needs --metrics-url"),
    ([], 3, "refused: no CANDIDATE in"),
    (["--rollback"], 3, "refused: no PREVIOUS in"),
])
def test_promote_says_why_in_one_line(tmp_path, args, code, says):
    result = run_cli("trainer.promote", "--model-dir", str(tmp_path), *args)
    assert result.returncode == code
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_children_get_their_own_port_and_instance_id():
    s = WorkerSettings(http_port=9000, instance_id="gpu-0", processes=3)
    args = child_args(s, ["--processes", "3", "--device", "cuda"], 2)
    assert args[-8:] == ["--device", "cuda", "--processes", "1", "--http-port", "9002", "--instance-id",
                         "gpu-0-2"]
    assert child_args(WorkerSettings(http_port=0), [], 1)[-2:] == ["--processes", "1"]  # 0: each picks one


@pytest.mark.parametrize("args, says", [
    (["--kafka-client", "kafka-python", "--group-protocol", "consumer"], "group_protocol=consumer (KIP-848) needs"),
    (["--kafka-client", "librdkafka"], "invalid choice"),
    (["--processes", "0"], "processes must be between 1 and 64"),
])
def test_worker_bad_client_or_processes_exit_2_with_one_line(args, says):
    result = run_cli("worker.run", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr


@pytest.mark.parametrize("args, env, says", [
    (["--backend", "standin"], {}, "argument --backend: standin is the benchmarks' stand-in"),
    ([], {"BERT_STREAM_BACKEND": "standin"}, "BERT_STREAM_BACKEND='standin' is invalid: standin is the"),
    ([], {"BERT_STREAM_BACKEND": "gpu"}, "is invalid: choose from auto, packed, padded"),  # env, not only flags
    ([], {"BERT_STREAM_DELIVERY": "exactly_once"}, "is invalid: choose from at-least-once, exactly-once"),
])
def test_worker_refuses_the_benchmark_stand_in_and_unknown_choices_from_env(args, env, says):
    """The stand-in forward (bench/standin.py) is never a backend a deployment can select."""
    result = run_cli("worker.run", *args, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr


def test_worker_never_imports_the_trainer():
    """The checkpoint format is shared (bert_stream.checkpoint): a worker image needs no training code."""
    code = ("import sys, worker.run, worker.engine, worker.dtype_check, worker.publish, worker.tail; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trainer', 'bench', 'demo', 'accelerate'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
