"""The daemon as a service: systemd notifications on a real socket, /metrics and /healthz."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from conftest import Setup, uploaded, wait_until
from test_faults import daemon_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_health_endpoints(make_setup) -> None:
    port = free_port()
    setup = make_setup()
    setup.config_path.write_text(
        setup.config_path.read_text().replace(
            "[log]", f'[metrics]\nlisten = "127.0.0.1:{port}"\n[log]'
        )
    )
    setup.api.faults.reject_pattern = "*.bad"
    with daemon_process(setup):
        good = setup.write("good.txt", b"measured")
        setup.write("no.bad", b"rejected")
        wait_until(lambda: uploaded(setup, [good]), what="upload")
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: 'smooth_watcher_uploads_total{outcome="failed"} 1' in get(base + "/metrics")[1],
            what="the failure counted",
        )
        status, text = get(base + "/metrics")
        assert status == 200
        assert 'smooth_watcher_uploads_total{outcome="uploaded"} 1' in text
        assert 'smooth_watcher_upload_bytes_total{outcome="uploaded"} 8' in text
        assert 'smooth_watcher_files{state="uploaded"} 1' in text
        assert "smooth_watcher_upload_duration_seconds_count 1" in text
        assert get(base + "/healthz") == (200, "ok")


def test_systemd_notify_protocol(make_setup, tmp_path: Path) -> None:
    """1. READY=1 once the start scan is queued; 2. STATUS with counts; 3. WATCHDOG=1 pings;
    4. STOPPING=1 on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    setup: Setup = make_setup()
    setup.write("before.txt", b"x")
    env = setup.env()
    env["NOTIFY_SOCKET"] = str(sock_path)
    env["WATCHDOG_USEC"] = "2000000"  # a ping at least every second
    setup.env = lambda: env  # type: ignore[method-assign]
    messages: list[str] = []

    def receive_until(marker: str) -> None:
        while not any(marker in m for m in messages):
            messages.append(sock.recv(4096).decode())

    try:
        with daemon_process(setup) as proc:
            receive_until("READY=1")
            ready = next(m for m in messages if "READY=1" in m)
            assert "STATUS=" in ready
            receive_until("WATCHDOG=1")
            wait_until(lambda: uploaded(setup, [setup.drop / "before.txt"]), what="upload")
            proc.terminate()
            receive_until("STOPPING=1")
            assert proc.wait(20) == 0
    finally:
        sock.close()
    assert any(m.startswith("STATUS=uploaded") for m in messages)
