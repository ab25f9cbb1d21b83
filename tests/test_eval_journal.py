"""The crash-safe record log, atomic creation and the writer lock (safe_diffusion.records.journal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safe_diffusion.records.journal import (
    Journal,
    LockedError,
    WriterLock,
    _host,
    create_atomically,
    remove_leftovers,
)

SRC = str(Path(__file__).resolve().parent.parent / "src")


def test_last_write_wins_across_writers_and_reopen(tmp_path):
    a, b = Journal(tmp_path / "j"), Journal(tmp_path / "j")
    a.append([("image", "k1", {"v": 1}), ("image", "k2", {"v": 2})])
    b.put("image", "k1", {"v": 3})  # later: wins
    b.put("quality", "k1", {"clip_score": 31.5})
    assert a.get("image") == {"k1": {"v": 3}, "k2": {"v": 2}}
    assert len(a.segments()) == 2 and a.segment != b.segment  # one segment per writer
    a.close(), b.close()
    fresh = Journal(tmp_path / "j")
    assert fresh.get("image") == {"k1": {"v": 3}, "k2": {"v": 2}} and fresh.get("quality") == {
        "k1": {"clip_score": 31.5}
    }
    assert fresh.stages() == ["image", "quality"]
    # a restarted writer gets a new segment; the old ones are never appended to again
    c = Journal(tmp_path / "j")
    c.put("image", "k3", 1)
    assert len(c.segments()) == 3


def test_torn_and_damaged_lines_are_ignored(tmp_path):
    j = Journal(tmp_path / "j")
    j.append([("s", "a", 1), ("s", "b", 2)])
    seg = j.segment
    j.close()
    data = seg.read_bytes()
    lines = data.split(b"\n")
    damaged = lines[1].replace(b'"b"', b'"c"')  # checksum no longer matches
    seg.write_bytes(lines[0] + b"\n" + damaged + b"\n" + b'0badc0de\t["s","d",4,1')  # + a torn, unterminated tail
    fresh = Journal(tmp_path / "j")
    assert fresh.get("s") == {"a": 1}
    assert fresh.damaged_lines == 1
    with pytest.raises(ValueError):
        j.put("s", "x", float("nan"))  # strict JSON only


def test_incremental_reading_sees_new_records(tmp_path):
    reader, writer = Journal(tmp_path / "j"), Journal(tmp_path / "j")
    assert reader.get("s") == {}
    writer.put("s", "a", 1)
    assert reader.get("s") == {"a": 1}
    writer.put("s", "a", 2)
    writer.put("s", "b", 3)
    assert reader.get("s") == {"a": 2, "b": 3}


def test_create_atomically_never_leaves_a_half_made_folder(tmp_path):
    target = tmp_path / "parent" / "run"

    def broken(tmp: Path):
        (tmp / "x").write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        create_atomically(target, broken, marker="config.json")
    assert not target.exists() and not list((tmp_path / "parent").iterdir())

    def good(tmp: Path):
        (tmp / "config.json").write_text("{}")

    # leftovers of creators that were SIGKILLed (on this host: the pid is gone; on another: long ago), one
    # still being populated by a live process, and an empty folder the user made
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    parent = tmp_path / "parent"
    (parent / f".creating-run-{host}-{dead.pid}-abcd").mkdir()
    (parent / ".creating-run-elsewhere-7-abcd").mkdir()
    old = time.time() - 2 * 24 * 3600
    os.utime(parent / ".creating-run-elsewhere-7-abcd", (old, old))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    (parent / f".creating-run-{host}-{live.pid}-abcd").mkdir()
    (parent / ".creating-run-fresh-node-8-abcd").mkdir()
    target.mkdir()
    try:
        assert create_atomically(target, good, marker="config.json") is True
        assert create_atomically(target, good, marker="config.json") is False  # already complete
        remove_leftovers(target)
        assert sorted(p.name for p in parent.iterdir()) == sorted(
            ["run", f".creating-run-{host}-{live.pid}-abcd", ".creating-run-fresh-node-8-abcd"]
        )
    finally:
        live.kill()
        live.wait()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        create_atomically(other, good, marker="config.json")
    assert (other / "data.txt").read_text() == "mine"


def test_writer_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    path = tmp_path / "locks" / "writer-0.lock"
    with WriterLock(path), pytest.raises(LockedError, match=f"held by pid {os.getpid()}"):
        WriterLock(path).acquire()
    assert not path.exists()
    # a holder on this host that was SIGKILLed: its pid is gone
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path.write_text(json.dumps({"host": os.uname().nodename, "boot_id": _boot_id(), "pid": proc.pid, "token": "x"}))
    with WriterLock(path) as lock:
        assert json.loads(path.read_text())["token"] == lock.token
    # a holder on another host: stale once its heartbeat is older than stale_after
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    with pytest.raises(LockedError, match="elsewhere"):
        WriterLock(path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    with WriterLock(path, stale_after=60):
        pass


def test_writer_lock_heartbeat_keeps_it_fresh(tmp_path):
    path = tmp_path / "w.lock"
    with WriterLock(path, stale_after=0.3):
        old = time.time() - 10
        os.utime(path, (old, old))
        time.sleep(0.25)
        assert time.time() - path.stat().st_mtime < 1  # refreshed by the holder


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


WRITER = """
import sys, time
from safe_diffusion.records.journal import Journal
j = Journal(sys.argv[1])
name = sys.argv[2]
done = set(j.get("work"))
for i in range(400):
    key = f"{i:04d}"
    if key in done or i % 2 != int(name):
        continue
    j.put("work", key, {"by": name, "value": i * i})
    time.sleep(0.001)
"""


def test_two_writers_killed_at_random_then_restarted_lose_and_duplicate_nothing(tmp_path):
    """Two processes share one journal folder (as two nodes would on NFS); SIGKILLs, restarts, exactly-once."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    folder = tmp_path / "j"
    for attempt in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(r)], env=env) for r in (0, 1)]
        if attempt < 2:
            time.sleep(0.25 + 0.1 * attempt)
            for p in procs:
                p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
    records = Journal(folder).get("work")
    assert sorted(records) == [f"{i:04d}" for i in range(400)]
    assert all(v == {"by": str(int(k) % 2), "value": int(k) ** 2} for k, v in records.items())
    from safe_diffusion.records.journal import _decode

    keys = [
        rec[1]
        for seg in Journal(folder).segments()
        for line in seg.read_bytes().split(b"\n")
        if (rec := _decode(line)) is not None
    ]
    assert len(keys) == len(set(keys)) == 400  # no complete record written twice


def test_a_full_disk_mid_append_loses_nothing_written_after_it(tmp_path, monkeypatch):
    """ENOSPC after part of a line: the torn tail is ignored and the next append goes to a new segment, so it is
    not glued onto the torn line (where its checksum would fail and the record be lost)."""
    j = Journal(tmp_path / "j")
    j.put("s", "a", 1)
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[:5]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        j.put("s", "b", 2)
    monkeypatch.setattr(os, "write", real_write)
    j.put("s", "c", 3)  # space again
    fresh = Journal(tmp_path / "j")
    assert fresh.get("s") == {"a": 1, "c": 3}
    assert len(fresh.segments()) == 2 and fresh.damaged_lines == 0
