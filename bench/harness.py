"""Processes the benchmark starts and measures: the fake API, the daemon, the baselines.

Every process is a real child started from its command line, as a user would start it, and
everything is measured from the outside: wall time from spawn to exit, peak RSS from the
kernel (``wait4``'s ``ru_maxrss``, exact for that one child, where
``getrusage(RUSAGE_CHILDREN)`` would be the maximum over all children so far), bytes read
from ``/proc/<pid>/io``. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

PYTHON = sys.executable
API_KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent

# urllib, curl and aiohttp (with trust_env) would send 127.0.0.1 through a configured proxy.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    # Nothing from the caller's shell may steer the daemon to another API, key or config.
    for name in (
        "SMOOTH_BASE_URL",
        "CIRCLEMIND_API_KEY",
        "SMOOTH_WATCHER_CONFIG",
        "STATE_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
    ):
        env.pop(name, None)
    env.update(SMOOTH_TELEMETRY="off", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", **extra)
    return env


class Child:
    """One measured child process; a thread reaps it the moment it exits."""

    def __init__(self, cmd: list[str], log: Path, *, stderr: Path | None = None) -> None:
        self.cmd = cmd
        self.log = log
        self.maxrss_kib: int | None = None
        self.cpu_s: float | None = None  # user + system CPU seconds, once it has exited
        self.ended: float | None = None
        self._done = threading.Event()
        with log.open("wb") as out, contextlib.ExitStack() as stack:
            err: Any = stack.enter_context(stderr.open("wb")) if stderr else subprocess.STDOUT
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env(), cwd=ROOT)
        self.pid = self.proc.pid
        threading.Thread(target=self._reap, name=f"reap-{self.pid}", daemon=True).start()

    def _reap(self) -> None:
        # Blocking wait4 in a thread: the exit time is taken when the kernel reports it, not
        # at the next poll, and rusage is this child's alone.
        _, status, usage = os.wait4(self.pid, 0)
        self.ended = time.perf_counter()
        self.maxrss_kib = usage.ru_maxrss
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._done.set()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self._done.is_set() else None

    @property
    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def hwm_kib(self) -> int | None:
        """Peak RSS so far (VmHWM), for a process still running."""
        text = self._proc_file("status")
        m = re.search(r"^VmHWM:\s+(\d+) kB", text or "", re.MULTILINE)
        return int(m.group(1)) if m else None

    def cpu_now(self) -> float | None:
        """CPU seconds used so far (user + system), for a process still running."""
        text = self._proc_file("stat")
        if text is None:
            return self.cpu_s
        fields = text.rpartition(")")[2].split()  # the name in (…) may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def io(self) -> dict[str, int]:
        """/proc/<pid>/io: rchar counts every read(), cache or not; read_bytes only the disk."""
        text = self._proc_file("io") or ""
        return {k: int(v) for k, v in re.findall(r"^(\w+): (\d+)$", text, re.MULTILINE)}

    def _proc_file(self, name: str) -> str | None:
        if self._done.is_set():  # the pid may already belong to someone else
            return None
        try:
            return Path(f"/proc/{self.pid}/{name}").read_text()
        except OSError:
            return None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (the daemon's clean stop), SIGKILL if it does not go within ``grace_s``."""
        if self._done.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        if not self.wait(grace_s):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.wait(10.0)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, predicate: Any, timeout: float) -> dict[str, Any] | None:
        """The first JSON log line for which ``predicate`` holds, polling the log file."""
        deadline = time.monotonic() + timeout
        offset, buffer = 0, b""
        while time.monotonic() < deadline:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                buffer += fh.read()
                offset = fh.tell()
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                with contextlib.suppress(ValueError):
                    record = json.loads(raw)
                    if isinstance(record, dict) and predicate(record):
                        return record
            if self._done.is_set():
                return None
            time.sleep(0.01)
        return None


class FakeApi:
    """``smooth-watcher fake-api`` in its own process, on a free port chosen by the kernel."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.data_dir = workdir / f"api-{name}"
        self.child = Child(
            [
                PYTHON,
                "-m",
                "watcher",
                "fake-api",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--data-dir",
                str(self.data_dir),
                "--api-key",
                API_KEY,
            ],
            workdir / f"api-{name}.log",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://\S+)", self.child.output())
            if m:
                self.url = m.group(1)  # http://127.0.0.1:PORT/api/v1
                self.root = self.url.removesuffix("/api/v1")
                return
            if self.child.wait(0.05):
                break
        self.child.stop()
        raise RuntimeError(f"fake-api did not start: {self.child.output()[-2000:]}")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with _NO_PROXY.open(req, timeout=60) as resp:
            return json.loads(resp.read())

    def set_delay(self, seconds: float) -> None:
        self._call("PUT", "/_fake/faults", {"delay_s": seconds})

    def uploads_ok(self) -> int:
        """Uploads answered 200 so far: a counter, cheap to poll even after 100,000 files."""
        return int(self._call("GET", "/_fake/stats").get("POST /api/v1/file", {}).get("200", 0))

    def files(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/_fake/files"))

    def drop_stored_data(self) -> None:
        """Free the disk the stored uploads take (the fake never reads them back)."""
        for path in self.data_dir.glob("*.bin"):
            path.unlink(missing_ok=True)

    def stop(self) -> None:
        self.child.stop()


def write_config(
    path: Path,
    *,
    url: str,
    key_file: Path,
    manifest: Path,
    watch: Path,
    concurrency: int = 8,
    settle_s: float = 0.0,
    level: str = "warning",
    max_file_size: str = "512MiB",
) -> Path:
    """A daemon config; json.dumps quotes strings the way TOML basic strings want them."""
    q = json.dumps
    path.write_text(
        f"""[api]
base_url = {q(url)}
api_key_file = {q(str(key_file))}
concurrency = {concurrency}

[manifest]
path = {q(str(manifest))}

[log]
format = "json"
level = {q(level)}

[[watch]]
path = {q(str(watch))}
settle_s = {settle_s}
rescan_interval_s = 0
max_file_size = {q(max_file_size)}
""",
        encoding="utf-8",
    )
    return path


def daemon(command: str, config: Path, log: Path) -> Child:
    return Child(
        [PYTHON, "-m", "watcher", command, "--config", str(config)],
        log,
        stderr=log.with_suffix(".err"),
    )


def contender(
    name: str, api: FakeApi, files: list[Path], workdir: Path, concurrency: int
) -> tuple[dict[str, Any], Child]:
    """Run one baseline from contenders.py on ``files``; its JSON result and its process."""
    listing = workdir / f"list-{name}-{len(files)}.txt"
    listing.write_text("\n".join(map(str, files)) + "\n")
    child = Child(
        [
            PYTHON,
            str(Path(__file__).with_name("contenders.py")),
            name,
            "--url",
            api.url,
            "--key",
            API_KEY,
            "--list",
            str(listing),
            "--concurrency",
            str(concurrency),
        ],
        workdir / f"{name}.out",
        stderr=workdir / f"{name}.err",
    )
    try:
        if not child.wait(1800):
            raise RuntimeError(f"{name} did not finish within 30 minutes")
    finally:
        child.stop()
    lines = child.output().strip().splitlines()
    if not lines:
        err = (workdir / f"{name}.err").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} exited {child.returncode} without a result: {err}")
    return json.loads(lines[-1]), child
