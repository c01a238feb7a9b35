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
