"""The few errors that cross module boundaries. Only the CLI turns them into a line and a status."""

from __future__ import annotations


class WatcherError(Exception):
    """Base of every error smooth-watcher raises on purpose."""

    exit_status = 1


class ConfigError(WatcherError):
    """The configuration is unusable; the message names the key or path at fault."""

    exit_status = 2


class AuthError(WatcherError):
    """The API rejected the key (401/403): no upload can succeed until a person acts."""

    exit_status = 3


class ManifestError(WatcherError):
    """The manifest cannot be opened or written (locked, corrupt, disk full)."""

    exit_status = 1


class UploadError(Exception):
    """One request to the API failed; subclasses say whether trying again can help."""

    def __init__(
        self, reason: str, retry_after_s: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status
        self.attempts = 1  # set by the client once it gives up: how many tries it took


class TransientError(UploadError):
    """Connection error, timeout, 408, 429, 5xx or a 2xx without an id: try again later."""


class RateLimitedError(TransientError):
    """429: the API wants fewer requests from everyone; every worker pauses."""


class PermanentError(UploadError):
    """400, 413, 415, 422 and the like: this file will never be accepted as it is."""


class FileChangedError(UploadError):
    """The file changed, shrank or vanished while it was being sent; it goes back to settling."""
