"""The broker's configuration: one frozen, validated value.

Settings come from four places; each overrides the one before:

1. the defaults below (each says why it is what it is);
2. a TOML file given with ``--config`` (or ``MSG_CONFIG``), keys named as the fields;
3. ``MSG_<FIELD>`` environment variables, e.g. ``MSG_PORT=9000``;
4. command-line flags, e.g. ``--port 9000``.

:func:`load_config` merges them; :class:`Config` checks every value when it is built,
so a bad setting stops the broker at start-up with a message naming the setting and
where it came from.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from msg.errors import ConfigError
from msg.persistence import FsyncPolicy, Retention

__all__ = ["DEFAULT_PORT", "Config", "StorageKind", "load_config", "parse_size"]

DEFAULT_PORT: Final = 8888
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_STORAGE_KINDS: Final = ("file", "memory")
StorageKind = str


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the broker can be told. Built once; never changed after."""

    host: str = "localhost"
    """Interface to listen on. The seed's examples connect to localhost."""
    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free one (the log says which)."""
    data_dir: Path = Path(".msg_data")
    """Where the logs live; relative to the working directory, as in the seed."""
    storage: StorageKind = "file"
    """``file`` (durable logs in data_dir) or ``memory`` (nothing survives a restart)."""
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS
    """An ack means the message is on disk; group commit keeps that affordable."""
    log_level: str = "INFO"
    max_message_bytes: int = 1024 * 1024
    """Longest request line; NATS's default max_payload is 1 MiB too."""
    max_connections: int = 65_536
    """NATS's default; each idle connection costs a few kilobytes."""
    max_pending_bytes: int = 64 * 1024 * 1024
    """Unsent bytes a subscriber may fall behind by before it is disconnected as a slow
    consumer. NATS allows 64 MiB per client as well."""
    max_inflight_requests: int = 65_536
    """Requests of one connection waiting on storage before the broker stops reading
    from it, so a fast publisher cannot queue unbounded work."""
    max_queue_messages: int | None = None
    """Messages a queue may hold before publishes get ``queue_full``; None: no limit
    (RabbitMQ's default), bounded only by the disk."""
    ack_timeout: float | None = 30 * 60.0
    """A delivery not settled this long is given to another consumer (RabbitMQ's
    consumer_timeout default is 30 minutes). None: wait forever."""
    max_deliveries: int = 20
    """Deliveries of a queue message to manual-ack consumers before it is dead-lettered
    instead of delivered again (a poison message that crashes every consumer would
    otherwise loop forever). RabbitMQ 4's quorum queues default to 20 as well; NATS
    calls it MaxDeliver. 0: no limit."""
    retention_messages: int | None = 1_000_000
    """Messages kept per topic log (for durable subscribers and replay)."""
    retention_bytes: int | None = 1024**3
    """Bytes kept per topic log."""
    retention_age: float | None = 7 * 24 * 3600.0
    """Seconds a topic message is kept; Kafka's default of seven days."""
    segment_bytes: int = 16 * 1024 * 1024
    """Size at which a log starts a new segment file; the unit of reclaiming space."""
    min_free_bytes: int = 64 * 1024 * 1024
    """Publishes get ``storage_full`` while the data directory's file system has less
    than this free, before the disk is actually full, so consumers' acks and compaction
    (which writes before it deletes) still have room. RabbitMQ's disk_free_limit
    defaults to 50 MB; 64 MiB is four segments, and the acks of a million messages
    (about 40 bytes each). 0 turns the check off."""
    shutdown_timeout: float = 10.0
    """Seconds a graceful shutdown waits for storage and clients before giving up."""

    def __post_init__(self) -> None:
        # Types first: a TOML file or a caller can hand over any value, and a string port
        # or a boolean size would otherwise pass (or break) the range checks below.
        for name, kind in _KINDS.items():
            value = _checked_type(name, kind, getattr(self, name))
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)  # normalised: str -> Path, int -> float
        if not self.host:
            raise ConfigError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, not {self.port}")
        if self.storage not in _STORAGE_KINDS:
            raise ConfigError(f"storage must be one of {', '.join(_STORAGE_KINDS)}")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        _positive("max_message_bytes", self.max_message_bytes, minimum=64)
        _positive("max_connections", self.max_connections)
        _positive("max_pending_bytes", self.max_pending_bytes, minimum=64 * 1024)
        _positive("max_inflight_requests", self.max_inflight_requests)
        _positive("segment_bytes", self.segment_bytes, minimum=4096)
        _positive("min_free_bytes", self.min_free_bytes, minimum=0)
        _positive("max_deliveries", self.max_deliveries, minimum=0)
        for name in ("max_queue_messages", "retention_messages", "retention_bytes"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        for name in ("ack_timeout", "retention_age", "shutdown_timeout"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive, finite number of seconds")

    @property
    def retention(self) -> Retention:
        """The topic retention limits as the store takes them."""
        return Retention(self.retention_messages, self.retention_bytes, self.retention_age)


# The type of every field, checked before the values are. Kinds: "str", "int",
# "seconds" (a float; an int is converted), "path" (a str is converted), "fsync" (a
# policy or its name); a trailing "?" also allows None.
_KINDS: Final[Mapping[str, str]] = {
    "host": "str",
    "port": "int",
    "data_dir": "path",
    "storage": "str",
    "fsync": "fsync",
    "log_level": "str",
    "max_message_bytes": "int",
    "max_connections": "int",
    "max_pending_bytes": "int",
    "max_inflight_requests": "int",
    "max_queue_messages": "int?",
    "ack_timeout": "seconds?",
    "max_deliveries": "int",
    "retention_messages": "int?",
    "retention_bytes": "int?",
    "retention_age": "seconds?",
    "segment_bytes": "int",
    "min_free_bytes": "int",
    "shutdown_timeout": "seconds",
}


def _checked_type(name: str, kind: str, value: object) -> Any:
    """Return ``value`` (normalised) if it has the type ``kind`` names; else raise."""
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    # bool is an int subclass, but True is no port number or size.
    if not isinstance(value, bool):
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "int" and isinstance(value, int):
            return value
        if kind == "seconds" and isinstance(value, int | float):
            return float(value)
        if kind == "path" and isinstance(value, str | os.PathLike):
            try:
                return value if isinstance(value, Path) else Path(value)
            except TypeError:
                pass
        if kind == "fsync" and isinstance(value, str):
            try:
                return FsyncPolicy(value)
            except ValueError:
                choices = ", ".join(policy.value for policy in FsyncPolicy)
                raise ConfigError(f"fsync must be one of {choices}, not {value!r}") from None
    wanted = {
        "str": "a string",
        "int": "an integer",
        "seconds": "a number of seconds",
        "path": "a path",
        "fsync": "an fsync policy",
    }[kind]
    raise ConfigError(f"{name} must be {wanted}, not {type(value).__name__} {value!r}")


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value}")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        if text.strip().lower() in ("", "none", "off", "unlimited"):
            return None
        return parse(text)

    return parse_optional


def parse_size(text: str) -> int:
    """Parse ``1048576``, ``64KiB``, ``16MiB``, ``1GiB`` (also KB/MB/GB, k/m/g)."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    cleaned = text.strip().lower().replace("ib", "").replace("b", "")
    if cleaned and cleaned[-1] in units:
        return int(float(cleaned[:-1]) * units[cleaned[-1]])
    return int(cleaned)


# How to read each field from text (environment variables and flags).
_PARSERS: Final[Mapping[str, Callable[[str], Any]]] = {
    "host": str,
    "port": int,
    "data_dir": Path,
    "storage": str.lower,
    "fsync": lambda text: FsyncPolicy(text.lower()),
    "log_level": str.upper,
    "max_message_bytes": parse_size,
    "max_connections": int,
    "max_pending_bytes": parse_size,
    "max_inflight_requests": int,
    "max_queue_messages": _optional(int),
    "ack_timeout": _optional(float),
    "max_deliveries": int,
    "retention_messages": _optional(int),
    "retention_bytes": _optional(parse_size),
    "retention_age": _optional(float),
    "segment_bytes": parse_size,
    "min_free_bytes": parse_size,
    "shutdown_timeout": float,
}

FIELD_NAMES: Final = tuple(f.name for f in fields(Config))


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> Config:
    """Merge defaults, a TOML file, ``MSG_*`` variables and ``flags`` into a Config.

    ``flags`` maps field names to already-parsed values (None means "not given").
    ``env`` defaults to ``os.environ``; the TOML file to ``MSG_CONFIG`` if set.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_file = config_file or env.get("MSG_CONFIG") or None
    if config_file is not None:
        values.update(_read_toml(Path(config_file)))
    for name in FIELD_NAMES:
        text = env.get(f"MSG_{name.upper()}")
        if text is not None:
            values[name] = _parse(name, text, f"environment variable MSG_{name.upper()}")
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
    try:
        return Config(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _parse(name: str, text: str, source: str) -> Any:
    try:
        return _PARSERS[name](text)
    except (ValueError, OverflowError) as exc:  # int(float("inf")) overflows
        raise ConfigError(f"{source}: cannot read {text!r} as {name}: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in _PARSERS:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        if isinstance(value, str):  # "64MiB", "none", ...; other types are checked by Config
            value = _parse(name, value, f"config file {path}")
        values[name] = value
    return values
