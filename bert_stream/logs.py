"""One structlog setup for every entry point.

JSON lines when stderr is not a terminal (what log shippers want), a coloured console when it is (what
people want). Context bound with ``structlog.contextvars.bind_contextvars`` is merged into every line, so a
unit of work (a batch, a training run) can bind its ids once. Logs go to stderr: the CLIs that print data
(``worker.tail``, the demo table) keep stdout for it.

Standard-library loggers (kafka-python, transformers, accelerate) are routed through the same renderer and
held at WARNING unless ``LOG_LEVEL=DEBUG``: kafka-python logs every connection at INFO.

Secrets never reach the output at any level: every value a settings object marks secret (and a URL's
password) is registered when the settings are built (:func:`register_secrets`), and each line, from
structlog or from a library's own logger (kafka-python logs its whole config at DEBUG), is masked last,
after the exception text is formatted. The price: a substring scan per registered secret per line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import structlog

_PROCESS: dict[str, object] = {}  # bind_process(): on every line of the process, from every thread

_SECRETS: set[str] = set()  # register_secrets(): masked in every line at every level
MASK = "***"

_CHATTY = ("kafka", "urllib3", "filelock", "transformers", "accelerate", "matplotlib", "PIL", "jieba")


def configure_logging(level: str | None = None, json_lines: bool | None = None) -> None:
    """Configure structlog and stdlib logging once per process. Safe to call again (tests do)."""
    level_name = (level or os.environ.get("LOG_LEVEL", "INFO")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level_name!r}")
    if json_lines is None:
        fmt = os.environ.get("LOG_FORMAT", "auto")
        json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())

    shared = [
        structlog.contextvars.merge_contextvars,
        _merge_process,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info if json_lines else (lambda _l, _m, e: e),
                _mask_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)


def register_secrets(*values: str | None) -> None:
    """Mask these values (and their escaped forms, as a repr() of a config dict shows them) wherever a log
    line would show them. Values under 4 characters are not masked: they would mask ordinary words."""
    for value in values:
        if value and len(value) >= 4:
            _SECRETS.update({value, repr(value)[1:-1], value.encode("unicode_escape").decode()})


def mask(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _mask_secrets(_logger, _method, event_dict):
    if not _SECRETS:
        return event_dict
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = mask(value)
        elif not isinstance(value, (int, float, bool, type(None))):
            shown = str(value)
            masked = mask(shown)
            if masked != shown:
                event_dict[key] = masked
    return event_dict


def bind_process(**values: object) -> None:
    """Context for every line this process logs, whatever the thread (contextvars are per thread: a new
    thread starts without them); e.g. which of a worker's several processes this is."""
    _PROCESS.update(values)


def _merge_process(_logger, _method, event_dict):
    for key, value in _PROCESS.items():
        event_dict.setdefault(key, value)
    return event_dict


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


@contextlib.contextmanager
def quieted(*logger_names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise standard-library loggers to ``level`` for a block (a library's expected, noisy warning), then
    put their levels back."""
    loggers = [logging.getLogger(name) for name in logger_names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)
