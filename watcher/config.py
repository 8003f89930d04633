"""The TOML configuration: one loader that validates everything and builds frozen dataclasses.

Every error names the key (``watch[1].settle_s``), the file and, where it can be found, the line,
so a user can fix it without reading code. Durations end in ``_s``; sizes are bytes.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from watcher import checks
from watcher.checks import normalise_base_url
from watcher.constants import DEFAULT_BASE_URL
from watcher.errors import ConfigError

APP_NAME = "smooth-watcher"
CONFIG_ENV = "SMOOTH_WATCHER_CONFIG"
KEY_ENV = "CIRCLEMIND_API_KEY"
BASE_URL_ENV = "SMOOTH_BASE_URL"
CREDENTIAL_NAME = "smooth-api-key"  # systemd LoadCredential=smooth-api-key:/path
DEFAULT_EXCLUDE = (".*", "*~", "*.tmp", "*.part", "*.crdownload", "*.swp", "~$*")


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key_file: Path | None = None
    concurrency: int = 4
    max_requests_per_s: float = 0.0
    timeout_s: float = 600.0
    max_attempts: int = 8
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0


@dataclass(frozen=True)
class TaskConfig:
    task: str
    url: str = ""
    max_steps: int = 32
    # hash=False: tables are not hashable, and a WatchConfig is used as a dict key.
    metadata: Mapping[str, str | int | float | bool] = field(default_factory=dict, hash=False)
    response_model: Mapping[str, Any] = field(default_factory=dict, hash=False)
    wait: bool = True
    result_dir: Path | None = None
    delete_file_after: bool = False


@dataclass(frozen=True)
class WatchConfig:
    path: Path
    recursive: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    settle_s: float = 2.0
    max_file_size: int = 512 * 1024**2
    purpose: str = ""
    follow_symlinks: bool = False
    poll: bool = False
    rescan_interval_s: float = 600.0
    after_upload: str = "keep"
    done_dir: Path | None = None
    failed_dir: Path | None = None
    task: TaskConfig | None = None


@dataclass(frozen=True)
class Config:
    api: ApiConfig
    manifest_path: Path
    log_format: str
    log_level: str
    metrics_listen: tuple[str, int] | None
    watches: tuple[WatchConfig, ...]
    source: Path | None = None

    def watch_for(self, path: Path) -> WatchConfig | None:
        """The watch whose root holds ``path`` (absolute), if any."""
        for watch in self.watches:
            if path == watch.path or watch.path in path.parents:
                return watch
        return None


class Secret(str):
    """The API key: a str that never shows itself in a repr, a log line or a traceback."""

    def __repr__(self) -> str:
        return "Secret('***')"


# --- finding the file -------------------------------------------------------------------------


def default_config_path() -> Path:
    return platformdirs.user_config_path(APP_NAME) / "config.toml"


def find_config(explicit: str | None) -> Path:
    """``--config``, else ``$SMOOTH_WATCHER_CONFIG``, else the platform's user config dir."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return default_config_path()


def default_manifest_path() -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY (a colon-separated list when several).
    state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state_dir) if state_dir else platformdirs.user_state_path(APP_NAME)
    return base / "manifest.sqlite3"


