"""Readiness: each start-up task holds a guard; meshd is ready once every guard is released.

As ztunnel does it: components register before they start, so there is no window in which an
unregistered component is still starting while /healthz/ready already says yes.
"""

from __future__ import annotations

import trio


class Readiness:
    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._ready = trio.Event()
        self._sealed = False

    def register(self, name: str) -> ReadinessGuard:
        if self._sealed:
            raise RuntimeError("register every component before sealing readiness")
        self._pending.add(name)
        return ReadinessGuard(self, name)

    def seal(self) -> None:
        """No more components will register; ready as soon as the pending ones are."""
        self._sealed = True
        self._check()

    def release(self, name: str) -> None:
        self._pending.discard(name)
        self._check()

    def _check(self) -> None:
        if self._sealed and not self._pending:
            self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(sorted(self._pending))

    async def wait_ready(self) -> None:
        await self._ready.wait()


class ReadinessGuard:
    def __init__(self, readiness: Readiness, name: str) -> None:
        self._readiness = readiness
        self.name = name

    def release(self) -> None:
        self._readiness.release(self.name)
