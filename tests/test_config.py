"""msg.config: defaults, the four sources and their order, and validation.

Every test passes ``env=`` explicitly, so nothing here reads or changes the real
environment.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Final

import pytest

from msg.config import _KINDS, _PARSERS, DEFAULT_PORT, FIELD_NAMES, Config, load_config
from msg.errors import ConfigError, MsgError
from msg.persistence import FsyncPolicy, Retention
from msg.protocol.codec import DEFAULT_MAX_LINE_BYTES

MiB: Final = 1024 * 1024


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "msg.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Defaults


def test_documented_defaults() -> None:
    config = Config()
    assert config.port == DEFAULT_PORT == 8888
    assert config.host == "localhost"
    assert config.data_dir == Path(".msg_data")
    assert config.fsync is FsyncPolicy.ALWAYS
    assert config.max_message_bytes == MiB
    assert config.storage == "file"
    assert config.log_level == "INFO"
    assert config.max_queue_messages is None
    assert config.ack_timeout == 30 * 60.0


def test_message_limit_matches_the_codec_default() -> None:
    assert Config().max_message_bytes == DEFAULT_MAX_LINE_BYTES


def test_nothing_given_is_the_defaults() -> None:
    assert load_config(env={}) == Config()
    assert load_config(dict.fromkeys(FIELD_NAMES), env={}) == Config()


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_retention_view() -> None:
    config = Config(retention_messages=5, retention_bytes=None, retention_age=60.0)
    assert config.retention == Retention(5, None, 60.0)


def test_every_field_has_a_parser_and_a_type() -> None:
    assert set(FIELD_NAMES) == set(_PARSERS) == set(_KINDS)


# ---------------------------------------------------------------------------
# Precedence: defaults < TOML file < MSG_* environment < flags

LAYERS: Final = [
    pytest.param(False, False, False, DEFAULT_PORT, id="defaults"),
    pytest.param(True, False, False, 1001, id="file"),
    pytest.param(False, True, False, 1002, id="env"),
    pytest.param(False, False, True, 1003, id="flag"),
    pytest.param(True, True, False, 1002, id="env-over-file"),
    pytest.param(True, False, True, 1003, id="flag-over-file"),
    pytest.param(False, True, True, 1003, id="flag-over-env"),
    pytest.param(True, True, True, 1003, id="flag-over-all"),
]


@pytest.mark.parametrize(("file", "env", "flag", "port"), LAYERS)
def test_precedence(tmp_path: Path, file: bool, env: bool, flag: bool, port: int) -> None:
    path = write_toml(tmp_path, 'port = 1001\nhost = "from-file"\n') if file else None
    config = load_config(
        {"port": 1003 if flag else None},
        env={"MSG_PORT": "1002"} if env else {},
        config_file=path,
    )
    assert config.port == port
    # Settings one layer does not mention come from the layer below.
    assert config.host == ("from-file" if file else "localhost")


def test_layers_merge_per_setting(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'host = "h"\nport = 1\nstorage = "memory"\nfsync = "never"\n')
    config = load_config(
        {"port": 3, "storage": None},
        env={"MSG_PORT": "2", "MSG_FSYNC": "everysec", "MSG_LOG_LEVEL": "debug"},
        config_file=path,
    )
    assert (config.host, config.port, config.storage) == ("h", 3, "memory")
    assert (config.fsync, config.log_level) == (FsyncPolicy.EVERYSEC, "DEBUG")


def test_msg_config_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 1001\n")
    assert load_config(env={"MSG_CONFIG": str(path)}).port == 1001


def test_config_file_argument_beats_msg_config(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 1001\n")
    other = tmp_path / "other.toml"
    other.write_text("port = 2002\n", encoding="utf-8")
    assert load_config(env={"MSG_CONFIG": str(path)}, config_file=other).port == 2002


def test_empty_msg_config_means_no_file() -> None:
    assert load_config(env={"MSG_CONFIG": ""}) == Config()


def test_other_msg_variables_are_not_settings() -> None:
    assert load_config(env={"MSG_PURE_JSON": "1", "MSG_BOGUS": "x", "PORT": "1"}) == Config()


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSG_PORT", "4321")
    monkeypatch.delenv("MSG_CONFIG", raising=False)
    assert load_config().port == 4321


# ---------------------------------------------------------------------------
# Reading text (environment variables, and strings in the TOML file)

TEXT: Final = [
    pytest.param("host", "0.0.0.0", "0.0.0.0", id="host"),
    pytest.param("port", "9000", 9000, id="port"),
    pytest.param("port", "0", 0, id="port-zero"),
    pytest.param("data_dir", "/var/lib/msg", Path("/var/lib/msg"), id="data-dir"),
    pytest.param("storage", "MEMORY", "memory", id="storage-any-case"),
    pytest.param("fsync", "EverySec", FsyncPolicy.EVERYSEC, id="fsync-any-case"),
    pytest.param("log_level", "warning", "WARNING", id="log-level-any-case"),
    pytest.param("max_message_bytes", "64KiB", 64 * 1024, id="size-kib"),
    pytest.param("max_message_bytes", "16MiB", 16 * MiB, id="size-mib"),
    pytest.param("max_pending_bytes", "1GiB", 1024**3, id="size-gib"),
    pytest.param("max_message_bytes", "1024", 1024, id="size-plain"),
    pytest.param("max_message_bytes", "64kb", 64 * 1024, id="size-kb-is-kib"),
    pytest.param("max_message_bytes", "64K", 64 * 1024, id="size-k"),
    pytest.param("max_message_bytes", "1.5MiB", 3 * MiB // 2, id="size-fraction"),
    pytest.param("max_message_bytes", " 2 MiB ", 2 * MiB, id="size-spaces"),
    pytest.param("segment_bytes", "4096", 4096, id="segment-bytes"),
    pytest.param("min_free_bytes", "64MiB", 64 * MiB, id="min-free-bytes"),
    pytest.param("min_free_bytes", "0", 0, id="min-free-bytes-off"),
    pytest.param("max_connections", "10", 10, id="max-connections"),
    pytest.param("max_inflight_requests", "7", 7, id="max-inflight"),
    pytest.param("max_queue_messages", "1000", 1000, id="optional-int"),
    pytest.param("max_queue_messages", "none", None, id="optional-none"),
    pytest.param("max_queue_messages", "None", None, id="optional-none-any-case"),
    pytest.param("max_queue_messages", "off", None, id="optional-off"),
    pytest.param("max_queue_messages", "unlimited", None, id="optional-unlimited"),
    pytest.param("max_queue_messages", "", None, id="optional-empty"),
    pytest.param("max_deliveries", "5", 5, id="delivery-limit"),
    pytest.param("max_deliveries", "0", 0, id="int-zero-means-no-limit"),
    pytest.param("ack_timeout", "2.5", 2.5, id="seconds"),
    pytest.param("ack_timeout", "none", None, id="seconds-none"),
    pytest.param("retention_messages", "5", 5, id="retention-messages"),
    pytest.param("retention_bytes", "1MiB", MiB, id="retention-bytes-size"),
    pytest.param("retention_bytes", "none", None, id="retention-bytes-none"),
    pytest.param("retention_age", "3600", 3600.0, id="retention-age"),
    pytest.param("shutdown_timeout", "0.5", 0.5, id="shutdown-timeout"),
]


@pytest.mark.parametrize(("name", "text", "value"), TEXT)
def test_env_text(name: str, text: str, value: object) -> None:
    config = load_config(env={f"MSG_{name.upper()}": text})
    assert getattr(config, name) == value
    assert type(getattr(config, name)) is type(value)


@pytest.mark.parametrize(("name", "text", "value"), TEXT)
def test_toml_string(tmp_path: Path, name: str, text: str, value: object) -> None:
    path = write_toml(tmp_path, f"{name} = {text!r}\n".replace("'", '"'))
    assert getattr(load_config(env={}, config_file=path), name) == value


def test_every_field_can_come_from_the_environment() -> None:
    covered = {case.values[0] for case in TEXT}
    assert covered == set(FIELD_NAMES)


BAD_TEXT: Final = [
    pytest.param("port", "eighty", id="port-word"),
    pytest.param("port", "80.0", id="port-float"),
    pytest.param("port", "", id="port-empty"),
    pytest.param("fsync", "sometimes", id="fsync-unknown"),
    pytest.param("max_message_bytes", "lots", id="size-word"),
    pytest.param("max_message_bytes", "1.5", id="size-fraction-of-a-byte"),
    pytest.param("max_message_bytes", "KiB", id="size-unit-only"),
    pytest.param("max_message_bytes", "", id="size-empty"),
    pytest.param("max_message_bytes", "1e3", id="size-exponent"),
    pytest.param("max_message_bytes", "infk", id="size-infinite"),
    pytest.param("max_message_bytes", "nanM", id="size-nan"),
    pytest.param("max_message_bytes", "1TiB", id="size-unknown-unit"),
    pytest.param("max_queue_messages", "many", id="optional-int-word"),
    pytest.param("ack_timeout", "soon", id="seconds-word"),
]


@pytest.mark.parametrize(("name", "text"), BAD_TEXT)
def test_env_text_rejected(name: str, text: str) -> None:
    variable = f"MSG_{name.upper()}"
    with pytest.raises(ConfigError, match=f"environment variable {variable}: cannot read"):
        load_config(env={variable: text})


# ---------------------------------------------------------------------------
# Validation: Config checks every value itself, whoever builds it.

INVALID: Final = [
    # types
    pytest.param("host", 5, "host must be a string", id="host-int"),
    pytest.param("host", None, "host must be a string", id="host-none"),
    pytest.param("port", "80", "port must be an integer", id="port-str"),
    pytest.param("port", True, "port must be an integer", id="port-bool"),
    pytest.param("port", 80.0, "port must be an integer", id="port-float"),
    pytest.param("port", None, "port must be an integer", id="port-none"),
    pytest.param("data_dir", 5, "data_dir must be a path", id="data-dir-int"),
    pytest.param("data_dir", None, "data_dir must be a path", id="data-dir-none"),
    pytest.param("storage", 1, "storage must be a string", id="storage-int"),
    pytest.param("fsync", True, "fsync must be an fsync policy", id="fsync-bool"),
    pytest.param("fsync", "sometimes", "fsync must be one of always", id="fsync-unknown"),
    pytest.param("log_level", 10, "log_level must be a string", id="log-level-int"),
    pytest.param("max_message_bytes", "1MiB", "max_message_bytes must be an", id="size-str"),
    pytest.param("max_message_bytes", 1.5e6, "max_message_bytes must be an", id="size-float"),
    pytest.param("max_connections", True, "max_connections must be an", id="count-bool"),
    pytest.param("max_queue_messages", 1.0, "max_queue_messages must be an", id="opt-float"),
    pytest.param("max_queue_messages", False, "max_queue_messages must be an", id="opt-bool"),
    pytest.param("ack_timeout", "30", "ack_timeout must be a number of seconds", id="secs-str"),
    pytest.param("ack_timeout", True, "ack_timeout must be a number", id="seconds-bool"),
    pytest.param("shutdown_timeout", None, "shutdown_timeout must be a number", id="secs-none"),
    pytest.param("max_deliveries", None, "max_deliveries must be an", id="limit-none"),
    # values
    pytest.param("max_deliveries", -1, "max_deliveries must be at least 0", id="limit-negative"),
    pytest.param("host", "", "host must not be empty", id="host-empty"),
    pytest.param("port", -1, "port must be 0-65535", id="port-negative"),
    pytest.param("port", 65536, "port must be 0-65535", id="port-65536"),
    pytest.param("port", 70000, "port must be 0-65535, not 70000", id="port-70000"),
    pytest.param("storage", "disk", "storage must be one of file, memory", id="storage-unknown"),
    pytest.param("log_level", "info", "log_level must be one of", id="log-level-lowercase"),
    pytest.param("log_level", "TRACE", "log_level must be one of", id="log-level-unknown"),
    pytest.param("max_message_bytes", 63, "max_message_bytes must be at least 64", id="size"),
    pytest.param("max_message_bytes", 0, "max_message_bytes must be at least", id="size-0"),
    pytest.param("max_connections", 0, "max_connections must be at least 1", id="conns-0"),
    pytest.param("max_pending_bytes", 65535, "max_pending_bytes must be at least", id="pend"),
    pytest.param("max_inflight_requests", 0, "max_inflight_requests must be at", id="inflight"),
    pytest.param("segment_bytes", 4095, "segment_bytes must be at least 4096", id="segment"),
    pytest.param("max_queue_messages", 0, "max_queue_messages must be at least 1", id="queue"),
    pytest.param("retention_messages", -5, "retention_messages must be at least", id="ret-msgs"),
    pytest.param("retention_bytes", 0, "retention_bytes must be at least", id="ret-bytes"),
    pytest.param("ack_timeout", 0, "ack_timeout must be a positive", id="ack-timeout-zero"),
    pytest.param("ack_timeout", -1.0, "ack_timeout must be a positive", id="ack-negative"),
    pytest.param("ack_timeout", math.nan, "ack_timeout must be a positive", id="ack-nan"),
    pytest.param("ack_timeout", math.inf, "ack_timeout must be a positive, finite", id="inf"),
    pytest.param("retention_age", 0.0, "retention_age must be a positive", id="age-zero"),
    pytest.param("shutdown_timeout", -0.1, "shutdown_timeout must be a positive", id="shutdown"),
]


@pytest.mark.parametrize(("name", "value", "message"), INVALID)
def test_config_rejects(name: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config(**{name: value})
    assert message in str(caught.value)
    assert isinstance(caught.value, MsgError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("name", "value", "message"), INVALID)
def test_replace_is_validated_too(name: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=name):
        dataclasses.replace(Config(), **{name: value})


# A flag of None means "not given", so those cases do not apply to flags.
@pytest.mark.parametrize(
    ("name", "value", "message"), [case for case in INVALID if case.values[1] is not None]
)
def test_flags_are_validated(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({name: value}, env={})


VALID: Final = [
    pytest.param("port", 0, 0, id="port-zero"),
    pytest.param("port", 65535, 65535, id="port-max"),
    pytest.param("max_message_bytes", 64, 64, id="smallest-message-limit"),
    pytest.param("max_pending_bytes", 64 * 1024, 64 * 1024, id="smallest-pending"),
    pytest.param("segment_bytes", 4096, 4096, id="smallest-segment"),
    pytest.param("max_queue_messages", 1, 1, id="one-message-queue"),
    pytest.param("retention_messages", None, None, id="no-retention-limit"),
    pytest.param("ack_timeout", None, None, id="wait-forever"),
    pytest.param("ack_timeout", 5, 5.0, id="int-seconds-become-float"),
    pytest.param("shutdown_timeout", 1e-3, 1e-3, id="tiny-timeout"),
    pytest.param("data_dir", "relative/dir", Path("relative/dir"), id="str-path-becomes-path"),
    pytest.param("data_dir", Path("/abs"), Path("/abs"), id="path"),
    pytest.param("fsync", "never", FsyncPolicy.NEVER, id="fsync-name-becomes-policy"),
    pytest.param("fsync", FsyncPolicy.EVERYSEC, FsyncPolicy.EVERYSEC, id="fsync-policy"),
    pytest.param("log_level", "CRITICAL", "CRITICAL", id="log-level"),
    pytest.param("host", "::1", "::1", id="ipv6-host"),
]


@pytest.mark.parametrize(("name", "value", "stored"), VALID)
def test_config_accepts(name: str, value: Any, stored: object) -> None:
    got = getattr(Config(**{name: value}), name)
    assert got == stored
    assert type(got) is type(stored)


def test_unknown_flag_is_rejected() -> None:
    with pytest.raises(ConfigError, match="max_message_byte"):
        load_config({"max_message_byte": 10}, env={})


# ---------------------------------------------------------------------------
# The TOML file


def test_toml_native_types(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'host = "0.0.0.0"\n'
        "port = 9000\n"
        'data_dir = "/srv/msg"\n'
        'fsync = "never"\n'
        "max-message-bytes = 65536\n"
        'max_pending_bytes = "1MiB"\n'
        "ack_timeout = 60\n"
        'max_queue_messages = "none"\n'
        "retention_age = 1.5\n",
    )
    config = load_config(env={}, config_file=path)
    assert config == Config(
        host="0.0.0.0",
        port=9000,
        data_dir=Path("/srv/msg"),
        fsync=FsyncPolicy.NEVER,
        max_message_bytes=65536,
        max_pending_bytes=MiB,
        ack_timeout=60.0,
        max_queue_messages=None,
        retention_age=1.5,
    )
    assert type(config.ack_timeout) is float


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("bogus = 1\n", "unknown setting 'bogus'", id="unknown-key"),
        pytest.param("Port = 1\n", "unknown setting 'Port'", id="keys-are-lowercase"),
        pytest.param("[broker]\nport = 1\n", "unknown setting 'broker'", id="table"),
        pytest.param("port = true\n", "port must be an integer", id="port-bool"),
        pytest.param("port = 80.5\n", "port must be an integer", id="port-float"),
        pytest.param("port = [80]\n", "port must be an integer", id="port-array"),
        pytest.param('port = "eighty"\n', "cannot read 'eighty' as port", id="port-word"),
        pytest.param("port = 99999\n", "port must be 0-65535", id="port-range"),
        pytest.param("host = 5\n", "host must be a string", id="host-int"),
        pytest.param("data_dir = 5\n", "data_dir must be a path", id="data-dir-int"),
        pytest.param('data_dir = ["a"]\n', "data_dir must be a path", id="data-dir-array"),
        pytest.param("fsync = true\n", "fsync must be an fsync policy", id="fsync-bool"),
        pytest.param('fsync = "sometimes"\n', "cannot read 'sometimes' as fsync", id="fsync"),
        pytest.param("max_message_bytes = 1.5\n", "max_message_bytes must be an", id="float"),
        pytest.param("ack_timeout = false\n", "ack_timeout must be a number", id="secs-bool"),
        pytest.param("ack_timeout = inf\n", "ack_timeout must be a positive, finite", id="inf"),
        pytest.param("ack_timeout = nan\n", "ack_timeout must be a positive", id="nan"),
        pytest.param("shutdown_timeout = 1979-05-27\n", "shutdown_timeout must be", id="date"),
    ],
)
def test_toml_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, config_file=path)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"port = \n", id="missing-value"),
        pytest.param(b"port = 1\nport = 2\n", id="duplicate-key"),
        pytest.param(b"port: 1\n", id="yaml"),
        pytest.param(b'host = "\xff"\n', id="invalid-utf8"),
    ],
)
def test_invalid_toml(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "msg.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(env={}, config_file=path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        load_config(env={}, config_file=tmp_path / "nope.toml")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env={}, config_file=tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 1\n")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError, match="cannot read config file"):
            load_config(env={}, config_file=path)
    finally:
        path.chmod(0o600)


def test_missing_file_named_by_msg_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env={"MSG_CONFIG": str(tmp_path / "nope.toml")})


def test_settings_keep_their_meaning(tmp_path: Path) -> None:
    """Every field can be given in every layer, with the same result."""
    values: dict[str, Any] = {
        "port": 1234,
        "max_message_bytes": 4096,
        "ack_timeout": 2.0,
        "max_queue_messages": 10,
    }
    toml = "".join(f"{name} = {value}\n" for name, value in values.items())
    from_file = load_config(env={}, config_file=write_toml(tmp_path, toml))
    from_env = load_config(env={f"MSG_{k.upper()}": str(v) for k, v in values.items()})
    from_flags = load_config(values, env={})
    assert from_file == from_env == from_flags == Config(**values)
