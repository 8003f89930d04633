"""The daemon end to end: real files, the real watchdog observer, real HTTP to fake-api."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from conftest import TEST_KEY, Setup, records, uploaded, wait_until

from watcher.manifest import Record


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_stored(setup: Setup, files: dict[Path, bytes], rows: dict[str, Record]) -> None:
    """Each file's row points at an id the server stored with the file's exact bytes."""
    for path, data in files.items():
        row = rows[str(path)]
        stored = setup.api.api.files[row.file_id]
        assert stored.sha256 == sha(data) == row.sha256, path
        assert stored.name == path.name
        assert stored.size == len(data) == row.size


def test_mixed_files_uploaded_once_with_their_ids(setup: Setup, run_daemon) -> None:
    before = {setup.write("already there.txt", b"present at start"): b"present at start"}
    daemon = run_daemon(setup.load())
    files = dict(before)
    contents = {
        "a.bin": os.urandom(3 * 1024 * 1024 + 17),
        "empty": b"",
        "nested/deeper/Ünïcødé файл 日本.pdf": b"%PDF unicode",
        "with space/and more spaces.csv": b"a,b\n1,2\n",
        "nested/small.json": json.dumps({"k": 1}).encode(),
    }
    for rel, data in contents.items():
        files[setup.write(rel, data)] = data

    rows = wait_until(lambda: uploaded(setup, list(files)), what="all files uploaded")
    assert_stored(setup, files, rows)
    assert len(setup.api.api.files) == len(files), "a file was uploaded more than once"
    assert daemon.stop() == 0


def test_restart_uploads_nothing_again(setup: Setup, run_daemon) -> None:
    files = {
        setup.write(f"f{i}.txt", f"content {i}".encode()): f"content {i}".encode() for i in range(5)
    }
    daemon = run_daemon(setup.load())
    wait_until(lambda: uploaded(setup, list(files)), what="first run uploads")
    assert daemon.stop() == 0
    posts = len(setup.api.uploads())

    again = run_daemon(setup.load())
    wait_until(again.idle, what="second run idle")
    assert again.stop() == 0
    assert len(setup.api.uploads()) == posts == len(files)


def test_slow_writer_is_uploaded_only_with_final_content(make_setup, run_daemon) -> None:
    setup = make_setup(settle_s=0.5)
    daemon = run_daemon(setup.load())
    path = setup.drop / "slow.log"
    chunks = [os.urandom(4096) for _ in range(12)]
    with open(path, "wb") as f:
        for chunk in chunks:  # a writer slower than settle_s in total, faster per chunk
            f.write(chunk)
            f.flush()
            time.sleep(0.1)
    final = b"".join(chunks)
    rows = wait_until(lambda: uploaded(setup, [path]), what="slow file uploaded")
    assert_stored(setup, {path: final}, rows)
    assert len(setup.api.uploads()) == 1, "a partial version was sent"
    daemon.stop()


def test_old_mtime_copy_still_waits_for_settle(make_setup, run_daemon) -> None:
    """cp -p keeps an old mtime: the settle clock is the daemon's, not the file's."""
    setup = make_setup(settle_s=0.6)
    daemon = run_daemon(setup.load())
    path = setup.drop / "copied.dat"
    old = time.time() - 86400
    with open(path, "wb") as f:
        for _ in range(4):
            f.write(b"x" * 1000)
            f.flush()
            os.utime(f.fileno(), (old, old))
            time.sleep(0.2)
    rows = wait_until(lambda: uploaded(setup, [path]), what="copied file uploaded")
    assert rows[str(path)].size == 4000
    assert len(setup.api.uploads()) == 1
    daemon.stop()


def test_folder_moved_in_with_one_rename(setup: Setup, run_daemon) -> None:
    daemon = run_daemon(setup.load())
    staging = setup.tmp / "staging" / "batch"
    files = {}
    for rel in ("a.txt", "sub/b.txt", "sub/deep/c.txt", "sub/deep/d e.txt"):
        p = staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rel.encode())
        files[setup.drop / "batch" / rel] = rel.encode()
    os.rename(staging, setup.drop / "batch")
    rows = wait_until(lambda: uploaded(setup, list(files)), what="moved-in folder uploaded")
    assert_stored(setup, files, rows)
    daemon.stop()


def test_503_then_429_are_retried(setup: Setup, run_daemon) -> None:
    setup.api.faults.script = [503, 429]
    setup.api.faults.retry_after_s = 0.3
    daemon = run_daemon(setup.load())
    path = setup.write("retry-me.txt", b"eventually")
    rows = wait_until(lambda: uploaded(setup, [path]), what="uploaded after retries")
    assert rows[str(path)].attempts == 3
    statuses = [r.status for r in setup.api.uploads()]
    assert statuses == [503, 429, 200]
    # Retry-After was honoured: the third attempt came no sooner than 0.3 s after the 429.
    times = [r.t for r in setup.api.uploads()]
    assert times[2] - times[1] >= 0.29
    daemon.stop()


def test_rejected_file_fails_with_detail_and_daemon_carries_on(make_setup, run_daemon) -> None:
    setup = make_setup()
    setup.api.faults.reject_pattern = "*.exe"
    daemon = run_daemon(setup.load())
    bad = setup.write("virus.exe", b"MZ")
    good = setup.write("fine.txt", b"ok")
    wait_until(lambda: uploaded(setup, [good]), what="good file uploaded")
    row = wait_until(lambda: records(setup).get(str(bad)), what="bad file recorded")
    wait_until(lambda: records(setup)[str(bad)].state == "failed", what="bad file failed")
    row = records(setup)[str(bad)]
    assert "HTTP 400" in row.error and "file type not allowed" in row.error
    assert row.file_id is None
    assert daemon.stop() == 0


def test_run_exits_3_when_key_rejected(make_setup) -> None:
    setup = make_setup(key="wrong-key-for-this-api-123")
    setup.write("waiting.txt", b"stays pending")
    proc = setup.cli("run", "--config", str(setup.config_path))
    assert proc.returncode == 3, proc.stderr
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "rejected the key" in err_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "wrong-key-for-this-api-123" not in proc.stdout + proc.stderr
    rows = records(setup)
    assert rows[str(setup.drop / "waiting.txt")].state == "pending"


def test_sync_exit_codes(make_setup) -> None:
    setup = make_setup()
    files = [setup.write(f"s{i}.txt", f"sync {i}".encode()) for i in range(6)]
    proc = setup.cli("sync", "--config", str(setup.config_path))
    assert proc.returncode == 0, proc.stderr
    assert uploaded(setup, files)

    setup.api.faults.reject_pattern = "*.bad"
    setup.write("one.bad", b"nope")
    setup.write("another.txt", b"fine")
    proc = setup.cli("sync", "--config", str(setup.config_path))
    assert proc.returncode == 1, proc.stderr
    rows = records(setup)
    assert rows[str(setup.drop / "one.bad")].state == "failed"
    assert rows[str(setup.drop / "another.txt")].state == "uploaded"


def test_export_json_lists_uploads(setup: Setup) -> None:
    path = setup.write("exported.txt", b"export me")
    assert setup.cli("sync", "--config", str(setup.config_path)).returncode == 0
    proc = setup.cli("export", "--config", str(setup.config_path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    (record,) = json.loads(proc.stdout)
    assert record["path"] == str(path)
    assert record["watch"] == str(setup.drop)
    assert record["state"] == "uploaded"
    assert record["sha256"] == sha(b"export me")
    assert record["file_id"] in setup.api.api.files
    assert record["uploaded_at"].endswith("+00:00")
    assert TEST_KEY not in proc.stdout
