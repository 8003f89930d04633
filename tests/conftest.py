"""Fixtures: a real fake-api on a free port, config files in temporary folders, and the daemon
running for real (in a thread with its own loop, or as a subprocess for exit codes/signals)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("SMOOTH_TELEMETRY", "off")  # the SDK decides at import time

from watcher import config as config_mod
from watcher import fakeapi
from watcher.daemon import Daemon
from watcher.errors import ManifestError
from watcher.manifest import Manifest, Record

TEST_KEY = "test-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def records(setup: Setup) -> dict[str, Record]:
    if not setup.manifest_path.exists():
        return {}
    try:
        m = Manifest(setup.manifest_path, readonly=True)
    except ManifestError:  # the daemon is creating it right now
        return {}
    try:
        return {r.path: r for r in m.rows()}
    finally:
        m.close()


def in_state(setup: Setup, state: str, paths: list[Path]) -> dict[str, Record] | None:
    """All rows, once every one of ``paths`` is in ``state``; else None (for wait_until)."""
    rows = records(setup)
    if all(rows.get(str(p)) and rows[str(p)].state == state for p in paths):
        return rows
    return None


def uploaded(setup: Setup, paths: list[Path]) -> dict[str, Record] | None:
    return in_state(setup, "uploaded", paths)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing from the developer's environment may leak into a test.
    for name in (
        "CIRCLEMIND_API_KEY",
        "SMOOTH_BASE_URL",
        "SMOOTH_WATCHER_CONFIG",
        "CREDENTIALS_DIRECTORY",
        "STATE_DIRECTORY",
    ):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Api:
    api: fakeapi.FakeApi
    base_url: str

    @property
    def faults(self) -> fakeapi.Faults:
        return self.api.faults

    def uploads(self) -> list[fakeapi.RequestRecord]:
        return [
            r for r in list(self.api.requests) if r.method == "POST" and r.path.endswith("/file")
        ]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    fake = fakeapi.FakeApi(tmp_path / "api-data", api_keys=(TEST_KEY,), task_duration_s=0.3)
    with fakeapi.serve_in_thread(fake) as base_url:
        yield Api(fake, base_url)


@dataclass
class Setup:
    tmp: Path
    drop: Path
    config_path: Path
    key_file: Path
    api: Api

    @property
    def manifest_path(self) -> Path:
        return self.tmp / "state" / "manifest.sqlite3"  # as write_config puts it

    def load(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CIRCLEMIND_API_KEY", "SMOOTH_BASE_URL", "SMOOTH_WATCHER_CONFIG")
        }
        env["PYTHONPATH"] = str(ROOT)
        return env

    def cli(self, *args: str, timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "watcher", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=self.tmp,
            **kw,
        )

    def write(self, rel: str, data: bytes = b"x") -> Path:
        path = self.drop / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def toml_value(value: Any) -> str:
    """Enough of a TOML writer for test configs: scalars, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    return repr(value)


def write_config(
    tmp: Path,
    base_url: str,
    key_file: Path,
    watch: dict[str, Any],
    api_extra: str = "",
    api: dict[str, Any] | None = None,
) -> Path:
    api_keys: dict[str, Any] = {
        "base_url": base_url,
        "api_key_file": key_file,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "max_attempts": 4,
        **(api or {}),
    }
    lines = [
        "[api]",
        *(f"{k} = {toml_value(v)}" for k, v in api_keys.items()),
        api_extra,
        "[manifest]",
        f'path = "{tmp / "state" / "manifest.sqlite3"}"',
        "[log]",
        'format = "json"',
        'level = "debug"',
        "[[watch]]",
    ]
    for key, value in watch.items():
        lines.append(f"{key} = {toml_value(value)}")
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def make_setup(tmp_path: Path, api: Api) -> Callable[..., Setup]:
    """Factory: a drop folder and a config pointing at the fake API; watch keys as kwargs."""
    fake = api

    def make(
        api_extra: str = "", key: str = TEST_KEY, api: dict[str, Any] | None = None, **watch: Any
    ) -> Setup:
        drop = tmp_path / "drop"
        drop.mkdir(exist_ok=True)
        key_file = tmp_path / "api-key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        settings: dict[str, Any] = {"path": drop, "settle_s": 0.2, "rescan_interval_s": 0}
        settings.update(watch)
        path = write_config(tmp_path, fake.base_url, key_file, settings, api_extra, api)
        return Setup(tmp_path, drop, path, key_file, fake)

    return make


@pytest.fixture
def setup(make_setup: Callable[..., Setup]) -> Setup:
    return make_setup()


class DaemonThread:
    """The real daemon on its own event loop in a thread, stopped like SIGTERM would."""

    def __init__(self, cfg: config_mod.Config, key: str = TEST_KEY, **kw: Any) -> None:
        self.cfg = cfg
        self.key = key
        self.kw = kw
        self.status: int | None = None
        self.error: BaseException | None = None
        self.daemon: Daemon | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def go() -> int:
            self.loop = asyncio.get_running_loop()
            self.daemon = Daemon(self.cfg, self.key, **self.kw)
            return await self.daemon.run()

        try:
            self.status = asyncio.run(go())
        except BaseException as exc:  # surfaced to the test by stop()
            self.error = exc

    def start(self) -> DaemonThread:
        self._thread.start()
        wait_until(
            lambda: (
                self.error is not None or (self.daemon is not None and self.daemon.ready.is_set())
            ),
            what="daemon ready",
        )
        if self.error:
            raise self.error
        return self

    def idle(self) -> bool:
        """True once nothing is settling, scanning, queued or in flight."""
        assert self.loop and self.daemon and self.daemon.pipeline
        pipeline = self.daemon.pipeline
        done = threading.Event()
        result: list[bool] = []

        def check() -> None:
            result.append(pipeline.idle())
            done.set()

        self.loop.call_soon_threadsafe(check)
        done.wait(5)
        return bool(result and result[0])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.loop and self.daemon and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "daemon did not stop"
        if self.error:
            raise self.error
        return self.status


@pytest.fixture
def run_daemon() -> Iterator[Callable[..., DaemonThread]]:
    started: list[DaemonThread] = []

    def start(cfg: config_mod.Config, **kw: Any) -> DaemonThread:
        d = DaemonThread(cfg, **kw).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d._thread.is_alive():
            d.stop()
