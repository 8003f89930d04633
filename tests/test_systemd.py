"""The sd_notify client against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from watcher.systemd import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path, as systemd binds /run/systemd/notify."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_exactly_as_sent(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    assert notifier.enabled

    assert notifier.ready("watching 2 folders")
    assert received(sock) == "READY=1\nSTATUS=watching 2 folders"
    assert notifier.status("3 pending\n1 failed")  # a newline must not start a new assignment
    assert received(sock) == "STATUS=3 pending 1 failed"
    assert notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert received(sock) == "STOPPING=1"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    reloading, monotonic = received(sock).split("\n")
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"smooth-watcher-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("ok")
        assert received(sock) == "READY=1\nSTATUS=ok"
        notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "60000000"})
    assert notifier.watchdog_interval_s == 30.0
    same_pid = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "5000000"}
    same_pid["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_env(same_pid).watchdog_interval_s == 2.5
    for bad in ("", "0", "-1", "sixty"):
        env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": bad}
        assert Notifier.from_env(env).watchdog_interval_s is None
    # A watchdog without a socket to send it to is no watchdog.
    assert Notifier.from_env({"WATCHDOG_USEC": "60000000"}).watchdog_interval_s is None


def test_watchdog_pid_of_another_process_disables_the_watchdog(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}
    notifier = Notifier.from_env(env)
    assert notifier.watchdog_interval_s is None
    assert not notifier.watchdog()
    assert notifier.stopping()  # other notifications still go out
    assert received(sock) == "STOPPING=1"  # and the watchdog ping did not come before it
    notifier.close()


def test_unset_environment_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    with capture_logs() as logs:
        for send in (notifier.ready, notifier.status):
            assert not send("x")
        assert not notifier.watchdog()
        assert not notifier.stopping()
        assert not notifier.reloading()
    assert logs == []


def test_missing_socket_warns_once_and_never_raises(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    with capture_logs() as logs:
        assert not notifier.ready("x")
        assert not notifier.stopping()
    assert [e["log_level"] for e in logs] == ["warning"]
    assert "FileNotFoundError" in logs[0]["error"]
    notifier.close()


def test_full_receive_queue_does_not_block(listener: tuple[socket.socket, str]) -> None:
    _, path = listener  # nobody reads: the kernel queue fills up and sendto gets EAGAIN
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    start = time.monotonic()
    with capture_logs() as logs:
        results = [notifier.status(f"message {i}") for i in range(2000)]
    assert time.monotonic() - start < 1.0
    assert results[0] and not all(results)
    assert len(logs) == 1 and "BlockingIOError" in logs[0]["error"]
    notifier.close()


def test_unsupported_address_is_ignored() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert logs[0]["log_level"] == "warning"
