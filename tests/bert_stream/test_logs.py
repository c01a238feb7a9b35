"""Logs are JSON lines off a terminal, with context and ISO UTC timestamps; stdlib loggers go the same way."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, structlog
from bert_stream.logs import configure_logging, get_logger
configure_logging()
structlog.contextvars.bind_contextvars(batch_id=7)
get_logger("t").info("batch_done", size=3, text="中文")
logging.getLogger("other").warning("plain %s", "stdlib")
"""


def test_json_lines_with_context_when_not_a_tty():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={"LOG_FORMAT": "auto", "PATH": ""})
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    first, second = lines
    assert first["event"] == "batch_done" and first["batch_id"] == 7 and first["text"] == "中文"
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert second["event"] == "plain stdlib" and second["level"] == "warning"
    assert out.stdout == ""  # stdout stays free for data


def test_quieted_silences_a_library_logger_for_a_block_only():
    import logging

    from bert_stream.logs import quieted

    logger = logging.getLogger("some.library")
    logger.setLevel(logging.INFO)
    with quieted("some.library"):
        assert not logger.isEnabledFor(logging.WARNING)
        assert logger.isEnabledFor(logging.ERROR)
    assert logger.level == logging.INFO, "the level is put back"


SECRET_SCRIPT = """
import logging
from bert_stream.kafka import KafkaSettings, make_admin
from bert_stream.logs import configure_logging, get_logger
from bert_stream.settings import from_env
from worker.settings import WorkerSettings
configure_logging("DEBUG")
settings = from_env(WorkerSettings, env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
    "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
    "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "pa'ss-w0rd-42", "REDIS_URL": "redis://:r3dis-secret@h:1/0"})
config = settings.kafka.client_config()
logging.getLogger("kafka.admin.client").debug("Starting KafkaAdminClient with configuration: %s", config)
get_logger("t").info("oops", url="redis://:r3dis-secret@h:1/0", nested={"password": "pa'ss-w0rd-42"})
try:
    raise RuntimeError("connect failed for pa'ss-w0rd-42")
except RuntimeError:
    get_logger("t").exception("failed")
"""


def test_secrets_are_masked_at_debug_in_every_logger_and_traceback():
    out = subprocess.run([sys.executable, "-c", SECRET_SCRIPT], capture_output=True, text=True, check=True,
                         env={"LOG_FORMAT": "json", "PATH": ""})
    assert "w0rd-42" not in out.stderr and "r3dis-secret" not in out.stderr, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    events = [line["event"] for line in lines]
    assert any(e.startswith("Starting KafkaAdminClient") and "'sasl_plain_password': \"***\"" in e for e in events)
    assert any(line["event"] == "failed" and "***" in line["exception"] for line in lines)
