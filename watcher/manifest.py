"""The manifest: one SQLite row per path, holding its upload state, file ID and task result.

It is also the queue: pending work lives here, not in memory, so a backlog of 100,000 files
costs disk, not RAM, and survives a crash. The daemon is the only process that claims work
(an exclusive lock file sees to that); ``status``, ``export`` and ``retry`` may run beside it
thanks to WAL mode.

Durability: the connection runs WAL with ``synchronous=NORMAL`` (a commit survives a crash of
this process, not a power cut) and switches to ``FULL`` for the commit that marks a file
``uploaded``: that commit fsyncs the log, and with it every commit before it. Losing the others
to a power cut is harmless: a lost ``pending`` or ``uploading`` is found again by the start
scan, a lost ``failed`` is tried again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.constants import (
    FAILED,
    MAX_ERROR_CHARS,
    PENDING,
    SKIPPED,
    STATES,
    UPLOADED,
    UPLOADING,
)
from watcher.errors import ManifestError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id          INTEGER PRIMARY KEY,
    path        BLOB NOT NULL UNIQUE,   -- os.fsencode(absolute path): any byte sequence works
    watch       BLOB NOT NULL,          -- the watch root it was found under
    size        INTEGER,
    mtime_ns    INTEGER,
    sha256      TEXT,
    state       TEXT NOT NULL,
    file_id     TEXT,
    uploaded_at REAL,                   -- unix time the API returned file_id
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    task_id     TEXT,
    task_status TEXT,
    task_output TEXT,                   -- JSON text of the task's output
    queued_at   REAL NOT NULL,          -- unix time it last became pending: claim order
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state, queued_at);
"""

