"""The ``msg`` command: serve, pub, sub, status, check.

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
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from msg import __version__
from msg.config import Config, load_config, parse_size
from msg.errors import ConfigError, MsgError
from msg.persistence import FsyncPolicy

__all__ = ["main"]

log = logging.getLogger("msg")

_COMMANDS = ("serve", "pub", "sub", "status", "check")


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
    serve.add_argument(
        "--max-deliveries",
        type=int,
        help="deliveries of a queue message before it is dead-lettered (default 20; 0: no limit)",
    )
    serve.add_argument("--segment-bytes", type=parse_size)
    serve.add_argument(
        "--min-free-bytes",
        type=parse_size,
        help="refuse publishes while less is free on the data disk (default 64MiB; 0: off)",
    )
    serve.set_defaults(run=_serve)
    _add_client_commands(commands)
    _add_check_command(commands)
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
    "max_deliveries",
    "segment_bytes",
    "min_free_bytes",
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
    server = Server(config, tune_process=True)
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


_T = TypeVar("_T")


def _run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on uvloop when it is installed (unless MSG_LOOP=asyncio).

    ``benchmarks/inprocess.py`` runs its broker through this too, so that it measures
    the loop the command line would pick.
    """
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


# ----------------------------------------------------------------------
# pub, sub, status: the client commands (thin glue over msg.client)

_DEFAULT_CLIENT_HOST = "localhost"
_DEFAULT_CLIENT_PORT = 8888
# Longest stdin line 'msg pub TOPIC -' reads; the broker enforces its own (smaller)
# max_message_bytes and answers too_large, which is the clearer message.
_MAX_STDIN_LINE = 64 * 1024 * 1024
_STDIN_CHUNK = 64 * 1024


