"""``msg check DATA_DIR [--fix]``: verify every log offline, report torn and corrupt
records with file and offset, and repair them without losing a good record.
"""

from __future__ import annotations

import contextlib
import logging
import random
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from msg.cli import main
from msg.errors import StorageError
from msg.persistence import Append, Claim, CursorCommit, FsyncPolicy, Kind
from msg.storage.check import Problem, check
from msg.storage.filenames import encode_name
from msg.storage.filestore import FileStore
from tests.durability.crashfs import POWER_LOSSES, CrashFS, Loss
from tests.durability.powerloss import Ledger, Workload, observe, verify
from tests.durability.test_power_loss import ROOT, SEGMENT_BYTES, crash_round

STORAGE = "msg.storage"
Q = "jobs"
T = "news"


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(["check", *args])
    code = exited.value.code
    assert isinstance(code, int)
    return code


async def make_data(root: Path) -> None:
    store = FileStore(root, segment_bytes=1024, fsync=FsyncPolicy.NEVER)
    await store.open()
    try:
        for i in range(30):
            await store.append(
                [
                    Append(Kind.QUEUE, Q, [f"m{i}"], [b'{"n":%d}' % i], 1.0),
                    Append(Kind.TOPIC, T, [f"t{i}"], [b"%d" % i], 1.0),
                ]
            )
        await store.commit_cursors([CursorCommit(T, "c", p) for p in range(5)])
    finally:
        await store.close()


def logs_of(root: Path, kind: str, name: str) -> list[Path]:
    return sorted((root / kind / encode_name(name)).glob("0*.log"))


def damage(root: Path) -> dict[str, tuple[Path, int]]:
    """A torn tail, a corrupt middle record, and a record with a good checksum but
    unusable content; returns where each is."""
    queue_files = logs_of(root, "queues", Q)
    newest = queue_files[-1]
    torn_at = newest.stat().st_size
    with newest.open("ab") as file:
        file.write(b'{"op":"pub","seq":99,"id":"x')
    middle = queue_files[1]
    data = bytearray(middle.read_bytes())
    second = data.index(b"\n") + 1
    data[second + 20] ^= 0x10
    middle.write_bytes(bytes(data))
    # A checksummed record no replay can use: a topic log holds only pubs.
    from msg.storage import records

    topic_file = logs_of(root, "topics", T)[0]
    odd = records.ack_record(3)
    data = bytearray(topic_file.read_bytes())
    first_end = data.index(b"\n") + 1
    topic_file.write_bytes(bytes(data[:first_end]) + odd + bytes(data[first_end:]))
    return {
        "torn": (newest, torn_at),
        "corrupt": (middle, second),
        "unreadable": (topic_file, first_end),
    }


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_clean_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    await make_data(root)
    assert run_cli(str(root)) == 0
    out = capsys.readouterr().out
    assert "no problems" in out
    assert "checked 2 logs" in out


async def test_cursor_records_are_checked_with_their_acked_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    await make_data(root)
    store = FileStore(root, segment_bytes=1024)
    await store.open()
    try:
        await store.commit_cursors([CursorCommit(T, "gaps", 1, ((3, 4), (7, 20)))])
    finally:
        await store.close()
    assert run_cli(str(root)) == 0
    capsys.readouterr()
    # A record whose checksum matches but whose ranges overlap: a replay cannot use it.
    path = root / "topics" / encode_name(T) / "cursors.log"
    offset = path.stat().st_size
    body = b'{"op":"cur","name":"gaps","pos":1,"acked":[[3,9],[5,20]]'
    with path.open("ab") as file:
        file.write(b'%b,"crc":"%08x"}\n' % (body, zlib.crc32(body)))
    assert run_cli(str(root)) == 4
    out = capsys.readouterr().out
    assert f"topics/{encode_name(T)}/cursors.log: offset {offset}: unreadable" in out
    assert "range [5, 20]" in out


async def test_report_names_file_and_offset_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    await make_data(root)
    where = damage(root)
    before = snapshot(root)
    assert run_cli(str(root)) == 4  # problems left
    out = capsys.readouterr().out.splitlines()
    assert snapshot(root) == before
    for problem, (path, offset) in where.items():
        wanted = f"{path.relative_to(root)}: offset {offset}: {problem}"
        assert any(line.startswith(wanted) for line in out), (wanted, out)
    assert "3 not fixed" in out[-1]


