"""The settings helper: flags beat env vars beat defaults; bad input is one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from bert_stream.kafka import KafkaSettings
from bert_stream.settings import SettingsError, env_vars, from_env, parse_settings, public_view, require, setting


@dataclasses.dataclass(frozen=True)
class Demo:
    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)
    batch: int = setting(8, env="DEMO_BATCH", help="items per batch")
    ratio: float = setting(0.5, env="DEMO_RATIO", help="a ratio")
    name: str | None = setting(None, env="DEMO_NAME", help="optional name")
    flag: bool = setting(False, env="DEMO_FLAG", help="a switch")
    tags: tuple[str, ...] = setting((), env="DEMO_TAGS", help="comma list")

    def __post_init__(self):
        require(self.batch >= 1, "batch must be at least 1")


def test_precedence_flag_env_default():
    env = {"DEMO_BATCH": "16", "DEMO_FLAG": "yes", "DEMO_TAGS": "a, b", "KAFKA_BOOTSTRAP_SERVERS": "k:1"}
    s = parse_settings(Demo, [], prog="demo", env=env)
    assert (s.batch, s.flag, s.tags, s.kafka.bootstrap_servers, s.name) == (16, True, ("a", "b"), "k:1", None)
    s = parse_settings(Demo, ["--batch", "32", "--no-flag", "--name", "x"], prog="demo", env=env)
    assert (s.batch, s.flag, s.name) == (32, False, "x")


def test_settings_are_frozen():
    s = parse_settings(Demo, [], prog="demo", env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        (["--batch", "many"], {}, "invalid int value"),
        (["--batch", "0"], {}, "batch must be at least 1"),
        ([], {"DEMO_RATIO": "half"}, "DEMO_RATIO"),
        ([], {"DEMO_FLAG": "maybe"}, "DEMO_FLAG"),
        (["--nope"], {}, "unrecognized arguments"),
        ([], {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs sasl_mechanism"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, env, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(Demo, argv, prog="demo", env=env)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_from_env_raises_instead_of_exiting():
    assert from_env(Demo, env={}, batch=4).batch == 4
    with pytest.raises(SettingsError, match="DEMO_BATCH"):
        from_env(Demo, env={"DEMO_BATCH": "x"})
    with pytest.raises(SettingsError, match="unknown settings"):
        from_env(Demo, env={}, typo=1)


def test_secrets_are_masked_everywhere():
    s = from_env(Demo, env={"KAFKA_SASL_PASSWORD": "hunter2", "KAFKA_SASL_USERNAME": "u"})
    assert "hunter2" not in repr(s)
    assert public_view(s)["sasl_password"] == "***"
    assert "hunter2" not in json.dumps(public_view(s))


def test_env_vars_lists_nested_settings():
    names = env_vars(Demo)
    assert {"DEMO_BATCH", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SASL_PASSWORD"} <= set(names)


def test_help_shows_env_and_defaults():
    out = subprocess.run([sys.executable, "-c", "import tests.bert_stream.test_settings as t, bert_stream.settings as s;"
                          "s.parse_settings(t.Demo, ['--help'], prog='demo')"], capture_output=True, text=True)
    assert out.returncode == 0 and "env DEMO_BATCH; default: 8" in out.stdout


def test_kafka_client_config_carries_security():
    s = KafkaSettings(bootstrap_servers="a:1,b:2", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="u", sasl_password="p", ssl_cafile="/ca.pem")
    config = s.client_config()
    assert config["bootstrap_servers"] == ["a:1", "b:2"]
    assert (config["sasl_mechanism"], config["sasl_plain_username"], config["ssl_cafile"]) == ("SCRAM-SHA-512", "u",
                                                                                              "/ca.pem")


def test_passwords_in_urls_are_masked():
    @dataclasses.dataclass(frozen=True)
    class WithUrl:
        url: str | None = setting(None, env="X_URL", help="a url")

    view = public_view(from_env(WithUrl, env={"X_URL": "redis://:s3cret@cache:6379/0"}))
    assert view["url"] == "redis://:***@cache:6379/0"
    assert public_view(from_env(WithUrl, env={"X_URL": "rediss://u:pw@h/1"}))["url"] == "rediss://u:***@h/1"
    assert public_view(from_env(WithUrl, env={"X_URL": "redis://cache:6379/0"}))["url"] == "redis://cache:6379/0"
