"""Request-rate limits shared by every process of the orchestrator, with an in-process fallback.

A service that limits requests per project (Gemini: RPM per API key) needs one limit across
every process that calls it, not one per process. The orchestrator provides such limits by
attaching its `RateLimits` (flows/rate_limits.py: Prefect global concurrency limits with slot
decay) for the duration of a stage task, so nothing under tasks/ imports Prefect. Without one
(a plain `execute_stage`, tests), `rate_limiter` hands out a token bucket shared by the threads
of this process, keyed by the limit's name.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Protocol


class RateLimiter(Protocol):
    """Blocks until one more request may start."""

    def acquire(self) -> None: ...


class RateLimits(Protocol):
    """Where named limits live (flows/rate_limits.py: the Prefect API)."""

    def limiter(self, name: str, per_second: float, burst: int) -> RateLimiter: ...


class LocalRateLimiter:
    """A token bucket: `burst` requests at once, then `per_second` on average; thread-safe."""

    def __init__(self, per_second: float, burst: int):
        if not per_second > 0:
            raise ValueError(f"a rate limit needs per_second > 0, got {per_second}")
        self.per_second = per_second
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.per_second)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                wait_s = (1.0 - self._tokens) / self.per_second
            time.sleep(wait_s)


_provider: RateLimits | None = None
_local: dict[tuple[str, float, int], LocalRateLimiter] = {}
_local_lock = threading.Lock()


@contextmanager
def attached_rate_limits(provider: RateLimits) -> Iterator[None]:
    """Take named limits from `provider` inside the block."""
    global _provider
    previous, _provider = _provider, provider
    try:
        yield
    finally:
        _provider = previous


def local_rate_limiter(name: str, per_second: float, burst: int) -> LocalRateLimiter:
    """The process-wide bucket of this name and rate (every captioner of the process shares it)."""
    with _local_lock:
        key = (name, per_second, burst)
        if key not in _local:
            _local[key] = LocalRateLimiter(per_second, burst)
        return _local[key]


def rate_limiter(name: str, per_minute: float) -> RateLimiter:
    """The limit `name` of `per_minute` requests: the attached provider's, else this process's.

    The burst is one second's worth of requests (at least one), so a limit never lets a whole
    minute's quota through at once.
    """
    per_second = per_minute / 60.0
    burst = max(1, int(per_second))
    if _provider is not None:
        return _provider.limiter(name, per_second, burst)
    return local_rate_limiter(name, per_second, burst)