def load(path: Path, *, check_paths: bool = True) -> Config:
    """Read, parse and validate the config at ``path``; raise ConfigError naming what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse(data, source=path, text=text, check_paths=check_paths)


def parse(
    data: Mapping[str, Any],
    *,
    source: Path | None = None,
    text: str = "",
    check_paths: bool = True,
) -> Config:
    return _Loader(source, text, check_paths).build(data)


class _Loader:
    def __init__(self, source: Path | None, text: str, check_paths: bool) -> None:
        self.source = source
        self.lines = text.splitlines()
        self.check_paths = check_paths
        self.base_dir = source.parent.resolve() if source else Path.cwd()

    def build(self, data: Mapping[str, Any]) -> Config:
        self._only(data, {"api", "manifest", "log", "metrics", "watch"}, ())
        api = self._section(data, "api", checks.API_KEYS)
        manifest = self._section(data, "manifest", checks.MANIFEST_KEYS)
        log = self._section(data, "log", checks.LOG_KEYS)
        metrics = self._section(data, "metrics", checks.METRICS_KEYS)

        if os.environ.get(BASE_URL_ENV):
            api["base_url"] = self._check(
                checks.url, os.environ[BASE_URL_ENV], f"${BASE_URL_ENV}", ()
            )
        if "base_url" in api:
            api["base_url"] = normalise_base_url(api["base_url"])
        if api.get("api_key_file"):
            api["api_key_file"] = self._path(api["api_key_file"])
        else:
            api.pop("api_key_file", None)

        raw_watches = data.get("watch")
        if not isinstance(raw_watches, list) or not raw_watches:
            raise self._error(("watch",), "", "at least one [[watch]] table is required")
        watches = tuple(self._watch(i, w) for i, w in enumerate(raw_watches))
        self._no_overlap(watches)

        manifest_path = manifest.get("path")
        return Config(
            api=ApiConfig(**api),
            manifest_path=self._path(manifest_path) if manifest_path else default_manifest_path(),
            log_format=log.get("format", "auto"),
            log_level=log.get("level", "info"),
            metrics_listen=metrics.get("listen"),
            watches=watches,
            source=self.source,
        )

    def _watch(self, i: int, raw: Any) -> WatchConfig:
        where: tuple[str | int, ...] = ("watch", i)
        if not isinstance(raw, dict):
            raise self._error(where, "", "expected a [[watch]] table")
        values = self._values(raw, checks.WATCH_KEYS, where)
        if "path" not in values:
            raise self._error(where, "path", "is required")
        root = self._path(values["path"])
        if self.check_paths:
            if not root.exists():
                raise self._error(where, "path", f"{root} does not exist")
            if not root.is_dir():
                raise self._error(where, "path", f"{root} is not a directory")
            root = root.resolve()
        values["path"] = root
        for key in ("done_dir", "failed_dir"):
            values[key] = self._path(values[key]) if values.get(key) else None
        if values.get("after_upload") == "move" and values["done_dir"] is None:
            raise self._error(where, "done_dir", 'is required when after_upload = "move"')
        for key in ("done_dir", "failed_dir"):
            target = values[key]
            # Moved files must leave the watched tree, or they would be found again.
            if target is not None and (
                target == root or (root in target.parents and values.get("recursive", True))
            ):
                raise self._error(where, key, f"{target} is inside the watched folder")
        for key in ("include", "exclude"):
            if key in values:
                values[key] = tuple(values[key])
        if "task" in values:
            values["task"] = self._task(where, values["task"])
        return WatchConfig(**values)

    def _task(self, where: tuple[str | int, ...], raw: dict[str, Any]) -> TaskConfig:
        where = (*where, "task")
        values = self._values(raw, checks.TASK_KEYS, where)
        if "task" not in values:
            raise self._error(where, "task", "is required in [watch.task]")
        values["result_dir"] = (
            self._path(values["result_dir"]) if values.get("result_dir") else None
        )
        return TaskConfig(**values)

    def _no_overlap(self, watches: tuple[WatchConfig, ...]) -> None:
        # One file under two roots would be uploaded twice, with two manifest rows.
        for i, a in enumerate(watches):
            for j, b in enumerate(watches):
                if i < j and (a.path == b.path or (a.recursive and a.path in b.path.parents)):
                    msg = f"{b.path} is already watched by watch[{i}] ({a.path})"
                    raise self._error(("watch", j), "path", msg)
                if i < j and b.recursive and b.path in a.path.parents:
                    msg = f"{a.path} is already watched by watch[{j}] ({b.path})"
                    raise self._error(("watch", i), "path", msg)

    # -- helpers --

    def _section(
        self, data: Mapping[str, Any], name: str, schema: dict[str, Callable[[Any], Any]]
    ) -> dict[str, Any]:
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise self._error((name,), "", "expected a table")
        return self._values(raw, schema, (name,))

    def _values(
        self,
        raw: Mapping[str, Any],
        schema: dict[str, Callable[[Any], Any]],
        where: tuple[str | int, ...],
    ) -> dict[str, Any]:
        self._only(raw, set(schema), where)
        return {key: self._check(schema[key], value, key, where) for key, value in raw.items()}

    def _only(
        self, raw: Mapping[str, Any], allowed: set[str], where: tuple[str | int, ...]
    ) -> None:
        for key in raw:
            if key not in allowed:
                close = fnmatch.filter(sorted(allowed), key[:3] + "*")
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self._error(where, key, f"unknown key{hint}")

    def _check(
        self, checker: Callable[[Any], Any], value: Any, key: str, where: tuple[str | int, ...]
    ) -> Any:
        try:
            return checker(value)
        except ValueError as exc:
            raise self._error(where, key, str(exc)) from None

    def _path(self, raw: str) -> Path:
        path = Path(os.path.expandvars(raw)).expanduser()
        # Relative paths are relative to the config file, not to wherever the daemon started.
        return path if path.is_absolute() else self.base_dir / path

    def _error(self, where: tuple[str | int, ...], key: str, message: str) -> ConfigError:
        dotted = ""
        for part in where:
            dotted += f"[{part}]" if isinstance(part, int) else (f".{part}" if dotted else part)
        if key.startswith("$"):
            return ConfigError(f"{key}: {message}")
        name = f"{dotted}.{key}" if key and dotted else (key or dotted)
        line = self._line_of(where, key)
        place = f"{self.source}:{line}" if self.source and line else str(self.source or "config")
        return ConfigError(f"{place}: {name}: {message}")

    def _line_of(self, where: tuple[str | int, ...], key: str) -> int | None:
        """Best effort: the line of ``key`` inside the table ``where`` (tomllib gives no lines)."""
        current: tuple[str | int, ...] = ()
        watch_index = -1
        header_line = None
        key_re = re.compile(rf'^\s*["\']?{re.escape(key)}["\']?\s*=') if key else None
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            if stripped.startswith("[["):
                name = stripped.strip("[] ").split("#")[0].strip(" ]")
                if name == "watch":
                    watch_index += 1
                current = ("watch", watch_index) if name == "watch" else (name,)
            elif stripped.startswith("["):
                name = stripped.strip("[] ").split("#")[0].strip(" ]")
                parts = tuple(name.split("."))
                current = ("watch", watch_index, *parts[1:]) if parts[0] == "watch" else parts
            else:
                if current == where and key_re and key_re.match(line):
                    return number
                continue
            if key and current[: len(where) + 1] == (*where, key):
                return number  # the key names a table: its header is the place
            if current == where:
                header_line = number
        return header_line


# --- the API key ------------------------------------------------------------------------------


def resolve_api_key(config: Config, warn: Callable[[str], None] | None = None) -> Secret:
    """``api.api_key_file``, else ``$CIRCLEMIND_API_KEY``, else ``$CREDENTIALS_DIRECTORY``."""
    if config.api.api_key_file is not None:
        return _read_key(config.api.api_key_file, "api.api_key_file", warn)
    if os.environ.get(KEY_ENV, "").strip():
        return Secret(os.environ[KEY_ENV].strip())
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return _read_key(Path(creds) / CREDENTIAL_NAME, "$CREDENTIALS_DIRECTORY", None)
    raise ConfigError(
        f"no API key: set api.api_key_file, ${KEY_ENV}, or a systemd credential {CREDENTIAL_NAME}"
    )


def _read_key(path: Path, what: str, warn: Callable[[str], None] | None) -> Secret:
    try:
        st = path.stat()
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.__class__.__name__}") from None
    if not key:
        raise ConfigError(f"{what}: {path} is empty")
    if warn and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"{path} holds the API key and is readable by others; chmod 600 it")
    return Secret(key)
