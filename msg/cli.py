"""The ``msg`` command: serve, pub, sub, status.

``msg`` with no command (and ``python -m msg``, ``python -m msg.broker``) starts the
broker. This is the only module that configures logging; the library only logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from msg import __version__
from msg.config import Config, load_config, parse_size
from msg.errors import ConfigError, MsgError
from msg.persistence import FsyncPolicy

__all__ = ["main"]

log = logging.getLogger("msg")

_COMMANDS = ("serve", "pub", "sub", "status")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; exits the process with the command's status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in _COMMANDS and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "serve")
    parser = _parser()
    options = parser.parse_args(args)
    command: Callable[[argparse.Namespace], int] = options.run
    try:
        status = command(options)
    except ConfigError as exc:
        print(f"msg: configuration error: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msg",
        description="msg, a small dependable message broker. "
        "With no command, starts the broker (same as 'msg serve').",
    )
    parser.add_argument("--version", action="version", version=f"msg {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker (the default)")
    serve.add_argument("--config", metavar="FILE", help="TOML file with settings")
    serve.add_argument("--host", help="interface to listen on (default localhost)")
    serve.add_argument("--port", type=int, help="TCP port (default 8888; 0 picks a free one)")
    serve.add_argument("--data-dir", type=Path, help="where logs are kept (default ./.msg_data)")
    serve.add_argument("--storage", choices=["file", "memory"], help="storage backend")
    serve.add_argument(
        "--fsync",
        type=FsyncPolicy,
        choices=list(FsyncPolicy),
        help="when writes are forced to disk (default always)",
    )
    serve.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--max-message-bytes", type=parse_size, help="longest request line")
    serve.add_argument("--max-connections", type=int)
    serve.add_argument(
        "--max-pending-bytes", type=parse_size, help="slow-consumer limit per connection"
    )
    serve.add_argument("--max-queue-messages", type=int)
    serve.add_argument(
        "--ack-timeout", type=float, help="seconds before an unacked delivery is redelivered"
    )
    serve.add_argument("--segment-bytes", type=parse_size)
    serve.set_defaults(run=_serve)
    return parser


# ----------------------------------------------------------------------
# serve

_SERVE_FLAGS = (
    "host",
    "port",
    "data_dir",
    "storage",
    "fsync",
    "log_level",
    "max_message_bytes",
    "max_connections",
    "max_pending_bytes",
    "max_queue_messages",
    "ack_timeout",
    "segment_bytes",
)


def _serve(options: argparse.Namespace) -> int:
    flags = {name: getattr(options, name) for name in _SERVE_FLAGS}
    config = load_config(flags, config_file=options.config)
    _configure_logging(config.log_level)
    return _run(_serve_async(config))


async def _serve_async(config: Config) -> int:
    from msg.broker.server import Server

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning(
                "second %s: exiting without finishing shutdown", signal.Signals(signum).name
            )
            os._exit(1)
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    server = Server(config)
    try:
        await server.serve_until(stop)
    except MsgError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return 1
    return 0


# ----------------------------------------------------------------------
# helpers


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when it is installed (unless MSG_LOOP=asyncio)."""
    loop_factory = None
    if os.environ.get("MSG_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)
