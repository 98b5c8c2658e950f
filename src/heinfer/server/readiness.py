"""`/v2/health/ready` from a cached probe.

Why: the route is anonymous (load balancers and Kubernetes call it without a token), and a
probe pings every worker and checks the key store, which for `azure://` and `s3://` is a
billed API call. Answering each request with a fresh probe would let anyone turn requests
into cloud calls and queue unbounded pings in front of real work. Here at most one probe runs
at a time (concurrent callers await the same one) and its result answers every request for
`ttl` seconds afterwards, so the store sees at most one check per `ttl` however many callers
there are.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["CachedProbe"]


class CachedProbe:
    """One `probe()` in flight at a time; its result reused for `ttl` seconds."""

    def __init__(self, probe: Callable[[], Awaitable[dict[str, bool]]], ttl: float) -> None:
        self._probe = probe
        self._ttl = ttl
        self._result: dict[str, bool] | None = None
        self._at = 0.0
        self._running: asyncio.Future[dict[str, bool]] | None = None
        self.probes = 0  # probes run so far (a metric)

    async def result(self) -> dict[str, bool]:
        if self._result is not None and time.monotonic() - self._at < self._ttl:
            return self._result
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        # shield: a caller that disconnects must not cancel the probe the others wait for
        return await asyncio.shield(self._running)

    async def _run(self) -> dict[str, bool]:
        try:
            self.probes += 1
            result = await self._probe()
            self._result, self._at = result, time.monotonic()
            return result
        finally:
            self._running = None