def _add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pub = commands.add_parser(
        "pub",
        help="publish a message",
        description="Publish MESSAGE to TOPIC and print its message id. MESSAGE is sent as "
        'JSON if it is valid JSON (42, true, {"a": 1}, "text"), else as a string. '
        "With MESSAGE '-', every non-blank line of stdin is one message (pipelined).",
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("message", metavar="MESSAGE", help="a JSON value or text; '-' for stdin")
    pub.add_argument("--queue", action="store_true", help="publish to the queue TOPIC")
    pub.add_argument(
        "--string", action="store_true", help="send MESSAGE as a string even if it is JSON"
    )
    _add_address_flags(pub)
    pub.set_defaults(run=_pub)

    sub = commands.add_parser(
        "sub",
        help="print messages as they arrive",
        description="Subscribe to TOPIC and print every delivery frame as one JSON line. "
        "With --ack manual each message is acked after it is printed. Ctrl-C stops.",
    )
    sub.add_argument("topic", metavar="TOPIC")
    sub.add_argument("--queue", action="store_true", help="consume the queue TOPIC")
    sub.add_argument("--durable", metavar="NAME", help="a durable subscription of that name")
    sub.add_argument("--ack", choices=["auto", "manual"], default="auto")
    sub.add_argument("--prefetch", type=_positive_int, metavar="N", help="unacked messages at once")
    sub.add_argument("--count", type=_positive_int, metavar="N", help="exit after N messages")
    _add_address_flags(sub)
    sub.set_defaults(run=_sub)

    status = commands.add_parser(
        "status",
        help="show the broker's queues, topics and rates",
        description="Show the broker's queues, topics, connections and rates.",
    )
    status.add_argument("--json", action="store_true", help="print the raw status reply")
    _add_address_flags(status)
    status.set_defaults(run=_status)


def _add_address_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help=f"broker host (default $MSG_HOST or {_DEFAULT_CLIENT_HOST})")
    parser.add_argument(
        "--port", type=int, help=f"broker port (default $MSG_PORT or {_DEFAULT_CLIENT_PORT})"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _address(options: argparse.Namespace) -> tuple[str, int]:
    host = options.host or os.environ.get("MSG_HOST") or _DEFAULT_CLIENT_HOST
    port = options.port
    if port is None:
        raw = os.environ.get("MSG_PORT")
        try:
            port = int(raw) if raw else _DEFAULT_CLIENT_PORT
        except ValueError:
            raise ConfigError(f"MSG_PORT must be a port number, not {raw!r}") from None
    if not 0 < port <= 65535:
        raise ConfigError(f"port must be 1-65535, not {port}")
    return host, port


def _client_command(main: Coroutine[Any, Any, int]) -> int:
    """Run a client command; turn the errors a user can meet into one line on stderr."""
    from msg.client import ConnectFailedError, RemoteError

    try:
        return _run(main)
    except BrokenPipeError:
        # Whoever read stdout went away ('| head'): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConnectFailedError as exc:
        print(f"msg: {exc}", file=sys.stderr)
    except RemoteError as exc:
        print(f"msg: the broker refused: {exc.text} ({exc.code})", file=sys.stderr)
    except ConfigError:
        raise  # main() reports it, with the usage-error status
    except MsgError as exc:
        print(f"msg: {exc}", file=sys.stderr)
    return 1


def _parse_message(text: str, as_string: bool) -> Any:
    if as_string:
        return text
    from msg import jsonlib

    try:
        return jsonlib.loads(text)
    except jsonlib.DecodeError:
        return text


# -- pub


def _pub(options: argparse.Namespace) -> int:
    return _client_command(_pub_async(options))


async def _pub_async(options: argparse.Namespace) -> int:
    from msg.client import Client

    host, port = _address(options)
    async with await Client.connect(host, port, reconnect=False) as client:
        if options.message != "-":
            message = _parse_message(options.message, options.string)
            print(await client.publish(options.topic, message, queue=options.queue))
            return 0
        async for lines in _stdin_lines():
            messages = [_parse_message(line, options.string) for line in lines]
            ids = await client.publish_many(options.topic, messages, queue=options.queue)
            sys.stdout.write("".join(f"{message_id}\n" for message_id in ids))
            sys.stdout.flush()
    return 0


async def _stdin_lines() -> AsyncIterator[list[str]]:
    """The non-blank lines of stdin, a read's worth at a time, as they arrive.

    A daemon thread does the blocking reads (stdin may be a terminal, a pipe or a
    file, and only a thread reads all three), so Ctrl-C is never stuck behind one.
    """
    import concurrent.futures
    import threading

    from msg.protocol.codec import LineBuffer, LineTooLong

    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)  # bounded: reading waits for acks

    def read() -> None:
        fd = sys.stdin.fileno()
        try:
            while True:
                chunk = os.read(fd, _STDIN_CHUNK)  # whatever is there, as soon as it is
                asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop).result()
                if not chunk:
                    return
        except (OSError, RuntimeError, concurrent.futures.CancelledError):
            # The command ended (an error, Ctrl-C) while this thread read or waited
            # for room; the loop is gone or going, and so is this thread.
            return

    threading.Thread(target=read, name="msg-pub-stdin", daemon=True).start()
    buffer = LineBuffer(_MAX_STDIN_LINE)
    number = 0
    while True:
        chunk = await chunks.get()
        # At the end, a newline completes a last line that has none.
        pieces = buffer.feed(chunk if chunk else b"\n")
        lines: list[str] = []
        for piece in pieces:
            number += 1
            if isinstance(piece, LineTooLong):
                raise MsgError(f"stdin line {number} is longer than {_MAX_STDIN_LINE} bytes")
            try:
                lines.append(piece.decode().rstrip("\r"))
            except UnicodeDecodeError as exc:
                raise MsgError(f"stdin line {number} is not UTF-8: {exc}") from None
        if lines:
            yield lines
        if not chunk:
            return


# -- sub


def _sub(options: argparse.Namespace) -> int:
    try:
        return _client_command(_sub_async(options))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a subscriber is meant to stop


async def _sub_async(options: argparse.Namespace) -> int:
    from msg import jsonlib
    from msg.client import Client, SlowConsumerError

    host, port = _address(options)
    manual = options.ack == "manual"
    out = sys.stdout
    received = 0
    async with await Client.connect(host, port) as client:
        subscription = await client.subscribe(
            options.topic,
            queue=options.queue,
            ack=options.ack,
            prefetch=options.prefetch,
            durable=options.durable,
        )
        while options.count is None or received < options.count:
            try:
                message = await subscription.next()
            except SlowConsumerError as exc:
                print(f"msg: {exc}", file=sys.stderr)
                continue
            # Flushed per line, so '| jq' and '| grep --line-buffered' see each at once.
            out.write(jsonlib.dumps(message.raw).decode() + "\n")
            out.flush()
            if manual:
                await message.ack()
            received += 1
    return 0


# -- status


def _status(options: argparse.Namespace) -> int:
    return _client_command(_status_async(options))


