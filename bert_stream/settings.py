"""Frozen settings objects built from CLI flags and environment variables.

Each program declares one frozen dataclass whose fields are made with :func:`setting`: a default, a help
text that states the trade-off, and the environment variable that can set it. :func:`parse_settings` turns
the dataclass into an argparse parser (flag ``--field-name``), takes each default from the environment when
the variable is set, and builds the object. Precedence: flag > environment > default.

Nested dataclass fields (e.g. the Kafka connection inside the worker's settings) are flattened into the
same flag namespace, so a field name must be unique across a program's settings.

Bad input never produces a traceback: an unknown flag, a value that does not parse, or an invariant that
``__post_init__`` rejects prints one line ``prog: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    env: str | None = None,
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    secret: bool = False,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A settings field. ``env`` names the variable that sets it (None: flag only); ``secret`` hides it
    from ``repr`` and from :func:`public_view` (passwords, SASL credentials)."""
    metadata = {"help": help, "env": env, "choices": choices, "parse": parse, "secret": secret}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, repr=not secret)
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


class SettingsError(ValueError):
    """A setting that does not parse or violates an invariant."""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any, meta: Mapping[str, Any]) -> Callable[[str], Any]:
    if meta.get("parse"):
        return meta["parse"]
    base, optional = _unwrap_optional(tp)
    if base is bool:
        convert: Callable[[str], Any] = parse_bool
    elif base in (int, float, str, Path):
        convert = base
    elif typing.get_origin(base) is tuple:
        (item,) = {a for a in typing.get_args(base) if a is not Ellipsis}
        convert = lambda s: tuple(item(p.strip()) for p in s.split(",") if p.strip())  # noqa: E731
    else:
        raise TypeError(f"no converter for settings type {tp!r}")
    if not optional:
        return convert
    return lambda s: None if s.strip().lower() in ("", "none") else convert(s)


def iter_settings(cls: type) -> Iterator[tuple[dataclasses.Field, Any, tuple[str, ...]]]:
    """Yield (field, resolved type, path) for every leaf setting, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for sub, sub_tp, path in iter_settings(tp):
                yield sub, sub_tp, (f.name, *path)
        else:
            yield f, tp, (f.name,)


def env_vars(cls: type) -> dict[str, str]:
    """Map each environment variable a settings class reads to its field name."""
    return {f.metadata["env"]: f.name for f, _, _ in iter_settings(cls) if f.metadata.get("env")}


def required_env_vars(cls: type) -> set[str]:
    """Environment variables of settings that have no default."""
    out = set()
    for f, _, _ in iter_settings(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.metadata.get("env"):
            out.add(f.metadata["env"])
    return out


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage + message; we print one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(empty)"
    return "(unset)" if value is None else str(value)


def build_parser(cls: type, *, prog: str, description: str | None, env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, tp, path in iter_settings(cls):
        meta = f.metadata
        convert = _converter(tp, meta)
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        env_name = meta.get("env")
        if env_name and env.get(env_name) is not None:
            try:
                default = convert(env[env_name])
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                parser.error(f"environment variable {env_name}={env[env_name]!r} is invalid: {exc}")
            if meta.get("choices") and default not in meta["choices"]:  # argparse checks only the flag's
                parser.error(f"environment variable {env_name}={env[env_name]!r} is invalid: choose from "
                             + ", ".join(map(str, meta["choices"])))
        help_text = meta["help"]
        where = f"env {env_name}; " if env_name else ""
        shown = "***" if meta.get("secret") and default not in (None, "", dataclasses.MISSING) else None
        if default is dataclasses.MISSING:
            help_text += f" [{where}required]"
        else:
            help_text += f" [{where}default: {shown or _default_text(default)}]"
        kwargs: dict[str, Any] = {"dest": "__".join(path), "help": help_text.replace("%", "%%")}
        if _unwrap_optional(tp)[0] is bool and not meta.get("parse"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = convert
            kwargs["metavar"] = f.name.upper()
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(flag, **kwargs)
    return parser


def _build(cls: type[T], values: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values, path)
        else:
            kwargs[f.name] = values["__".join(path)]
    built = cls(**kwargs)
    if not prefix:  # whatever logs from now on masks its secrets
        from bert_stream.logs import register_secrets

        register_secrets(*secret_values(built))
    return built


def parse_settings(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str | None = None,
    env: Mapping[str, str] | None = None,
) -> T:
    """Parse flags and environment into ``cls``; on any error print one line and exit 2."""
    env = os.environ if env is None else env
    parser = build_parser(cls, prog=prog, description=description, env=env)
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _build(cls, vars(namespace))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def from_env(cls: type[T], env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build settings from the environment and defaults alone (no argv), with keyword overrides.
    For library use and tests; raises SettingsError instead of exiting."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f, tp, path in iter_settings(cls):
        key = "__".join(path)
        if f.name in overrides:
            values[key] = overrides.pop(f.name)
            continue
        env_name = f.metadata.get("env")
        if env_name and env.get(env_name) is not None:
            try:
                values[key] = _converter(tp, f.metadata)(env[env_name])
            except (ValueError, TypeError) as exc:
                raise SettingsError(f"environment variable {env_name} is invalid: {exc}") from None
        elif f.default is not dataclasses.MISSING:
            values[key] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[key] = f.default_factory()
        else:
            raise SettingsError(f"setting {f.name} is required")
    if overrides:
        raise SettingsError(f"unknown settings: {', '.join(sorted(overrides))}")
    try:
        return _build(cls, values)
    except (ValueError, TypeError) as exc:
        raise SettingsError(str(exc)) from None


def _leaves(obj: Any) -> Iterator[tuple[dataclasses.Field, Any]]:
    """(field, value) of every leaf setting of a settings object (:func:`iter_settings`' order)."""
    for f, _tp, path in iter_settings(type(obj)):
        yield f, functools.reduce(getattr, path, obj)


def _has_url_credentials(value: Any) -> bool:
    return isinstance(value, str) and "://" in value and "@" in value


def secret_values(obj: Any) -> list[str]:
    """Every secret a settings object holds: the fields marked secret, and the passwords in URLs."""
    from urllib.parse import urlsplit

    out = []
    for f, value in _leaves(obj):
        if f.metadata.get("secret") and isinstance(value, str):
            out.append(value)
        elif _has_url_credentials(value):
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            if password:
                out.append(password)
    return out


def public_view(obj: Any) -> dict[str, Any]:
    """The settings as a flat dict for logging, with secrets masked."""
    out: dict[str, Any] = {}
    for f, value in _leaves(obj):
        if f.metadata.get("secret"):
            out[f.name] = "***" if value else value
        elif _has_url_credentials(value):
            out[f.name] = mask_url_password(value)  # redis://:password@host, rediss://user:password@host
        else:
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def mask_url_password(url: str) -> str:
    """``scheme://user:***@host/...``: a URL's password replaced, everything else kept for the logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def require(condition: bool, message: str) -> None:
    """Invariant check for ``__post_init__``: raises SettingsError(message) when ``condition`` is false."""
    if not condition:
        raise SettingsError(message)
