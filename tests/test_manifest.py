"""watcher/manifest.py: the SQLite store and queue, on a controlled clock."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from watcher import manifest as manifest_mod
from watcher.constants import MAX_ERROR_CHARS, STATES
from watcher.errors import ManifestError
from watcher.manifest import Manifest

WATCH = "/srv/drop"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(manifest_mod, "time", SimpleNamespace(time=clock.time))
    return clock


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "manifest.sqlite3"


@pytest.fixture
def m(db_path: Path, clock: Clock) -> Iterator[Manifest]:
    manifest = Manifest(db_path)
    yield manifest
    manifest.close()


def p(name: str) -> str:
    return f"{WATCH}/{name}"


def enqueue(m: Manifest, clock: Clock, *names: str, size: int = 10) -> None:
    for name in names:
        clock.tick()
        m.enqueue(p(name), WATCH, size, 123_000_000_000)


def state_of(m: Manifest, name: str) -> str | None:
    rec = m.get(p(name))
    return rec.state if rec else None


# --- the file ------------------------------------------------------------------------------------


def test_schema_version_and_wal(m: Manifest, db_path: Path) -> None:
    assert db_path.exists()  # the state folder is created
    raw = sqlite3.connect(db_path)
    try:
        (version,) = raw.execute("PRAGMA user_version").fetchone()
        (mode,) = raw.execute("PRAGMA journal_mode").fetchone()
    finally:
        raw.close()
    assert version == manifest_mod.SCHEMA_VERSION >= 1
    assert mode.lower() == "wal"


def test_rows_survive_close_and_reopen(db_path: Path, clock: Clock) -> None:
    first = Manifest(db_path)
    enqueue(first, clock, "a.txt")
    first.mark_uploaded(p("a.txt"), file_id="f1", sha256="ab" * 32, size=10, mtime_ns=5, attempts=1)
    first.close()
    again = Manifest(db_path, readonly=True)
    try:
        rec = again.get(p("a.txt"))
        assert rec is not None and rec.state == "uploaded" and rec.file_id == "f1"
    finally:
        again.close()


def test_readonly_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none" / "manifest.sqlite3"
    with pytest.raises(ManifestError) as excinfo:
        Manifest(path, readonly=True)
    assert str(path) in str(excinfo.value)
    assert not path.parent.exists()  # a read-only open creates nothing


def test_readonly_cannot_write(m: Manifest, db_path: Path, clock: Clock) -> None:
    enqueue(m, clock, "a.txt")
    ro = Manifest(db_path, readonly=True)
    try:
        assert ro.counts()["pending"] == 1  # reads beside the writer
        with pytest.raises(ManifestError, match="cannot write"):
            ro.enqueue(p("b.txt"), WATCH, 1, 1)
    finally:
        ro.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_not_sqlite_is_a_manifest_error(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "manifest.sqlite3"
    path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(ManifestError) as excinfo:
        Manifest(path, readonly=readonly)
    assert str(path) in str(excinfo.value)
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


def test_newer_schema_asks_to_upgrade(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {manifest_mod.SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(ManifestError, match="upgrade") as excinfo:
        Manifest(db_path)
    assert str(db_path) in str(excinfo.value)
    with pytest.raises(ManifestError, match="schema"):
        Manifest(db_path, readonly=True)


def test_lock_is_exclusive_until_close(db_path: Path, clock: Clock) -> None:
    first = Manifest(db_path)
    second = Manifest(db_path)
    try:
        first.lock()
        with pytest.raises(ManifestError) as excinfo:
            second.lock()
        assert str(db_path) in str(excinfo.value)
        assert "another smooth-watcher" in str(excinfo.value)
        first.close()
        second.lock()  # free again once the first is closed
        third = Manifest(db_path)
        try:
            with pytest.raises(ManifestError):
                third.lock()
        finally:
            third.close()
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("folder", ["state#2", "what?", "100%41"])
def test_manifest_path_with_uri_characters(tmp_path: Path, clock: Clock, folder: str) -> None:
    path = tmp_path / folder / "manifest.sqlite3"
    manifest = Manifest(path)
    try:
        manifest.enqueue(p("a.txt"), WATCH, 1, 1)
    finally:
        manifest.close()
    assert path.exists()
    ro = Manifest(path, readonly=True)
    try:
        assert ro.counts()["pending"] == 1
    finally:
        ro.close()


# --- the queue -----------------------------------------------------------------------------------


def test_enqueue_creates_a_pending_row(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "a.txt", size=42)
    rec = m.get(p("a.txt"))
    assert rec is not None
    assert (rec.path, rec.watch, rec.size, rec.mtime_ns) == (p("a.txt"), WATCH, 42, 123_000_000_000)
    assert rec.state == "pending"
    assert rec.file_id is None and rec.sha256 is None and rec.uploaded_at is None
    assert rec.attempts == 0
    assert rec.queued_at == clock.now
    assert m.stat_of(p("a.txt")) == ("pending", 42, 123_000_000_000)
    assert m.get(p("other")) is None
    assert m.stat_of(p("other")) is None
    assert m.has_pending()


def test_claim_oldest_first_with_limit(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "c.txt", "a.txt", "b.txt", "d.txt")  # queue order differs from name order
    first = m.claim(2)
    assert [r.path for r in first] == [p("c.txt"), p("a.txt")]
    assert all(r.state == "uploading" for r in first)
    assert state_of(m, "c.txt") == state_of(m, "a.txt") == "uploading"
    assert state_of(m, "b.txt") == state_of(m, "d.txt") == "pending"
    assert [r.path for r in m.claim()] == [p("b.txt")]
    assert [r.path for r in m.claim(10)] == [p("d.txt")]
    assert m.claim(10) == []
    assert not m.has_pending()


def test_claim_skips_rows_that_are_not_pending(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "up.txt", "bad.txt", "skip.txt", "todo.txt")
    m.mark_uploaded(p("up.txt"), file_id="f", sha256="s", size=1, mtime_ns=1, attempts=1)
    m.mark_failed(p("bad.txt"), "nope")
    m.mark_skipped(p("skip.txt"), WATCH, "a FIFO")
    assert [r.path for r in m.claim(10)] == [p("todo.txt")]


def test_mark_uploaded(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "a.txt")
    m.claim()
    m.note_attempt(p("a.txt"), 2, "HTTP 503")
    clock.tick(5)
    m.mark_uploaded(
        p("a.txt"), file_id="file-1", sha256="ab" * 32, size=11, mtime_ns=999, attempts=3
    )
    rec = m.get(p("a.txt"))
    assert rec is not None
    assert rec.state == "uploaded"
    assert rec.file_id == "file-1"
    assert rec.sha256 == "ab" * 32
    assert (rec.size, rec.mtime_ns, rec.attempts) == (11, 999, 3)
    assert rec.uploaded_at == clock.now
    assert rec.error is None

    m.mark_uploaded(
        p("a.txt"),
        file_id="file-2",
        sha256="cd" * 32,
        size=11,
        mtime_ns=999,
        attempts=1,
        uploaded_at=1234.5,
    )
    rec = m.get(p("a.txt"))
    assert rec is not None and rec.uploaded_at == 1234.5 and rec.file_id == "file-2"


def test_enqueue_again_resets_an_uploaded_row(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "a.txt")
    m.claim()
    m.mark_uploaded(p("a.txt"), file_id="file-1", sha256="s", size=10, mtime_ns=1, attempts=2)
    if hasattr(m, "set_task"):  # tasks are recorded on the same row
        m.set_task(p("a.txt"), "task-1", "running")
    clock.tick(60)
    m.enqueue(p("a.txt"), WATCH, 20, 2)
    rec = m.get(p("a.txt"))
    assert rec is not None
    assert rec.state == "pending"
    assert rec.file_id is None and rec.sha256 is None and rec.uploaded_at is None
    assert (rec.size, rec.mtime_ns, rec.attempts, rec.error) == (20, 2, 0, None)
    assert rec.task_id is None and rec.task_status is None
    assert rec.queued_at == clock.now
    assert m.counts()["pending"] == 1  # the same row, not a second one


def test_mark_failed_keeps_reason_cut_and_attempts(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "a.txt", "b.txt")
    reason = "HTTP 502: " + "<html>" * 200
    m.mark_failed(p("a.txt"), reason, attempts=8)
    rec = m.get(p("a.txt"))
    assert rec is not None
    assert rec.state == "failed"
    assert rec.error == reason[:MAX_ERROR_CHARS]
    assert len(rec.error) == MAX_ERROR_CHARS == 500
    assert rec.attempts == 8

    m.note_attempt(p("b.txt"), 3, "HTTP 503")
    m.mark_failed(p("b.txt"), "HTTP 400: invalid filename")  # attempts not given: kept
    rec = m.get(p("b.txt"))
    assert rec is not None and rec.attempts == 3 and rec.error == "HTTP 400: invalid filename"


def test_recover_puts_uploading_back(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "a", "b", "c", "d")
    m.claim(3)
    m.mark_uploaded(p("a"), file_id="f", sha256="s", size=1, mtime_ns=1, attempts=1)
    assert m.recover() == 2
    assert [state_of(m, n) for n in "abcd"] == ["uploaded", "pending", "pending", "pending"]
    assert m.recover() == 0


def test_release_only_touches_uploading(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "a", "b")
    m.claim(2)
    m.mark_uploaded(p("b"), file_id="f", sha256="s", size=1, mtime_ns=1, attempts=1)
    m.release(p("a"))
    m.release(p("b"))
    assert state_of(m, "a") == "pending"
    assert state_of(m, "b") == "uploaded"
    # Back in line where it was: claimed before anything queued later.
    enqueue(m, clock, "z")
    assert [r.path for r in m.claim()] == [p("a")]


def test_forget_never_deletes_an_uploaded_row(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "pending", "uploading", "skipped", "uploaded")
    m.claim(2)  # pending, uploading → uploading
    m.release(p("pending"))
    m.mark_skipped(p("skipped"), WATCH, "a socket")
    m.mark_uploaded(p("uploaded"), file_id="f", sha256="s", size=1, mtime_ns=1, attempts=1)
    assert state_of(m, "uploading") == "uploading"
    for name in ("pending", "uploading", "skipped", "uploaded"):
        m.forget(p(name))
    assert m.get(p("pending")) is None
    assert m.get(p("uploading")) is None
    assert m.get(p("skipped")) is None
    assert state_of(m, "uploaded") == "uploaded"
    m.forget(p("never-seen"))  # no error


def test_retry_failed_only_touches_failed(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "f1", "f2", "skip", "up", "pend")
    m.mark_failed(p("f1"), "x", attempts=8)
    m.mark_failed(p("f2"), "y", attempts=2)
    m.mark_skipped(p("skip"), WATCH, "FIFO")
    m.mark_uploaded(p("up"), file_id="f", sha256="s", size=1, mtime_ns=1, attempts=4)
    clock.tick(100)
    assert m.retry(failed=True) == 2
    for name in ("f1", "f2"):
        rec = m.get(p(name))
        assert rec is not None
        assert (rec.state, rec.attempts, rec.queued_at) == ("pending", 0, clock.now)
    assert state_of(m, "skip") == "skipped"
    rec = m.get(p("up"))
    assert rec is not None and rec.state == "uploaded" and rec.attempts == 4
    # Retried rows go to the back of the line.
    claimed = [r.path for r in m.claim(3)]
    assert claimed[0] == p("pend")
    assert set(claimed[1:]) == {p("f1"), p("f2")}


def test_retry_paths_only_touches_failed_or_skipped(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "f", "skip", "up", "pend", "other-failed")
    m.mark_failed(p("f"), "x", attempts=8)
    m.mark_failed(p("other-failed"), "x", attempts=8)
    m.mark_skipped(p("skip"), WATCH, "too big")
    m.mark_uploaded(p("up"), file_id="fid", sha256="s", size=1, mtime_ns=1, attempts=4)
    m.note_attempt(p("pend"), 2, "HTTP 503")
    changed = m.retry([p("f"), p("skip"), p("up"), p("pend"), p("unknown")])
    assert changed == 2
    assert state_of(m, "f") == state_of(m, "skip") == "pending"
    rec = m.get(p("f"))
    assert rec is not None and rec.attempts == 0
    up = m.get(p("up"))
    assert up is not None and up.state == "uploaded" and up.file_id == "fid"
    pend = m.get(p("pend"))
    assert pend is not None and pend.attempts == 2
    assert state_of(m, "other-failed") == "failed"


def test_counts_has_every_state(m: Manifest, clock: Clock) -> None:
    assert m.counts() == dict.fromkeys(STATES, 0)
    assert set(STATES) == {"pending", "uploading", "uploaded", "failed", "skipped"}
    enqueue(m, clock, "a", "b", "c", "d", "e", "f")
    m.claim(2)  # a, b
    m.mark_uploaded(p("a"), file_id="f", sha256="s", size=1, mtime_ns=1, attempts=1)
    m.mark_failed(p("c"), "x")
    m.mark_skipped(p("d"), WATCH, "FIFO")
    assert m.counts() == {"pending": 2, "uploading": 1, "uploaded": 1, "failed": 1, "skipped": 1}


def test_oldest_pending(m: Manifest, clock: Clock) -> None:
    assert m.oldest_pending() is None
    enqueue(m, clock, "z-old", "a-new")
    rec = m.oldest_pending()
    assert rec is not None and rec.path == p("z-old")
    m.claim()
    rec = m.oldest_pending()
    assert rec is not None and rec.path == p("a-new")


def test_last_errors_most_recent_first(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "a", "b", "c", "ok")
    for name in ("b", "a", "c"):
        clock.tick()
        m.mark_failed(p(name), f"error {name}")
    errors = m.last_errors(2)
    assert [(r.path, r.error) for r in errors] == [(p("c"), "error c"), (p("a"), "error a")]
    assert len(m.last_errors()) == 3


def test_rows_filter_by_state(m: Manifest, clock: Clock) -> None:
    enqueue(m, clock, "b", "a", "c")
    m.mark_failed(p("c"), "x")
    assert [r.path for r in m.rows()] == [p("a"), p("b"), p("c")]
    assert [r.path for r in m.rows("pending")] == [p("a"), p("b")]
    assert [r.path for r in m.rows("failed")] == [p("c")]


def test_transaction_rolls_back_on_error(m: Manifest, clock: Clock) -> None:
    with pytest.raises(RuntimeError), m.transaction():
        m.enqueue(p("a"), WATCH, 1, 1)
        with m.transaction():  # nested: joins the outer one
            m.enqueue(p("b"), WATCH, 1, 1)
        raise RuntimeError("boom")
    assert m.get(p("a")) is None and m.get(p("b")) is None
    with m.transaction():
        m.enqueue(p("c"), WATCH, 1, 1)
    assert state_of(m, "c") == "pending"


# --- paths that are not text ---------------------------------------------------------------------

ODD_NAMES = [
    b"/srv/drop/bad\xff\xfe.txt",
    b"/srv/drop/new\nline.txt",
    b"/srv/drop/\xe9t\xe9 latin-1/r\xe9sum\xe9.pdf",
    "/srv/drop/Ünïcødé файл 日本.pdf".encode(),
    b"/srv/drop/tab\tand\rcr",
]


def test_odd_paths_round_trip_exactly(m: Manifest, clock: Clock, db_path: Path) -> None:
    paths = [os.fsdecode(raw) for raw in ODD_NAMES]
    watch = os.fsdecode(b"/srv/dr\xffop")
    for path in paths:
        clock.tick()
        m.enqueue(path, watch, 1, 1)
    claimed = m.claim(len(paths))
    assert [os.fsencode(r.path) for r in claimed] == ODD_NAMES
    assert all(os.fsencode(r.watch) == b"/srv/dr\xffop" for r in claimed)
    for path in paths:
        m.mark_uploaded(path, file_id=f"id-{path!r}", sha256="s", size=1, mtime_ns=1, attempts=1)
        rec = m.get(path)
        assert rec is not None and rec.path == path and rec.state == "uploaded"
    assert sorted(os.fsencode(r.path) for r in m.rows()) == sorted(ODD_NAMES)
    # Different bytes are different rows, even when they would decode alike with "replace".
    assert m.get(os.fsdecode(b"/srv/drop/bad\xff\xff.txt")) is None
    assert len(list(m.rows())) == len(ODD_NAMES)
    # And the same from a second reader.
    ro = Manifest(db_path, readonly=True)
    try:
        assert {os.fsencode(r.path) for r in ro.rows()} == set(ODD_NAMES)
    finally:
        ro.close()
