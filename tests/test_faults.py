"""Faults: a flaky API, kill -9, SIGTERM/SIGHUP, files that change under us, lost events."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Setup, records, toml_value, uploaded, wait_until
from structlog.testing import capture_logs


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def daemon_process(setup: Setup, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`smooth-watcher run` as its own process, killed at the end whatever happens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "run", "--config", str(setup.config_path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=setup.env(),
        cwd=setup.tmp,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def in_flight(setup: Setup) -> int:
    return sum(r.state == "uploading" for r in records(setup).values())


def every_uploaded_row_is_on_the_server(setup: Setup) -> int:
    """No path is marked uploaded with an id the server did not store with those bytes."""
    n = 0
    for row in records(setup).values():
        if row.state == "uploaded":
            stored = setup.api.api.files[row.file_id]
            assert stored.sha256 == row.sha256 == sha(Path(row.path).read_bytes())
            n += 1
    return n


def test_flaky_api_everything_uploaded(make_setup, run_daemon) -> None:
    setup = make_setup(api={"max_attempts": 25, "backoff_max_s": 0.2})
    faults = setup.api.faults
    faults.update(
        {"rate_503": 0.3, "rate_429": 0.1, "retry_after_s": 0.2, "rate_reset": 0.1, "seed": 7}
    )
    files = [setup.write(f"flaky/{i:02}.bin", os.urandom(100_000 + i)) for i in range(40)]
    daemon = run_daemon(setup.load())
    wait_until(lambda: uploaded(setup, files), timeout=60, what="40 files through a flaky API")
    assert every_uploaded_row_is_on_the_server(setup) == 40
    statuses = Counter(r.status for r in setup.api.uploads())
    assert statuses[503] and statuses[429] and statuses[0], statuses  # each fault happened

    # A 429 pauses every worker: after each one, no upload arrives until Retry-After is over
    # (a small margin for requests that were already on the wire when the 429 was sent).
    uploads = setup.api.uploads()
    for r429 in (r for r in uploads if r.status == 429):
        during = [r for r in uploads if r429.t + 0.05 < r.t < r429.t + 0.18]
        assert not during, f"{len(during)} upload(s) arrived during a Retry-After pause"
    daemon.stop()


def test_failing_api_is_not_hammered_and_files_fail_with_reason(make_setup, run_daemon) -> None:
    setup = make_setup(api={"max_attempts": 4, "backoff_max_s": 0.2})
    setup.api.faults.rate_503 = 1.0
    files = [setup.write(f"down{i}.txt", b"api is down") for i in range(3)]
    daemon = run_daemon(setup.load())
    wait_until(
        lambda: all((r := records(setup).get(str(p))) and r.state == "failed" for p in files),
        what="files failed after max_attempts",
    )
    row = records(setup)[str(files[0])]
    assert row.error.startswith("gave up after 4 attempts: HTTP 503")
    assert len(setup.api.uploads()) == 3 * 4  # exactly max_attempts each: no hot loop
    ok = setup.write("after.txt", b"daemon carries on")
    setup.api.faults.rate_503 = 0.0
    wait_until(lambda: uploaded(setup, [ok]), what="daemon carries on")
    daemon.stop()


def test_kill_9_then_restart_loses_nothing(make_setup) -> None:
    setup = make_setup(api={"concurrency": 4})
    setup.api.faults.delay_s = 0.15  # keeps uploads in flight when the kill lands
    files = {setup.write(f"k/{i:02}.dat", os.urandom(5000)): None for i in range(30)}
    with daemon_process(setup) as proc:
        wait_until(
            lambda: sum(r.state == "uploaded" for r in records(setup).values()) >= 6,
            what="some uploads done",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert not uploaded(setup, list(files)), "the kill came too late to test anything"
    setup.api.faults.delay_s = 0.0
    with daemon_process(setup):
        wait_until(lambda: uploaded(setup, list(files)), timeout=30, what="all after restart")
    assert every_uploaded_row_is_on_the_server(setup) == 30
    # Only files in flight at the kill may have been sent twice: at most `concurrency` being
    # sent, plus at most one per worker confirmed but waiting for the 50 ms group commit.
    per_name = Counter(f.name for f in setup.api.api.files.values())
    assert max(per_name.values()) <= 2
    assert sum(1 for n in per_name.values() if n == 2) <= 2 * 4


def test_sigterm_lets_in_flight_uploads_finish(make_setup) -> None:
    """1. uploads are in flight; 2. SIGTERM; 3. they finish within the grace period and are
    recorded; 4. nothing new starts; 5. exit status 0; 6. the rest stays pending."""
    setup = make_setup(api={"concurrency": 2})
    setup.api.faults.delay_s = 1.0
    files = [setup.write(f"t{i}.txt", b"term") for i in range(6)]
    with daemon_process(setup) as proc:
        wait_until(lambda: in_flight(setup) == 2, what="two uploads in flight")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    rows = records(setup)
    states = Counter(rows[str(p)].state for p in files)
    assert states == {"uploaded": 2, "pending": 4}, states
    assert len(setup.api.uploads()) == 2


def test_sigterm_past_the_grace_period_cuts_and_requeues(make_setup) -> None:
    setup = make_setup(api={"concurrency": 2})
    setup.api.faults.delay_s = 5.0
    files = [setup.write(f"g{i}.txt", b"grace") for i in range(3)]
    with daemon_process(setup, "--grace-s", "0.3") as proc:
        wait_until(lambda: in_flight(setup) == 2, what="uploads in flight")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert time.monotonic() - started < 4.0, "did not cut at the grace period"
    assert {r.state for r in records(setup).values()} == {"pending"}
    assert len(records(setup)) == len(files)


def write_two_watch_config(setup: Setup, second: Path, extra: str = "") -> None:
    text = setup.config_path.read_text()
    text += f"\n[[watch]]\npath = {toml_value(second)}\nsettle_s = 0.2\n{extra}"
    setup.config_path.write_text(text)


def test_sighup_reloads_and_refuses_a_bad_config(make_setup) -> None:
    setup = make_setup()
    second = setup.tmp / "second"
    second.mkdir()
    original = setup.config_path.read_text()
    with daemon_process(setup) as proc:
        first = setup.write("one.txt", b"1")
        wait_until(lambda: uploaded(setup, [first]), what="first watch works")
        write_two_watch_config(setup, second)
        proc.send_signal(signal.SIGHUP)
        new = second / "two.txt"
        new.write_bytes(b"2")  # before or after the restart: events or the start scan find it
        wait_until(lambda: uploaded(setup, [new]), what="the new watch is watched after SIGHUP")

        setup.config_path.write_text(original + "\nbogus_key = 1\n")
        proc.send_signal(signal.SIGHUP)
        after = setup.write("three.txt", b"3")
        wait_until(lambda: uploaded(setup, [after]), what="old config still running")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "config reload refused" in out and "bogus_key" in out


def test_file_changed_while_sent_is_sent_again(make_setup, run_daemon) -> None:
    setup = make_setup()
    setup.api.faults.delay_s = 0.6  # the answer comes late: time to change the file meanwhile
    daemon = run_daemon(setup.load())
    path = setup.write("growing.log", b"first part\n")
    wait_until(lambda: setup.api.api.requests, what="upload under way")
    with open(path, "ab") as f:
        f.write(b"second part\n")
    final = path.read_bytes()
    wait_until(
        lambda: (r := uploaded(setup, [path])) and r[str(path)].sha256 == sha(final),
        timeout=20,
        what="final content uploaded",
    )
    row = records(setup)[str(path)]
    assert setup.api.api.files[row.file_id].sha256 == sha(final)
    assert len(setup.api.uploads()) >= 2
    daemon.stop()


def test_deleted_and_renamed_files(make_setup, run_daemon) -> None:
    setup = make_setup(settle_s=0.4)
    daemon = run_daemon(setup.load())
    with capture_logs() as logs:
        gone = setup.write("gone.txt", b"short-lived")
        moved = setup.write("before.txt", b"renamed")
        gone.unlink()
        target = setup.drop / "after.txt"
        moved.rename(target)
        wait_until(lambda: uploaded(setup, [target]), what="renamed file uploaded")
        wait_until(daemon.idle, what="idle")
    rows = records(setup)
    assert set(rows) == {str(target)}
    assert not [e for e in logs if e["log_level"] in ("error", "warning")]
    daemon.stop()


@contextlib.contextmanager
def sysctl(name: str, value: str) -> Iterator[None]:
    """Set /proc/sys/fs/inotify/<name> for one test (as root), and put it back."""
    knob = Path("/proc/sys/fs/inotify") / name
    old = knob.read_text()
    try:
        knob.write_text(value)
    except OSError:
        pytest.skip(f"cannot set {knob} here (not root, or /proc read-only)")
    try:
        yield
    finally:
        knob.write_text(old)


@pytest.fixture
def tiny_inotify_queue() -> Iterator[None]:
    with sysctl("max_queued_events", "16"):
        yield


def test_inotify_overflow_leads_to_a_rescan(make_setup, run_daemon, tiny_inotify_queue) -> None:
    setup = make_setup(rescan_interval_s=0)  # no periodic rescan: only the overflow can save us
    with capture_logs() as logs:
        daemon = run_daemon(setup.load())
        files = [setup.write(f"burst/{i:04}.txt", b"o") for i in range(1500)]
        wait_until(
            lambda: uploaded(setup, files),
            timeout=90,
            what="every file after overflow",
            interval=0.5,  # reading 1,500 rows often would steal the daemon thread's GIL
        )
    assert any("events were lost" in e["event"] for e in logs)
    daemon.stop()


@pytest.fixture
def one_inotify_watch() -> Iterator[None]:
    with sysctl("max_user_watches", "1"):
        yield


def test_watch_limit_falls_back_to_polling(make_setup, run_daemon, one_inotify_watch) -> None:
    setup = make_setup()
    for i in range(3):
        (setup.drop / f"d{i}").mkdir()
    with capture_logs() as logs:
        daemon = run_daemon(setup.load())
        new = setup.write("d1/late.txt", b"seen by polling")
        try:
            wait_until(lambda: uploaded(setup, [new]), timeout=20, what="file seen by polling")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; daemon events: {[e['event'] for e in logs]}") from None
    assert any("polling this folder instead" in e["event"] for e in logs)
    daemon.stop()


def count_uploaded(setup: Setup) -> int:
    db = sqlite3.connect(f"file:{setup.manifest_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM files WHERE state = 'uploaded'").fetchone()[0]
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_burst_of_20000_files(make_setup, run_daemon) -> None:
    setup = make_setup(api={"concurrency": 8})
    daemon = run_daemon(setup.load())
    staging = setup.tmp / "staging"
    for d in range(20):
        (staging / f"d{d:02}").mkdir(parents=True)
        for i in range(1000):
            (staging / f"d{d:02}" / f"{i:04}.txt").write_bytes(b"%d-%d" % (d, i))
    for d in range(20):  # twenty folders dropped at once
        os.rename(staging / f"d{d:02}", setup.drop / f"d{d:02}")
    wait_until(
        lambda: (
            setup.load()
            and sum(1 for r in records(setup).values() if r.state == "uploaded") == 20_000
        ),
        timeout=240,
        what="20,000 files uploaded",
    )
    assert len(setup.api.api.files) == 20_000
    daemon.stop()
