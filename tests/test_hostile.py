"""Hostile drop folders: special files, symlinks, unreadable files, odd names, vanishing roots.

Each test drives the real daemon (in a thread, or `python -m watcher` as a subprocess) on real
files and real HTTP to the fake API, and fails if the guarantee it names is broken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TEST_KEY,
    Api,
    Setup,
    in_state,
    records,
    uploaded,
    wait_until,
    write_config,
)

TEST_USER = "smoothtest"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_names(api: Api) -> list[str]:
    return [f.name for f in list(api.api.files.values())]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- FIFOs, sockets, devices ------------------------------------------------------------------


class FifoProbe(threading.Thread):
    """Opens the FIFO for writing with O_NONBLOCK, over and over: ENXIO means no reader.

    If the daemon ever opened the FIFO for reading (blocking or not) while a probe runs, that
    probe's open succeeds; a blocking reader would even wait for it, so it is always caught.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.done = threading.Event()
        self.probes = 0
        self.opened = 0
        self.unexpected: list[int] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    self.unexpected.append(exc.errno)
            else:
                os.close(fd)
                self.opened += 1
            self.probes += 1
            self.done.wait(0.002)  # pacing between probes, not a wait for a condition

    def finish(self) -> None:
        self.done.set()
        self.join(5)


@pytest.mark.timeout(20)
def test_fifo_socket_and_device_are_skipped_never_opened(setup: Setup, run_daemon) -> None:
    fifo = setup.drop / "pipe.fifo"
    os.mkfifo(fifo)
    sock_path = setup.drop / "app.sock"
    assert len(os.fsencode(sock_path)) < 100, "unix socket path too long for this tmp dir"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    device = setup.drop / "null-dev"
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        device = None  # type: ignore[assignment]
    probe = FifoProbe(fifo)
    probe.start()
    try:
        before = setup.write("present.txt", b"ordinary file, present at start")
        daemon = run_daemon(setup.load())
        # Special files made while the daemon runs come through inotify, not the start scan.
        fifo2 = setup.drop / "live" / "late.fifo"
        fifo2.parent.mkdir()
        os.mkfifo(fifo2)
        after = setup.write("live/arrived.txt", b"ordinary file, arrived later")
        specials = {fifo: "FIFO", fifo2: "FIFO", sock_path: "socket"}
        if device is not None:
            specials[device] = "device"
        wait_until(lambda: uploaded(setup, [before, after]), 10, "ordinary files uploaded")
        rows = wait_until(lambda: in_state(setup, "skipped", list(specials)), 10, "specials")
        wait_until(daemon.idle, 10, "daemon idle")
        assert daemon.stop() == 0
    finally:
        probe.finish()
        sock.close()
    for path, word in specials.items():
        assert word in rows[str(path)].error, rows[str(path)]
        assert rows[str(path)].file_id is None
    assert probe.probes > 10, "the FIFO probe hardly ran"
    assert probe.unexpected == [], probe.unexpected
    assert probe.opened == 0, "the daemon opened the FIFO for reading"
    assert sorted(stored_names(setup.api)) == ["arrived.txt", "present.txt"]
    assert len(setup.api.uploads()) == 2


@pytest.mark.timeout(20)
def test_sync_finishes_with_a_fifo_in_the_folder(setup: Setup) -> None:
    fifo = setup.drop / "blocker"
    os.mkfifo(fifo)
    ok = setup.write("ok.txt", b"fine")
    proc = setup.cli("sync", "--config", str(setup.config_path), timeout=15)
    assert proc.returncode == 0, proc.stderr
    rows = records(setup)
    assert rows[str(fifo)].state == "skipped" and "FIFO" in rows[str(fifo)].error
    assert rows[str(ok)].state == "uploaded"


# --- symbolic links ---------------------------------------------------------------------------


def test_symlink_not_followed_by_default(setup: Setup, run_daemon) -> None:
    target = setup.write("real.txt", b"the real file")
    link = setup.drop / "link.txt"
    link.symlink_to(target)
    daemon = run_daemon(setup.load())
    late = setup.drop / "late-link.txt"
    late.symlink_to("real.txt")
    wait_until(lambda: uploaded(setup, [target]), 10, "target uploaded")
    rows = wait_until(lambda: in_state(setup, "skipped", [link, late]), 10, "links skipped")
    wait_until(daemon.idle, 10, "daemon idle")
    assert daemon.stop() == 0
    for path in (link, late):
        assert "follow_symlinks" in rows[str(path)].error
    assert stored_names(setup.api) == ["real.txt"]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the watch root, with files that must never be sent."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(b"outside the root: never sent")
    (folder / "other.txt").write_bytes(b"also outside")
    return folder


