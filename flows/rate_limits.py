"""Prefect global concurrency limits as the shared rate limits of tasks/rate_limits.py.

Every process that runs stage tasks against the same Prefect API (a server, or the ephemeral
one over the same PREFECT_HOME database) draws from one limit per name, so two caption runs
together stay within the project's requests per minute. Each request takes one slot through
`prefect.concurrency.sync.rate_limit`, which needs a limit with slot decay: a missing limit is
created with the configured rate (limit = burst, slot_decay_per_second = rate); one that exists
is used as it is, so an operator can tune it in the UI or with `prefect gcl update`. Where the
API cannot be reached, or the limit has no decay, the run falls back to the in-process bucket
with a warning instead of failing.
"""

from __future__ import annotations

import logging
import threading

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import rate_limit
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.rate_limits import RateLimiter, local_rate_limiter

log = logging.getLogger("tok1d")


class PrefectRateLimiter:
    """One slot of the Prefect limit `name` per request; the in-process bucket if Prefect fails."""

    def __init__(self, name: str, per_second: float, burst: int):
        self.name = name
        self._fallback = local_rate_limiter(name, per_second, burst)
        self._failed = threading.Event()

    def acquire(self) -> None:
        if not self._failed.is_set():
            try:
                rate_limit(self.name, occupy=1, strict=True)
                return
            except Exception as error:  # API gone mid-run: keep limiting, in this process
                if not self._failed.is_set():
                    self._failed.set()
                    log.warning("rate limit %r: Prefect's API failed (%s); limiting within this process "
                                "from now on", self.name, type(error).__name__)
        self._fallback.acquire()


class PrefectRateLimits:
    """Named rate limits kept by the Prefect API this process talks to."""

    def limiter(self, name: str, per_second: float, burst: int) -> RateLimiter:
        try:
            decay = self._ensure(name, per_second, burst)
        except Exception as error:  # no reachable API: the limit still holds within this process
            log.warning("rate limit %r: Prefect's API is not reachable (%s); limiting within this process",
                        name, type(error).__name__)
            return local_rate_limiter(name, per_second, burst)
        if not decay:
            log.warning("rate limit %r: the Prefect concurrency limit of this name has no slot decay, so it "
                        "cannot limit a rate; limiting within this process (give it one with "
                        "`prefect gcl update %s --slot-decay-per-second %g`)", name, name, per_second)
            return local_rate_limiter(name, per_second, burst)
        return PrefectRateLimiter(name, per_second, burst)

    @staticmethod
    def _ensure(name: str, per_second: float, burst: int) -> float:
        """Create the limit if it does not exist; its slot decay per second."""
        with get_client(sync_client=True) as client:
            try:
                return client.read_global_concurrency_limit_by_name(name).slot_decay_per_second or 0.0
            except ObjectNotFound:
                pass
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=burst, slot_decay_per_second=per_second)
                )
                log.info("rate limit %r: created the Prefect concurrency limit (%d slots, %.3g/s decay)",
                         name, burst, per_second)
                return per_second
            except ObjectAlreadyExists:  # another process created it meanwhile
                return client.read_global_concurrency_limit_by_name(name).slot_decay_per_second or 0.0
