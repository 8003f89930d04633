"""Named values that are not configuration. Each says why it has the value it has."""

from __future__ import annotations

DEFAULT_BASE_URL = "https://api.smooth.sh/api/v1"

# How long in-flight uploads may take to finish after SIGTERM before they are cut and their
# files go back to pending. Below systemd's default TimeoutStopSec (90 s) with room to close.
SHUTDOWN_GRACE_S = 30.0

# Bytes read from disk per chunk while streaming an upload: aiohttp's own default chunk size,
# large enough for full-speed loopback, small enough that memory stays flat.
UPLOAD_CHUNK_BYTES = 256 * 1024

# Files up to this size are read on the event loop in one go: a thread hop costs more than
# reading a few pages from the page cache.
INLINE_READ_MAX_BYTES = 64 * 1024

# The API deletes uploaded files 24 hours after upload; a task needs a fresh id before then.
# The margin leaves room for the task to start and read the file.
FILE_ID_LIFETIME_S = 24 * 3600.0
FILE_ID_SAFETY_MARGIN_S = 15 * 60.0

# How often idle workers look at the manifest for rows another process put back to pending
# (`smooth-watcher retry` while the daemon runs).
IDLE_POLL_S = 2.0

# How often the daemon checks that each watch root is still the folder it watches: a root
# deleted and re-created, or a network share that went away and came back, is watched again.
ROOT_CHECK_S = 2.0

# How often systemd hears STATUS= (and WATCHDOG=1, at least twice per WatchdogSec).
HEARTBEAT_S = 10.0

# Uploads confirmed by the API are committed together: at most this long after the first of a
# batch, or at once when this many wait. One fsync per batch instead of one per file is what
# lets small files go as fast as the wire allows.
COMMIT_WINDOW_S = 0.05
COMMIT_BATCH_MAX = 256

# Files handed on per event-loop turn, by the scanner to settling and by settling to the
# manifest: keeps the loop responsive during a scan or a burst of 100,000 files.
SCAN_BATCH = 500

# Error messages kept per row are cut to this length: an HTML error page is not a reason.
MAX_ERROR_CHARS = 500

# Upload states as stored in the manifest and shown by `status` and `export`.
PENDING = "pending"
UPLOADING = "uploading"
UPLOADED = "uploaded"
FAILED = "failed"
SKIPPED = "skipped"
STATES = (PENDING, UPLOADING, UPLOADED, FAILED, SKIPPED)
