"""Checkers for configuration values, and the schema of each table.

Each checker takes the raw TOML value and returns the typed one, or raises ValueError with a
message that the loader prefixes with the key, the file and the line.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from typing import Any

AFTER_UPLOAD = ("keep", "move", "delete")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
TASK_PLACEHOLDERS = frozenset({"name", "path", "relpath", "file_id", "size", "sha256"})


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected a whole number, got {v!r}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"must be between {lo} and {hi}, got {v}" if hi else f"must be ≥ {lo}")
        return v

    return check


def _float(lo: float, *, above: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"expected a finite number, got {v!r}")
        if v < lo or (above and v == lo):
            raise ValueError(f"must be {'>' if above else '≥'} {lo:g}, got {v:g}")
        return float(v)

    return check


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {v!r}")
        return str(v)

    return check


def _globs(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ValueError(f"expected a list of non-empty glob strings, got {v!r}")
    return tuple(v)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(v: Any) -> int:
    """``512MiB``, ``2GB``, ``100`` (bytes) → bytes."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    m = _SIZE.match(v) if isinstance(v, str) else None
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]) if m else 0
    if size <= 0:
        raise ValueError(f"expected a positive size such as 512MiB or 2GB, got {v!r}")
    return size


def _listen(v: Any) -> tuple[str, int] | None:
    if v == "":
        return None
    host, sep, port = _str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'expected "host:port" such as "127.0.0.1:9478", got {v!r}')
    return host.strip("[]"), int(port)


def url(v: Any) -> str:
    v = _str(v).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"expected an http(s) URL, got {v!r}")
    return v


def normalise_base_url(url: str) -> str:
    """The API root with its version: the SDK's SMOOTH_BASE_URL omits ``/v1``, ours keeps it."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _flat_dict(v: Any) -> dict[str, str | int | float | bool]:
    if not isinstance(v, dict) or not all(
        isinstance(x, str | int | float | bool) for x in v.values()
    ):
        raise ValueError("expected a flat table of strings, numbers and booleans")
    return dict(v)


def _table(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"expected a table, got {v!r}")
    return dict(v)


def _template(v: Any) -> str:
    v = _str(v)
    if not v.strip():
        raise ValueError("must not be empty")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
    except ValueError as exc:
        raise ValueError(f"bad template: {exc}") from None
    unknown = names - TASK_PLACEHOLDERS
    if unknown:
        known = " ".join("{" + p + "}" for p in sorted(TASK_PLACEHOLDERS))
        raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}; known: {known}")
    return v


def _purpose(v: Any) -> str:
    v = _str(v)
    if len(v) > 64:
        raise ValueError(f"at most 64 characters, got {len(v)}")
    return v


API_KEYS: dict[str, Callable[[Any], Any]] = {
    "base_url": url,
    "api_key_file": _str,
    "concurrency": _int(1, 256),
    "max_requests_per_s": _float(0),
    "timeout_s": _float(0, above=True),
    "max_attempts": _int(1, 1000),
    "backoff_initial_s": _float(0),
    "backoff_max_s": _float(0),
}
MANIFEST_KEYS: dict[str, Callable[[Any], Any]] = {"path": _str}
LOG_KEYS: dict[str, Callable[[Any], Any]] = {
    "format": _choice(*LOG_FORMATS),
    "level": _choice(*LOG_LEVELS),
}
METRICS_KEYS: dict[str, Callable[[Any], Any]] = {"listen": _listen}
WATCH_KEYS: dict[str, Callable[[Any], Any]] = {
    "path": _str,
    "recursive": _bool,
    "include": _globs,
    "exclude": _globs,
    "settle_s": _float(0),
    "max_file_size": parse_size,
    "purpose": _purpose,
    "follow_symlinks": _bool,
    "poll": _bool,
    "rescan_interval_s": _float(0),
    "after_upload": _choice(*AFTER_UPLOAD),
    "done_dir": _str,
    "failed_dir": _str,
    "task": _table,
}
TASK_KEYS: dict[str, Callable[[Any], Any]] = {
    "task": _template,
    "url": _str,
    "max_steps": _int(2, 128),
    "metadata": _flat_dict,
    "response_model": _table,
    "wait": _bool,
    "result_dir": _str,
    "delete_file_after": _bool,
}
