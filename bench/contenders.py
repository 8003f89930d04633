"""The baselines smooth-watcher is compared with, each run as its own process.

Run as ``python bench/contenders.py NAME --url URL --key KEY --list FILE [--concurrency N]``;
prints one JSON line ``{"files", "ok", "bytes", "seconds", "errors"}``. Every contender runs in
a fresh interpreter, like the daemon does, so that their peak RSS can be read the same way
(wait4) and none of them inherits a warm heap or the orchestrator's threads. ``seconds`` times
the uploads only, not the interpreter's start or the imports: the baselines get their best
case, the daemon is timed as the whole command a user types.

NAMES
  sdk-seq     the official SDK (smooth-py), one file after another (SmoothClient)
  sdk-async   the SDK's SmoothAsyncClient, N uploads in flight
  curl        one ``curl -F file=@path`` process per file, one after another
  aiohttp     a bare aiohttp client: one session, N streaming uploads in flight; the
              "as fast as the wire allows" reference
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The SDK reads this when it is imported; without it every upload also posts a usage event.
os.environ["SMOOTH_TELEMETRY"] = "off"


def sdk_seq(files: list[Path], url: str, key: str, concurrency: int) -> dict[str, Any]:
    import smooth

    client = smooth.SmoothClient(api_key=key, base_url=_sdk_root(url))
    ok, errors = 0, []
    started = time.perf_counter()
    try:
        for path in files:
            try:
                with path.open("rb") as fh:
                    if client.upload_file(fh).id:
                        ok += 1
            except Exception as exc:  # counted, not fatal: a figure with errors is flagged
                errors.append(repr(exc))
    finally:
        seconds = time.perf_counter() - started
        with _quiet():
            client.__exit__(None, None, None)
    return _result(files, ok, seconds, errors)


def sdk_async(files: list[Path], url: str, key: str, concurrency: int) -> dict[str, Any]:
    import smooth

    async def main() -> tuple[int, float, list[str]]:
        client = smooth.SmoothAsyncClient(api_key=key, base_url=_sdk_root(url))
        queue = list(reversed(files))
        ok, errors = 0, []

        async def worker() -> None:
            nonlocal ok
            while queue:
                path = queue.pop()
                try:
                    with path.open("rb") as fh:
                        if (await client.upload_file(fh)).id:
                            ok += 1
                except Exception as exc:
                    errors.append(repr(exc))

        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return ok, time.perf_counter() - started, errors
        finally:
            await client.close()

    ok, seconds, errors = asyncio.run(main())
    return _result(files, ok, seconds, errors)


def curl(files: list[Path], url: str, key: str, concurrency: int) -> dict[str, Any]:
    ok, errors = 0, []
    started = time.perf_counter()
    for path in files:
        # As a user would type it; -w only adds the status code so failures are counted.
        done = subprocess.run(
            [
                "curl",
                "-s",
                "-F",
                f"file=@{path}",
                "-H",
                f"apikey: {key}",
                "-o",
                os.devnull,
                "-w",
                "%{http_code}",
                f"{url}/file",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.stdout.strip() == "200":
            ok += 1
        else:
            errors.append(f"curl exit {done.returncode}, HTTP {done.stdout.strip() or '-'}")
    return _result(files, ok, time.perf_counter() - started, errors)


def bare_aiohttp(files: list[Path], url: str, key: str, concurrency: int) -> dict[str, Any]:
    import aiohttp

    async def main() -> tuple[int, float, list[str]]:
        queue = list(reversed(files))
        ok, errors = 0, []
        # No total timeout: aiohttp's default of 5 minutes is too short for 1 GiB on a slow day.
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(headers={"apikey": key}, timeout=timeout) as session:

            async def worker() -> None:
                nonlocal ok
                while queue:
                    path = queue.pop()
                    with path.open("rb") as fh:
                        # An open file: aiohttp streams it from disk, as the daemon does.
                        form = aiohttp.FormData()
                        form.add_field("file", fh, filename=path.name)
                        async with session.post(f"{url}/file", data=form) as resp:
                            body = await resp.read()
                    if resp.status == 200 and json.loads(body)["r"]["id"]:
                        ok += 1
                    else:
                        errors.append(f"HTTP {resp.status}: {body[:200]!r}")

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return ok, time.perf_counter() - started, errors

    ok, seconds, errors = asyncio.run(main())
    return _result(files, ok, seconds, errors)


CONTENDERS = {"sdk-seq": sdk_seq, "sdk-async": sdk_async, "curl": curl, "aiohttp": bare_aiohttp}


def _sdk_root(url: str) -> str:
    # The SDK wants the root without the version (it appends /v1); ours ends in /api/v1.
    return url.removesuffix("/v1")


def _result(files: list[Path], ok: int, seconds: float, errors: list[str]) -> dict[str, Any]:
    return {
        "files": len(files),
        "ok": ok,
        "bytes": sum(p.stat().st_size for p in files),
        "seconds": seconds,
        "errors": errors[:5],
        "error_count": len(errors),
    }


class _quiet:
    """Closing the SDK's sync client may log about its background loop; not our business."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("--url", required=True, help="API base URL, ending in /api/v1")
    parser.add_argument("--key", required=True)
    parser.add_argument("--list", required=True, type=Path, help="file with one path a line")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    files = [Path(line) for line in args.list.read_text().splitlines() if line]
    result = CONTENDERS[args.name](files, args.url, args.key, args.concurrency)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] == result["files"] else 1


if __name__ == "__main__":
    sys.exit(main())
