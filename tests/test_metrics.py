"""Metrics: the exposition text parsed back line by line, and the HTTP endpoint for real."""

from __future__ import annotations

import asyncio
import math
import re

import aiohttp
import pytest
from structlog.testing import capture_logs

from watcher.metrics import CONTENT_TYPE, FILE_STATES, Metrics, start_server

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
UNESCAPE = {"n": "\n", "\\": "\\", '"': '"'}

Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> tuple[dict[str, str], dict[str, str], list[Sample]]:
    """A strict reader of format 0.0.4: HELP and TYPE once per family and before its samples,
    every sample in a declared family, label values unescaped."""
    assert text.endswith("\n")
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_ = line[7:].split(" ", 1)
            assert name not in helps, f"HELP twice for {name}"
            helps[name] = help_
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name not in types, f"TYPE twice for {name}"
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            raw = m["labels"] or ""
            pairs = LABEL.findall(raw)
            assert "".join(f'{k}="{v}",' for k, v in pairs).rstrip(",") == raw
            labels = {k: re.sub(r"\\(.)", lambda e: UNESCAPE[e[1]], v) for k, v in pairs}
            name = m["name"]
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in types or types.get(family) == "histogram", f"undeclared {name}"
            samples.append((name, labels, float(m["value"])))
    assert helps.keys() == types.keys()
    return helps, types, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and lab == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def test_every_family_is_declared_once_with_its_series_at_zero() -> None:
    helps, types, samples = parse(Metrics().render())
    p = "smooth_watcher_"
    assert types == {
        p + "uploads_total": "counter",
        p + "upload_bytes_total": "counter",
        p + "retries_total": "counter",
        p + "tasks_total": "counter",
        p + "queue_depth": "gauge",
        p + "files": "gauge",
        p + "in_flight": "gauge",
        p + "upload_duration_seconds": "histogram",
    }
    assert all(helps.values())
    for outcome in ("uploaded", "failed", "skipped", "resent", "vanished"):
        assert value(samples, p + "uploads_total", outcome=outcome) == 0
        assert value(samples, p + "upload_bytes_total", outcome=outcome) == 0
    for status in ("done", "failed", "cancelled", "error"):
        assert value(samples, p + "tasks_total", status=status) == 0
    for state in FILE_STATES:
        assert value(samples, p + "files", state=state) == 0
    assert value(samples, p + "retries_total") == 0
    assert value(samples, p + "upload_duration_seconds_count") == 0


def test_updates_and_label_escaping_round_trip() -> None:
    metrics = Metrics()
    metrics.inc("uploads_total", outcome="uploaded")
    metrics.inc("uploads_total", outcome="uploaded")
    metrics.inc("upload_bytes_total", 1536, outcome="uploaded")
    metrics.inc("retries_total", 3)
    metrics.inc("tasks_total", status="done")
    metrics.set_gauge("queue_depth", 7)
    metrics.set_gauge("in_flight", 2)
    metrics.set_gauge("files", 0.5, state="pending")
    odd = 'say "hi"\\back\nslash'
    metrics.inc("tasks_total", status=odd)

    text = metrics.render()
    assert "3.0" not in text  # integral values are written as integers
    _, _, samples = parse(text)
    p = "smooth_watcher_"
    assert value(samples, p + "uploads_total", outcome="uploaded") == 2
    assert value(samples, p + "upload_bytes_total", outcome="uploaded") == 1536
    assert value(samples, p + "retries_total") == 3
    assert value(samples, p + "tasks_total", status="done") == 1
    assert value(samples, p + "tasks_total", status=odd) == 1
    assert value(samples, p + "queue_depth") == 7
    assert value(samples, p + "in_flight") == 2
    assert value(samples, p + "files", state="pending") == 0.5
    assert r'status="say \"hi\"\\back\nslash"' in text  # one physical line
    assert metrics.get("uploads_total", outcome="uploaded") == 2
    assert metrics.get("uploads_total", outcome="never") == 0


def test_histogram_buckets_are_cumulative() -> None:
    metrics = Metrics()
    durations = [0.004, 0.01, 0.3, 7.0, 299.0, 1000.0]
    for seconds in durations:
        metrics.observe_upload(seconds)
    _, _, samples = parse(metrics.render())
    name = "smooth_watcher_upload_duration_seconds"
    buckets = [(float(lab["le"]), v) for n, lab, v in samples if n == name + "_bucket"]
    bounds = [le for le, _ in buckets]
    assert bounds == sorted(bounds) and bounds[0] == 0.01 and bounds[-2] == 300.0
    assert bounds[-1] == math.inf
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative: never decreasing
    for le, count in buckets:  # le is inclusive: 0.01 falls in the 0.01 bucket
        assert count == sum(1 for d in durations if d <= le)
    assert counts[-1] == value(samples, name + "_count") == len(durations)
    assert value(samples, name + "_sum") == pytest.approx(sum(durations))
    assert 'le="+Inf"' in metrics.render()


def test_misuse_is_refused() -> None:
    metrics = Metrics()
    with pytest.raises(KeyError):
        metrics.inc("uploads")  # no such counter
    with pytest.raises(KeyError):
        metrics.inc("queue_depth")  # a gauge, not a counter
    with pytest.raises(ValueError):
        metrics.inc("uploads_total")  # missing outcome label
    with pytest.raises(ValueError):
        metrics.set_gauge("files", 1, outcome="pending")  # wrong label name
    with pytest.raises(ValueError):
        metrics.inc("retries_total", -1)


def test_collect_runs_before_each_render_and_may_fail() -> None:
    metrics = Metrics()
    calls: list[int] = []

    def collect() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("manifest locked")
        for state in FILE_STATES:
            metrics.set_gauge("files", len(calls), state=state)

    metrics.collect = collect
    assert value(parse(metrics.render())[2], "smooth_watcher_files", state="failed") == 1
    with capture_logs() as logs:
        _, _, samples = parse(metrics.render())  # stale values, but an answer
    assert value(samples, "smooth_watcher_files", state="failed") == 1
    assert logs[0]["log_level"] == "error"
    assert len(calls) == 2


def test_server_answers_metrics_and_healthz() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        metrics.inc("uploads_total", outcome="failed")
        health = {"ok": True}
        runner = await start_server(metrics, "127.0.0.1", 0, lambda: health["ok"])
        try:
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}"
            async with aiohttp.ClientSession() as session:
                async with session.get(base + "/metrics") as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"] == CONTENT_TYPE
                    _, _, samples = parse(await resp.text())
                    assert value(samples, "smooth_watcher_uploads_total", outcome="failed") == 1
                async with session.get(base + "/healthz") as resp:
                    assert (resp.status, await resp.text()) == (200, "ok")
                health["ok"] = False
                async with session.get(base + "/healthz") as resp:
                    assert (resp.status, await resp.text()) == (503, "unhealthy")
                async with session.get(base + "/") as resp:
                    assert resp.status == 404
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_server_reports_a_busy_port() -> None:
    async def scenario() -> None:
        first = await start_server(Metrics(), "127.0.0.1", 0, lambda: True)
        try:
            port = first.addresses[0][1]
            with pytest.raises(OSError):
                await start_server(Metrics(), "127.0.0.1", port, lambda: True)
        finally:
            await first.cleanup()

    asyncio.run(scenario())
