"""The daemon's life: startup → run → shutdown.

Startup opens and locks the manifest (rows cut by a crash go back to pending), opens one HTTP
session, starts the observers *before* the start scan (so nothing slips between the two), then
the workers. Run waits for a stop signal, an auth failure, or, in ``sync`` mode, for all work
to be done. Shutdown stops the observers, lets uploads in flight finish within a grace period,
cuts the rest (their rows go back to pending), closes the session and the manifest, and logs
one summary line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from watcher import __version__
from watcher.config import Config
from watcher.constants import HEARTBEAT_S, ROOT_CHECK_S, SHUTDOWN_GRACE_S
from watcher.errors import AuthError, ConfigError
from watcher.filters import Kind, inspect
from watcher.manifest import Manifest
from watcher.metrics import start_server
from watcher.pipeline import Pipeline
from watcher.scanner import EventBridge, Observers
from watcher.systemd import Notifier
from watcher.uploader import ApiClient, Throttle

log = structlog.get_logger("watcher.daemon")


class Daemon:
    def __init__(
        self,
        config: Config,
        api_key: str,
        *,
        once: bool = False,
        paths: Sequence[str] = (),
        grace_s: float = SHUTDOWN_GRACE_S,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.once = once
        self.paths = [str(Path(p).absolute()) for p in paths]
        self.grace_s = grace_s
        self._api_key = api_key
        self._notifier = notifier or Notifier(None)
        self._metrics_runner: web.AppRunner | None = None
        self.pipeline: Pipeline | None = None
        self.ready = asyncio.Event()  # the start scan is queued: systemd READY=1, tests
        self._stop = asyncio.Event()
        self._observers: Observers | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._settler_task: asyncio.Task[None] | None = None
        self._task_follower: asyncio.Task[None] | None = None
        self._rescanning = False
        self._rescan_wanted = False
        self._fatal: BaseException | None = None

    def stop(self) -> None:
        """Ask for a graceful stop; safe to call from a signal handler (on the loop)."""
        self._stop.set()

    async def run(self) -> int:
        """The whole life of the daemon; returns the exit status."""
        self._check_paths()
        manifest = Manifest(self.config.manifest_path)
        try:
            manifest.lock()
            recovered = manifest.recover()
            connector = aiohttp.TCPConnector(limit=self.config.api.concurrency * 2)
            async with aiohttp.ClientSession(connector=connector) as session:
                throttle = Throttle(self.config.api.max_requests_per_s)
                client = ApiClient(session, self.config.api, self._api_key, throttle)
                pipeline = self.pipeline = Pipeline(self.config, manifest, client)
                pipeline.on_auth_error = self._on_auth_error
                pipeline.on_fatal = self._on_fatal
                pipeline.on_root_lost = self._on_root_lost
                try:
                    await self._startup(pipeline, recovered)
                    await self._main(pipeline)
                finally:
                    await self._shutdown(pipeline)  # also after a failed start: no stray task
        finally:
            manifest.close()
        return self._exit_status(pipeline)

    # -- phases ----------------------------------------------------------------------------------

    async def _startup(self, pipeline: Pipeline, recovered: int) -> None:
        loop = asyncio.get_running_loop()
        log.info(
            "starting",
            version=__version__,
            mode="sync" if self.once else "run",
            manifest=str(self.config.manifest_path),
            api=self.config.api.base_url,
            watches=[str(w.path) for w in self.config.watches],
            recovered=recovered,
        )
        self._settler_task = self._critical(pipeline.settler.run())
        if not self.once:
            # Called on watchdog's thread when inotify dropped events: rescan everything.
            def lost() -> None:
                loop.call_soon_threadsafe(self._rescan_all, pipeline, "inotify queue overflow")

            self._observers = Observers(on_lost_events=lost)
            for watch in self.config.watches:
                self._observers.schedule(EventBridge(loop, watch, pipeline.on_event), watch)
        self._workers = [
            self._critical(pipeline.worker()) for _ in range(self.config.api.concurrency)
        ]
        if pipeline.tasks.enabled:
            self._task_follower = self._critical(pipeline.follow_tasks())
        if self.paths:
            for path in self.paths:
                self._scan_path(pipeline, path)
        else:
            for watch in self.config.watches:
                pipeline.spawn(self._timed_scan(pipeline, watch))
        if self.config.metrics_listen and not self.once:
            pipeline.metrics.collect = pipeline.collect_gauges
            host, port = self.config.metrics_listen
            try:
                self._metrics_runner = await start_server(
                    pipeline.metrics, host, port, lambda: self._healthy(pipeline)
                )
            except OSError as exc:
                reason = f"cannot listen on {host}:{port}: {exc.strerror}"
                raise ConfigError(f"metrics.listen: {reason}") from None
        self.ready.set()
        self._notifier.ready(pipeline.status_line())

    async def _main(self, pipeline: Pipeline) -> None:
        # Companions of the main loop, cancelled when it ends.
        companions = []
        if not self.once:
            companions = [
                asyncio.create_task(self._rescan_every(pipeline, w))
                for w in self.config.watches
                if w.rescan_interval_s > 0
            ]
            companions.append(asyncio.create_task(self._supervise_roots(pipeline)))
            companions.append(asyncio.create_task(self._heartbeat(pipeline)))
        try:
            if self.once:
                await self._until_idle(pipeline)
            else:
                await self._stop.wait()
        finally:
            for task in companions:
                task.cancel()
            await asyncio.gather(*companions, return_exceptions=True)

    async def _shutdown(self, pipeline: Pipeline) -> None:
        started = time.monotonic()
        self._notifier.stopping()
        if self._observers is not None:
            self._observers.stop()
        pipeline.stop_accepting()
        in_flight = pipeline.in_flight
        _, cut = (
            await asyncio.wait(self._workers, timeout=self.grace_s)
            if self._workers
            else (set(), set())
        )
        for task in cut:
            task.cancel()  # the worker puts its row back to pending
        await asyncio.gather(*self._workers, return_exceptions=True)
        pipeline.settle_accounts()
        await pipeline.cancel_background()
        for helper in (self._settler_task, self._task_follower):
            if helper is not None:
                helper.cancel()
                await asyncio.gather(helper, return_exceptions=True)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()  # before the manifest closes under a scrape
        counts = pipeline.manifest.counts()
        log.info(
            "stopped",
            **pipeline.summary(),
            in_flight_at_stop=in_flight,
            cut=len(cut),
            pending=counts["pending"],
            duration_s=round(time.monotonic() - started, 2),
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _check_paths(self) -> None:
        for path in self.paths:
            if self.config.watch_for(Path(path)) is None:
                raise ConfigError(f"{path}: not under any watched folder")
            if not Path(path).exists():
                raise ConfigError(f"{path}: does not exist")

    def _scan_path(self, pipeline: Pipeline, path: str) -> None:
        watch = self.config.watch_for(Path(path))
        assert watch is not None
        if inspect(watch, path).kind is Kind.DIRECTORY:
            pipeline.spawn(pipeline.scan(watch, path))
        else:
            pipeline.consider(watch, path)

    async def _timed_scan(self, pipeline: Pipeline, watch: Any) -> None:
        started = time.monotonic()
        seen = await pipeline.scan(watch)
        log.info(
            "scan done",
            watch=str(watch.path),
            files=seen,
            settling=len(pipeline.settler),
            duration_s=round(time.monotonic() - started, 3),
        )

    async def _rescan_every(self, pipeline: Pipeline, watch: Any) -> None:
        # Catches what events missed (a dropped inotify queue, a share that was away).
        while True:
            await asyncio.sleep(watch.rescan_interval_s)
            await self._timed_scan(pipeline, watch)

    def _on_root_lost(self, watch: Any) -> None:
        if self._observers is not None:
            self._observers.lost(watch)

    def _rescan_all(self, pipeline: Pipeline, reason: str) -> None:
        # One rescan at a time, but events lost *during* a rescan (in a folder it had already
        # passed) are only found by another one: remember to go again.
        self._rescan_wanted = True
        if self._rescanning:
            return
        log.warning("events were lost; rescanning every watched folder", reason=reason)
        self._rescanning = True

        async def rescan() -> None:
            try:
                while self._rescan_wanted:
                    self._rescan_wanted = False
                    for watch in self.config.watches:
                        await self._timed_scan(pipeline, watch)
            finally:
                self._rescanning = False

        pipeline.spawn(rescan())

    async def _supervise_roots(self, pipeline: Pipeline) -> None:
        """A watch root deleted and re-created (or a share remounted) is watched again."""
        assert self._observers is not None
        while True:
            await asyncio.sleep(ROOT_CHECK_S)
            for watch in self._observers.check_roots():
                pipeline.spawn(self._timed_scan(pipeline, watch))

    async def _until_idle(self, pipeline: Pipeline) -> None:
        while not self._stop.is_set() and pipeline.auth_error is None:
            if pipeline.idle():
                return
            pipeline.changed.clear()
            with contextlib.suppress(TimeoutError):
                # `changed` wakes us on every step; the timeout covers steps that end quietly.
                await asyncio.wait_for(pipeline.changed.wait(), 0.5)

    async def _heartbeat(self, pipeline: Pipeline) -> None:
        """systemd STATUS= with counts, and WATCHDOG=1 while the observers are alive.

        Sent from the event loop, so a stuck loop also stops the pings and systemd restarts us.
        """
        interval = min(self._notifier.watchdog_interval_s or HEARTBEAT_S, HEARTBEAT_S)
        while True:
            if self._healthy(pipeline):
                self._notifier.watchdog()
            self._notifier.status(pipeline.status_line())
            await asyncio.sleep(interval)

    def _healthy(self, pipeline: Pipeline) -> bool:
        if self._fatal is not None:
            return False
        if self._observers is not None and not self._observers.healthy():
            return False
        try:
            pipeline.manifest.counts()
        except Exception:
            return False
        return True

    def _critical(self, coro: Any) -> asyncio.Task[Any]:
        """A task that must run until shutdown: if it dies, the daemon stops and says why."""
        task = asyncio.get_running_loop().create_task(coro)

        def done(task: asyncio.Task[Any]) -> None:
            if not task.cancelled() and task.exception() is not None:
                self._on_fatal(task.exception())  # type: ignore[arg-type]

        task.add_done_callback(done)
        return task

    def _on_fatal(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            log.error("stopping: cannot go on", error=str(exc) or repr(exc))
        self._stop.set()

    def _on_auth_error(self, exc: AuthError) -> None:
        log.error("stopping: the API rejected the key; files stay pending", reason=str(exc))
        self._stop.set()

    def _exit_status(self, pipeline: Pipeline) -> int:
        if self._fatal is not None:
            raise self._fatal  # a ManifestError becomes one line and status 1; a bug, a traceback
        if pipeline.auth_error is not None:
            raise pipeline.auth_error
        if self.once and pipeline.summary()["failed"]:
            return 1
        return 0
