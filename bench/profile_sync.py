"""Where `smooth-watcher sync` spends its time: the daemon under a profiler, summarised.

    python bench/profile_sync.py                         # 1,000 × 8 KiB, cProfile
    python bench/profile_sync.py --tool py-spy           # same, sampled, all threads
    python bench/profile_sync.py --files 1 --size 1GiB --tool py-spy
    python bench/profile_sync.py --files 20000 --size 16 --unchanged   # the start scan

Same set-up as bench/run.py (fake API in its own process, concurrency 8). Two tools, because
each is blind where the other sees:

- cProfile (deterministic, main thread only) counts calls exactly, but misses the executor
  threads that read and hash large files, and inflates pure-Python code against C code.
- py-spy (sampling, every thread, on-CPU samples only) shows where the CPU really goes,
  including those threads; ``pip install py-spy`` first.

Prints the functions with the most own time, then the project's own functions (watcher/) by
inclusive time. Raw output stays in bench/out/ (sync.prof, sync.pyspy.txt).
(Not named profile.py: that would shadow the standard library's ``profile``, which cProfile
imports.)
"""

from __future__ import annotations

import argparse
import collections
import io
import pstats
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data
from harness import API_KEY, PYTHON, Child, FakeApi, write_config

OUT = Path(__file__).resolve().parent / "out"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(|KiB|MiB|GiB)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError("a size such as 8KiB, 1GiB or 100")
    return int(m.group(1)) * {"": 1, "KiB": data.KiB, "MiB": data.MiB, "GiB": data.GiB}[m[2]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=parse_size, default=8 * data.KiB, help="bytes per file")
    parser.add_argument("--delay-s", type=float, default=0.0, help="API answers this late")
    parser.add_argument("--tool", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--unchanged",
        action="store_true",
        help="upload everything first, unprofiled; then profile a sync that finds it unchanged",
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smooth-profile-"))
    try:
        folder = tmp / "files"
        if args.size > 64 * data.MiB:
            for i in range(args.files):
                data.large_file(folder / f"large{i}.bin", args.size)
        else:
            data.small_files(folder, args.files, args.size)
        key = tmp / "api-key"
        key.write_text(API_KEY)
        key.chmod(0o600)
        api = FakeApi(tmp, "profile")
        try:
            api.set_delay(args.delay_s)
            config = write_config(
                tmp / "sync.toml",
                url=api.url,
                key_file=key,
                manifest=tmp / "m.sqlite3",
                watch=folder,
                max_file_size=f"{2 * args.size}B",
            )
            sync = ["-m", "watcher", "sync", "--config", str(config)]
            if args.unchanged:
                first = Child([PYTHON, *sync], tmp / "first.log", stderr=tmp / "first.err")
                try:
                    first.wait(1800)
                finally:
                    first.stop()
                print(f"first sync (not profiled): {first.seconds:.1f} s, {api.uploads_ok()} up")
            if args.tool == "cprofile":
                out = OUT / "sync.prof"
                cmd = [PYTHON, "-m", "cProfile", "-o", str(out), *sync]
            else:
                out = OUT / "sync.pyspy.txt"
                py_spy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
                cmd = [
                    py_spy,
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--threads",
                    "-o",
                    str(out),
                    "--",
                    PYTHON,
                    *sync,
                ]
            child = Child(cmd, tmp / "sync.log", stderr=tmp / "sync.err")
            try:
                child.wait(900)
            finally:
                child.stop()
            print(
                f"sync of {args.files} × {args.size:,} B under {args.tool}: "
                f"{child.seconds:.2f} s, exit {child.returncode}, "
                f"{api.uploads_ok()} uploaded"
            )
        finally:
            api.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (summarise_cprofile if args.tool == "cprofile" else summarise_pyspy)(out, args.top)
    print(f"\nraw profile: {out}")
    return 0


def summarise_cprofile(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    for title, key, restrict in (
        ("own time (tottime), all code", "tottime", ()),
        ("cumulative time, watcher/ only", "cumulative", ("watcher/",)),
    ):
        buf = io.StringIO()
        stats.stream = buf  # type: ignore[attr-defined]
        stats.sort_stats(key).print_stats(*restrict, top)
        body = buf.getvalue()
        print(f"\n== {title} ==\n" + body[body.find("   ncalls") :].rstrip())


# A raw py-spy line: "thread (0x7f…);frame;frame;… <count>", a frame "func (file:line)".
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def summarise_pyspy(path: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if frames:
            own[frames[-1]] += n
        for name in {f for f in frames if f.startswith("watcher/")}:
            inclusive[name] += n
    print(f"\n== own CPU samples (all threads, {total} samples) ==")
    for name, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name}")
    print("\n== inclusive CPU samples, watcher/ only ==")
    for name, n in inclusive.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name}")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"]
    for marker in ("/site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{m['func']}"


if __name__ == "__main__":
    sys.exit(main())