def test_followed_symlinks_stay_inside_the_root(make_setup, run_daemon, outside: Path) -> None:
    setup = make_setup(follow_symlinks=True)
    target_data = b"the target's bytes"
    target = setup.write("target.txt", target_data)
    inside_link = setup.drop / "inside-link.txt"
    inside_link.symlink_to("target.txt")
    out_link = setup.drop / "out-link.txt"
    out_link.symlink_to(outside / "secret.txt")
    dangling = setup.drop / "dangling.txt"
    dangling.symlink_to(setup.drop / "no-such-file")
    loop_a, loop_b = setup.drop / "a", setup.drop / "b"
    loop_a.symlink_to("b")
    loop_b.symlink_to("a")
    (setup.drop / "dir").mkdir()
    (setup.drop / "dir" / "up").symlink_to("..")  # a directory loop
    out_dir = setup.drop / "outdir"
    out_dir.symlink_to(outside, target_is_directory=True)

    daemon = run_daemon(setup.load())
    rows = wait_until(lambda: uploaded(setup, [target, inside_link]), 10, "link uploaded")
    skipped = [out_link, dangling, loop_a, loop_b, out_dir]
    rows = wait_until(lambda: in_state(setup, "skipped", skipped), 10, "bad links skipped")
    wait_until(daemon.idle, 10, "daemon idle (no endless recursion)")
    assert daemon.stop() == 0

    stored = setup.api.api.files[rows[str(inside_link)].file_id]
    assert stored.sha256 == sha(target_data) and stored.name == "inside-link.txt"
    assert "outside" in rows[str(out_link)].error
    assert "dangling" in rows[str(dangling)].error
    assert "loop" in rows[str(loop_a)].error and "loop" in rows[str(loop_b)].error
    assert "outside" in rows[str(out_dir)].error
    # Nothing reached through the folder link, nothing from outside, nothing twice.
    assert not [p for p in rows if p.startswith(str(out_dir) + "/")]
    assert sorted(stored_names(setup.api)) == ["inside-link.txt", "target.txt"]
    assert all(f.sha256 == sha(target_data) for f in setup.api.api.files.values())
    assert len(setup.api.uploads()) == 2


def test_links_made_while_running_never_lead_outside(make_setup, run_daemon, outside: Path) -> None:
    setup = make_setup(follow_symlinks=True)
    daemon = run_daemon(setup.load())
    (setup.drop / "outdir").symlink_to(outside, target_is_directory=True)
    (setup.drop / "out-link.txt").symlink_to(outside / "secret.txt")
    (outside / "written-later.txt").write_bytes(b"arrives outside while running")
    marker = setup.write("marker.txt", b"written last")
    wait_until(lambda: uploaded(setup, [marker]), 10, "marker uploaded")
    wait_until(daemon.idle, 10, "daemon idle")
    assert daemon.stop() == 0
    assert stored_names(setup.api) == ["marker.txt"]
    rows = records(setup)
    assert rows[str(setup.drop / "out-link.txt")].state == "skipped"
    assert rows[str(setup.drop / "outdir")].state == "skipped"
    assert not [p for p in rows if p.startswith(str(setup.drop / "outdir") + "/")]


def test_directory_link_loop_made_while_running_uploads_nothing_twice(
    make_setup, run_daemon
) -> None:
    setup = make_setup(follow_symlinks=True)
    existing = setup.write("existing.txt", b"present at start")
    daemon = run_daemon(setup.load())
    wait_until(lambda: uploaded(setup, [existing]), 10, "existing file uploaded")
    (setup.drop / "dir").mkdir()
    (setup.drop / "dir" / "up").symlink_to("..")  # dir/up -> the root: a loop
    marker = setup.write("marker.txt", b"written after the loop")
    wait_until(lambda: uploaded(setup, [marker]), 10, "marker uploaded")
    wait_until(daemon.idle, 10, "daemon idle (no endless recursion)")
    assert daemon.stop() == 0
    assert sorted(stored_names(setup.api)) == ["existing.txt", "marker.txt"]


# --- an unreadable file, as an unprivileged user ------------------------------------------------


def _user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("useradd is not available to create an unprivileged test user")
        proc = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            capture_output=True,
            text=True,
        )
        if proc.returncode not in (0, 9):  # 9: created meanwhile by a parallel run
            pytest.skip(f"cannot create user {TEST_USER}: {proc.stderr.strip()}")
        entry = pwd.getpwnam(TEST_USER)
    return entry.pw_uid, entry.pw_gid


