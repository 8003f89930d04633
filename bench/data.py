"""Test data for the benchmark: written once per run into a temporary folder, then reused.

Content is random (small and large files) so that nothing on the path (page cache aside) can
profit from compression or deduplication; the tiny files of the scan and burst rows only need
to be distinct, so they hold their own index.
"""

from __future__ import annotations

import os
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# os.urandom in pieces of this size: one call per MiB keeps generating 1 GiB at a few hundred
# MB/s without holding more than one piece in memory.
_RANDOM_PIECE = 1 * MiB


def small_files(folder: Path, count: int, size: int, prefix: str = "f") -> list[Path]:
    """``count`` files of ``size`` random bytes in ``folder``; returns them sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:06d}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def large_file(path: Path, size: int) -> Path:
    """One file of ``size`` incompressible bytes, written in pieces (memory stays flat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        left = size
        while left > 0:
            piece = os.urandom(min(_RANDOM_PIECE, left))
            fh.write(piece)
            left -= len(piece)
    return path


def tiny_tree(root: Path, count: int, folders: int, size: int = 16) -> int:
    """``count`` files of ``size`` bytes spread over ``folders`` sub-folders of ``root``.

    Written with bare os calls: at 100,000 files, pathlib's per-call overhead is seconds.
    """
    per_folder = -(-count // folders)  # ceiling: the last folder may hold fewer
    written = 0
    for d in range(folders):
        folder = root / f"d{d:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = os.fspath(folder)
        for i in range(min(per_folder, count - written)):
            body = f"{written:0{size - 1}d}\n".encode()[-size:]
            fd = os.open(f"{base}/t{i:05d}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            written += 1
    return written
