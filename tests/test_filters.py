"""watcher/filters.py (globs, what a path is) and scanner.walk (the folder walk)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher import scanner
from watcher.config import DEFAULT_EXCLUDE, WatchConfig
from watcher.filters import Kind, PathFilter, inside, inspect, relpath
from watcher.scanner import walk

DEFAULT = PathFilter((), DEFAULT_EXCLUDE)


# --- PathFilter ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        ".hidden",
        "a/.git/x",
        ".git/config",
        "x.tmp",
        "sub/x.part",
        "dl/movie.mkv.crdownload",
        ".report.pdf.swp",
        "notes.txt.swp",
        "~$doc.docx",
        "office/~$doc.docx",
        "file~",
        "deep/er/file~",
    ],
)
def test_default_exclude_drops(rel: str) -> None:
    assert not DEFAULT.wants_file(rel)


@pytest.mark.parametrize(
    "rel",
    [
        "report.pdf",
        "a/b/c.txt",
        "tmp/x.txt",  # a folder called tmp is not *.tmp
        "x.tmp.pdf",
        "a~b.txt",
        "doc$.docx",
        "with space/and more.csv",
        "Ünïcødé файл 日本.pdf",
    ],
)
def test_default_exclude_keeps(rel: str) -> None:
    assert DEFAULT.wants_file(rel)


@pytest.mark.parametrize(
    ("rel", "wanted"),
    [(".git", False), ("a/.cache", False), ("a/b", True), ("reports", True), ("x.tmp", False)],
)
def test_wants_dir_with_default_exclude(rel: str, wanted: bool) -> None:
    assert DEFAULT.wants_dir(rel) is wanted


def test_no_patterns_wants_everything() -> None:
    f = PathFilter()
    assert f.wants_file(".hidden") and f.wants_file("a/b/x.tmp") and f.wants_dir(".git")


def test_include_without_slash_matches_the_file_name_at_any_depth() -> None:
    f = PathFilter(("*.pdf",), DEFAULT_EXCLUDE)
    assert f.wants_file("x.pdf")
    assert f.wants_file("a/b/x.pdf")
    assert not f.wants_file("a/b/x.txt")
    assert not f.wants_file("x.pdf/readme.txt")  # a folder named *.pdf does not count
    assert not f.wants_file(".x.pdf")  # exclude still wins
    assert not f.wants_file("a/.hidden/x.pdf")
    assert f.wants_dir("a")  # include never prunes folders


def test_include_with_slash_matches_the_whole_relative_path() -> None:
    f = PathFilter(("reports/*.pdf",), DEFAULT_EXCLUDE)
    assert f.wants_file("reports/x.pdf")
    assert not f.wants_file("other/x.pdf")
    assert not f.wants_file("x.pdf")
    assert not f.wants_file("a/reports/x.pdf")
    assert not f.wants_file("reports/x.txt")


def test_several_include_patterns() -> None:
    f = PathFilter(("*.pdf", "scans/*.png"), ())
    assert f.wants_file("deep/a.pdf")
    assert f.wants_file("scans/a.png")
    assert not f.wants_file("deep/a.png")


def test_exclude_with_slash() -> None:
    f = PathFilter((), ("drafts/*",))
    assert not f.wants_file("drafts/x.txt")
    assert f.wants_file("final/x.txt")
    assert f.wants_file("x/drafts/y.txt")


def test_patterns_are_case_sensitive() -> None:
    f = PathFilter(("*.pdf",), ())
    assert not f.wants_file("X.PDF")


# --- inspect -------------------------------------------------------------------------------------


def watch_of(root: Path, **kw: object) -> WatchConfig:
    return WatchConfig(path=root, **kw)  # type: ignore[arg-type]


def test_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"12345")
    result = inspect(watch_of(tmp_path), str(f))
    assert result.kind is Kind.REGULAR
    assert result.st is not None and result.st.st_size == 5
    assert result.real_path is None


def test_missing_is_gone(tmp_path: Path) -> None:
    assert inspect(watch_of(tmp_path), str(tmp_path / "nope")).kind is Kind.GONE


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert inspect(watch_of(tmp_path), str(tmp_path / "sub")).kind is Kind.DIRECTORY


@pytest.mark.timeout(5)
@pytest.mark.parametrize("follow", [False, True])
def test_fifo_is_skipped_never_opened(tmp_path: Path, follow: bool) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = inspect(watch_of(tmp_path, follow_symlinks=follow), str(fifo))
    assert result.kind is Kind.SKIP
    assert "FIFO" in result.reason


def test_socket_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        result = inspect(watch_of(tmp_path), str(path))
    assert result.kind is Kind.SKIP
    assert "socket" in result.reason


def test_device_is_skipped(tmp_path: Path) -> None:
    result = inspect(watch_of(Path("/dev")), "/dev/null")
    assert result.kind is Kind.SKIP
    assert "device" in result.reason


def test_symlink_not_followed_by_default(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_text("x")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    result = inspect(watch_of(tmp_path), str(link))
    assert result.kind is Kind.SKIP
    assert "symbolic link" in result.reason
    assert result.real_path is None


def test_followed_symlink_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.txt"
    target.write_text("hello")
    link = tmp_path / "link.txt"
    link.symlink_to("real/target.txt")
    result = inspect(watch_of(tmp_path, follow_symlinks=True), str(link))
    assert result.kind is Kind.REGULAR
    assert result.real_path == str(target)
    assert result.st is not None and result.st.st_size == 5  # the target's stat, not the link's
    assert result.st.st_ino == target.stat().st_ino


def test_followed_symlink_to_a_folder_inside(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    result = inspect(watch_of(tmp_path, follow_symlinks=True), str(tmp_path / "alias"))
    assert result.kind is Kind.DIRECTORY
    assert result.real_path == str(tmp_path / "real")


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_followed_symlink_pointing_outside_is_skipped(tmp_path: Path, how: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    link = root / "link.txt"
    link.symlink_to(outside if how == "absolute" else Path("..") / "secret.txt")
    result = inspect(watch_of(root, follow_symlinks=True), str(link))
    assert result.kind is Kind.SKIP
    assert "outside" in result.reason


def test_followed_symlink_to_a_sibling_with_the_root_as_prefix(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    root.mkdir()
    sibling = tmp_path / "drop-private"
    sibling.mkdir()
    (sibling / "x.txt").write_text("no")
    (root / "link.txt").symlink_to(sibling / "x.txt")
    result = inspect(watch_of(root, follow_symlinks=True), str(root / "link.txt"))
    assert result.kind is Kind.SKIP
    assert "outside" in result.reason


def test_followed_dangling_symlink_is_skipped(tmp_path: Path) -> None:
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "not-there")
    result = inspect(watch_of(tmp_path, follow_symlinks=True), str(link))
    assert result.kind is Kind.SKIP
    assert "dangling" in result.reason


def test_followed_symlink_loop_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    result = inspect(watch_of(tmp_path, follow_symlinks=True), str(tmp_path / "a"))
    assert result.kind is Kind.SKIP
    assert "loop" in result.reason


@pytest.mark.parametrize("follow", [False, True])
def test_path_through_a_linked_folder_outside_the_root_is_skipped(
    tmp_path: Path, follow: bool
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    make_tree(tmp_path, ["outside/secret.txt"])
    (root / "sub").symlink_to(tmp_path / "outside")
    result = inspect(watch_of(root, follow_symlinks=follow), str(root / "sub" / "secret.txt"))
    assert result.kind is Kind.SKIP


def test_folder_that_stops_being_a_link_is_seen_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    make_tree(tmp_path, ["outside/f.txt"])
    (root / "sub").symlink_to(tmp_path / "outside")
    watch = watch_of(root)
    assert inspect(watch, str(root / "sub" / "f.txt")).kind is Kind.SKIP
    (root / "sub").unlink()
    make_tree(root, ["sub/f.txt"])
    assert inspect(watch, str(root / "sub" / "f.txt")).kind is Kind.REGULAR


def test_path_through_a_linked_folder_inside_the_root(tmp_path: Path) -> None:
    # Folder links are never followed: what they lead to inside the root is watched under its
    # real path already, so the alias would only upload the same file twice.
    make_tree(tmp_path, ["real/f.txt"])
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    path = str(tmp_path / "alias" / "f.txt")
    for follow in (False, True):
        result = inspect(watch_of(tmp_path, follow_symlinks=follow), path)
        assert result.kind is Kind.SKIP and "linked folder" in result.reason


def test_followed_symlink_to_a_fifo_is_skipped(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "pipe")
    result = inspect(watch_of(tmp_path, follow_symlinks=True), str(tmp_path / "link"))
    assert result.kind is Kind.SKIP
    assert "FIFO" in result.reason


def test_inside_and_relpath(tmp_path: Path) -> None:
    assert inside("/srv/drop/a", "/srv/drop")
    assert inside("/srv/drop", "/srv/drop")
    assert inside("/srv/drop/a", "/srv/drop/")
    assert not inside("/srv/drop-other/a", "/srv/drop")
    assert not inside("/srv", "/srv/drop")
    assert relpath(watch_of(tmp_path), str(tmp_path / "a" / "b.txt")) == "a/b.txt"


# --- walk ----------------------------------------------------------------------------------------


def make_tree(root: Path, files: list[str]) -> None:
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The folders walk() lists, in order."""
    folders: list[str] = []
    real_scandir = os.scandir

    def recording(path: str) -> object:
        folders.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(scanner.os, "scandir", recording)
    yield folders


