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
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import structlog
from watchdog.events import (
    DirCreatedEvent,
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
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from watcher.config import WatchConfig
from watcher.filters import Inspection, Kind, PathFilter, inside, inspect, relpath

log = structlog.get_logger("watcher.scanner")

# Only events that can mean "new content here"; deletions and opens are noise to us.
EVENT_TYPES: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileAttribEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]

Signature = tuple[int, int, int, int] | None


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

    def touch(self, watch: WatchConfig, path: str) -> None:
        """Something changed at ``path``: restart its settle clock."""
        waiting = self._waiting.setdefault(watch, OrderedDict())
        if not waiting:
            self._wake.set()
        waiting[path] = (self._clock(), signature(inspect(watch, path)))
        waiting.move_to_end(path)

    def forget_watch(self, watch: WatchConfig) -> None:
        self._waiting.pop(watch, None)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            delay = self._settle_due()
            if delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    def _settle_due(self) -> float | None:
        """Hand on every path whose time has come; return the delay to the next deadline."""
        next_delay: float | None = None
        for watch, waiting in list(self._waiting.items()):
            while waiting:
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
    """One inotify observer for all ordinary roots, one polling observer for ``poll = true``."""

    def __init__(self) -> None:
        self._native: BaseObserver | None = None
        self._polling: BaseObserver | None = None

    def schedule(self, handler: EventBridge, watch: WatchConfig) -> None:
        if watch.poll:
            if self._polling is None:
                self._polling = PollingObserver(timeout=1.0)
                self._polling.start()
            observer = self._polling
        else:
            if self._native is None:
                self._native = Observer()
                self._native.start()
            observer = self._native
        observer.schedule(
            handler, str(watch.path), recursive=watch.recursive, event_filter=EVENT_TYPES
        )

    def healthy(self) -> bool:
        return all(o.is_alive() for o in (self._native, self._polling) if o is not None)

    def stop(self) -> None:
        observers = [o for o in (self._native, self._polling) if o is not None]
        for observer in observers:
            observer.stop()
        for observer in observers:
            observer.join(timeout=5.0)
        self._native = self._polling = None


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
    classify; never opens a file. Followed directory links stay inside the root and are
    visited once, so link loops end.
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
            if is_dir or (is_link and watch.follow_symlinks and _is_dir_inside(entry.path, root)):
                if watch.recursive and path_filter.wants_dir(rel):
                    stack.append(entry.path)
            elif path_filter.wants_file(rel):
                yield entry.path


def _is_dir_inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    try:
        return inside(real, root) and stat.S_ISDIR(os.stat(real).st_mode)
    except OSError:
        return False
