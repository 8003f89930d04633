"""From a settled file to an ``uploaded`` row: intake decisions, the workers, the counters.

Intake decides, by stat alone, whether a file is new or changed against the manifest, and
queues it there. Workers claim rows from the manifest (the queue lives on disk, so memory does
not grow with the backlog), upload, and record the outcome. Each outcome is explicit: uploaded,
failed (permanent, or transient past ``max_attempts``), skipped, changed-while-sent (settles
again), vanished (forgotten), or auth (everything stops, the file stays pending).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import DirDeletedEvent, DirMovedEvent, FileSystemEvent

from watcher import actions
from watcher.config import Config, WatchConfig
from watcher.constants import (
    COMMIT_BATCH_MAX,
    COMMIT_WINDOW_S,
    IDLE_POLL_S,
    PENDING,
    SCAN_BATCH,
    UPLOADED,
    UPLOADING,
)
from watcher.errors import (
    AuthError,
    FileChangedError,
    PermanentError,
    TransientError,
    UploadError,
)
from watcher.filters import Inspection, Kind, PathFilter, inspect, relpath
from watcher.manifest import Manifest, Record
from watcher.metrics import UPLOAD_OUTCOMES, Metrics
from watcher.scanner import Settler, event_paths, walk
from watcher.tasks import TaskRunner
from watcher.uploader import ApiClient, Sent, UploadJob, open_regular

log = structlog.get_logger("watcher.pipeline")


@dataclass(frozen=True, slots=True)
class Uploaded:
    """An upload the API confirmed, waiting for its durable commit."""

    path: str
    sent: Sent
    attempts: int
    duration_s: float


class Pipeline:
    def __init__(
        self,
        config: Config,
        manifest: Manifest,
        client: ApiClient,
    ) -> None:
        self.config = config
        self.manifest = manifest
        self.client = client
        client.on_retry = self._on_retry
        self.metrics = Metrics()
        self.in_flight = 0
        self.tasks = TaskRunner(config, manifest, client, self.metrics)
        self.settler = Settler(self._on_settled)
        self.filters = {w: PathFilter(w.include, w.exclude) for w in config.watches}
        self.auth_error: AuthError | None = None
        self.changed = asyncio.Event()  # something moved on: `sync` re-checks whether it is done
        self.on_auth_error: Callable[[AuthError], None] = lambda exc: None
        # A step that must not fail did (the manifest cannot be written, or a bug): the
        # daemon stops rather than carry on losing track of files.
        self.on_fatal: Callable[[BaseException], None] = lambda exc: None
        self.on_root_lost: Callable[[WatchConfig], None] = lambda watch: None
        self._work = asyncio.Event()
        self._accepting = True
        self._background: set[asyncio.Task[Any]] = set()
        self._claimed: collections.deque[Record] = collections.deque()
        self._to_commit: list[tuple[Uploaded, WatchConfig]] = []
        self._commit_timer: asyncio.TimerHandle | None = None
        self._task_starts = asyncio.Semaphore(config.api.concurrency)
        self._changed_in_flight: set[str] = set()  # see _is_new

    # -- intake ----------------------------------------------------------------------------------

    def on_event(self, watch: WatchConfig, event: FileSystemEvent) -> None:
        if isinstance(event, DirDeletedEvent | DirMovedEvent) and os.fsdecode(
            event.src_path
        ) == str(watch.path):
            self.on_root_lost(watch)  # the supervisor watches it again once it is back
            return
        found = event_paths(watch, event)
        if found is None:
            return
        path, is_dir = found
        rel = relpath(watch, path)
        if is_dir:
            # A folder created or moved in: walk it ourselves, whatever watchdog replays.
            if watch.recursive and self.filters[watch].wants_dir(rel):
                self.spawn(self.scan(watch, path))
        elif self.filters[watch].wants_file(rel):
            self.settler.touch(watch, path)

    async def scan(self, watch: WatchConfig, top: str | None = None) -> int:
        """Queue every new or changed file below ``top`` for settling; returns files seen."""
        seen = 0
        for path in walk(watch, self.filters[watch], top):
            self.consider(watch, path)
            seen += 1
            if seen % SCAN_BATCH == 0:
                await asyncio.sleep(0)  # let uploads and events through during a long scan
        self.changed.set()
        return seen

    def consider(self, watch: WatchConfig, path: str) -> None:
        """Settle ``path`` unless the manifest already has it, by stat alone: no read."""
        inspection = inspect(watch, path)
        if inspection.kind is Kind.GONE or not self._is_new(path, inspection):
            return
        self.settler.touch(watch, path, inspection)

    def _is_new(self, path: str, inspection: Inspection) -> bool:
        known = self.manifest.stat_of(path)
        if known is None:
            return True
        state, size, mtime_ns = known
        if state == UPLOADING:
            # Being sent, or sent and waiting for its commit: if this change came after the
            # upload read the file, it must be looked at again once the row is committed.
            self._changed_in_flight.add(path)
            return False
        if state == PENDING:
            return False  # queued; the upload sends whatever is there by then
        st = inspection.st
        return st is None or (size, mtime_ns) != (st.st_size, st.st_mtime_ns)

    def _on_settled(self, watch: WatchConfig, path: str, inspection: Inspection) -> None:
        if inspection.kind is Kind.DIRECTORY:
            if inspection.real_path is None:  # a real folder; a link to one is not descended
                self.spawn(self.scan(watch, path))
            return
        if not self._is_new(path, inspection):
            return
        st = inspection.st
        if inspection.kind is Kind.SKIP:
            self._outcome("skipped")
            log.info("skipped", path=path, reason=inspection.reason)
            self.manifest.mark_skipped(
                path,
                watch.path,
                inspection.reason,
                st.st_size if st else None,
                st.st_mtime_ns if st else None,
            )
        else:
            assert st is not None
            record = self.manifest.get(path)
            if record and record.state == UPLOADED and record.size == st.st_size:
                # Same size, new mtime (touch, cp -p of the same bytes): compare content.
                self.spawn(self._compare_and_queue(watch, path, record, st))
                return
            self.manifest.enqueue(path, watch.path, st.st_size, st.st_mtime_ns)
            self._work.set()
        self.changed.set()

    async def _compare_and_queue(
        self, watch: WatchConfig, path: str, record: Record, st: os.stat_result
    ) -> None:
        digest = await asyncio.get_running_loop().run_in_executor(
            None, _sha256_of, path, watch.follow_symlinks
        )
        if digest == record.sha256:
            self.manifest.mark_unchanged(path, size=st.st_size, mtime_ns=st.st_mtime_ns)
            log.debug("unchanged content", path=path)
        else:
            self.manifest.enqueue(path, watch.path, st.st_size, st.st_mtime_ns)
            self._work.set()
        self.changed.set()

    # -- workers ---------------------------------------------------------------------------------

    async def worker(self) -> None:
        while self._accepting and self.auth_error is None:
            if not self._claimed:
                # One claim transaction feeds every worker, not one per file.
                self._claimed.extend(self.manifest.claim(self.config.api.concurrency))
            if not self._claimed:
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), IDLE_POLL_S)
                continue
            record = self._claimed.popleft()
            self.in_flight += 1
            try:
                await self._process(record)
            except asyncio.CancelledError:
                self.manifest.release(record.path)
                raise
            finally:
                self.in_flight -= 1
                if not any(done.path == record.path for done, _ in self._to_commit):
                    self._changed_in_flight.discard(record.path)  # vanished, skipped, cut…
                self.changed.set()

    def stop_accepting(self) -> None:
        self._accepting = False
        self._work.set()  # wake idle workers so they can leave

    def settle_accounts(self) -> None:
        """At shutdown, once the workers are gone: commit what was sent, release the rest."""
        self._commit_uploaded()
        while self._claimed:
            self.manifest.release(self._claimed.popleft().path)

    async def _process(self, record: Record) -> None:
        path = record.path
        watch = self.config.watch_for(Path(path))
        if watch is None:
            self.manifest.mark_skipped(path, record.watch, "no longer under a watched folder")
            return
        inspection = inspect(watch, path)
        if inspection.kind in (Kind.GONE, Kind.DIRECTORY):
            self._outcome("vanished")
            log.info("vanished before upload", path=path)
            self.manifest.forget(path)
            return
        if inspection.kind is Kind.SKIP:
            self._outcome("skipped")
            self.manifest.mark_skipped(path, watch.path, inspection.reason)
            return
        job = UploadJob(
            path=path,
            open_path=inspection.real_path or path,
            follow=watch.follow_symlinks,
            purpose=watch.purpose,
            max_size=watch.max_file_size,
            root=str(watch.path),
        )
        started = time.monotonic()
        try:
            sent, attempts = await self.client.upload(job)
        except AuthError as exc:
            self.manifest.release(path)
            self.auth_failed(exc)
            return
        except FileChangedError as exc:
            self._outcome("resent")
            log.info(
                "changed while sending, will settle and send again", path=path, reason=exc.reason
            )
            self.manifest.forget(path)
            self._changed_in_flight.discard(path)
            self.settler.touch(watch, path)
            return
        except (PermanentError, TransientError) as exc:
            self._fail(watch, record, exc)
            return
        self._to_commit.append((Uploaded(path, sent, attempts, time.monotonic() - started), watch))
        if len(self._to_commit) >= COMMIT_BATCH_MAX:
            self._commit_uploaded()
        elif self._commit_timer is None:
            loop = asyncio.get_running_loop()
            self._commit_timer = loop.call_later(COMMIT_WINDOW_S, self._commit_uploaded)

    def _commit_uploaded(self) -> None:
        """Commit the uploads of the last few dozen milliseconds durably, with one fsync.

        Until then their rows stay ``uploading``: a crash sends them again, it never loses
        them. Moving, deleting and tasks wait for the commit.
        """
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        batch, self._to_commit = self._to_commit, []
        if not batch:
            return
        try:
            with self.manifest.transaction(durable=True):
                for done, _ in batch:
                    self.manifest.mark_uploaded(
                        done.path,
                        file_id=done.sent.file_id,
                        sha256=done.sent.sha256,
                        size=done.sent.size,
                        mtime_ns=done.sent.mtime_ns,
                        attempts=done.attempts,
                    )
        except Exception as exc:
            self.on_fatal(exc)
            return
        for done, watch in batch:
            self._outcome("uploaded", done.sent.size)
            self.metrics.observe_upload(done.duration_s)
            log.info(
                "uploaded",
                path=done.path,
                file_id=done.sent.file_id,
                size=done.sent.size,
                attempt=done.attempts,
                duration_s=round(done.duration_s, 3),
            )
            actions.after_upload(watch, done.path, self.manifest)
            if watch.task is not None:
                self.spawn(self._start_task(watch, done.path))
            self._recheck(watch, done.path)
        self.changed.set()

    def _recheck(self, watch: WatchConfig, path: str) -> None:
        """The row has its final state: settle the file again if it changed meanwhile."""
        if path in self._changed_in_flight:
            self._changed_in_flight.discard(path)
            self.settler.touch(watch, path)

    async def _start_task(self, watch: WatchConfig, path: str) -> None:
        async with self._task_starts:
            uploaded = self.manifest.get(path)
            if uploaded is not None:
                try:
                    await self.tasks.start_for(watch, uploaded)
                except AuthError as exc:
                    self.auth_failed(exc)

    def auth_failed(self, exc: AuthError) -> None:
        if self.auth_error is None:
            self.auth_error = exc
            self.on_auth_error(exc)

    async def follow_tasks(self) -> None:
        """Start tasks a stop kept from starting, then follow running ones until cancelled."""
        try:
            await self.tasks.start_missing()
            await self.tasks.poll_forever()
        except AuthError as exc:
            self.auth_failed(exc)

    def _fail(
        self, watch: WatchConfig, record: Record, exc: PermanentError | TransientError
    ) -> None:
        attempts = exc.attempts
        reason = exc.reason  # a permanent rejection: the API's own words
        if isinstance(exc, TransientError):
            reason = f"gave up after {attempts} attempt{'s' * (attempts > 1)}: {exc.reason}"
        self.manifest.mark_failed(record.path, reason, attempts=attempts)
        self._outcome("failed", record.size or 0)
        log.warning("failed", path=record.path, reason=reason, attempt=attempts)
        actions.after_failure(watch, record.path, self.manifest)
        self._recheck(watch, record.path)

    def _on_retry(self, kind: str, subject: str, attempt: int, reason: str, wait_s: float) -> None:
        self.metrics.inc("retries_total")
        log.info(
            "retrying",
            call=kind,
            subject=subject,
            attempt=attempt,
            reason=reason,
            wait_s=round(wait_s, 2),
        )
        if kind == "upload":
            self.manifest.note_attempt(subject, attempt, reason)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _outcome(self, outcome: str, size: int = 0) -> None:
        self.metrics.inc("uploads_total", outcome=outcome)
        if size:
            self.metrics.inc("upload_bytes_total", size, outcome=outcome)

    def collect_gauges(self) -> None:
        """Refresh gauges from the manifest; runs before each /metrics scrape."""
        counts = self.manifest.counts()
        for state, n in counts.items():
            self.metrics.set_gauge("files", n, state=state)
        self.metrics.set_gauge("queue_depth", len(self.settler) + counts["pending"])
        self.metrics.set_gauge("in_flight", self.in_flight)

    def status_line(self) -> str:
        counts = self.manifest.counts()
        return (
            f"uploaded {counts['uploaded']}, pending {counts['pending'] + len(self.settler)}, "
            f"in flight {self.in_flight}, failed {counts['failed']}"
        )

    def summary(self) -> dict[str, int]:
        """Counts since start, for the closing log line and `sync`'s exit status."""
        counts = {o: int(self.metrics.get("uploads_total", outcome=o)) for o in UPLOAD_OUTCOMES}
        counts["retried"] = int(self.metrics.get("retries_total"))
        counts["bytes_sent"] = int(self.metrics.get("upload_bytes_total", outcome="uploaded"))
        return counts

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.on_fatal(task.exception())  # type: ignore[arg-type]
        self.changed.set()

    def idle(self) -> bool:
        """Nothing settling, scanning, queued or in flight: `sync` may finish."""
        return (
            not self._background
            and len(self.settler) == 0
            and self.in_flight == 0
            and not self._to_commit
            and not self.manifest.has_pending()
            and not self.tasks.busy()
        )

    async def cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


def _sha256_of(path: str, follow: bool) -> str | None:
    digest = hashlib.sha256()
    try:
        file, _ = open_regular(path, follow, max_size=2**63)
    except UploadError:
        return None
    with file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
