"""systemd's notify protocol: READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1 and STATUS= lines.

A no-op outside systemd (no $NOTIFY_SOCKET). The watchdog keep-alive is sent from the trio loop
itself, so a wedged loop stops the keep-alives and systemd restarts meshd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import trio

log = logging.getLogger("meshd.systemd")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name"; its address starts with a NUL byte.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 1e6 / 2 if wanted else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            # A datagram to a local socket does not block; systemd reads it at once.
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    def ready(self, status: str = "ready") -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining")

    async def keep_alive(self) -> None:
        """Send WATCHDOG=1 at half the interval systemd asked for, forever (returns at once if not asked)."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
