"""Command line: arguments, logging set-up, and the one place errors become a line and a status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from watcher import __version__, config, logs
from watcher.errors import WatcherError

log = structlog.get_logger("watcher.cli")

EXPORT_FIELDS = (
    "path",
    "watch",
    "size",
    "mtime",
    "mtime_ns",
    "sha256",
    "state",
    "file_id",
    "uploaded_at",
    "attempts",
    "error",
    "task_id",
    "task_status",
    "task_output",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(full="fake-api" in argv).parse_args(argv)
    try:
        return int(args.func(args))
    except WatcherError as exc:
        print(f"smooth-watcher: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """``full``: also define fake-api's options, which imports aiohttp's server side; the
    daemon's commands start faster without it."""
    parser = argparse.ArgumentParser(
        prog="smooth-watcher",
        description="Watch drop folders and upload every new or changed file to the Smooth API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if name not in ("fake-api", "demo"):
            p.add_argument("--config", metavar="F", help="config file (default: see README)")
        return p

    p = command("run", cmd_run, "the daemon: scan, watch and upload until SIGTERM/SIGINT")
    p.add_argument("--grace-s", type=float, default=None, help=argparse.SUPPRESS)
    p = command("sync", cmd_sync, "upload everything not uploaded yet, then exit")
    p.add_argument("paths", nargs="*", metavar="PATH", help="only these files or folders")
    command("status", cmd_status, "counts per state, oldest pending, last errors")
    p = command("export", cmd_export, "the manifest, one record per path, to stdout")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p = command("retry", cmd_retry, "put failed files back to pending")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--failed", action="store_true", help="every failed file")
    command("check", cmd_check, "validate the config and the watch folders")
    p = command("fake-api", cmd_fake_api, "a local Smooth-compatible API, for trying and tests")
    if full:
        from watcher import fakeapi

        fakeapi.add_arguments(p)
    command("demo", cmd_demo, "try it with no account: local API, ./inbox, each upload shown")
    return parser


def _load(args: argparse.Namespace, *, check_paths: bool = True) -> config.Config:
    return config.load(config.find_config(args.config), check_paths=check_paths)


# --- the daemon ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    logs.configure(cfg.log_format, cfg.log_level)
    return asyncio.run(_serve(cfg, args, once=False))


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = _load(args)
    logs.configure(
        cfg.log_format, cfg.log_level, stream=sys.stderr if sys.stdout.isatty() else None
    )
    return asyncio.run(_serve(cfg, args, once=True))


async def _serve(cfg: config.Config, args: argparse.Namespace, *, once: bool) -> int:
    """Run the daemon; SIGTERM/SIGINT stop it, SIGHUP restarts it on the re-read config."""
    from watcher.daemon import Daemon
    from watcher.systemd import Notifier

    loop = asyncio.get_running_loop()
    notifier = Notifier.from_env()
    while True:
        key = config.resolve_api_key(cfg, warn=lambda m: log.warning(m))
        logs.redact(key)
        daemon = Daemon(
            cfg,
            key,
            once=once,
            paths=getattr(args, "paths", ()) or (),
            notifier=notifier,
            **({"grace_s": args.grace_s} if getattr(args, "grace_s", None) else {}),
        )
        reloaded: list[config.Config] = []

        def reload(
            daemon: Daemon = daemon,
            reloaded: list[config.Config] = reloaded,
            source: Path | None = cfg.source,
        ) -> None:
            try:
                if source is None:
                    return
                new = config.load(source)
            except WatcherError as exc:
                log.error("config reload refused; keeping the running config", reason=str(exc))
                return
            log.info("config reloaded; restarting the watchers")
            notifier.reloading()
            reloaded.append(new)
            daemon.stop()

        stops = 0

        def on_stop(daemon: Daemon = daemon) -> None:
            nonlocal stops
            stops += 1
            if stops > 1:  # a second Ctrl-C: do not wait for the grace period
                daemon.grace_s = 0.0
            daemon.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop)
        if not once:
            loop.add_signal_handler(signal.SIGHUP, reload)
        progress = asyncio.create_task(_progress(daemon)) if once and sys.stderr.isatty() else None
        try:
            status = await daemon.run()
        finally:
            if progress is not None:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
                sys.stderr.write("\n")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        if not reloaded:
            notifier.close()
            return status
        cfg = reloaded[-1]


async def _progress(daemon: Any) -> None:
    """`sync` on a terminal: one line redrawn in place, "[#####-----] 120/500 …"."""
    try:
        while True:
            await asyncio.sleep(0.2)
            _draw_progress(daemon)
    finally:
        _draw_progress(daemon)  # the final count, not the last one before the end


