"""Prometheus metrics, by hand: a few counters, gauges and one histogram, and the HTTP endpoint.

The text exposition format 0.0.4 is small enough to write directly
(https://prometheus.io/docs/instrumenting/exposition_formats/), which spares a dependency and
its process-wide registry. Everything is updated and rendered on the event loop thread, so
there are no locks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from watcher.constants import STATES

log = structlog.get_logger("watcher.metrics")

PREFIX = "smooth_watcher_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upload durations run from a few ms (small file, loopback) to minutes (large file, slow link).
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

UPLOAD_OUTCOMES = ("uploaded", "failed", "skipped", "resent", "vanished")
TASK_STATUSES = ("done", "failed", "cancelled", "error")
FILE_STATES = STATES  # as stored in the manifest

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Family:
    kind: str  # counter | gauge (the one histogram is kept apart)
    help: str
    label_names: tuple[str, ...] = ()
    # Label values known in advance: their series exist (at 0) from the first scrape, so rate()
    # and alerts work before the first event of that kind.
    known: tuple[str, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)


def _families() -> dict[str, _Family]:
    return {
        "uploads_total": _Family(
            "counter", "Files whose upload ended, by outcome.", ("outcome",), UPLOAD_OUTCOMES
        ),
        "upload_bytes_total": _Family(
            "counter",
            "Bytes of files whose upload ended, by outcome.",
            ("outcome",),
            UPLOAD_OUTCOMES,
        ),
        "retries_total": _Family("counter", "Requests retried after a transient failure."),
        "tasks_total": _Family(
            "counter", "Smooth tasks that ended, by status.", ("status",), TASK_STATUSES
        ),
        "queue_depth": _Family("gauge", "Files settling or waiting for an upload worker."),
        "files": _Family("gauge", "Files in the manifest, by state.", ("state",), FILE_STATES),
        "in_flight": _Family("gauge", "Uploads being sent right now."),
    }


class Metrics:
    """The daemon's metrics. ``collect``, if set, runs before each render to refresh gauges."""

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS_S) -> None:
        self.collect: Callable[[], None] | None = None
        self._families = _families()
        for family in self._families.values():
            if not family.label_names:
                family.values[()] = 0.0
            for value in family.known:
                family.values[((family.label_names[0], value),)] = 0.0
        self._buckets = tuple(sorted(buckets))
        self._bucket_counts = [0] * (len(self._buckets) + 1)  # the last one is +Inf
        self._duration_sum = 0.0

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        """Add ``value`` to counter ``name`` (unprefixed, e.g. ``"uploads_total"``)."""
        family = self._family(name, "counter", labels)
        if value < 0:
            raise ValueError(f"counter {name} cannot go down (inc by {value})")
        key = tuple(sorted(labels.items()))
        family.values[key] = family.values.get(key, 0.0) + value

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        """Set gauge ``name``; for ``files``, set every state, or a vanished one stays stale."""
        family = self._family(name, "gauge", labels)
        family.values[tuple(sorted(labels.items()))] = float(value)

    def observe_upload(self, seconds: float) -> None:
        """One upload's duration, into the ``upload_duration_seconds`` histogram."""
        self._bucket_counts[bisect.bisect_left(self._buckets, seconds)] += 1
        self._duration_sum += seconds

    def get(self, name: str, **labels: str) -> float:
        """The current value of a counter or gauge series (0 if it was never touched)."""
        return self._families[name].values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """All metrics in the text exposition format 0.0.4."""
        if self.collect is not None:
            try:
                self.collect()
            except Exception:  # stale gauges beat no metrics at all
                log.exception("metrics collection failed; serving the last values")
        lines: list[str] = []
        for name, family in self._families.items():
            full = PREFIX + name
            lines += [f"# HELP {full} {_escape_help(family.help)}", f"# TYPE {full} {family.kind}"]
            for labels, value in sorted(family.values.items()):
                lines.append(f"{full}{_labels(labels)} {_number(value)}")
        full = PREFIX + "upload_duration_seconds"
        lines += [
            f"# HELP {full} Seconds each upload took, from the request to the API's answer.",
            f"# TYPE {full} histogram",
        ]
        cumulative = 0
        for le, count in zip((*self._buckets, math.inf), self._bucket_counts, strict=True):
            cumulative += count
            lines.append(f"{full}_bucket{_labels((('le', _number(float(le))),))} {cumulative}")
        lines += [f"{full}_sum {_number(self._duration_sum)}", f"{full}_count {cumulative}"]
        return "\n".join(lines) + "\n"

    def _family(self, name: str, kind: str, labels: dict[str, str]) -> _Family:
        family = self._families.get(name)
        if family is None or family.kind != kind:
            raise KeyError(f"no {kind} named {name!r}")
        if tuple(sorted(labels)) != tuple(sorted(family.label_names)):
            raise ValueError(f"{name} takes labels {family.label_names}, got {tuple(labels)}")
        return family


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))  # "3", not "3.0": exact, and what people grep for
    return repr(float(value))


# --- HTTP ---------------------------------------------------------------------------------------


async def start_server(
    metrics: Metrics, host: str, port: int, healthy: Callable[[], bool]
) -> web.AppRunner:
    """Serve ``GET /metrics`` and ``GET /healthz`` on host:port (0: any free port; read it from
    ``runner.addresses``). Stop it with ``await runner.cleanup()``."""

    async def get_metrics(request: web.Request) -> web.Response:
        body = metrics.render().encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def get_healthz(request: web.Request) -> web.Response:
        try:
            ok = healthy()
        except Exception:
            log.exception("health check failed")
            ok = False
        return web.Response(text="ok" if ok else "unhealthy", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    # No access log: Prometheus scrapes every few seconds. A short shutdown timeout: a scrape
    # in flight must not hold up the daemon's own stop.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