async def _status_async(options: argparse.Namespace) -> int:
    from msg import jsonlib
    from msg.client import Client

    host, port = _address(options)
    async with await Client.connect(host, port, reconnect=False) as client:
        reply = await client.status()
    if options.json:
        print(jsonlib.dumps(reply).decode())
    else:
        print(format_status(reply))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """A status reply as a readable report: a summary, then a table of queues and one
    of topics (with a line per durable subscription)."""
    rates = status.get("rates") or {}
    totals = status.get("totals") or {}
    lines = [
        f"msg {status.get('version', '?')} on {status.get('storage', '?')} storage, "
        f"up {_duration(status.get('uptime', 0))}, "
        f"connections {status.get('connections', 0)}"
        + (f", READ-ONLY ({status['read_only']})" if status.get("read_only") else ""),
        f"rates: {rates.get('published_per_s', 0)} published/s, "
        f"{rates.get('delivered_per_s', 0)} delivered/s, {rates.get('acked_per_s', 0)} acked/s",
        "totals: " + ", ".join(f"{value} {name}" for name, value in totals.items())
        if totals
        else "totals: none",
        "",
    ]
    queues: dict[str, dict[str, Any]] = status.get("queues") or {}
    if queues:
        columns = [
            "depth",
            "unacked",
            "consumers",
            "published",
            "delivered",
            "acked",
            "dead_lettered",
            "bytes",
        ]
        rows = [[name] + [_cell(queue.get(c)) for c in columns] for name, queue in queues.items()]
        lines += _table(["QUEUE", *(c.upper() for c in columns)], rows)
    else:
        lines.append("no queues")
    lines.append("")
    topics: dict[str, dict[str, Any]] = status.get("topics") or {}
    if topics:
        columns = ["subscribers", "durable", "retained", "published", "delivered", "bytes"]
        rows = []
        for name, topic in topics.items():
            durables: dict[str, dict[str, Any]] = topic.get("durable") or {}
            cells = {**topic, "durable": len(durables)}
            rows.append([name] + [_cell(cells.get(c)) for c in columns])
        lines += _table(["TOPIC", *(c.upper() for c in columns)], rows)
        for name, topic in topics.items():
            for durable, cursor in (topic.get("durable") or {}).items():
                # Acked out of order past the first unacked one: worth seeing, since a
                # held message keeps the position back while these pile up.
                ahead = cursor.get("acked_ahead")
                lines.append(
                    f"  {name} durable {durable}: "
                    f"{'online' if cursor.get('online') else 'offline'}, "
                    f"position {cursor.get('position')}, {cursor.get('pending')} pending"
                    + (f", {ahead} acked ahead" if ahead else "")
                )
    else:
        lines.append("no topics")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Rows under headers; the first column left-aligned, the numbers right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{seconds:.1f}s"


# ----------------------------------------------------------------------
# check: verify (and repair) a data directory offline; see msg.storage.check

# e2fsck's exit statuses, so a script can tell "was fine" from "was repaired".
_CHECK_CLEAN = 0
_CHECK_FIXED = 1
_CHECK_LEFT = 4
_CHECK_FAILED = 8


def _add_check_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check",
        help="verify every log in a data directory (broker stopped)",
        description="Read every log in DATA_DIR and check every record, as a broker's "
        "start does; report torn and corrupt records with file and offset. With --fix, "
        "cut torn tails off and quarantine corrupt records (each repaired file is first "
        "copied to DATA_DIR/lost+found). Exit status as e2fsck: 0 clean, 1 problems "
        "fixed, 4 problems left, 8 could not check.",
    )
    check.add_argument(
        "data_dir",
        metavar="DATA_DIR",
        nargs="?",
        type=Path,
        help="the data directory (default $MSG_DATA_DIR or ./.msg_data)",
    )
    check.add_argument("--fix", action="store_true", help="repair what can be repaired")
    check.set_defaults(run=_check)


def _check(options: argparse.Namespace) -> int:
    from msg.storage.check import check

    data_dir = options.data_dir or Path(os.environ.get("MSG_DATA_DIR") or ".msg_data")
    try:
        report = check(data_dir, fix=options.fix)
    except OSError as exc:  # StorageError too: missing, or in use by a broker
        print(f"msg: cannot check {data_dir}: {exc}", file=sys.stderr)
        return _CHECK_FAILED
    print("\n".join(report.lines()))
    if report.clean:
        return _CHECK_CLEAN
    return _CHECK_LEFT if report.unfixed else _CHECK_FIXED