def _draw_progress(daemon: Any) -> None:
    pipeline = daemon.pipeline
    if pipeline is not None:
        done = pipeline.summary()
        finished = done["uploaded"] + done["failed"] + done["skipped"]
        try:
            waiting = pipeline.manifest.counts()["pending"] + len(pipeline.settler)
        except Exception:  # the final draw, after the manifest closed: nothing is waiting
            waiting = 0
        total = finished + waiting + pipeline.in_flight
        width = 30
        filled = width * finished // total if total else width
        sys.stderr.write(
            f"\r[{'#' * filled}{'-' * (width - filled)}] {finished}/{total} "
            f"(uploaded {done['uploaded']}, failed {done['failed']}, skipped {done['skipped']})"
        )
        sys.stderr.flush()


# --- reading the manifest -----------------------------------------------------------------------


def _manifest(args: argparse.Namespace, *, readonly: bool = True) -> Any:
    from watcher.manifest import Manifest

    cfg = _load(args, check_paths=False)
    return Manifest(cfg.manifest_path, readonly=readonly)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def cmd_status(args: argparse.Namespace) -> int:
    manifest = _manifest(args)
    try:
        counts = manifest.counts()
        oldest = manifest.oldest_pending()
        errors = manifest.last_errors(5)
        tasks = manifest.task_counts()
    finally:
        manifest.close()
    print(f"manifest: {manifest.path}")
    print("  ".join(f"{state}: {n}" for state, n in counts.items()))
    if tasks:
        print("tasks: " + "  ".join(f"{status}: {n}" for status, n in sorted(tasks.items())))
    if oldest is not None:
        age = time.time() - oldest.queued_at
        print(f"oldest pending: {oldest.path} (queued {age:.0f} s ago)")
    if errors:
        print("last errors:")
        for rec in errors:
            print(f"  {_iso(rec.updated_at)}  {rec.state:9} {rec.path}: {rec.error}")
    return 0


def _export_records(manifest: Any) -> Iterator[dict[str, Any]]:
    for rec in manifest.rows():
        output: Any = rec.task_output
        if output is not None:
            with contextlib.suppress(ValueError):
                output = json.loads(output)
        yield {
            "path": rec.path,
            "watch": rec.watch,
            "size": rec.size,
            "mtime": _iso(rec.mtime_ns / 1e9) if rec.mtime_ns is not None else None,
            "mtime_ns": rec.mtime_ns,
            "sha256": rec.sha256,
            "state": rec.state,
            "file_id": rec.file_id,
            "uploaded_at": _iso(rec.uploaded_at),
            "attempts": rec.attempts,
            "error": rec.error,
            "task_id": rec.task_id,
            "task_status": rec.task_status,
            "task_output": output,
        }


def cmd_export(args: argparse.Namespace) -> int:
    manifest = _manifest(args)
    # Paths that are not UTF-8 go out as the bytes they are (CSV) or as \\udcXX escapes (JSON).
    sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    out = sys.stdout
    try:
        if args.format == "json":
            out.write("[")
            for n, record in enumerate(_export_records(manifest)):
                out.write(("," if n else "") + "\n  " + json.dumps(record))
            out.write("\n]\n")
        else:
            writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
            writer.writeheader()
            for record in _export_records(manifest):
                if record["task_output"] is not None:
                    record["task_output"] = json.dumps(record["task_output"])
                writer.writerow(record)
    finally:
        manifest.close()
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    if not args.paths and not args.failed:
        print("smooth-watcher: retry needs PATH… or --failed", file=sys.stderr)
        return 2
    manifest = _manifest(args, readonly=False)
    try:
        changed = manifest.retry([str(Path(p).absolute()) for p in args.paths], failed=args.failed)
    finally:
        manifest.close()
    print(f"{changed} file(s) back to pending")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from watcher.filters import PathFilter
    from watcher.scanner import walk

    cfg = _load(args)
    print(f"config: {cfg.source}")
    print(f"api: {cfg.api.base_url} (concurrency {cfg.api.concurrency})")
    try:
        config.resolve_api_key(cfg, warn=lambda m: print(f"warning: {m}"))
        print("api key: found")
    except WatcherError as exc:
        print(f"warning: {exc}")
    print(f"manifest: {cfg.manifest_path}")
    for i, w in enumerate(cfg.watches):
        files = sum(1 for _ in walk(w, PathFilter(w.include, w.exclude)))
        mode = "polling" if w.poll else "inotify"
        print(
            f"watch[{i}]: {w.path} ({'recursive' if w.recursive else 'top level only'}, {mode}, "
            f"settle {w.settle_s:g} s, after upload: {w.after_upload}"
            f"{', task' if w.task else ''}) — {files} file(s) there now"
        )
        if w.include:
            print(f"  include: {' '.join(w.include)}")
        print(f"  exclude: {' '.join(w.exclude) or '(nothing)'}")
    print("ok")
    return 0


# --- trying it ----------------------------------------------------------------------------------


def cmd_fake_api(args: argparse.Namespace) -> int:
    from watcher import fakeapi

    return fakeapi.run_from_args(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from watcher import demo

    return demo.run()
