"""What happens to a file after the manifest has recorded its fate: keep, move or delete.

Moves keep the path relative to the watch root and never overwrite: a clash gets " (1)",
" (2)"… before the suffix. Nothing here runs before the manifest row is committed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import structlog

from watcher.config import WatchConfig
from watcher.filters import relpath
from watcher.manifest import Manifest

log = structlog.get_logger("watcher.actions")


def after_upload(watch: WatchConfig, path: str, manifest: Manifest) -> None:
    if watch.after_upload == "delete":
        try:
            os.unlink(path)
            log.info("deleted after upload", path=path)
        except OSError as exc:
            log.warning("cannot delete after upload", path=path, reason=exc.strerror)
    elif watch.after_upload == "move" and watch.done_dir is not None:
        _move(watch, path, watch.done_dir, "moved after upload")


def after_failure(watch: WatchConfig, path: str, manifest: Manifest) -> None:
    if watch.failed_dir is not None:
        _move(watch, path, watch.failed_dir, "moved to failed_dir")


def _move(watch: WatchConfig, path: str, target_root: Path, event: str) -> Path | None:
    target = target_root / relpath(watch, path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        dest = move_no_clobber(Path(path), target)
    except OSError as exc:
        log.warning(f"cannot move ({event})", path=path, to=str(target), reason=exc.strerror)
        return None
    log.info(event, path=path, to=str(dest))
    return dest


def move_no_clobber(src: Path, target: Path) -> Path:
    """Move ``src`` to ``target`` or the first free ``target (n)``; never replace a file."""
    for n in range(10_000):
        dest = target if n == 0 else target.with_name(f"{target.stem} ({n}){target.suffix}")
        try:
            os.link(src, dest)  # fails if dest exists: no window in which a file is replaced
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                raise
            try:
                with open(src, "rb") as fin, open(dest, "xb") as fout:  # another filesystem
                    shutil.copyfileobj(fin, fout, 1024 * 1024)
                shutil.copystat(src, dest)
            except FileExistsError:
                continue
        os.unlink(src)
        return dest
    raise OSError(errno.EEXIST, f"no free name for {target}")
