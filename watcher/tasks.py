"""From an uploaded file to a recorded task result.

One task per uploaded file in a folder with ``[watch.task]``: started right after the upload
is committed, its id recorded at once so a restart does not start it again. One poller follows
every running task (not one per file), each at its own pace: soon after the start, then less
often the longer it runs, so a thousand long tasks do not hammer the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from watcher.config import Config, WatchConfig
from watcher.constants import FILE_ID_LIFETIME_S, FILE_ID_SAFETY_MARGIN_S
from watcher.errors import PermanentError, TransientError
from watcher.filters import relpath
from watcher.manifest import Manifest, Record
from watcher.metrics import Metrics
from watcher.uploader import ApiClient

log = structlog.get_logger("watcher.tasks")

RUNNING = ("waiting", "running")
POLL_FIRST_S = 1.0  # the first look, soon after the start: short tasks end quickly
POLL_MAX_S = 30.0  # a long task is looked at no less often than this
POLL_GROWTH = 1.5


class TaskRunner:
    def __init__(
        self,
        config: Config,
        manifest: Manifest,
        client: ApiClient,
        metrics: Metrics,
        poll_first_s: float = POLL_FIRST_S,
    ) -> None:
        self.config = config
        self.manifest = manifest
        self.client = client
        self.metrics = metrics
        self._poll_first_s = poll_first_s
        self._task_watches = [w for w in config.watches if w.task is not None]
        self._waited = [str(w.path) for w in self._task_watches if w.task and w.task.wait]
        self._next_poll: dict[str, tuple[float, float]] = {}  # task id → (when, interval)
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return bool(self._task_watches)

    def busy(self) -> bool:
        """Tasks still to start or to wait for (``sync`` waits for them too)."""
        if not self._task_watches:
            return False
        roots = [str(w.path) for w in self._task_watches]
        if self.manifest.tasks_to_start(roots, limit=1):
            return True
        return bool(self._waited) and bool(self.manifest.running_tasks(self._waited))

    # -- starting --------------------------------------------------------------------------------

    async def start_for(self, watch: WatchConfig, record: Record) -> None:
        """Start the task for an uploaded file; re-queue the upload if its id is too old."""
        spec = watch.task
        if spec is None or record.file_id is None:
            return
        age = time.time() - (record.uploaded_at or 0)
        if age > FILE_ID_LIFETIME_S - FILE_ID_SAFETY_MARGIN_S:
            # The API deletes files 24 h after upload: never hand a task an expired id.
            log.info("file id too old for a task, uploading again", path=record.path)
            self.manifest.enqueue(record.path, watch.path, record.size or 0, record.mtime_ns or 0)
            return
        body: dict[str, Any] = {
            "task": spec.task.format_map(_placeholders(watch, record)),
            "files": [record.file_id],
            "max_steps": spec.max_steps,
        }
        if spec.url:
            body["url"] = spec.url
        if spec.metadata:
            body["metadata"] = dict(spec.metadata)
        if spec.response_model:
            body["response_model"] = dict(spec.response_model)
        try:
            answer = await self.client.start_task(record.path, body)
        except (PermanentError, TransientError) as exc:
            self.manifest.set_task_result(record.path, "error", None, f"task start: {exc.reason}")
            self._count("error")
            log.warning("task not started", path=record.path, reason=exc.reason)
            return
        status = str(answer.get("status") or "waiting")
        self.manifest.set_task(record.path, answer["id"], status)
        log.info("task started", path=record.path, file_id=record.file_id, task_id=answer["id"])
        self._wake.set()

    async def start_missing(self) -> None:
        """At start: tasks that a crash or a stop kept from starting after their upload."""
        if not self._task_watches:
            return
        roots = [str(w.path) for w in self._task_watches]
        done: set[str] = set()
        while batch := [r for r in self.manifest.tasks_to_start(roots) if r.path not in done]:
            for record in batch:
                done.add(record.path)
                watch = self.config.watch_for(Path(record.path))
                if watch is not None:
                    await self.start_for(watch, record)

    # -- following -------------------------------------------------------------------------------

    async def poll_forever(self) -> None:
        """Follow every running task of a ``wait = true`` folder until it ends."""
        if not self._waited:
            return
        while True:
            self._wake.clear()  # before polling: a task started meanwhile must wake us
            delay = await self._poll_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _poll_due(self) -> float:
        now = time.monotonic()
        running = self.manifest.running_tasks(self._waited)
        ids = {r.task_id for r in running}
        for gone in set(self._next_poll) - ids:
            del self._next_poll[gone]
        next_delay = POLL_MAX_S
        for record in running:
            assert record.task_id is not None
            when, interval = self._next_poll.setdefault(
                record.task_id, (now + self._poll_first_s, self._poll_first_s)
            )
            if when > now:
                next_delay = min(next_delay, when - now)
                continue
            interval = min(interval * POLL_GROWTH, POLL_MAX_S)
            self._next_poll[record.task_id] = (time.monotonic() + interval, interval)
            next_delay = min(next_delay, interval)
            await self._poll_one(record)
        return next_delay

    async def _poll_one(self, record: Record) -> None:
        assert record.task_id is not None
        try:
            answer = await self.client.get_task(record.task_id)
        except TransientError as exc:
            log.info("task poll failed, will look again", task_id=record.task_id, reason=exc.reason)
            return
        except PermanentError as exc:
            self.manifest.set_task_result(record.path, "error", None, f"task poll: {exc.reason}")
            self._count("error")
            return
        status = str(answer.get("status"))
        if status in RUNNING:
            if status != record.task_status:
                self.manifest.set_task(record.path, record.task_id, status)
            return
        await self._finish(record, status, answer)

    async def _finish(self, record: Record, status: str, answer: dict[str, Any]) -> None:
        output = answer.get("output")
        self.manifest.set_task_result(record.path, status, json.dumps(output))
        self._count(status)
        log.info(
            "task ended",
            path=record.path,
            task_id=record.task_id,
            status=status,
            credits_used=answer.get("credits_used"),
        )
        watch = self.config.watch_for(Path(record.path))
        spec = watch.task if watch else None
        if watch is None or spec is None:
            return
        if spec.result_dir is not None:
            result = {
                "path": record.path,
                "file_id": record.file_id,
                "task_id": record.task_id,
                "status": status,
                "output": output,
                "credits_used": answer.get("credits_used"),
                "recording_url": answer.get("recording_url"),
            }
            target = spec.result_dir / (relpath(watch, record.path) + ".result.json")
            try:
                write_atomic(target, json.dumps(result, indent=2).encode())
            except OSError as exc:
                log.warning("cannot write task result", path=str(target), reason=exc.strerror)
        if spec.delete_file_after and record.file_id:
            try:
                await self.client.delete_file(record.file_id)
                log.info("file deleted from the API", path=record.path, file_id=record.file_id)
            except (PermanentError, TransientError) as exc:
                log.warning("cannot delete file", file_id=record.file_id, reason=exc.reason)

    def _count(self, status: str) -> None:
        self.metrics.inc("tasks_total", status=status)


def _placeholders(watch: WatchConfig, record: Record) -> dict[str, Any]:
    return {
        "name": os.path.basename(record.path),
        "path": record.path,
        "relpath": relpath(watch, record.path),
        "file_id": record.file_id,
        "size": record.size,
        "sha256": record.sha256,
    }


def write_atomic(target: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
