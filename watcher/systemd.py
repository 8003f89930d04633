"""A tiny sd_notify(3) client: tell systemd we are ready, alive, reloading or stopping.

No dependency on libsystemd or python-systemd: the protocol is one datagram of ``KEY=value``
lines sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html). Outside systemd the
variable is unset and every method is a no-op, so the daemon calls them unconditionally.

Sending never blocks (non-blocking socket, one ``sendto``) and never raises into the caller: a
service manager that went away must not take the daemon's uploads with it. The first failure is
logged once as a warning; later ones are silent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("watcher.systemd")


class Notifier:
    """Notifications to the service manager; build it with :meth:`from_env`."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # An address starting with "@" names a socket in the abstract namespace (Linux only).
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: os.environ)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address and address[0] not in "/@":
            # systemd ≥ 254 may pass "vsock:CID:PORT" to services inside VMs; not needed here.
            log.warning("NOTIFY_SOCKET not supported; not notifying systemd", address=address)
            address = ""
        return cls(address or None, _watchdog_usec(env))

    # -- what the daemon reads --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when systemd (or something like it) listens for notifications."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call :meth:`watchdog`: half of ``WatchdogSec=``, as sd_watchdog_enabled(3)
        advises; None when no watchdog is expected from this process."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # -- notifications ----------------------------------------------------------------------------

    def ready(self, status: str = "") -> bool:
        """Start-up is done (Type=notify); also sent after a reload has finished."""
        return self._send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """Free-form status line shown by ``systemctl status``."""
        return self._send(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        """Shutdown has begun; systemd then waits up to TimeoutStopSec= for us to exit."""
        return self._send("STOPPING=1")

    def reloading(self) -> bool:
        """A reload has begun; send :meth:`ready` when it is done.

        systemd ≥ 253 (Type=notify-reload) wants MONOTONIC_USEC with it to match the reload to
        the request; older versions ignore the extra line.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """Keep-alive; a no-op unless systemd expects one from this process."""
        if self.watchdog_interval_s is None:
            return False
        return self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- the wire ---------------------------------------------------------------------------------

    def _send(self, *lines: str) -> bool:
        """One datagram; True when the kernel took it. Never raises, never blocks."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # gone, refused, queue full (EAGAIN), permission denied, ...
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify systemd; carrying on without it",
                    address=self._address.replace("\0", "@"),
                    error=f"{type(exc).__name__}: {exc}",
                )
            return False
        return True


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` when the watchdog is meant for this very process, else None."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    # WATCHDOG_PID names the process that must ping; a child that inherited our environment
    # (or a process started by us) must not.
    if pid and pid != str(os.getpid()):
        return None
    return usec if usec > 0 else None


def _one_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start a bogus one.
    return " ".join(text.splitlines())
