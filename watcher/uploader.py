"""Sending one file to ``POST /file``: streamed multipart, answer classification, retries.

The body streams from disk in chunks and the sha256 is computed from the very bytes sent, so a
file is read once. Each attempt re-opens the file and builds a fresh body. Answers are sorted
into success, transient (retried with backoff and jitter), permanent (the file fails at once)
and auth (everything stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractStreamWriter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from watcher.config import ApiConfig
from watcher.constants import INLINE_READ_MAX_BYTES, UPLOAD_CHUNK_BYTES
from watcher.errors import (
    AuthError,
    FileChangedError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UploadError,
)

PERMANENT_STATUSES = frozenset({400, 413, 415, 422})
MAX_BODY = 4 * 1024 * 1024  # answers are small JSON; an error page is not read further
T = TypeVar("T")
MAX_RETRY_AFTER_S = 3600.0  # a server asking for more than an hour is ignored past that


@dataclass(frozen=True, slots=True)
class UploadJob:
    path: str  # as found in the watched folder; its basename is the uploaded filename
    open_path: str  # what is opened: the link's target when a symlink is followed
    follow: bool  # False: open with O_NOFOLLOW, a link swapped in is refused
    purpose: str
    max_size: int
    root: str | None = None  # the watch root the opened file must resolve into


@dataclass(frozen=True, slots=True)
class Sent:
    file_id: str
    sha256: str
    size: int
    mtime_ns: int


# --- classification -----------------------------------------------------------------------------


def _detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    detail = data.get("detail") if isinstance(data, dict) else None
    if detail is None:
        return json.dumps(data)[:200]
    return detail if isinstance(detail, str) else json.dumps(detail)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        seconds = float(value)
        if not math.isfinite(seconds):
            return None
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        seconds = when - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def classify(status: int, body: bytes, retry_after: str | None = None) -> Any:
    """The payload ``r`` of a successful answer, or the error this answer means."""
    if 200 <= status < 300:
        try:
            return json.loads(body)["r"]
        except (ValueError, KeyError, TypeError):
            raise TransientError(
                f"HTTP {status} with an unexpected body: {_detail(body)}"
            ) from None
    if status in (401, 403):
        raise AuthError(f"the API rejected the key (HTTP {status}: {_detail(body)})")
    if status == 429:
        raise RateLimitedError(f"HTTP 429: {_detail(body)}", parse_retry_after(retry_after))
    if status == 408 or status >= 500:
        raise TransientError(f"HTTP {status}: {_detail(body)}", parse_retry_after(retry_after))
    # 400, 413, 415, 422 and any other 4xx: sending the same request again cannot help.
    raise PermanentError(f"HTTP {status}: {_detail(body)}", status=status)


def file_id_of(payload: Any) -> str:
    """The id in ``{"r": {"id": ...}}``; a 2xx without one is treated as a transient fault."""
    file_id = payload.get("id") if isinstance(payload, dict) else None
    if isinstance(file_id, str) and file_id:
        return file_id
    raise TransientError(f"answer without a file id: {json.dumps(payload)[:200]}")


# --- the request body ---------------------------------------------------------------------------


def form_filename(path: str) -> str:
    """The basename as browsers put it in multipart: raw UTF-8, with ``"`` CR LF escaped.

    Bytes that are not UTF-8 (surrogate-escaped by Python) become U+FFFD: the API takes text.
    """
    name = os.path.basename(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class FilePayload(aiohttp.payload.Payload):
    """Streams an open file as the ``file`` part, hashing exactly the bytes it sends."""

    def __init__(self, file: BinaryIO, size: int, filename: str) -> None:
        super().__init__(file, content_type="application/octet-stream")
        self._size = size
        self._file = file
        self.sha256 = hashlib.sha256()
        self.shrank = False
        # Built by hand: aiohttp would percent-encode a non-ASCII filename, which the API
        # would store as the literal "%C3%A9…". Browsers and curl send raw UTF-8.
        self.headers[hdrs.CONTENT_DISPOSITION] = f'form-data; name="file"; filename="{filename}"'

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file payload is not text")

    def _read(self, n: int) -> bytes:
        chunk = self._file.read(n)
        self.sha256.update(chunk)  # releases the GIL for large chunks
        return chunk

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        size = remaining = self._size or 0
        if size <= INLINE_READ_MAX_BYTES:
            chunk = self._read(size)  # a few pages from the page cache: no thread hop
            if len(chunk) < size:
                self.shrank = True
                raise FileChangedError("file shrank while being sent")
            await writer.write(chunk)
            return
        # Larger files: the next chunk is read and hashed in a thread while this one is sent,
        # so hashing costs no time on the wire. Reads stay in order: one at a time.
        loop = asyncio.get_running_loop()
        ahead = loop.run_in_executor(None, self._read, min(UPLOAD_CHUNK_BYTES, remaining))
        try:
            while remaining > 0:
                chunk = await ahead
                if not chunk:
                    self.shrank = True
                    raise FileChangedError("file shrank while being sent")
                remaining -= len(chunk)
                if remaining > 0:
                    n = min(UPLOAD_CHUNK_BYTES, remaining)
                    ahead = loop.run_in_executor(None, self._read, n)
                await writer.write(chunk)
        finally:
            if not ahead.done():
                # Cut mid-send: let the last read finish before the file is closed under it.
                with contextlib.suppress(Exception):
                    await asyncio.shield(ahead)


# --- rate limit and shared pause ----------------------------------------------------------------


class Throttle:
    """Spaces requests to ``max_per_s`` and pauses every worker after a 429.

    One instance is shared by all workers: a 429 means the API as a whole wants less, so the
    pause applies to everyone, not just the worker that was told.
    """

    def __init__(self, max_per_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self._interval = 1.0 / max_per_s if max_per_s > 0 else 0.0
        self._clock = clock
        self._next_slot = 0.0
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def wait(self) -> None:
        # A loop, not one sleep: another 429 may push the pause further while we wait.
        while (delay := self._paused_until - self._clock()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)
        if self._interval:
            now = self._clock()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
            if slot > now:
                await asyncio.sleep(slot - now)
            # A 429 that came while we waited for our slot holds us too.
            while (delay := self._paused_until - self._clock()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(delay)


# --- the client ---------------------------------------------------------------------------------


class ApiClient:
    """Every call to the API, with one retry policy and one throttle for all of them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api: ApiConfig,
        api_key: str,
        throttle: Throttle,
    ) -> None:
        self._session = session
        self._api = api
        self._headers = {"apikey": api_key}
        self._throttle = throttle
        # Set by the pipeline: (kind, subject, attempt, reason, wait_s) for each retry.
        self.on_retry: Callable[[str, str, int, str, float], None] | None = None
        self._timeout = aiohttp.ClientTimeout(total=api.timeout_s)
        # Exponential from backoff_initial_s, capped at backoff_max_s, plus up to one initial
        # step of jitter so that workers that failed together do not come back together.
        self._backoff = wait_exponential(
            multiplier=api.backoff_initial_s, max=api.backoff_max_s
        ) + wait_random(0, api.backoff_initial_s)

    # -- retry policy --

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after_s", None)
        # The server's Retry-After wins over our own backoff, in both directions.
        wait = float(self._backoff(state)) if retry_after is None else retry_after
        if isinstance(exc, RateLimitedError):
            self._throttle.pause(wait)
        return wait

    async def _retrying(
        self, kind: str, subject: str, call: Callable[[], Awaitable[T]]
    ) -> tuple[T, int]:
        """``call()`` until it succeeds, fails for good, or runs out of attempts.

        ``kind`` (upload, task, delete) and ``subject`` (a path, a file id) are for the
        on_retry callback, which logs each retry and keeps the manifest's attempt count.
        """
        # The first attempt runs bare: most succeed, and tenacity's bookkeeping costs about
        # 0.3 ms per call, a tenth of the daemon's time per small file on a fast link. A
        # transient failure is replayed as tenacity's attempt 1, so the policy is unchanged.
        try:
            return await call(), 1
        except TransientError as exc:
            first: list[TransientError] = [exc]
        except UploadError as exc:
            exc.attempts = 1
            raise

        async def again() -> T:
            if first:
                raise first.pop()
            return await call()

        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            if self.on_retry:
                self.on_retry(kind, subject, state.attempt_number, str(exc), wait)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._api.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(TransientError),
            before_sleep=note,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    result = await again()
        except UploadError as exc:
            exc.attempts = attempt.retry_state.attempt_number  # for the manifest and the log
            raise
        return result, attempt.retry_state.attempt_number

    async def _request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """One request: (HTTP status, payload ``r``), or the classified error."""
        await self._throttle.wait()
        try:
            async with self._session.request(
                method,
                self._api.base_url + path,
                headers=self._headers,
                timeout=self._timeout,
                **kw,
            ) as resp:
                raw = await _read_capped(resp)
                return resp.status, classify(resp.status, raw, resp.headers.get(hdrs.RETRY_AFTER))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransientError(_describe(exc, self._api.timeout_s)) from None

    # -- files --

    async def upload(self, job: UploadJob) -> tuple[Sent, int]:
        """Send ``job``, retrying transient failures; return what was sent and the attempts."""
        return await self._retrying("upload", job.path, lambda: self.upload_once(job))

    async def upload_once(self, job: UploadJob) -> Sent:
        file, before = open_regular(job.open_path, job.follow, job.max_size, job.root)
        try:
            payload = FilePayload(file, before.st_size, form_filename(job.path))
            with aiohttp.MultipartWriter("form-data") as body:
                body.append_payload(payload)
                if job.purpose:
                    part = body.append(job.purpose)
                    part.set_content_disposition("form-data", name="file_purpose")
            try:
                _, answer = await self._request("POST", "/file", data=body)
            except TransientError:
                if payload.shrank:
                    raise FileChangedError("file shrank while being sent") from None
                raise
            file_id = file_id_of(answer)
            _check_unchanged(job, file, before)
            return Sent(file_id, payload.sha256.hexdigest(), before.st_size, before.st_mtime_ns)
        finally:
            file.close()

    async def delete_file(self, file_id: str) -> None:
        try:
            await self._retrying(
                "delete", file_id, lambda: self._request("DELETE", f"/file/{file_id}")
            )
        except PermanentError as exc:
            if exc.status != 404:  # already gone (the API deletes files after 24 h anyway)
                raise

    # -- tasks --

    async def start_task(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /task`` for the file at ``path``; returns ``{"id": ..., "status": ...}``."""
        (_, answer), _ = await self._retrying(
            "task", path, lambda: self._request("POST", "/task", json=body)
        )
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise PermanentError(f"task start answered without a task id: {str(answer)[:200]}")
        return answer

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """One ``GET /task/{id}`` (202 while it runs, 200 once it ended); the caller paces it."""
        _, answer = await self._request("GET", f"/task/{task_id}")
        if not isinstance(answer, dict):
            raise TransientError(f"unexpected task answer: {str(answer)[:200]}")
        return answer


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, whole, up to MAX_BODY bytes: an error page is not read further."""
    chunks: list[bytes] = []
    total = 0
    while total < MAX_BODY and (chunk := await resp.content.read(MAX_BODY - total)):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within timeout_s = {timeout_s:g}"
    text = str(exc) or exc.__class__.__name__
    return f"connection error: {text}"


def open_regular(
    path: str, follow: bool, max_size: int, root: str | None = None
) -> tuple[BinaryIO, os.stat_result]:
    """Open without following a swapped-in link and without blocking on a FIFO.

    With ``root``, the opened file's real path (from /proc/self/fd) must lie inside it, and
    be ``path`` itself unless links are followed: a folder swapped for a link is refused.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        # Look before opening: opening a device, even non-blocking, can have side effects.
        if not stat.S_ISREG(os.stat(path, follow_symlinks=follow).st_mode):
            raise FileChangedError("no longer a regular file")
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileChangedError("file vanished before it was sent") from None
    except PermissionError:
        raise PermanentError("permission denied: the daemon cannot read this file") from None
    except OSError as exc:
        raise FileChangedError(f"cannot open: {exc.strerror}") from None
    if root is not None and not _opened_inside(fd, path, root, follow):
        os.close(fd)
        raise PermanentError("reached through a symbolic link out of the watch root: not sent")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileChangedError("no longer a regular file")
    if st.st_size > max_size:
        os.close(fd)
        raise PermanentError(f"file is {st.st_size} bytes, over max_file_size ({max_size})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb", buffering=0), st


def _opened_inside(fd: int, path: str, root: str, follow: bool) -> bool:
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (not Linux): the lstat-based checks before opening stand alone
        return True
    if follow:
        return real == root or real.startswith(root.rstrip("/") + "/")
    return real == os.path.normpath(path)


def _check_unchanged(job: UploadJob, file: Any, before: os.stat_result) -> None:
    """Raise if the file was written to, truncated or replaced while it was being sent."""
    after = os.fstat(file.fileno())
    try:
        now = os.stat(job.open_path, follow_symlinks=job.follow)
    except OSError:
        raise FileChangedError("file vanished while being sent") from None
    same = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if not same or (now.st_ino, now.st_dev) != (before.st_ino, before.st_dev):
        raise FileChangedError("file changed while being sent")
