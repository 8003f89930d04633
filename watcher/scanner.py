"""Finding files: watchdog observers, the settle stage and the folder walk.

Watchdog calls back on its own threads; ``EventBridge.on_any_event`` is the one place that
crosses into the event loop (``call_soon_threadsafe``). Everything after that runs on the loop.

Settling is counted on the daemon's clock from the last change it saw (an event, or a stat that
differs), never from the file's mtime: files copied with their old mtime (``cp -p``,
``rsync -t``, SMB clients) are still waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from watcher.config import WatchConfig
from watcher.constants import SCAN_BATCH
from watcher.filters import Inspection, Kind, PathFilter, inside, inspect, relpath

log = structlog.get_logger("watcher.scanner")

# Only events that can mean "new content here", and folder deletions (the root itself going
# away); file deletions and opens are noise to us.
EVENT_TYPES: list[type[FileSystemEvent]] = [
    DirDeletedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileAttribEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]

Signature = tuple[int, int, int, int] | None

POLL_INTERVAL_S = 1.0  # polling observer: how often each folder is listed


def signature(inspection: Inspection) -> Signature:
    st = inspection.st
    if st is None or inspection.kind is not Kind.REGULAR:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class Settler:
    """Paths that changed recently, each handed on once it has been still for ``settle_s``.

    One ordered dict per watch (all its paths share one ``settle_s``), so the oldest entry is
    always first: each event is O(1) and the loop sleeps exactly until the next deadline.
    """

    def __init__(
        self,
        on_settled: Callable[[WatchConfig, str, Inspection], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_settled = on_settled
        self._clock = clock
        self._waiting: dict[WatchConfig, OrderedDict[str, tuple[float, Signature]]] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(d) for d in self._waiting.values())

    def touch(self, watch: WatchConfig, path: str, inspection: Inspection | None = None) -> None:
        """Something changed at ``path`` (just ``inspection``-ed, if given): restart its clock."""
        waiting = self._waiting.setdefault(watch, OrderedDict())
        if not waiting:
            self._wake.set()
        inspection = inspection or inspect(watch, path)
        waiting[path] = (self._clock(), signature(inspection))
        waiting.move_to_end(path)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            delay = self._settle_due()
            if delay is None:
                await self._wake.wait()
            elif delay == 0:
                await asyncio.sleep(0)  # more are due: let the loop breathe, then go on
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    def _settle_due(self) -> float | None:
        """Hand on the paths whose time has come; return the delay to the next deadline.

        At most SCAN_BATCH per call: a burst of 100,000 files that settle together must not
        hold the event loop (uploads, signals) for seconds.
        """
        next_delay: float | None = None
        handled = 0
        for watch, waiting in list(self._waiting.items()):
            while waiting:
                if handled >= SCAN_BATCH:
                    return 0.0
                handled += 1
                path, (seen, sig) = next(iter(waiting.items()))
                remaining = seen + watch.settle_s - self._clock()
                if remaining > 0:
                    next_delay = remaining if next_delay is None else min(next_delay, remaining)
                    break
                del waiting[path]
                inspection = inspect(watch, path)
                if inspection.kind is Kind.REGULAR and signature(inspection) != sig:
                    # Changed without an event (polling, NFS, a slow writer): wait again.
                    waiting[path] = (self._clock(), signature(inspection))
                    continue
                if inspection.kind is not Kind.GONE:
                    self._on_settled(watch, path, inspection)
        return next_delay


class EventBridge(FileSystemEventHandler):
    """Runs on watchdog's thread: passes each event to the loop and does nothing else."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        watch: WatchConfig,
        deliver: Callable[[WatchConfig, FileSystemEvent], None],
    ) -> None:
        self._loop = loop
        self._watch = watch
        self._deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        # RuntimeError: the loop is closing; the start scan of the next run finds the file.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver, self._watch, event)


