"""The API key never shows, and the manifest holds up: locked, corrupt, full, read-only, shared.

Commands run as `python -m watcher` subprocesses (real exit codes, real stdout/stderr) against
the fake API over real HTTP; the daemon runs for real in a thread where one must be running.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TEST_KEY, Setup, records, uploaded, wait_until

OTHER_KEY = "rejected-key-Zx81q0w9e7r6t5y4"


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_no_key(text: str, *keys: str) -> None:
    for key in keys:
        assert key not in text, f"the API key appears in: {text[:2000]}"
        assert key[-12:] not in text, f"part of the API key appears in: {text[:2000]}"


def log_events(stdout: str) -> list[dict]:
    events = []
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def manifest_bytes(setup: Setup) -> bytes:
    path = setup.load().manifest_path
    siblings = path.parent.glob(path.name + "*")
    return b"".join(p.read_bytes() for p in siblings if p.is_file())


# --- secrets ------------------------------------------------------------------------------------


def read_commands(setup: Setup) -> list[subprocess.CompletedProcess[str]]:
    """status, export json, export csv: run side by side, as they would beside a daemon."""
    cfg = str(setup.config_path)
    commands = [
        ("status", "--config", cfg),
        ("export", "--config", cfg, "--format", "json"),
        ("export", "--config", cfg, "--format", "csv"),
    ]
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: setup.cli(*args), commands))


def test_key_never_in_output_for_upload_retries_and_401(make_setup) -> None:
    setup = make_setup()
    cfg = str(setup.config_path)
    setup.write("normal.txt", b"a normal upload")
    proc = setup.cli("sync", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    events = log_events(proc.stdout)
    assert any(e.get("event") == "uploaded" for e in events), "no JSON log lines to check"
    assert_no_key(proc.stdout + proc.stderr, TEST_KEY)

    setup.api.faults.script = [503, 503, 503]
    retried = setup.write("retried.txt", b"503 three times, then fine")
    proc = setup.cli("sync", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert [e for e in log_events(proc.stdout) if e.get("event") == "retrying"], proc.stdout
    assert records(setup)[str(retried)].attempts == 4
    assert_no_key(proc.stdout + proc.stderr, TEST_KEY)

    setup.api.faults.script = [503] * 10  # past max_attempts: the file fails with the reason
    gave_up = setup.write("gave-up.txt", b"always 503")
    proc = setup.cli("sync", "--config", cfg)
    assert proc.returncode == 1, proc.stderr
    assert records(setup)[str(gave_up)].state == "failed"
    assert_no_key(proc.stdout + proc.stderr, TEST_KEY)
    setup.api.faults.script = []

    setup = make_setup(key=OTHER_KEY)  # same folders, a key the API does not know
    setup.write("after-401.txt", b"stays pending")
    proc = setup.cli("sync", "--config", cfg)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "rejected" in proc.stderr
    assert_no_key(proc.stdout + proc.stderr, OTHER_KEY, TEST_KEY)

    outputs = read_commands(setup)
    for proc in outputs:
        assert proc.returncode == 0, proc.args
        assert_no_key(proc.stdout + proc.stderr, OTHER_KEY, TEST_KEY)
    exported = json.loads(outputs[1].stdout)
    assert {r["state"] for r in exported} == {"uploaded", "failed", "pending"}
    assert_no_key(manifest_bytes(setup).decode("latin-1"), OTHER_KEY, TEST_KEY)


def test_key_from_environment_never_in_output(tmp_path: Path, api) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        "\n".join(
            [
                "[api]",
                f"base_url = {json.dumps(api.base_url)}",
                "backoff_initial_s = 0.05",
                "backoff_max_s = 0.5",
                "max_attempts = 4",
                "[manifest]",
                f"path = {json.dumps(str(tmp_path / 'state' / 'manifest.sqlite3'))}",
                "[log]",
                'format = "json"',
                'level = "debug"',
                "[[watch]]",
                f"path = {json.dumps(str(drop))}",
                "settle_s = 0.2",
                "rescan_interval_s = 0",
            ]
        )
        + "\n"
    )
    setup = Setup(tmp_path, drop, config_path, tmp_path / "no-key-file", api)
    files = [setup.write(f"env{i}.txt", f"key from env {i}".encode()) for i in range(3)]
    api.faults.script = [503]
    env = {**setup.env(), "CIRCLEMIND_API_KEY": TEST_KEY}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "watcher", *args, "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )

    proc = cli("sync")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert uploaded(setup, files)
    assert [e for e in log_events(proc.stdout) if e.get("event") == "retrying"], proc.stdout
    assert_no_key(proc.stdout + proc.stderr, TEST_KEY)
    for args in (("status",), ("export", "--format", "json"), ("export", "--format", "csv")):
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert_no_key(proc.stdout + proc.stderr, TEST_KEY)
    proc = cli("check")
    assert proc.returncode == 0, proc.stderr
    assert "api key: found" in proc.stdout
    assert_no_key(proc.stdout + proc.stderr, TEST_KEY)
    assert_no_key(manifest_bytes(setup).decode("latin-1"), TEST_KEY)


def test_key_file_readable_by_others_draws_a_warning_without_the_key(make_setup) -> None:
    setup = make_setup()
    setup.key_file.chmod(0o644)
    setup.write("one.txt", b"one")
    proc = setup.cli("sync", "--config", str(setup.config_path))
    assert proc.returncode == 0, proc.stderr
    warnings = [
        e
        for e in log_events(proc.stdout)
        if e.get("level") == "warning" and str(setup.key_file) in json.dumps(e)
    ]
    assert len(warnings) == 1, proc.stdout
    assert "readable by others" in json.dumps(warnings[0])
    assert_no_key(proc.stdout + proc.stderr, TEST_KEY)

    proc = setup.cli("check", "--config", str(setup.config_path))
    assert proc.returncode == 0, proc.stderr
    assert any(
        "warning" in line and str(setup.key_file) in line for line in proc.stdout.splitlines()
    ), proc.stdout
    assert_no_key(proc.stdout + proc.stderr, TEST_KEY)


# --- the manifest: locked, corrupt ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_second_daemon_on_a_locked_manifest_exits_and_first_carries_on(
    setup: Setup, run_daemon
) -> None:
    first = setup.write("first.txt", b"uploaded by the first daemon")
    daemon = run_daemon(setup.load())
    wait_until(lambda: uploaded(setup, [first]), 10, "first daemon uploads")

    for command in ("run", "sync"):
        proc = setup.cli(command, "--config", str(setup.config_path), timeout=20)
        assert proc.returncode not in (0, None), proc.stdout + proc.stderr
        line = one_error_line(proc)
        manifest = str(setup.load().manifest_path)
        assert manifest in line and "already" in line.split(manifest, 1)[1], line

    later = setup.write("later.txt", b"still watched")
    wait_until(lambda: uploaded(setup, [later]), 10, "first daemon still uploads")
    wait_until(daemon.idle, 10, "daemon idle")
    assert daemon.stop() == 0
    assert len(setup.api.uploads()) == 2


def test_corrupt_manifest_is_reported_and_left_alone(setup: Setup) -> None:
    setup.write("waiting.txt", b"must not be lost")
    manifest = setup.load().manifest_path
    manifest.parent.mkdir(parents=True)
    garbage = b"definitely not SQLite\x00\xff" + bytes(range(256)) * 16
    manifest.write_bytes(garbage)
    cfg = str(setup.config_path)
    for args in (
        ("run",),
        ("sync",),
        ("status",),
        ("export", "--format", "json"),
        ("retry", "--failed"),
    ):
        proc = setup.cli(args[0], "--config", cfg, *args[1:], timeout=20)
        assert proc.returncode not in (0, None), (args, proc.stdout, proc.stderr)
        line = one_error_line(proc)
        assert str(manifest) in line, (args, line)
        assert manifest.read_bytes() == garbage, f"{args[0]} changed the corrupt manifest"
    assert setup.api.uploads() == [], "a file was uploaded without a manifest to record it"


# --- the manifest on a full or read-only disk -----------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs where the manifest lives (the config's `state` folder)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a small filesystem")
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield state
    finally:
        if subprocess.run(["umount", str(state)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(state)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the filesystem says it is full."""
    filler = folder / "filler"
    chunk = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        chunk = b"\0"
        while True:  # the last bytes of a partly used page
            try:
                os.write(fd, chunk)
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize(
    "in_use",
    [
        pytest.param(True, id="wal-in-use"),
        pytest.param(
            False,
            id="after-clean-close",
        ),
    ],
)
def test_full_disk_under_the_manifest_fails_cleanly_and_loses_nothing(
    setup: Setup, small_fs: Path, in_use: bool
) -> None:
    cfg = str(setup.config_path)
    before = [setup.write(f"before{i}.txt", f"before {i}".encode()) for i in range(2)]
    proc = setup.cli("sync", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert sorted(f.name for f in setup.api.api.files.values()) == ["before0.txt", "before1.txt"]
    if in_use:
        # A reader (status, export) has looked at it: the -wal and -shm files exist, so the
        # disk runs out when the next run writes to the log, not when it opens the manifest.
        assert uploaded(setup, before)
        assert Path(str(setup.load().manifest_path) + "-shm").exists()
    else:
        assert sorted(p.name for p in small_fs.iterdir()) == [
            "manifest.sqlite3",
            "manifest.sqlite3.lock",
        ]

    filler = fill(small_fs)
    later = [setup.write(f"later{i}.txt", f"later {i}".encode()) for i in range(4)]
    proc = setup.cli("sync", "--config", cfg, timeout=30)
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert str(setup.load().manifest_path) in line, line

    filler.unlink()
    proc = setup.cli("sync", "--config", cfg, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert uploaded(setup, before + later), records(setup)
    names = [f.name for f in setup.api.api.files.values()]
    assert sorted(set(names)) == sorted(p.name for p in before + later)
    assert names.count("before0.txt") == names.count("before1.txt") == 1
    # Last, so that a poor wording does not hide a lost file: the line says the disk is full
    # (in the words after the path: the test's own folder name has "full" in it).
    reason = line.split(str(setup.load().manifest_path), 1)[1].lower()
    assert "full" in reason or "no space" in reason, line


def test_read_only_manifest_fails_cleanly_and_loses_nothing(setup: Setup, small_fs: Path) -> None:
    cfg = str(setup.config_path)
    before = setup.write("before.txt", b"before")
    proc = setup.cli("sync", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert uploaded(setup, [before])

    remount = ["mount", "-o", "remount,ro", str(small_fs)]
    subprocess.run(remount, check=True, capture_output=True)
    try:
        later = setup.write("later.txt", b"later")
        for command in ("sync", "run"):
            proc = setup.cli(command, "--config", cfg, timeout=20)
            assert proc.returncode not in (0, None), proc.stdout + proc.stderr
            line = one_error_line(proc)
            assert str(setup.load().manifest_path) in line, line
    finally:
        remount[2] = "remount,rw"
        subprocess.run(remount, check=True, capture_output=True)
    proc = setup.cli("sync", "--config", cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert uploaded(setup, [before, later])
    assert len(setup.api.uploads()) == 2


# --- the manifest shared with status/export/retry while the daemon runs ---------------------------


def test_status_export_and_retry_work_while_the_daemon_runs(setup: Setup, run_daemon) -> None:
    cfg = str(setup.config_path)
    setup.api.faults.reject_pattern = "*.bad"
    daemon = run_daemon(setup.load())
    good = setup.write("good.txt", b"accepted")
    bad = setup.write("doc.bad", b"rejected until the pattern is cleared")
    wait_until(lambda: uploaded(setup, [good]), 10, "good file uploaded")
    wait_until(
        lambda: records(setup).get(str(bad)) and records(setup)[str(bad)].state == "failed",
        10,
        "bad file failed",
    )

    proc = setup.cli("status", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "uploaded: 1" in proc.stdout and "failed: 1" in proc.stdout, proc.stdout
    assert "doc.bad" in proc.stdout  # among the last errors
    proc = setup.cli("export", "--config", cfg, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    states = {r["path"]: r["state"] for r in json.loads(proc.stdout)}
    assert states == {str(good): "uploaded", str(bad): "failed"}

    setup.api.faults.reject_pattern = ""
    proc = setup.cli("retry", "--config", cfg, "--failed")
    assert proc.returncode == 0, proc.stderr
    assert "1 file(s)" in proc.stdout, proc.stdout
    # Idle workers look for rows put back to pending every 2 s (IDLE_POLL_S).
    rows = wait_until(lambda: uploaded(setup, [good, bad]), 8, "retried file uploaded")
    assert rows[str(bad)].error is None
    proc = setup.cli("status", "--config", cfg)
    assert proc.returncode == 0 and "uploaded: 2" in proc.stdout, proc.stdout
    assert daemon.stop() == 0
    names = sorted(f.name for f in setup.api.api.files.values())
    assert names == ["doc.bad", "good.txt"]