def _open_up(path: Path, restore: list[tuple[Path, int]]) -> None:
    """Make ``path`` and its ancestors traversable by others (o+x), remembering old modes."""
    for folder in (path, *path.parents):
        mode = stat.S_IMODE(folder.stat().st_mode)
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            restore.append((folder, mode))


@pytest.fixture
def unprivileged(api: Api) -> Iterator[tuple[int, int, Path]]:
    """(uid, gid, work dir owned by that user) with the interpreter reachable by that user.

    The work dir is made under /tmp rather than pytest's tmp_path: pytest resets the mode of
    /tmp/pytest-of-root to 0700 whenever a pytest run starts, which would cut a parallel run off.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not available")
    uid, gid = _user()
    # One such test at a time on this machine: a parallel run restoring the folder modes would
    # cut this one off from its interpreter.
    lock = os.open("/tmp/smooth-watcher-unprivileged-test.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    work = Path(tempfile.mkdtemp(prefix="smooth-unreadable-", dir="/tmp"))
    restore: list[tuple[Path, int]] = []
    try:
        _open_up(Path(os.path.realpath(sys.executable)).parent, restore)
        _open_up(ROOT, restore)
        os.chown(work, uid, gid)
        yield uid, gid, work
    finally:
        for folder, mode in reversed(restore):
            with contextlib.suppress(OSError):
                folder.chmod(mode)
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)  # releases the flock


def test_unreadable_file_fails_with_permission_denied(api: Api, unprivileged) -> None:
    uid, gid, work = unprivileged
    drop = work / "drop"
    drop.mkdir()
    key_file = work / "api-key"
    key_file.write_text(TEST_KEY + "\n")
    key_file.chmod(0o600)
    settings = {"path": drop, "settle_s": 0.2, "rescan_interval_s": 0}
    config_path = write_config(work, api.base_url, key_file, settings)
    setup = Setup(work, drop, config_path, key_file, api)
    readable = {setup.write(f"ok{i}.txt", f"readable {i}".encode()): i for i in range(3)}
    locked = setup.write("locked.txt", b"root only")
    for path in [work, *work.rglob("*")]:
        os.chown(path, uid, gid)
    os.chown(locked, 0, 0)
    locked.chmod(0o600)

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(work),
        "SMOOTH_TELEMETRY": "off",
    }
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    whoami = subprocess.run([*setpriv, "id", "-u"], capture_output=True, text=True, env=env)
    assert whoami.stdout.strip() == str(uid), whoami.stderr
    proc = subprocess.run(
        [*setpriv, sys.executable, "-m", "watcher", "sync", "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=30,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = records(setup)
    assert rows[str(locked)].state == "failed"
    assert "permission denied" in rows[str(locked)].error.lower()
    assert uploaded(setup, list(readable)), rows
    assert sorted(stored_names(api)) == ["ok0.txt", "ok1.txt", "ok2.txt"]


# --- size limit ---------------------------------------------------------------------------------


def test_file_over_max_file_size_fails_without_being_sent(make_setup, run_daemon) -> None:
    setup = make_setup(max_file_size="1KiB")
    big = setup.write("big.bin", os.urandom(2048))
    exact = setup.write("exact.bin", os.urandom(1024))
    small = setup.write("small.txt", b"small enough")
    daemon = run_daemon(setup.load())
    wait_until(lambda: uploaded(setup, [exact, small]), 10, "small files uploaded")
    rows = wait_until(lambda: in_state(setup, "failed", [big]), 10, "big file failed")
    wait_until(daemon.idle, 10, "daemon idle")
    assert daemon.stop() == 0
    assert "max_file_size" in rows[str(big)].error
    assert rows[str(big)].file_id is None
    assert sorted(stored_names(setup.api)) == ["exact.bin", "small.txt"]
    assert len(setup.api.uploads()) == 2, "the big file reached the API"


# --- names --------------------------------------------------------------------------------------


def test_hostile_names_are_uploaded_and_round_trip(setup: Setup, run_daemon) -> None:
    long_name = "é" * 127 + "x"
    assert len(long_name.encode()) == 255
    names = {
        "line\nbreak.txt": "line%0Abreak.txt",
        long_name: long_name,
        'say "hi".txt': "say %22hi%22.txt",
        "spaces and ünïcødé 日本 ✓.txt": "spaces and ünïcødé 日本 ✓.txt",
        "cr\rand tab\t.txt": "cr%0Dand tab\t.txt",
    }
    daemon = run_daemon(setup.load())
    files = {setup.write(name, name.encode() * 3): name for name in names}
    fd = os.open(os.fsencode(setup.drop) + b"/bad\xff.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"not utf-8 name")
    os.close(fd)
    bad = setup.drop / os.fsdecode(b"bad\xff.txt")
    wait_until(lambda: uploaded(setup, [*files, bad]), 10, "odd names uploaded")
    wait_until(daemon.idle, 10, "daemon idle")
    assert daemon.stop() == 0

    expected = sorted([*names.values(), "bad\ufffd.txt"])
    assert sorted(stored_names(setup.api)) == expected
    by_name = {f.name: f for f in setup.api.api.files.values()}
    for name in files.values():
        assert by_name[names[name]].sha256 == sha(name.encode() * 3), name
    assert by_name["bad\ufffd.txt"].sha256 == sha(b"not utf-8 name")

    proc = setup.cli("export", "--config", str(setup.config_path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    exported = json.loads(proc.stdout)
    assert len(exported) == len(files) + 1
    assert all(r["state"] == "uploaded" for r in exported)
    paths = {r["path"] for r in exported}
    assert {str(p) for p in files} <= paths  # newline, quote, CR and unicode come back intact
    assert str(bad) in paths  # the undecodable byte as a surrogate escape


# --- the watch root -----------------------------------------------------------------------------


def test_root_deleted_and_recreated_is_watched_again(setup: Setup, run_daemon) -> None:
    daemon = run_daemon(setup.load())
    first = setup.write("first.txt", b"before the root went away")
    wait_until(lambda: uploaded(setup, [first]), 10, "first file uploaded")
    shutil.rmtree(setup.drop)
    setup.drop.mkdir()
    second = setup.write("second.txt", b"after the root came back")
    # The daemon checks its roots every 2 s (ROOT_CHECK_S): four checks' worth of time.
    wait_until(lambda: uploaded(setup, [second]), 8, "file in the re-created root uploaded")
    assert daemon.stop() == 0


@pytest.mark.parametrize("command", ["run", "sync", "check"])
def test_missing_watch_root_exits_2_with_one_line(make_setup, tmp_path: Path, command) -> None:
    missing = tmp_path / "not" / "there"
    setup = make_setup(path=missing)
    proc = setup.cli(command, "--config", str(setup.config_path), timeout=20)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert str(missing) in line


# --- a share that drops out and comes back ------------------------------------------------------


def _keep_stat(path: Path, action: Callable[[], None]) -> None:
    st = path.stat()
    action()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "poll"])
def test_files_that_go_away_and_come_back_unchanged_are_not_sent_again(
    make_setup, run_daemon, tmp_path: Path, poll: bool
) -> None:
    setup = make_setup(poll=poll)
    files = {setup.write(f"share/f{i:02}.dat", f"content {i}".encode()): i for i in range(20)}
    first = run_daemon(setup.load())
    wait_until(lambda: uploaded(setup, list(files)), 10, "first upload of 20 files")
    assert first.stop() == 0
    posts = len(setup.api.uploads())
    assert posts == 20

    again = run_daemon(setup.load())
    wait_until(again.idle, 10, "second start idle")
    away = tmp_path / "away"
    away.mkdir()
    paths = sorted(files)
    for path in paths[:7]:  # moved out and back: same inode, same mtime
        os.rename(path, away / path.name)
        os.rename(away / path.name, path)
    for path in paths[7:14]:  # deleted and written again: new inode, same bytes, same mtime
        data = path.read_bytes()
        _keep_stat(path, lambda p=path, d=data: (p.unlink(), p.write_bytes(d)))
    touched = paths[14:]
    for path in touched:  # same bytes, a new mtime: the sha256 says unchanged
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    # Written last: once it is uploaded and the daemon is idle, everything before it settled.
    sentinel = setup.write("share/zz-sentinel.txt", b"new")
    wait_until(lambda: uploaded(setup, [sentinel]), 10, "sentinel uploaded")
    wait_until(again.idle, 10, "daemon idle")
    rows = records(setup)
    assert again.stop() == 0

    new_posts = setup.api.uploads()[posts:]
    assert len(new_posts) == 1, f"{len(new_posts) - 1} unchanged file(s) sent again"
    assert sorted(stored_names(setup.api)).count("zz-sentinel.txt") == 1
    for path in touched:  # the new mtime is remembered, so the next start does not hash again
        assert rows[str(path)].mtime_ns == path.stat().st_mtime_ns
        assert rows[str(path)].state == "uploaded"