class Observers:
    """One inotify observer for ordinary roots, one polling observer for ``poll = true`` roots
    and for roots that hit the inotify watch limit.

    Each root's identity (device, inode) is remembered: ``check_roots`` notices a root that was
    deleted, replaced or re-created, and watches it again.
    """

    def __init__(self, on_lost_events: Callable[[], None] | None = None) -> None:
        self._native: BaseObserver | None = None
        self._polling: BaseObserver | None = None
        self._scheduled: dict[WatchConfig, tuple[ObservedWatch | None, tuple[int, int] | None]]
        self._scheduled = {}
        self._handlers: dict[WatchConfig, EventBridge] = {}
        self._overflow = _OverflowHook(on_lost_events) if on_lost_events else None

    def _observer(self, polling: bool) -> BaseObserver:
        if polling:
            if self._polling is None:
                self._polling = PollingObserver(timeout=POLL_INTERVAL_S)
                self._polling.start()
            return self._polling
        if self._native is None:
            self._native = Observer()
            self._native.start()  # started first: schedule() then raises watch-limit errors here
        return self._native

    def schedule(self, handler: EventBridge, watch: WatchConfig) -> None:
        self._handlers[watch] = handler
        identity = _identity(watch.path)
        if identity is None:
            log.warning("watch root is missing; waiting for it to come back", path=str(watch.path))
            self._scheduled[watch] = (None, None)
            return
        kwargs: dict[str, Any] = {"recursive": watch.recursive, "event_filter": EVENT_TYPES}
        try:
            observed = self._observer(watch.poll).schedule(handler, str(watch.path), **kwargs)
            if not watch.poll and not self._covers_tree(observed, watch):
                raise OSError(errno.ENOSPC, "inotify watch limit reached below the root")
        except OSError as exc:
            if watch.poll or exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            # fs.inotify.max_user_watches (or instances) is exhausted: polling is slower but
            # sees everything. Raising the sysctl restores inotify at the next start.
            log.warning(
                "inotify limit reached; polling this folder instead",
                path=str(watch.path),
                reason=exc.strerror,
                hint="raise fs.inotify.max_user_watches",
            )
            observed = self._observer(True).schedule(handler, str(watch.path), **kwargs)
        self._scheduled[watch] = (observed, identity)

    def lost(self, watch: WatchConfig) -> None:
        """The root was deleted or moved away (its inode may well come back with a new mkdir,
        so identity alone cannot tell): forget the old watch; check_roots re-watches."""
        observed, _ = self._scheduled.get(watch, (None, None))
        self._unschedule(observed)
        self._scheduled[watch] = (None, None)
        log.warning("watch root disappeared", path=str(watch.path))

    def _unschedule(self, observed: ObservedWatch | None) -> None:
        if observed is None:
            return
        for observer in (self._native, self._polling):
            if observer is not None:
                with contextlib.suppress(KeyError, ValueError):
                    observer.unschedule(observed)

    def _covers_tree(self, observed: ObservedWatch, watch: WatchConfig) -> bool:
        """Did inotify get a watch on every folder? watchdog silently skips sub-folders whose
        watch fails, so hitting fs.inotify.max_user_watches mid-tree would go unnoticed.

        Reads watchdog internals (7.x); if they are not there, says yes and leaves it to the
        periodic rescans.
        """
        if not watch.recursive or self._native is None:
            return True
        emitter = getattr(self._native, "_emitter_for_watch", {}).get(observed)
        group = getattr(emitter, "_inotify", None)
        watched = getattr(group, "_active_callbacks_by_path", None)
        if watched is None:
            return True
        folders = 1 + sum(len(dirs) for _, dirs, _ in os.walk(watch.path))
        if len(watched) >= folders:
            return True
        self._unschedule(observed)
        return False

    def check_roots(self) -> list[WatchConfig]:
        """Watch again every root that disappeared or was replaced; return those re-watched."""
        rewatched = []
        for watch, (observed, identity) in list(self._scheduled.items()):
            now = _identity(watch.path)
            if now == identity:
                continue
            self._unschedule(observed)
            if now is None:
                if identity is not None:
                    log.warning("watch root disappeared", path=str(watch.path))
                self._scheduled[watch] = (None, None)
                continue
            log.info("watch root is back; watching it again", path=str(watch.path))
            self.schedule(self._handlers[watch], watch)
            rewatched.append(watch)
        return rewatched

    def healthy(self) -> bool:
        return all(o.is_alive() for o in (self._native, self._polling) if o is not None)

    def stop(self) -> None:
        if self._overflow:
            self._overflow.remove()
        observers = [o for o in (self._native, self._polling) if o is not None]
        for observer in observers:
            observer.stop()
        for observer in observers:
            observer.join(timeout=5.0)
        self._native = self._polling = None
        self._scheduled.clear()


class _OverflowHook(logging.Handler):
    """Turns watchdog's "Inotify queue overflowed" log record into a rescan.

    watchdog rebuilds its watches after an IN_Q_OVERFLOW but tells its handlers nothing; the
    warning it logs is the only signal. It is emitted on watchdog's thread, so ``on_lost``
    must be thread-safe (the daemon passes a ``call_soon_threadsafe`` wrapper).
    """

    LOGGER = "watchdog.observers.inotify_c"

    def __init__(self, on_lost: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._on_lost = on_lost
        logging.getLogger(self.LOGGER).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._on_lost()

    def remove(self) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def event_paths(watch: WatchConfig, event: FileSystemEvent) -> tuple[str, bool] | None:
    """The path an event tells us to look at, and whether it is a directory to walk."""
    if isinstance(event, FileMovedEvent | DirMovedEvent):
        path = os.fsdecode(event.dest_path)
    else:
        path = os.fsdecode(event.src_path)
    if not inside(path, str(watch.path)) or path == str(watch.path):
        return None
    return path, event.is_directory


def walk(watch: WatchConfig, path_filter: PathFilter, top: str | None = None) -> Iterator[str]:
    """Every candidate path below ``top`` (default: the root), excluded folders pruned.

    Yields files and anything else that is not a directory (links, FIFOs…) for the caller to
    classify; never opens a file. Directory links are not descended, so link loops end.
    """
    root = str(watch.path)
    top = top or root
    stack = [top]
    seen: set[tuple[int, int]] = set()
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot read folder", path=folder, reason=exc.strerror)
            continue
        for entry in entries:
            rel = relpath(watch, entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_link = entry.is_symlink()
            except OSError:
                continue
            if is_dir and not is_link:
                if watch.recursive and path_filter.wants_dir(rel):
                    stack.append(entry.path)
            elif path_filter.wants_entry(rel, entry.name):
                # Links to folders are yielded too, and classified (and skipped) by the caller:
                # they are never descended. Inside the root, what they lead to is already
                # watched under its real path; outside, it must not be reached at all.
                yield entry.path
