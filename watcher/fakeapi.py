"""fake-api: a local Smooth-compatible API, for trying the daemon without an account and for tests.

Same routes, auth, status codes and JSON shapes as the real API (see SPEC.md), plus fault
injection (`Faults`) and a few unauthenticated control routes under `/_fake/`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import platformdirs
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from watcher.faults import Faults, add_fault_arguments, faults_from_args

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
DEFAULT_API_KEY = "local-dev-key"  # public on purpose: the only key we ever print
MAX_PURPOSE_CHARS = 64
FILE_TTL_S = 24 * 3600.0  # the real API deletes uploads after 24 hours
# Chunks of this size are hashed and written in a worker thread: one thread hop per 256 KiB
# keeps disk stalls off the event loop without the per-hop cost dominating.
CHUNK_BYTES = 256 * 1024
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class StoredFile:
    id: str
    name: str
    size: int
    sha256: str
    purpose: str | None
    uploaded_at: float
    path: Path

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}


@dataclass
class RequestRecord:
    method: str
    path: str
    status: int  # 0: no answer (connection dropped by a fault or by the client)
    t: float  # time.monotonic() when the request arrived


@dataclass
class FakeTask:
    id: str
    task: str
    files: list[str]
    file_names: list[str]  # captured at creation: the output names them even after a delete
    url: str | None
    metadata: dict[str, Any] | None
    max_steps: int
    response_model: dict[str, Any] | None
    created_at: float  # time.time()
    started: float  # time.monotonic(): the run time must not jump with the wall clock


class _Reset(Exception):
    """Drop the connection without an answer."""


class _ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, dict(headers or {})


def _ok(payload: Any, status: int = 200) -> web.Response:
    return web.json_response({"r": payload}, status=status)


def _format_retry_after(seconds: float) -> str:
    return str(int(seconds)) if seconds.is_integer() else f"{seconds:.3f}".rstrip("0").rstrip(".")


class FakeApi:
    def __init__(
        self,
        data_dir: Path,
        api_keys: Sequence[str] = (DEFAULT_API_KEY,),
        task_duration_s: float = 2.0,
        faults: Faults | None = None,
        file_ttl_s: float = FILE_TTL_S,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._keys = [k.encode() for k in api_keys]
        self.task_duration_s = task_duration_s
        self.file_ttl_s = file_ttl_s
        self.faults = faults if faults is not None else Faults()
        self.files: dict[str, StoredFile] = {}
        self.tasks: dict[str, FakeTask] = {}
        self.requests: collections.deque[RequestRecord] = collections.deque(maxlen=100_000)
        # Exact per-route counts, unlike `requests`, which forgets the oldest records.
        self.stats: dict[str, collections.Counter[int]] = {}
        self._rng = random.Random(self.faults.seed)
        self._rng_seed = self.faults.seed
        self._load()

    # -- persistence: a JSON sidecar next to each data file, so a restart keeps the files --

    def _load(self) -> None:
        for leftover in self.data_dir.glob("*.part"):  # an upload cut short by a crash
            leftover.unlink(missing_ok=True)
        for sidecar in self.data_dir.glob("*.json"):
            try:
                meta = json.loads(sidecar.read_text("utf-8"))
                stored = StoredFile(path=self.data_dir / meta.pop("data"), **meta)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("fake-api: ignoring unreadable %s: %s", sidecar.name, exc)
                continue
            if stored.path.is_file():
                self.files[stored.id] = stored
            else:  # the upload died between writing the sidecar and moving the data in
                sidecar.unlink(missing_ok=True)

    def _save(self, stored: StoredFile) -> None:
        meta = {**stored.public(), "data": stored.path.name}
        tmp = stored.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, ensure_ascii=False), "utf-8")
        os.replace(tmp, stored.path.with_suffix(".json"))  # never a half-written sidecar

    def _remove(self, file_id: str) -> None:
        stored = self.files.pop(file_id)
        stored.path.with_suffix(".json").unlink(missing_ok=True)
        stored.path.unlink(missing_ok=True)

    def _live_file(self, file_id: str) -> StoredFile | None:
        stored = self.files.get(file_id)
        if stored is not None and time.time() - stored.uploaded_at > self.file_ttl_s:
            self._remove(file_id)  # expired, as the real API does after 24 hours
            return None
        return stored

    # -- the app --

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        p = API_PREFIX
        app.router.add_post(f"{p}/file", self._upload)
        app.router.add_delete(f"{p}/file/{{id}}", self._delete_file)
        app.router.add_post(f"{p}/task", self._create_task)
        app.router.add_get(f"{p}/task/{{id}}", self._get_task)
        # The SDK posts usage events here unless SMOOTH_TELEMETRY=off; accept and drop them.
        app.router.add_post(f"{p}/telemetry", self._accept)
        app.router.add_get("/_fake/faults", self._get_faults)
        app.router.add_put("/_fake/faults", self._put_faults)
        app.router.add_get("/_fake/files", self._list_files)
        app.router.add_get("/_fake/stats", self._get_stats)
        return app

    async def _accept(self, request: web.Request) -> web.Response:
        return _ok(True)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        arrived = time.monotonic()
        # Control routes are neither delayed, authenticated nor recorded: they are how a test
        # steers the fake, and must not show up in the traffic the test asserts on.
        control = request.path.startswith("/_fake/")
        status = 0
        try:
            if not control:
                if self.faults.delay_s > 0:
                    await asyncio.sleep(self.faults.delay_s)
                self._authenticate(request)
            response = await handler(request)
            status = response.status
            return response
        except _ApiError as exc:
            status = exc.status
            return web.json_response({"detail": exc.detail}, status=status, headers=exc.headers)
        except web.HTTPException as exc:  # unknown route, wrong method
            status = exc.status
            allow = {k: v for k, v in exc.headers.items() if k == "Allow"}  # not Content-Type
            return web.json_response({"detail": exc.reason}, status=status, headers=allow)
        except (_Reset, ConnectionError):  # cut by a fault, or by the client mid-body
            if request.transport is not None:
                request.transport.abort()
            # Never sent: aiohttp fails to write it to the dead transport and moves on
            # quietly, where an exception escaping the handler would be logged as an error.
            return web.Response(status=500)
        except Exception:
            log.exception("fake-api: %s %s failed", request.method, request.path)
            status = 500
            return web.json_response({"detail": "internal error"}, status=500)
        finally:
            if not control:
                self._record(request, status, arrived)

    def _record(self, request: web.Request, status: int, arrived: float) -> None:
        self.requests.append(RequestRecord(request.method, request.path, status, arrived))
        route = request.match_info.route.resource
        canonical = route.canonical if route is not None else request.path
        self.stats.setdefault(f"{request.method} {canonical}", collections.Counter())[status] += 1

    def _authenticate(self, request: web.Request) -> None:
        given = request.headers.get("apikey", "").encode()
        # compare_digest on every key: the time taken does not tell how much of a key matched
        known = any([secrets.compare_digest(given, key) for key in self._keys])
        if self.faults.reject_key or not known:
            raise _ApiError(401, "Invalid API key")

    def _random(self) -> random.Random:
        if self.faults.seed != self._rng_seed:
            self._rng, self._rng_seed = random.Random(self.faults.seed), self.faults.seed
        return self._rng

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._random().random() < rate

    # -- POST /file --

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        f = self.faults
        code: int | None = f.script.pop(0) if f.script else None
        bad_json = False
        if code is None:
            for rate, fault in ((f.rate_reset, 0), (f.rate_503, 503), (f.rate_429, 429)):
                if self._roll(rate):
                    code = fault
                    break
            bad_json = code is None and self._roll(f.rate_bad_json)
        if code == 0:
            await request.content.read(64 * 1024)  # the client has started sending the body
            raise _Reset
        if code is not None and code != 200:
            # Answered before the body is read, as a gateway would; aiohttp discards the rest.
            if code == 429:
                retry = {"Retry-After": _format_retry_after(f.retry_after_s)}
                raise _ApiError(429, "Too many requests (fake-api fault)", retry)
            raise _ApiError(code, f"Injected status {code} (fake-api fault)")
        if bad_json:
            while await request.content.readany():  # swallow the upload, keep nothing
                pass
            body, ctype = self._random().choice(
                [("<html><body>Bad Gateway</body></html>", "text/html"),
                 ('{"r": {}}', "application/json"), ('{"r": {"id"', "application/json")]
            )  # fmt: skip
            return web.Response(text=body, content_type=ctype)
        stored = await self._receive(request)
        return _ok({"id": stored.id})

    async def _receive(self, request: web.Request) -> StoredFile:
        if request.content_type != "multipart/form-data":
            raise _ApiError(400, "Expected a multipart/form-data body with a 'file' part")
        file_id = "file_" + secrets.token_hex(8)
        tmp = self.data_dir / f"{file_id}.part"
        received: tuple[str, int, str] | None = None
        purpose: str | None = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise _ApiError(400, "Nested multipart bodies are not supported")
                if part.name == "file":
                    if received is not None:
                        raise _ApiError(400, "More than one 'file' part")
                    name = self._check_filename(part.filename)
                    received = (name, *await _spool(part, tmp))
                elif part.name == "file_purpose":
                    purpose = await _read_purpose(part)
                else:
                    await part.release()
            if received is None:
                raise _ApiError(400, "Missing multipart part 'file'")
            name, size, digest = received
            stored = StoredFile(
                file_id, name, size, digest, purpose, time.time(), tmp.with_suffix(".bin")
            )
            # Sidecar first: a crash in between leaves a sidecar without data, skipped at load.
            await asyncio.to_thread(self._save, stored)
            os.replace(tmp, stored.path)
        except (ValueError, HttpProcessingError) as exc:  # aiohttp: a malformed body
            raise _ApiError(400, f"Malformed multipart body: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self.files[file_id] = stored
        return stored

    def _check_filename(self, name: str | None) -> str:
        # aiohttp decodes part headers as UTF-8 (raw UTF-8 names arrive intact) and maps
        # undecodable bytes to lone surrogates, which cannot be UTF-8 encoded again.
        if not name:
            raise _ApiError(400, "Missing filename in the 'file' part")
        if "/" in name or "\0" in name or name in (".", ".."):
            raise _ApiError(400, f"Invalid filename: {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise _ApiError(400, "Filename is not valid UTF-8") from None
        if self.faults.reject_pattern and fnmatch.fnmatchcase(name, self.faults.reject_pattern):
            raise _ApiError(400, f"file type not allowed: {name}")
        return name

    # -- DELETE /file/{id} --

    async def _delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if self._live_file(file_id) is None:
            raise _ApiError(404, f"File not found: {file_id}")
        await asyncio.to_thread(self._remove, file_id)
        return _ok(True)

    # -- POST /task, GET /task/{id} --

    async def _create_task(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise _ApiError(400, "The body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _ApiError(422, "The body must be a JSON object")
        task, files, url = body.get("task"), body.get("files") or [], body.get("url")
        metadata, max_steps = body.get("metadata"), body.get("max_steps", 32)
        response_model = body.get("response_model")
        if not isinstance(task, str):
            raise _ApiError(422, "task: a string is required")
        if not isinstance(files, list) or not all(isinstance(i, str) for i in files):
            raise _ApiError(422, "files: must be a list of file ids")
        if url is not None and not isinstance(url, str):
            raise _ApiError(422, "url: must be a string")
        flat = (str, int, float, bool)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, flat) for v in metadata.values())
        ):
            raise _ApiError(422, "metadata: must be a flat object of strings, numbers, booleans")
        if type(max_steps) is not int or not 2 <= max_steps <= 128:
            raise _ApiError(422, "max_steps: must be an integer from 2 to 128")
        if response_model is not None and not isinstance(response_model, dict):
            raise _ApiError(422, "response_model: must be a JSON schema object or null")
        names = []
        for file_id in files:
            stored = self._live_file(file_id)
            if stored is None:
                raise _ApiError(400, f"Unknown file id: {file_id}")
            names.append(stored.name)
        task_id = "task_" + secrets.token_hex(8)
        self.tasks[task_id] = FakeTask(
            task_id, task, files, names, url, metadata, max_steps, response_model,
            created_at=time.time(), started=time.monotonic(),
        )  # fmt: skip
        return _ok({"id": task_id, "status": "waiting"})

    async def _get_task(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            raise _ApiError(404, f"Task not found: {request.match_info['id']}")
        # `event_t` (the SDK's cursor for new events) is accepted and ignored: no events here.
        result: dict[str, Any] = {
            "id": task.id, "status": "running", "output": None, "credits_used": None,
            "recording_url": None, "events": [], "created_at": int(task.created_at),
        }  # fmt: skip
        if time.monotonic() - task.started < self.task_duration_s:
            return _ok(result, status=202)
        failed = "FAIL" in task.task
        result["status"] = "failed" if failed else "done"
        result["credits_used"] = 1 + len(task.files)
        result["recording_url"] = f"https://recordings.fake-api.invalid/{task.id}.mp4"
        if failed:
            result["output"] = "Error: the task failed (fake-api: task text contains FAIL)"
        elif task.response_model:
            result["output"] = _sample_output(task.response_model, task.file_names)
        else:
            result["output"] = f"Processed {', '.join(task.file_names) or 'no files'}"
        return _ok(result)

    # -- control routes --

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.as_dict())

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of fault fields")
            self.faults.update(changes)
        except ValueError as exc:
            raise _ApiError(400, str(exc)) from None
        if "seed" in changes:  # setting a seed, even the same one, restarts its sequence
            self._rng, self._rng_seed = random.Random(self.faults.seed), self.faults.seed
        return web.json_response(self.faults.as_dict())

    async def _list_files(self, request: web.Request) -> web.Response:
        live = [self._live_file(file_id) for file_id in list(self.files)]
        return web.json_response([f.public() for f in live if f is not None])

    async def _get_stats(self, request: web.Request) -> web.Response:
        counts = {route: {str(s): n for s, n in c.items()} for route, c in self.stats.items()}
        return web.json_response(counts)


def _write_chunk(fh: BinaryIO, digest: Any, chunk: bytes) -> None:
    digest.update(chunk)  # hashlib releases the GIL on big buffers: worth the thread too
    fh.write(chunk)


async def _spool(part: BodyPartReader, tmp: Path) -> tuple[int, str]:
    """Stream one part to `tmp`; return its size and sha256. Never holds more than a chunk."""
    digest, size = hashlib.sha256(), 0
    fh: BinaryIO = await asyncio.to_thread(tmp.open, "wb")
    try:
        while chunk := await part.read_chunk(CHUNK_BYTES):
            size += len(chunk)
            await asyncio.to_thread(_write_chunk, fh, digest, chunk)
    finally:
        await asyncio.to_thread(fh.close)
    return size, digest.hexdigest()


async def _read_purpose(part: BodyPartReader) -> str | None:
    too_long = _ApiError(400, f"file_purpose must be at most {MAX_PURPOSE_CHARS} characters")
    limit, raw = MAX_PURPOSE_CHARS * 4, b""  # UTF-8 takes at most 4 bytes a character
    while len(raw) <= limit and (chunk := await part.read_chunk(1024)):
        raw += chunk  # bounded: a huge text part is cut off here, not held in memory
    if len(raw) > limit:
        raise too_long
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ApiError(400, "file_purpose is not valid UTF-8") from None
    if len(text) > MAX_PURPOSE_CHARS:
        raise too_long
    return text or None


def _sample_output(schema: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """One plausible value per top-level property of a JSON schema."""
    samples: dict[str, Any] = {"integer": 1, "number": 1.5, "boolean": True, "null": None}
    out: dict[str, Any] = {}
    for prop, sub in (schema.get("properties") or {}).items():
        sub = sub if isinstance(sub, dict) else {}
        # pydantic writes Optional[X] as anyOf [X, null]: describe the X
        alts = [a for a in sub.get("anyOf") or sub.get("oneOf") or [] if isinstance(a, dict)]
        sub = next((a for a in alts if a.get("type") not in (None, "null")), sub)
        kind = sub.get("type")
        if isinstance(kind, list):  # ["string", "null"]
            kind = next((k for k in kind if k != "null"), "null")
        if sub.get("enum"):
            out[prop] = sub["enum"][0]
        elif isinstance(kind, str) and kind in samples:
            out[prop] = samples[kind]
        elif kind in ("array", "object") or "$ref" in sub:
            out[prop] = [] if kind == "array" else {}
        else:  # a string, or anything the schema leaves open
            out[prop] = f"{prop} of {names[0]}" if names else f"example {prop}"
    return out


async def _start(runner: web.AppRunner, host: str, port: int) -> int:
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return int(runner.addresses[0][1])  # the real port when port=0


def _base_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{API_PREFIX}"


@contextlib.contextmanager
def serve_in_thread(api: FakeApi, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the server on its own event loop in a daemon thread; yield the API base URL, e.g.
    "http://127.0.0.1:41234/api/v1"; stop cleanly on exit."""
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Like asyncio.run: aiohttp leaves tasks behind (lingering reads of bodies it
            # answered early), which would be reported as destroyed while pending.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    thread = threading.Thread(target=run, name="fake-api", daemon=True)
    thread.start()
    # A short grace: a test that ends mid-request should not wait for the request to finish.
    runner = web.AppRunner(api.make_app(), access_log=None, shutdown_timeout=1.0)
    try:
        actual = asyncio.run_coroutine_threadsafe(_start(runner, host, port), loop).result()
        try:
            yield _base_url(host, actual)
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_dir = platformdirs.user_data_path("smooth-watcher") / "fake-api"
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8787, help="port to listen on (0: any free)")
    parser.add_argument("--data-dir", type=Path, default=default_dir, help="where uploads go")
    parser.add_argument(
        "--api-key", action="append", default=None, metavar="KEY",
        help=f"accepted key, repeatable (default: $CIRCLEMIND_API_KEY, else {DEFAULT_API_KEY})",
    )  # fmt: skip
    parser.add_argument("--task-duration-s", type=float, default=2.0, help="how long tasks run")
    add_fault_arguments(parser)


def run_from_args(args: argparse.Namespace) -> int:
    env_key = os.environ.get("CIRCLEMIND_API_KEY")
    keys: list[str] = args.api_key or ([env_key] if env_key else [DEFAULT_API_KEY])
    shown = "key: " + (
        "from --api-key" if args.api_key else "from $CIRCLEMIND_API_KEY" if env_key
        else DEFAULT_API_KEY  # the only key we print: it is public anyway
    )  # fmt: skip
    try:
        api = FakeApi(args.data_dir, keys, args.task_duration_s, faults_from_args(args))
        asyncio.run(_serve_until_signal(api, args.host, args.port, shown))
    except ValueError as exc:  # a fault value out of range
        print(f"fake-api: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # port in use, data dir not writable
        print(f"fake-api: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(api: FakeApi, host: str, port: int, shown: str) -> None:
    runner = web.AppRunner(api.make_app(), shutdown_timeout=5.0)
    actual = await _start(runner, host, port)
    print(f"fake-api listening on {_base_url(host, actual)} ({shown})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still raises
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
