"""watcher/uploader.py without a server: answer classification, Retry-After, the multipart
filename, the shared throttle (on a fake clock) and opening files safely."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from watcher import uploader
from watcher.errors import (
    AuthError,
    FileChangedError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from watcher.uploader import Throttle, classify, form_filename, open_regular, parse_retry_after

ROOT = Path(__file__).resolve().parent.parent


def file_id(status: int, body: bytes, retry_after: str | None = None) -> str:
    """What the client does with a ``POST /file`` answer: classify it, then take the id."""
    return uploader.file_id_of(classify(status, body, retry_after))


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --- classify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_success_gives_the_file_id(status: int) -> None:
    assert file_id(status, body({"r": {"id": "file-42", "extra": 1}})) == "file-42"


def test_success_payload_is_returned_whole() -> None:
    assert classify(200, body({"r": {"id": "t1", "status": "waiting"}})) == {
        "id": "t1",
        "status": "waiting",
    }
    assert classify(200, body({"r": True})) is True


@pytest.mark.parametrize(
    "raw",
    [
        b"<html>ok</html>",
        b"",
        b"\xff\xfe not utf-8",
        body({"id": "top-level"}),
        body({"r": {}}),
        body({"r": {"id": ""}}),
        body({"r": {"id": 7}}),
        body({"r": None}),
        body({"r": "file-1"}),
        body(["r"]),
    ],
)
def test_2xx_without_an_id_is_transient(raw: bytes) -> None:
    with pytest.raises(TransientError) as excinfo:
        file_id(200, raw)
    assert type(excinfo.value) is TransientError


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504, 599])
def test_transient_statuses(status: int) -> None:
    with pytest.raises(TransientError) as excinfo:
        classify(status, body({"detail": "busy"}), "7")
    assert type(excinfo.value) is TransientError
    assert f"HTTP {status}" in str(excinfo.value)
    assert "busy" in excinfo.value.reason
    assert excinfo.value.retry_after_s == 7.0


def test_5xx_html_page_is_transient_with_a_short_reason() -> None:
    page = b"<html>" + b"x" * 10_000 + b"</html>"
    with pytest.raises(TransientError) as excinfo:
        classify(502, page)
    assert len(excinfo.value.reason) < 300
    assert excinfo.value.retry_after_s is None


def test_429_is_rate_limited_with_retry_after() -> None:
    with pytest.raises(RateLimitedError) as excinfo:
        classify(429, body({"detail": "slow down"}), "12")
    assert isinstance(excinfo.value, TransientError)  # retried like any transient failure
    assert excinfo.value.retry_after_s == 12.0
    assert "slow down" in excinfo.value.reason


def test_429_without_retry_after() -> None:
    with pytest.raises(RateLimitedError) as excinfo:
        classify(429, b"")
    assert excinfo.value.retry_after_s is None


@pytest.mark.parametrize("status", [400, 413, 415, 422, 404])
def test_permanent_statuses_carry_the_detail(status: int) -> None:
    detail = f"file rejected ({status}): invalid filename"
    with pytest.raises(PermanentError) as excinfo:
        classify(status, body({"detail": detail}))
    assert not isinstance(excinfo.value, TransientError)
    assert detail in excinfo.value.reason
    assert str(status) in excinfo.value.reason


def test_structured_detail_is_kept_as_json() -> None:
    detail = [{"loc": ["body", "file"], "msg": "field required"}]
    with pytest.raises(PermanentError) as excinfo:
        classify(422, body({"detail": detail}))
    assert "field required" in excinfo.value.reason
    assert '"loc"' in excinfo.value.reason


@pytest.mark.parametrize("status", [401, 403])
def test_auth_statuses(status: int) -> None:
    with pytest.raises(AuthError) as excinfo:
        classify(status, body({"detail": "invalid api key"}))
    assert not isinstance(excinfo.value, TransientError)  # never retried
    assert str(status) in str(excinfo.value)
    assert "invalid api key" in str(excinfo.value)


# --- Retry-After ---------------------------------------------------------------------------------

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("5", 5.0),
        ("120", 120.0),
        ("1.5", 1.5),
        ("0.25", 0.25),
        ("-3", 0.0),
        ("999999", uploader.MAX_RETRY_AFTER_S),
        (None, None),
        ("", None),
        ("soon", None),
        ("Wed, 99 Foo 2015 xx:yy", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) == expected


def test_retry_after_cap_is_at_most_an_hour() -> None:
    assert 0 < uploader.MAX_RETRY_AFTER_S <= 3600


@pytest.mark.parametrize(("ahead_s", "expected"), [(30, 30.0), (0, 0.0), (-60, 0.0)])
def test_retry_after_http_date(ahead_s: int, expected: float) -> None:
    header = email.utils.format_datetime(NOW + timedelta(seconds=ahead_s), usegmt=True)
    assert parse_retry_after(header, now=NOW.timestamp()) == pytest.approx(expected)


def test_retry_after_http_date_far_ahead_is_capped() -> None:
    header = email.utils.format_datetime(NOW + timedelta(days=3), usegmt=True)
    assert parse_retry_after(header, now=NOW.timestamp()) == uploader.MAX_RETRY_AFTER_S


@pytest.mark.parametrize("value", ["nan", "NaN"])
def test_retry_after_nan_is_garbage(value: str) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) is None


# --- the multipart filename ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/srv/drop/invoices/report.pdf", "report.pdf"),
        ("relative/dir/a b.txt", "a b.txt"),
        ("/x/Ünïcødé файл 日本.pdf", "Ünïcødé файл 日本.pdf"),
        ('/x/say "hi".txt', "say %22hi%22.txt"),
        ("/x/two\r\nlines.txt", "two%0D%0Alines.txt"),
        ("/x/new\nline.txt", "new%0Aline.txt"),
        ("/x/semi;colon=1.txt", "semi;colon=1.txt"),
    ],
)
def test_form_filename(path: str, expected: str) -> None:
    assert form_filename(path) == expected


def test_form_filename_invalid_utf8_becomes_replacement_char() -> None:
    name = form_filename(os.fsdecode(b"/drop/bad\xff.txt"))
    assert name == "bad\ufffd.txt"
    name.encode("utf-8")  # sendable as UTF-8: no lone surrogates left


def test_form_filename_goes_into_the_part_header_raw(tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"abc")
    with data.open("rb") as f:
        payload = uploader.FilePayload(f, 3, form_filename('/d/é "q".txt'))
        header = payload.headers["Content-Disposition"]
    assert header == 'form-data; name="file"; filename="é %22q%22.txt"'


# --- Throttle on a fake clock --------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the throttle sleeps (through the patched asyncio.sleep)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.on_sleep: list[Any] = []  # callbacks run at the first sleeps, one each

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    clock = FakeTime()
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        clock.sleeps.append(delay)
        target = clock.now + max(delay, 0.0)
        if clock.on_sleep:
            clock.on_sleep.pop(0)()
        await real_sleep(0)
        clock.now = max(clock.now, target)
        return result

    monkeypatch.setattr(uploader.asyncio, "sleep", sleep)
    return clock


def test_throttle_without_limit_or_pause_never_sleeps(fake_time: FakeTime) -> None:
    throttle = Throttle(0, clock=fake_time)

    async def go() -> None:
        for _ in range(20):
            await throttle.wait()

    asyncio.run(go())
    assert fake_time.sleeps == []
    assert fake_time.now == 1000.0


def test_pause_makes_wait_wait(fake_time: FakeTime) -> None:
    throttle = Throttle(0, clock=fake_time)
    throttle.pause(5.0)
    asyncio.run(throttle.wait())
    assert fake_time.now == pytest.approx(1005.0)
    assert sum(fake_time.sleeps) == pytest.approx(5.0)


def test_pause_is_shared_by_every_waiter(fake_time: FakeTime) -> None:
    throttle = Throttle(0, clock=fake_time)
    returned: list[float] = []

    async def worker() -> None:
        await throttle.wait()
        returned.append(fake_time.now)

    async def go() -> None:
        throttle.pause(3.0)
        await asyncio.gather(*(worker() for _ in range(4)))

    asyncio.run(go())
    assert len(returned) == 4
    assert all(t >= 1003.0 for t in returned)


def test_shorter_pause_does_not_shorten_a_longer_one(fake_time: FakeTime) -> None:
    throttle = Throttle(0, clock=fake_time)
    throttle.pause(10.0)
    throttle.pause(2.0)
    asyncio.run(throttle.wait())
    assert fake_time.now == pytest.approx(1010.0)


def test_pause_pushed_further_while_waiting(fake_time: FakeTime) -> None:
    throttle = Throttle(0, clock=fake_time)
    throttle.pause(2.0)
    # While the first sleep runs, another 429 asks for 6 s from then (t=1000): until 1006.
    fake_time.on_sleep.append(lambda: throttle.pause(6.0))
    asyncio.run(throttle.wait())
    assert fake_time.now == pytest.approx(1006.0)
    assert len(fake_time.sleeps) == 2


def test_expired_pause_does_not_wait(fake_time: FakeTime) -> None:
    throttle = Throttle(0, clock=fake_time)
    throttle.pause(1.0)
    fake_time.now += 1.5
    asyncio.run(throttle.wait())
    assert fake_time.sleeps == []


def test_max_per_s_spaces_consecutive_waits(fake_time: FakeTime) -> None:
    throttle = Throttle(4, clock=fake_time)
    returned: list[float] = []

    async def go() -> None:
        for _ in range(5):
            await throttle.wait()
            returned.append(fake_time.now)

    asyncio.run(go())
    gaps = [b - a for a, b in itertools.pairwise(returned)]
    assert returned[0] == 1000.0  # the first request goes at once
    assert gaps == pytest.approx([0.25] * 4)


def test_max_per_s_spaces_concurrent_waiters(fake_time: FakeTime) -> None:
    throttle = Throttle(2, clock=fake_time)

    async def go() -> None:
        await asyncio.gather(*(throttle.wait() for _ in range(4)))

    asyncio.run(go())
    assert sorted(fake_time.sleeps) == pytest.approx([0.5, 1.0, 1.5])


def test_max_per_s_gives_no_burst_credit_after_idle(fake_time: FakeTime) -> None:
    throttle = Throttle(2, clock=fake_time)

    async def two() -> list[float]:
        out = []
        for _ in range(2):
            await throttle.wait()
            out.append(fake_time.now)
        return out

    asyncio.run(two())
    fake_time.now += 60.0  # idle for a minute
    fake_time.sleeps.clear()
    times = asyncio.run(two())
    assert times[1] - times[0] == pytest.approx(0.5)
    assert fake_time.sleeps == [pytest.approx(0.5)]


# --- open_regular --------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = _open_fds()
    yield
    assert _open_fds() == before, "open_regular leaked a file descriptor"


def test_open_regular_reads_a_regular_file(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"hello world")
    f, st = open_regular(str(path), follow=False, max_size=11)
    with f:
        assert os.get_blocking(f.fileno())
        assert f.read() == b"hello world"
    assert st.st_size == 11
    assert st.st_ino == path.stat().st_ino


@pytest.mark.timeout(5)
def test_open_regular_refuses_a_fifo_without_blocking(tmp_path: Path, no_fd_leak: None) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for follow in (False, True):
        with pytest.raises(FileChangedError, match="regular file"):
            open_regular(str(fifo), follow=follow, max_size=1 << 20)


@pytest.mark.timeout(5)
def test_open_regular_refuses_a_socket_and_a_directory(tmp_path: Path, no_fd_leak: None) -> None:
    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(FileChangedError):
            open_regular(str(sock_path), follow=False, max_size=1 << 20)
    with pytest.raises(FileChangedError, match="regular file"):
        open_regular(str(tmp_path), follow=False, max_size=1 << 20)


def test_open_regular_refuses_a_symlink_unless_followed(tmp_path: Path, no_fd_leak: None) -> None:
    target = tmp_path / "target.txt"
    target.write_bytes(b"data")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(FileChangedError):
        open_regular(str(link), follow=False, max_size=100)
    f, _ = open_regular(str(link), follow=True, max_size=100)
    with f:
        assert f.read() == b"data"


def test_open_regular_over_max_size_is_permanent(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    with pytest.raises(PermanentError) as excinfo:
        open_regular(str(path), follow=False, max_size=100)
    assert "101" in excinfo.value.reason
    assert "max_file_size" in excinfo.value.reason
    f, st = open_regular(str(path), follow=False, max_size=101)  # exactly the limit is fine
    f.close()
    assert st.st_size == 101


@pytest.mark.parametrize("follow", [False, True])
def test_open_regular_with_root_refuses_a_path_through_a_link_out(
    tmp_path: Path, no_fd_leak: None, follow: bool
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(b"secret")
    (root / "sub").symlink_to(tmp_path / "outside")
    path = str(root / "sub" / "secret.txt")
    with pytest.raises(PermanentError, match="symbolic link"):
        open_regular(path, follow=follow, max_size=100, root=str(root))


def test_open_regular_with_root_and_links_inside(tmp_path: Path, no_fd_leak: None) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f.txt").write_bytes(b"inside")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    path = str(tmp_path / "alias" / "f.txt")
    with pytest.raises(PermanentError):  # not following: even a link inside is refused
        open_regular(path, follow=False, max_size=100, root=str(tmp_path))
    f, _ = open_regular(path, follow=True, max_size=100, root=str(tmp_path))
    with f:
        assert f.read() == b"inside"
    f, _ = open_regular(str(tmp_path / "real" / "f.txt"), False, 100, root=str(tmp_path))
    f.close()


def test_open_regular_missing_file(tmp_path: Path, no_fd_leak: None) -> None:
    with pytest.raises(FileChangedError, match="vanished"):
        open_regular(str(tmp_path / "gone"), follow=False, max_size=100)


_UNREADABLE_PROBE = """
import sys
sys.path.insert(0, sys.argv[2])
from watcher.errors import PermanentError
from watcher.uploader import open_regular
try:
    open_regular(sys.argv[1], False, 1 << 20)
except PermanentError as exc:
    print("PermanentError:", exc.reason)
except BaseException as exc:
    print("other:", type(exc).__name__, exc)
else:
    print("opened")
"""


def test_open_regular_unreadable_file_is_permanent() -> None:
    """Run as an unprivileged user: root reads every file, so only then is this real."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to drop to an unprivileged user")
    try:
        import pwd

        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to run as")
    # tmp_path lives under a 0700 folder of root's; use a folder the user can traverse.
    folder = tempfile.mkdtemp(prefix="sw-unreadable-")
    try:
        os.chmod(folder, 0o711)
        path = os.path.join(folder, "secret.txt")
        with open(path, "w") as f:
            f.write("not for you")
        os.chmod(path, 0o600)
        cmd = [
            setpriv,
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            _UNREADABLE_PROBE,
            path,
            str(ROOT),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/")
        if result.returncode != 0 and "setpriv" in result.stderr:
            pytest.skip(f"cannot drop privileges here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("PermanentError: "), result.stdout + result.stderr
        assert "permission denied" in result.stdout
    finally:
        shutil.rmtree(folder, ignore_errors=True)