async def test_fix_repairs_and_the_broker_then_starts_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    await make_data(root)
    where = damage(root)
    corrupt_file = where["corrupt"][0]
    original = corrupt_file.read_bytes()
    assert run_cli(str(root), "--fix") == 1  # problems found, all fixed
    out = capsys.readouterr().out
    assert "all fixed" in out
    assert "quarantined" in out
    assert "cut off" in out
    # The original of every rewritten file is kept.
    assert (root / "lost+found" / corrupt_file.relative_to(root)).read_bytes() == original
    assert run_cli(str(root)) == 0
    caplog.set_level(logging.WARNING, logger=STORAGE)
    caplog.clear()
    store = FileStore(root, segment_bytes=1024)
    recovery = await store.open()
    try:
        assert (recovery.torn_records, recovery.corrupt_records) == (0, 0)
        [deliveries] = await store.claim([Claim(Q, ("c",) * 100)])
        lost = int(original.split(b"\n")[1].split(b'"id":"m')[1].split(b'"')[0])
        assert [d.message_id for d in deliveries] == [f"m{i}" for i in range(30) if i != lost]
        read = await store.read(T, 0, 100)
        assert [m.message_id for m in read.messages] == [f"t{i}" for i in range(30)]
        assert dict((await store.stats()).topics[T].cursors) == {"c": 4}
    finally:
        await store.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_torn_meta_is_rebuilt_any_other_bad_meta_only_reported(tmp_path: Path) -> None:
    root = tmp_path / "data"
    await make_data(root)
    meta = root / "queues" / Q / "meta.json"
    meta.write_bytes(b'{"v":1,"kin')  # torn by a crash: rebuilt from the name
    report = check(root, fix=True)
    [finding] = report.findings
    assert finding.problem is Problem.BAD_META
    assert finding.fixed is not None
    assert check(root).clean
    newer = b'{"v":2,"kind":"queue","name":"jobs"}'  # a newer format: never touched
    meta.write_bytes(newer)
    report = check(root, fix=True)
    [finding] = report.findings
    assert (finding.problem, finding.fixed) == (Problem.BAD_META, None)
    assert report.unfixed == [finding]
    assert meta.read_bytes() == newer


async def test_one_fix_repairs_a_torn_meta_and_the_torn_tail_after_it(tmp_path: Path) -> None:
    # A crash can tear both a new log's meta.json and its last record: the rebuilt
    # log's files are repaired in the same pass, so the next check finds nothing.
    root = tmp_path / "data"
    await make_data(root)
    (root / "queues" / Q / "meta.json").write_bytes(b'{"v":1,"kin')
    newest = logs_of(root, "queues", Q)[-1]
    good = newest.read_bytes()
    with newest.open("ab") as file:
        file.write(b'{"op":"pub","seq":99,"id":"x')
    report = check(root, fix=True)
    assert sorted(f.problem for f in report.findings) == sorted([Problem.BAD_META, Problem.TORN])
    assert not report.unfixed
    assert check(root).clean
    assert newest.read_bytes() == good


async def test_refuses_a_directory_a_broker_is_using(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    store = FileStore(root)
    await store.open()
    try:
        with pytest.raises(StorageError, match="in use"):
            check(root)
        assert run_cli(str(root)) == 8
        assert "in use" in capsys.readouterr().err
    finally:
        await store.close()
    assert run_cli(str(tmp_path / "missing")) == 8


def collect(into: list[tuple[CrashFS, Ledger]]) -> Callable[[CrashFS, Ledger], None]:
    return lambda image, ledger: into.append((image, ledger))


async def test_fix_after_power_loss_keeps_every_acked_message() -> None:
    # What a crash leaves (torn tails, zeros, garbage), repaired offline: the store then
    # opens without a warning, and every promise still holds.
    rng = random.Random(7)
    fixed = 0
    for number in range(20):
        loss = POWER_LOSSES[number % len(POWER_LOSSES)]
        kept: list[tuple[CrashFS, Ledger]] = []
        result = await crash_round(
            f"check:{number}",
            FsyncPolicy.ALWAYS,
            loss,
            keep_metadata=rng.random() < 0.5,
            shape=Workload(),
            window=0,
            keep_image=collect(kept),
        )
        assert not result.verdict.errors
        [(image, ledger)] = kept
        report = check(ROOT, fix=True, fs=image)
        assert not report.unfixed, report.lines()
        fixed += len(report.findings)
        assert check(ROOT, fs=image).clean
        store = FileStore(ROOT, segment_bytes=SEGMENT_BYTES, fs=image)
        recovery = await store.open()
        try:
            assert (recovery.torn_records, recovery.corrupt_records) == (0, 0)
            seen = await observe(store)
        finally:
            await store.close()
        assert not verify(ledger, seen, window=0).errors
    assert fixed > 0


async def test_a_crash_during_fix_leaves_the_original_or_the_repair() -> None:
    template = CrashFS()
    store = FileStore(ROOT, segment_bytes=1024, fs=template)
    await store.open()
    try:
        for i in range(20):
            await store.append([Append(Kind.QUEUE, Q, [f"m{i}"], [b"%d" % i], 1.0)])
    finally:
        await store.close()
    [first, *_] = sorted(n for n in template.listdir(f"{ROOT}/queues/{Q}") if n.endswith(".log"))
    path = f"{ROOT}/queues/{Q}/{first}"
    data = bytearray(template.read_file(path))
    data[data.index(b"\n") + 15] ^= 1  # the second record
    template.write_file(path, bytes(data))
    template.writeback()
    template.crash()
    probe = template.reboot(Loss.KEEP)
    before = probe.ops
    check(ROOT, fix=True, fs=probe)
    total = probe.ops - before
    assert total > 3
    for point in range(1, total + 1):
        for loss in (Loss.KEEP, Loss.DROP, Loss.TORN):
            fs = template.reboot(Loss.KEEP)
            fs.crash_at = fs.ops + point
            with contextlib.suppress(OSError):
                check(ROOT, fix=True, fs=fs)
            image = fs.reboot(loss, random.Random(point), keep_metadata=True)
            store = FileStore(ROOT, segment_bytes=1024, fs=image)
            await store.open()
            try:
                [deliveries] = await store.claim([Claim(Q, ("c",) * 100)])
                assert [d.message_id for d in deliveries] == [
                    f"m{i}" for i in range(20) if i != 1
                ], (point, loss)
            finally:
                await store.close()