def rels(root: Path, paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in paths)


def test_walk_prunes_excluded_folders(tmp_path: Path, scanned: list[str]) -> None:
    make_tree(
        tmp_path,
        ["a.txt", "x.tmp", ".hidden/x.txt", ".hidden/deeper/y.txt", "sub/b.txt", "sub/.git/c"],
    )
    w = watch_of(tmp_path)
    found = list(walk(w, PathFilter(w.include, w.exclude)))
    assert rels(tmp_path, found) == ["a.txt", "sub/b.txt"]
    assert sorted(scanned) == sorted([str(tmp_path), str(tmp_path / "sub")])


def test_walk_with_include(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.pdf", "a.txt", "deep/b.pdf", "deep/b.doc"])
    w = watch_of(tmp_path, include=("*.pdf",))
    assert rels(tmp_path, list(walk(w, PathFilter(w.include, w.exclude)))) == [
        "a.pdf",
        "deep/b.pdf",
    ]


def test_walk_non_recursive_only_top_level(tmp_path: Path, scanned: list[str]) -> None:
    make_tree(tmp_path, ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"])
    w = watch_of(tmp_path, recursive=False)
    found = list(walk(w, PathFilter(w.include, w.exclude)))
    assert rels(tmp_path, found) == ["a.txt", "b.txt"]
    assert scanned == [str(tmp_path)]


def test_walk_yields_special_files_for_the_caller_to_classify(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.txt"])
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    w = watch_of(tmp_path)
    assert rels(tmp_path, list(walk(w, PathFilter()))) == ["a.txt", "link", "pipe"]


@pytest.mark.timeout(10)
def test_walk_symlinked_folder_loop_ends_and_yields_each_file_once(tmp_path: Path) -> None:
    make_tree(tmp_path, ["top.txt", "a/f.txt", "a/b/g.txt"])
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path)  # a loop back to the root
    (tmp_path / "a" / "self").symlink_to(".")  # a loop onto itself
    (tmp_path / "alias").symlink_to(tmp_path / "a")  # the same folder twice
    w = watch_of(tmp_path, follow_symlinks=True)
    found = list(walk(w, PathFilter(w.include, w.exclude)))
    files = [p for p in found if not os.path.islink(p)]
    assert sorted(files) == sorted(str(tmp_path / r) for r in ["top.txt", "a/f.txt", "a/b/g.txt"])
    # The links are handed over for classification (they are skipped), never descended.
    links = sorted(p for p in found if os.path.islink(p))
    assert links == sorted(str(tmp_path / r) for r in ["a/b/up", "a/self", "alias"])


def test_walk_does_not_follow_folder_links_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, ["in.txt"])
    make_tree(tmp_path, ["outside/secret.txt"])
    (root / "out").symlink_to(tmp_path / "outside")
    w = watch_of(root, follow_symlinks=True)
    found = list(walk(w, PathFilter()))
    assert all("secret" not in p for p in found)
    assert str(root / "in.txt") in found
