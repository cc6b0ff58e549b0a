"""Settings: flags, OMNI_* env vars and a TOML file from one field list; TURN credentials;
log lines with call ids. No server, no engine: fast."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from omni.cli import build_parser, main
from omni.gateway.turn import ice_servers_for_client
from omni.logs import ContextFilter, JsonFormatter, TextFormatter, bind_response, bind_session
from omni.settings import Settings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test from no OMNI_* variables (the tests' own setup may set some)."""
    import os

    for name in list(os.environ):
        if name.startswith("OMNI_"):
            monkeypatch.delenv(name)


def serve_settings(*argv: str) -> Settings:
    """What `omni serve ARGV` would run with."""
    args = build_parser().parse_args(["serve", *argv])
    return Settings(_cli_settings_source=args.settings_source(parsed_args=args))  # type: ignore[call-arg]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- one field, three ways


def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "omni.toml",
        'max_sessions = 3\nvad_threshold = 0.25\nport = 9001\ndtype = "float16"\n',
    )
    monkeypatch.setenv("OMNI_CONFIG", str(config))
    monkeypatch.setenv("OMNI_VAD_THRESHOLD", "0.75")
    monkeypatch.setenv("OMNI_PORT", "9002")
    settings = serve_settings("--port", "9003")
    assert settings.port == 9003  # flag over env and file
    assert settings.vad_threshold == 0.75  # env over file
    assert settings.max_sessions == 3  # file over default
    assert settings.dtype == "float16"
    assert settings.max_session_seconds == 1800.0  # default


def test_config_file_by_flag_and_list_settings_every_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "omni.toml", 'api_keys = ["from-file"]\nlog_format = "json"\n')
    assert serve_settings("--config", str(config)).api_keys == ["from-file"]
    monkeypatch.setenv("OMNI_API_KEYS", "a, b")
    assert serve_settings("--config", str(config)).api_keys == ["a", "b"]
    assert serve_settings("--api-keys", "c,d").api_keys == ["c", "d"]
    servers = '[{"urls": "stun:stun.example.com:3478"}]'
    assert serve_settings("--ice-servers", servers).ice_servers == [
        {"urls": "stun:stun.example.com:3478"}
    ]


def test_root_log_level_flag_and_engine_settings() -> None:
    args = build_parser().parse_args(["--log-level", "debug", "serve", "--device", "cuda:1"])
    settings = Settings(_cli_settings_source=args.settings_source(parsed_args=args))  # type: ignore[call-arg]
    assert settings.log_level == "DEBUG"
    assert settings.device == "cuda:1"
    assert settings.talker_device is None  # "as device"
    assert serve_settings("--talker-device", "cuda:2").talker_device == "cuda:2"


def test_bad_config_files_are_clear_errors(tmp_path: Path) -> None:
    typo = write(tmp_path / "typo.toml", "max_sesions = 3\n")
    with pytest.raises(SettingsError, match="unknown settings max_sesions"):
        serve_settings("--config", str(typo))
    with pytest.raises(SettingsError, match="missing.toml"):
        serve_settings("--config", str(tmp_path / "missing.toml"))
    broken = write(tmp_path / "broken.toml", "max_sessions = \n")
    with pytest.raises(SettingsError, match="broken.toml"):
        serve_settings("--config", str(broken))


def test_serve_with_invalid_settings_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--dtype", "int3"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("omni serve: invalid settings") and "dtype" in error
    assert main(["serve", "--log-level", "loud"]) == 2
    assert "unknown logging level 'loud'" in capsys.readouterr().err


def test_every_setting_has_a_documented_flag_and_the_readme_table() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {option for action in serve._actions for option in action.option_strings}
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in flags
        assert field.description, f"{name} has no description"
    # the flags `omni serve` had before they were derived still work
    assert {"--model", "--host", "--port", "--device", "--talker-device", "--dtype"} <= flags
    assert settings_table() in README.read_text(), (
        "README's Configuration table is out of date: paste omni.settings.settings_table()"
    )


# -- TURN credentials


def test_ice_servers_carry_fresh_turn_rest_credentials() -> None:
    stun = {"urls": "stun:stun.example.com:3478"}
    settings = Settings(
        ice_servers=[stun],
        turn_urls=["turn:turn.example.com:3478?transport=udp"],
        turn_secret="s3cret",
        turn_credential_ttl_seconds=3600,
    )
    first, turn = ice_servers_for_client(settings, now=1_000_000)
    assert first == stun
    assert turn["urls"] == ["turn:turn.example.com:3478?transport=udp"]
    # coturn's use-auth-secret: username "<expiry>:<anything>", credential
    # base64(HMAC-SHA1(secret, username)), refused once the expiry time has passed
    expiry, _, label = str(turn["username"]).partition(":")
    assert int(expiry) == 1_003_600 and label
    expected = hmac.new(b"s3cret", str(turn["username"]).encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(expected).decode()
    later = ice_servers_for_client(settings, now=1_000_060)[1]
    assert later["username"] != turn["username"]  # minted per call, not once
    assert "s3cret" not in json.dumps(ice_servers_for_client(settings))
    assert ice_servers_for_client(Settings()) == []


def test_turn_settings_are_checked_together() -> None:
    with pytest.raises(ValidationError, match="turn_urls and turn_secret"):
        Settings(turn_urls=["turn:x:3478"])
    with pytest.raises(ValidationError, match="max_session_seconds"):
        Settings(turn_urls=["turn:x:3478"], turn_secret="s", turn_credential_ttl_seconds=600)


# -- log lines


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(f"test_settings.{type(formatter).__name__}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


async def test_json_lines_carry_the_session_and_response_of_the_task() -> None:
    logger, stream = capture(JsonFormatter())

    async def call(session_id: str) -> None:
        bind_session(session_id)  # as the gateway does where a call runs

        async def reply() -> None:  # a task the session starts inherits the session id
            with bind_response("resp_1"):
                logger.info("reply %s", "started", extra={"tokens": 3})
            logger.info("after the reply")

        await asyncio.create_task(reply())

    await asyncio.gather(call("sess_a"), call("sess_b"))
    logger.info("outside any call")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ids = [(x.get("session_id"), x.get("response_id"), x["message"]) for x in lines]
    assert sorted(ids[:4], key=str) == [
        ("sess_a", "resp_1", "reply started"),
        ("sess_a", None, "after the reply"),
        ("sess_b", "resp_1", "reply started"),
        ("sess_b", None, "after the reply"),
    ]
    assert ids[4] == (None, None, "outside any call")
    assert lines[0]["tokens"] == 3  # extra= fields are kept
    assert {"time", "level", "logger"} <= set(lines[0])


def test_text_lines_name_the_call() -> None:
    logger, stream = capture(TextFormatter())
    with bind_response("resp_9"):
        logger.info("hello")
    assert stream.getvalue().rstrip().endswith("hello [resp_9]")