_COLUMNS = (
    "path, watch, size, mtime_ns, sha256, state, file_id, uploaded_at, attempts, error, "
    "task_id, task_status, task_output, queued_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class Record:
    path: str
    watch: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    state: str
    file_id: str | None
    uploaded_at: float | None
    attempts: int
    error: str | None
    task_id: str | None
    task_status: str | None
    task_output: str | None
    queued_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Record:
        return cls(os.fsdecode(row[0]), os.fsdecode(row[1]), *row[2:])


def _key(path: str | Path) -> bytes:
    return os.fsencode(path)


def _explain(exc: sqlite3.Error, path: Path) -> str:
    """SQLite says "disk I/O error" when it cannot grow its -shm file on a full disk."""
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    return f"{exc} (the disk is full)" if full and "disk is full" not in str(exc) else str(exc)


def _cut(reason: str | None) -> str | None:
    return None if reason is None else reason[:MAX_ERROR_CHARS]


class Manifest:
    """A thin store over one SQLite connection, used from one thread at a time."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self._in_tx = False
        if readonly and not path.exists():
            raise ManifestError(f"{path}: no manifest yet (has the daemon run?)")
        try:
            if not readonly:
                path.parent.mkdir(parents=True, exist_ok=True)
            # Quoted: a '#', '?' or '%' in the path is part of the name, not URI syntax.
            uri = f"file:{urllib.parse.quote(str(path))}" + ("?mode=ro" if readonly else "")
            self._db = sqlite3.connect(
                uri, uri=True, timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise ManifestError(f"{path}: cannot open manifest: {exc}") from None
        except OSError as exc:
            raise ManifestError(f"{path}: cannot create manifest: {exc.strerror}") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 10000")
            if readonly:
                self._check_version()
            else:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise ManifestError(
                    f"{path}: cannot open manifest: {_explain(exc, path)}"
                ) from None
            raise

    # -- life cycle --

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"{self.path}: manifest schema {version} is newer than this smooth-watcher "
                f"({SCHEMA_VERSION}); upgrade smooth-watcher"
            )
        if version < SCHEMA_VERSION:
            self._db.executescript(
                f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )

    def _check_version(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{self.path}: unexpected manifest schema {version}")

    def lock(self) -> None:
        """Take the one-daemon lock; refuse if another daemon (or sync) holds it."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ManifestError(f"{lock_path}: cannot create lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ManifestError(
                f"{self.path}: another smooth-watcher is already using this manifest"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[None]:
        """Group writes into one commit; ``durable``: fsync it (one fsync for the whole group).

        Nested use joins the outer transaction.
        """
        if self._in_tx:
            yield
            return
        with self._durable() if durable else contextlib.nullcontext(), self._transaction():
            yield

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._write("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self._in_tx = False
            self._db.execute("ROLLBACK")
            raise
        self._in_tx = False
        try:
            self._write("COMMIT")
        except ManifestError:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _durable(self) -> Iterator[None]:
        """The commit(s) inside fsync the log before they return."""
        self._db.execute("PRAGMA synchronous = FULL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous = NORMAL")

    def _write(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, tuple(args))
        except sqlite3.OperationalError as exc:
            # "database or disk is full", "database is locked", "disk I/O error": never silent.
            raise ManifestError(f"{self.path}: cannot write manifest: {exc}") from None

    # -- reads --

    def get(self, path: str | Path) -> Record | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE path = ?", (_key(path),)
        ).fetchone()
        return Record.from_row(row) if row else None

    def stat_of(self, path: str | Path) -> tuple[str, int | None, int | None] | None:
        """(state, size, mtime_ns): all a rescan needs, without building a Record."""
        row = self._db.execute(
            "SELECT state, size, mtime_ns FROM files WHERE path = ?", (_key(path),)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def rows(self, state: str | None = None) -> Iterator[Record]:
        sql = f"SELECT {_COLUMNS} FROM files"
        args: tuple[Any, ...] = ()
        if state:
            sql, args = sql + " WHERE state = ?", (state,)
        for row in self._db.execute(sql + " ORDER BY path", args):
            yield Record.from_row(row)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._db.execute("SELECT state, count(*) FROM files GROUP BY state"))
        return counts

    def task_counts(self) -> dict[str, int]:
        """Files per task status (waiting, running, done, failed, error…); none: {}."""
        rows = self._db.execute(
            "SELECT task_status, count(*) FROM files WHERE task_status IS NOT NULL "
            "GROUP BY task_status"
        )
        return dict(rows.fetchall())

    def oldest_pending(self) -> Record | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE state = ? ORDER BY queued_at LIMIT 1",
            (PENDING,),
        ).fetchone()
        return Record.from_row(row) if row else None

    def last_errors(self, limit: int = 5) -> list[Record]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE error IS NOT NULL "
            "ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )
        return [Record.from_row(r) for r in rows]

    def has_pending(self) -> bool:
        return (
            self._db.execute("SELECT 1 FROM files WHERE state = ? LIMIT 1", (PENDING,)).fetchone()
            is not None
        )

    # -- state changes --

    def recover(self) -> int:
        """At start: uploads cut by a crash or a stop go back to pending."""
        now = time.time()
        cur = self._write(
            "UPDATE files SET state = ?, updated_at = ? WHERE state = ?",
            (PENDING, now, UPLOADING),
        )
        return cur.rowcount

    def enqueue(self, path: str | Path, watch: str | Path, size: int, mtime_ns: int) -> None:
        """The file settled with new content: (re)queue it for upload."""
        now = time.time()
        self._write(
            "INSERT INTO files (path, watch, size, mtime_ns, state, queued_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (path) DO UPDATE SET watch = excluded.watch, size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, sha256 = NULL, state = excluded.state, "
            "file_id = NULL, uploaded_at = NULL, attempts = 0, error = NULL, task_id = NULL, "
            "task_status = NULL, task_output = NULL, queued_at = excluded.queued_at, "
            "updated_at = excluded.updated_at",
            (_key(path), _key(watch), size, mtime_ns, PENDING, now, now),
        )

    def claim(self, limit: int = 1) -> list[Record]:
        """Take up to ``limit`` pending rows, oldest first, and mark them uploading."""
        with self.transaction():
            rows = self._write(
                f"UPDATE files SET state = ?, updated_at = ? WHERE id IN "
                f"(SELECT id FROM files WHERE state = ? ORDER BY queued_at, id LIMIT ?) "
                f"RETURNING {_COLUMNS}",
                (UPLOADING, time.time(), PENDING, limit),
            ).fetchall()
        records = [Record.from_row(r) for r in rows]
        records.sort(key=lambda r: r.queued_at)
        return records

    def mark_uploaded(
        self,
        path: str | Path,
        *,
        file_id: str,
        sha256: str,
        size: int,
        mtime_ns: int,
        attempts: int,
        uploaded_at: float | None = None,
    ) -> None:
        now = time.time()
        with contextlib.nullcontext() if self._in_tx else self._durable():
            self._write(
                "UPDATE files SET state = ?, file_id = ?, sha256 = ?, size = ?, mtime_ns = ?, "
                "uploaded_at = ?, attempts = ?, error = NULL, updated_at = ? WHERE path = ?",
                (
                    UPLOADED,
                    file_id,
                    sha256,
                    size,
                    mtime_ns,
                    uploaded_at or now,
                    attempts,
                    now,
                    _key(path),
                ),
            )

    def mark_unchanged(self, path: str | Path, *, size: int, mtime_ns: int) -> None:
        """Same sha256 as the upload on record, new mtime: remember the new stat, send nothing."""
        self._write(
            "UPDATE files SET size = ?, mtime_ns = ?, updated_at = ? WHERE path = ?",
            (size, mtime_ns, time.time(), _key(path)),
        )

    def mark_failed(self, path: str | Path, reason: str, *, attempts: int | None = None) -> None:
        self._write(
            "UPDATE files SET state = ?, error = ?, attempts = coalesce(?, attempts), "
            "updated_at = ? WHERE path = ?",
            (FAILED, _cut(reason), attempts, time.time(), _key(path)),
        )

    def mark_skipped(
        self,
        path: str | Path,
        watch: str | Path,
        reason: str,
        size: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        now = time.time()
        self._write(
            "INSERT INTO files (path, watch, size, mtime_ns, state, error, queued_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
            "state = excluded.state, error = excluded.error, size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, updated_at = excluded.updated_at",
            (_key(path), _key(watch), size, mtime_ns, SKIPPED, _cut(reason), now, now),
        )

    def note_attempt(self, path: str | Path, attempts: int, error: str) -> None:
        """A transient failure: keep the count and the reason visible to ``status`` meanwhile."""
        self._write(
            "UPDATE files SET attempts = ?, error = ?, updated_at = ? WHERE path = ?",
            (attempts, _cut(error), time.time(), _key(path)),
        )

    def release(self, path: str | Path) -> None:
        """An upload was cut (shutdown, auth failure): back to pending, same place in line."""
        self._write(
            "UPDATE files SET state = ?, updated_at = ? WHERE path = ? AND state = ?",
            (PENDING, time.time(), _key(path), UPLOADING),
        )

    def forget(self, path: str | Path) -> None:
        """The file vanished before it was sent: nothing left to upload."""
        self._write(
            "DELETE FROM files WHERE path = ? AND state IN (?, ?, ?)",
            (_key(path), PENDING, UPLOADING, SKIPPED),
        )

    # -- tasks --

    def set_task(self, path: str | Path, task_id: str, status: str) -> None:
        self._write(
            "UPDATE files SET task_id = ?, task_status = ?, task_output = NULL, updated_at = ? "
            "WHERE path = ?",
            (task_id, status, time.time(), _key(path)),
        )

    def set_task_result(
        self, path: str | Path, status: str, output: str | None, error: str | None = None
    ) -> None:
        """The task ended (or could not start: ``status = "error"`` with the reason)."""
        self._write(
            "UPDATE files SET task_status = ?, task_output = ?, error = coalesce(?, error), "
            "updated_at = ? WHERE path = ?",
            (status, output, _cut(error), time.time(), _key(path)),
        )

    def tasks_to_start(self, watches: Iterable[str | Path], limit: int = 100) -> list[Record]:
        """Uploaded files under ``watches`` whose task was never started (a crash, a restart)."""
        roots = [_key(w) for w in watches]
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE state = ? AND task_id IS NULL "
            f"AND task_status IS NULL AND watch IN ({','.join('?' * len(roots))}) "
            "ORDER BY uploaded_at LIMIT ?",
            (UPLOADED, *roots, limit),
        )
        return [Record.from_row(r) for r in rows]

    def running_tasks(self, watches: Iterable[str | Path]) -> list[Record]:
        roots = [_key(w) for w in watches]
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE task_status IN ('waiting', 'running') "
            f"AND watch IN ({','.join('?' * len(roots))})",
            roots,
        )
        return [Record.from_row(r) for r in rows]

    def retry(self, paths: Iterable[str | Path] = (), *, failed: bool = False) -> int:
        """Failed (or named) rows back to pending; returns how many changed."""
        now = time.time()
        changed = 0
        with self.transaction():
            if failed:
                changed += self._write(
                    "UPDATE files SET state = ?, attempts = 0, error = NULL, queued_at = ?, "
                    "updated_at = ? WHERE state = ?",
                    (PENDING, now, now, FAILED),
                ).rowcount
            for path in paths:
                changed += self._write(
                    "UPDATE files SET state = ?, attempts = 0, error = NULL, queued_at = ?, "
                    "updated_at = ? WHERE path = ? AND state IN (?, ?)",
                    (PENDING, now, now, _key(path), FAILED, SKIPPED),
                ).rowcount
        return changed
