"""``smooth-watcher demo``: the daemon against the built-in local API, watching ./inbox."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from watcher import config, logs

DEMO_KEY = "local-dev-key"


def run(workdir: Path | None = None) -> int:
    from watcher import fakeapi
    from watcher.cli import _serve

    workdir = (workdir or Path.cwd()).absolute()
    state = workdir / ".smooth-watcher-demo"
    inbox = workdir / "inbox"
    inbox.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    api = fakeapi.FakeApi(state / "api", api_keys=(DEMO_KEY,), task_duration_s=2.0)
    with fakeapi.serve_in_thread(api) as base_url:
        config_path = state / "config.toml"
        config_path.write_text(
            "# Written by `smooth-watcher demo`; use it with status/export/retry --config.\n"
            f'[api]\nbase_url = "{base_url}"\n\n'
            f'[manifest]\npath = "{state / "manifest.sqlite3"}"\n\n'
            '[log]\nformat = "console"\n\n'
            f'[[watch]]\npath = "{inbox}"\nsettle_s = 0.5\nrescan_interval_s = 0\n',
            encoding="utf-8",
        )
        os.environ.pop(config.BASE_URL_ENV, None)  # the demo talks to its own API only
        cfg = config.load(config_path)
        os.environ[config.KEY_ENV] = DEMO_KEY
        logs.configure("console", "info")
        print(
            f"smooth-watcher demo: local API at {base_url}\n"
            f"  drop files into {inbox} and watch them being uploaded; Ctrl-C to stop.\n"
            f"  then: smooth-watcher export --config {config_path} --format json\n",
            file=sys.stderr,
        )

        class Args:
            paths: tuple[str, ...] = ()
            grace_s = None

        return asyncio.run(_serve(cfg, Args(), once=False))  # type: ignore[arg-type]
