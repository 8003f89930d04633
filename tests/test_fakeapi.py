"""fake-api: answers like the real Smooth API (proved with the official SDK), and its faults."""

from __future__ import annotations

import os

# Telemetry is decided when smooth is imported: switch it off first (no internet in tests).
os.environ.setdefault("SMOOTH_TELEMETRY", "off")

import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import smooth
from conftest import wait_until
from pydantic import BaseModel

from watcher.fakeapi import FakeApi, Faults, serve_in_thread

KEY = "test-key-1234"
SCHEMA = {"type": "object", "properties": {"total": {"type": "number"}, "vendor": {}}}


@pytest.fixture
def api(tmp_path: Path) -> FakeApi:
    return FakeApi(tmp_path / "data", api_keys=[KEY], task_duration_s=0.3)


@pytest.fixture
def base(api: FakeApi) -> Iterator[str]:
    with serve_in_thread(api) as url:
        yield url


def call(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One request with urllib; the body is decoded as JSON when it is JSON."""
    request = urllib.request.Request(
        url, data=body, method=method, headers={"apikey": KEY, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, got, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, got, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, got, json.loads(raw)
    except ValueError:
        return status, got, raw


def call_json(method: str, url: str, payload: Any) -> tuple[int, dict[str, str], Any]:
    return call(method, url, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def multipart(
    filename: bytes | None = b"a.txt", content: bytes = b"hello", purpose: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """A form as curl sends it: the filename as raw bytes, not percent-encoded."""
    parts = []
    if purpose is not None:
        parts.append(
            b'Content-Disposition: form-data; name="file_purpose"\r\n\r\n' + purpose.encode()
        )
    if filename is not None:
        parts.append(
            b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + content
        )
    body = b"".join(b"--BOUNDARY\r\n" + p + b"\r\n" for p in parts) + b"--BOUNDARY--\r\n"
    return body, {"Content-Type": "multipart/form-data; boundary=BOUNDARY"}


def upload(base: str, filename: bytes = b"a.txt", **kw: Any) -> tuple[int, dict[str, str], Any]:
    body, headers = multipart(filename, **kw)
    return call("POST", f"{base}/file", body, headers)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def sdk_client(base: str, key: str = KEY) -> Iterator[smooth.SmoothClient]:
    # The SDK wants the root without the version and appends /v1 itself.
    client = smooth.SmoothClient(api_key=key, base_url=base.removesuffix("/v1"), retries=0)
    try:
        with client:
            yield client
    finally:
        # The SDK runs its own event loop in a thread and never closes it: close it here so
        # the test leaves no ResourceWarning behind.
        client._loop.call_soon_threadsafe(client._loop.stop)
        client._loop_thread.join(5)
        client._loop.close()


# -- the official SDK --


# smooth-py 0.4.5 serialises its deprecated `session_id` alias on every run(), which warns
# from inside the SDK; nothing a caller can change.
@pytest.mark.filterwarnings("ignore:'session_id' is deprecated:DeprecationWarning")
def test_sdk_upload_run_delete(api: FakeApi, base: str, tmp_path: Path) -> None:
    src = tmp_path / "invoice #7.pdf"
    src.write_bytes(os.urandom(100_000))
    with sdk_client(base) as client:
        with src.open("rb") as fh:
            file_id = client.upload_file(fh, purpose="the invoice").id
        stored = api.files[file_id]
        # The SDK sends names percent-encoded (aiohttp's FormData default), not as raw UTF-8
        # like curl and browsers; fake-api keeps what arrives, as the real API does.
        assert stored.name == "invoice%20%237.pdf"
        assert (stored.sha256, stored.size, stored.purpose) == (sha256(src), 100_000, "the invoice")
        assert stored.path.read_bytes() == src.read_bytes()

        result = client.run(task="Summarise it", files=[file_id]).result(timeout=10)
        assert result.status == "done"
        assert "invoice" in result.output
        assert isinstance(result.credits_used, int) and result.recording_url

        api.task_duration_s = 0  # the running -> done path is proven above; keep this fast

        class Invoice(BaseModel):
            total: float
            vendor: str | None

        result = client.run(task="Extract", files=[file_id], response_model=Invoice).result(10)
        assert result.status == "done"
        assert isinstance(result.output["total"], float) and result.output["vendor"]

        client.delete_file(file_id)
        assert file_id not in api.files and not stored.path.exists()
        with pytest.raises(smooth.ApiError) as err:
            client.delete_file(file_id)
        assert err.value.status_code == 404


def test_sdk_wrong_key_is_401(base: str, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("x")
    with (
        sdk_client(base, key="wrong-key") as client,
        src.open("rb") as fh,
        pytest.raises(smooth.ApiError) as err,
    ):
        client.upload_file(fh)
    assert err.value.status_code == 401
    assert err.value.detail == "Invalid API key"


# -- the API over plain HTTP --


def test_utf8_filename_arrives_intact(api: FakeApi, base: str) -> None:
    name = "résumé 日本.pdf"
    status, _, body = upload(base, name.encode(), content=b"data")
    assert status == 200
    assert api.files[body["r"]["id"]].name == name


def test_browser_escapes_are_kept_as_they_arrive(api: FakeApi, base: str) -> None:
    status, _, body = upload(base, b"a%22b%0A.txt")
    assert status == 200
    assert api.files[body["r"]["id"]].name == "a%22b%0A.txt"


@pytest.mark.parametrize(
    ("filename", "needle"),
    [(None, "'file'"), (b"", "filename"), (b"a/b.txt", "filename"), (b"caf\xe9", "UTF-8")],
)
def test_bad_file_part_is_400(base: str, api: FakeApi, filename: bytes | None, needle: str) -> None:
    body, headers = multipart(filename, purpose="only a purpose")
    status, _, answer = call("POST", f"{base}/file", body, headers)
    assert status == 400
    assert needle in answer["detail"]
    assert not api.files and not list(api.data_dir.iterdir())


def test_file_purpose_at_most_64_chars(api: FakeApi, base: str) -> None:
    status, _, answer = upload(base, purpose="é" * 65)
    assert status == 400 and "file_purpose" in answer["detail"]
    status, _, answer = upload(base, purpose="é" * 64)
    assert status == 200 and api.files[answer["r"]["id"]].purpose == "é" * 64


def test_not_multipart_is_400(base: str) -> None:
    status, _, answer = call_json("POST", f"{base}/file", {"file": "x"})
    assert status == 400 and "multipart" in answer["detail"]
    body = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\nX\x01: \x00\r\n\r\n'
    )
    status, _, answer = call("POST", f"{base}/file", body, {"Content-Type": "multipart/form-data"})
    assert status == 400 and "multipart" in answer["detail"]  # no boundary
    headers = {"Content-Type": "multipart/form-data; boundary=B"}
    status, _, answer = call("POST", f"{base}/file", body + b"x\r\n--B--\r\n", headers)
    assert status == 400 and "Malformed" in answer["detail"]


def test_auth_and_unknown_routes(base: str) -> None:
    status, _, answer = call("GET", f"{base}/task/nope", headers={"apikey": ""})
    assert (status, answer) == (401, {"detail": "Invalid API key"})
    status, _, answer = call("GET", f"{base}/nothing-here")
    assert status == 404 and "detail" in answer
    status, headers, answer = call("DELETE", f"{base}/task/x")
    assert status == 405 and "detail" in answer and "GET" in headers["Allow"]
    # The SDK posts telemetry unless SMOOTH_TELEMETRY=off: it must not fail.
    status, _, answer = call_json("POST", f"{base}/telemetry", {"events": []})
    assert (status, answer) == (200, {"r": True})


def test_expired_file_cannot_start_a_task(api: FakeApi, base: str) -> None:
    file_id = upload(base)[2]["r"]["id"]
    api.files[file_id].uploaded_at -= 24 * 3600 + 1  # the real API deletes files after 24 h
    status, _, answer = call_json("POST", f"{base}/task", {"task": "t", "files": [file_id]})
    assert status == 400 and file_id in answer["detail"]
    assert file_id not in api.files and not list(api.data_dir.iterdir())


def test_client_gone_mid_upload_leaves_nothing(api: FakeApi, base: str) -> None:
    host, port = base.split("/")[2].split(":")
    head = b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /api/v1/file HTTP/1.1\r\nHost: x\r\napikey: " + KEY.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=BOUNDARY\r\n"
            b"Content-Length: 10000000\r\n\r\n" + head + os.urandom(1_000_000)
        )
        wait_until(lambda: list(api.data_dir.glob("*.part")))
    wait_until(lambda: [r.status for r in api.requests] == [0])
    assert not api.files and not list(api.data_dir.iterdir())


def test_task_validation(base: str) -> None:
    url = f"{base}/task"
    assert call_json("POST", url, {"task": "t", "max_steps": 1})[0] == 422
    assert call_json("POST", url, {"task": "t", "max_steps": 129})[0] == 422
    assert call_json("POST", url, {"task": "t", "metadata": {"a": [1]}})[0] == 422
    assert call_json("POST", url, {"files": []})[0] == 422
    status, _, answer = call_json("POST", url, {"task": "t", "files": ["file_missing"]})
    assert status == 400 and "file_missing" in answer["detail"]
    status, _, answer = call("POST", url, b"{not json", {"Content-Type": "application/json"})
    assert status == 400


def test_task_runs_then_ends(base: str) -> None:
    file_id = upload(base, b"scan.png")[2]["r"]["id"]
    extra = {"agent": "smooth", "device": "desktop", "max_steps": 2, "metadata": {"k": 1}}
    status, _, answer = call_json(
        "POST", f"{base}/task", {"task": "t", "files": [file_id], **extra}
    )
    assert status == 200 and answer["r"]["status"] == "waiting"
    task_url = f"{base}/task/{answer['r']['id']}?event_t=0"
    status, _, answer = call("GET", task_url)
    assert status == 202 and answer["r"]["status"] == "running" and answer["r"]["output"] is None
    deadline = time.monotonic() + 5
    while status == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
        status, _, answer = call("GET", task_url)
    assert status == 200
    r = answer["r"]
    assert r["status"] == "done" and r["output"] == "Processed scan.png" and r["events"] == []
    assert isinstance(r["credits_used"], int) and r["recording_url"].startswith("https://")


def test_task_failure_injection_and_unknown_task(api: FakeApi, base: str) -> None:
    api.task_duration_s = 0
    task_id = call_json("POST", f"{base}/task", {"task": "please FAIL"})[2]["r"]["id"]
    status, _, answer = call("GET", f"{base}/task/{task_id}")
    assert status == 200 and answer["r"]["status"] == "failed" and answer["r"]["output"]
    status, _, answer = call("GET", f"{base}/task/task_unknown")
    assert status == 404 and "task_unknown" in answer["detail"]


def test_files_survive_a_restart(api: FakeApi, base: str) -> None:
    file_id = upload(base, "ü.txt".encode(), purpose="p")[2]["r"]["id"]
    again = FakeApi(api.data_dir)
    assert again.files[file_id] == api.files[file_id]


def test_control_routes(api: FakeApi, base: str) -> None:
    root = base.removesuffix("/api/v1")
    file_id = upload(base)[2]["r"]["id"]
    upload(base, b"x/y")
    status, _, files = call("GET", f"{root}/_fake/files", headers={"apikey": ""})
    assert status == 200 and [f["id"] for f in files] == [file_id] and "path" not in files[0]
    status, _, stats = call("GET", f"{root}/_fake/stats")
    assert stats == {"POST /api/v1/file": {"200": 1, "400": 1}}
    assert [(r.method, r.status) for r in api.requests] == [("POST", 200), ("POST", 400)]


# -- faults --


def test_script_then_normal(api: FakeApi, base: str) -> None:
    api.faults.retry_after_s = 0.2
    api.faults.script = [503, 429]
    answers = [upload(base) for _ in range(3)]
    assert [status for status, _, _ in answers] == [503, 429, 200]
    assert answers[1][1]["Retry-After"] == "0.2"
    assert "detail" in answers[0][2] and "id" in answers[2][2]["r"]
    assert [r.status for r in api.requests] == [503, 429, 200]


def test_reject_pattern_and_reject_key(api: FakeApi, base: str) -> None:
    api.faults.reject_pattern = "*.exe"
    status, _, answer = upload(base, b"setup.exe")
    assert (status, answer) == (400, {"detail": "file type not allowed: setup.exe"})
    assert upload(base, b"setup.pdf")[0] == 200
    api.faults.reject_key = True
    assert call("GET", f"{base}/task/x")[0] == 401


def test_delay(api: FakeApi, base: str) -> None:
    api.faults.delay_s = 0.2
    started = time.monotonic()
    assert call("GET", f"{base}/task/x")[0] == 404
    assert time.monotonic() - started >= 0.2


def test_faults_over_http(api: FakeApi, base: str) -> None:
    url = base.removesuffix("/api/v1") + "/_fake/faults"
    status, _, answer = call_json("PUT", url, {"rate_503": 0.5, "script": [429], "seed": 3})
    assert status == 200 and answer["rate_503"] == 0.5 and answer["script"] == [429]
    assert (api.faults.rate_503, api.faults.seed) == (0.5, 3)
    status, _, answer = call_json("PUT", url, {"rate_503": 0, "bogus": 1})
    assert status == 400 and "bogus" in answer["detail"]
    assert api.faults.rate_503 == 0.5  # all or nothing
    assert call_json("PUT", url, {"rate_429": 1.5})[0] == 400
    assert call("GET", url)[2] == api.faults.as_dict()


def test_faults_validate_in_python() -> None:
    with pytest.raises(ValueError, match="rate_503"):
        Faults(rate_503=2)
    with pytest.raises(ValueError, match="nope"):
        Faults().update({"nope": 1})


def test_seed_reproduces_random_faults(tmp_path: Path) -> None:
    def statuses(data: Path) -> list[int]:
        api = FakeApi(data, api_keys=[KEY], faults=Faults(rate_503=0.3, rate_429=0.3, seed=7))
        with serve_in_thread(api) as url:
            return [upload(url)[0] for _ in range(12)]

    first = statuses(tmp_path / "a")
    assert first == statuses(tmp_path / "b")
    assert {200, 429, 503} == set(first)


def test_reset_drops_the_connection(api: FakeApi, base: str) -> None:
    api.faults.rate_reset = 1.0

    async def post() -> None:
        form = aiohttp.FormData()
        form.add_field("file", os.urandom(200_000), filename="a.bin")
        async with (
            aiohttp.ClientSession(headers={"apikey": KEY}) as session,
            session.post(f"{base}/file", data=form) as response,
        ):
            await response.read()

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(post())
    assert [r.status for r in api.requests] == [0] and not api.files


def test_bad_json(api: FakeApi, base: str) -> None:
    api.faults.rate_bad_json = 1.0
    for _ in range(6):
        status, _, answer = upload(base)
        assert status == 200
        assert not (isinstance(answer, dict) and "id" in (answer.get("r") or {}))
    assert not api.files


def test_large_upload_streams_to_disk(api: FakeApi, base: str, tmp_path: Path) -> None:
    src, block = tmp_path / "big.bin", os.urandom(1 << 20)
    with src.open("wb") as fh:
        for i in range(50):
            fh.write(i.to_bytes(4, "big") + block[4:])  # 50 MiB, never in memory at once
    expected = sha256(src)

    async def post() -> str:
        async with aiohttp.ClientSession(headers={"apikey": KEY}) as session:
            with src.open("rb") as fh:
                form = aiohttp.FormData()
                form.add_field("file", fh, filename="big.bin")
                async with session.post(f"{base}/file", data=form) as response:
                    return (await response.json())["r"]["id"]

    tracemalloc.start()
    try:
        file_id = asyncio.run(post())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    stored = api.files[file_id]
    assert (stored.size, stored.sha256) == (50 << 20, expected)
    assert stored.path.stat().st_size == 50 << 20
    assert peak < 8 << 20, f"peak {peak} bytes: the upload was held in memory"


# -- the command --


def test_command_prints_url_hides_keys_and_stops_on_sigterm(tmp_path: Path) -> None:
    code = (
        "import argparse, sys; from watcher import fakeapi as f; p = argparse.ArgumentParser();"
        "f.add_arguments(p); sys.exit(f.run_from_args(p.parse_args(sys.argv[1:])))"
    )
    env = {**os.environ, "CIRCLEMIND_API_KEY": "secret-env-key"}
    args = ["--port", "0", "--data-dir", str(tmp_path), "--rate-503", "0.5", "--seed", "0"]
    with subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        try:
            url = line.split()[3]
            request = urllib.request.Request(f"{url}/task/x", headers={"apikey": "secret-env-key"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=10)
            err.value.close()
            assert err.value.code == 404  # the env key is accepted
        finally:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert line.startswith("fake-api listening on http://127.0.0.1:")
    assert line.rstrip().endswith("/api/v1 (key: from $CIRCLEMIND_API_KEY)")
    assert "secret" not in line
