"""Enforcing a `SiloPolicy` on each call: allowed callers, rate limit, daily cap, concurrency.

`SiloAdmission.admit(caller, method)` runs inside the transport's
authorizing wrapper, after identity, revocation and role are checked, and
raises `SiloError` to refuse: PERMISSION_DENIED for a caller the policy does
not list, RESOURCE_EXHAUSTED for a rate, cap or concurrency limit (nothing is
queued: a refused call costs the silo no model time). A request this policy
refuses does not count against the caller's rate or cap; one it admits does,
even if the silo then refuses it (a bad request, a model still loading), as
it took the silo's time. Counters live in memory: a restart
resets the day's count, which the audit log (not this counter) records.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable

from mor_secure.wire.errors import ErrorCode, SiloError

from .schema import SiloPolicy


class SiloAdmission:
    """The policy engine of one silo server."""

    def __init__(self, policy: SiloPolicy, *, clock: Callable[[], float] = time.monotonic,
                 today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.timezone.utc).date()) -> None:
        self.policy = policy
        self._clock, self._today = clock, today
        self._lock = threading.Lock()
        self._in_flight = 0
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, time)
        self._daily: dict[tuple[str, dt.date], int] = {}

    @property
    def max_concurrent_calls(self) -> int:
        """Calls admitted at once (each holds a server worker until it ends)."""
        return self.policy.max_concurrent_requests

    def admit(self, caller, method: str) -> Callable[[], None]:
        rpc = method.rsplit("/", 1)[-1]
        who = caller.identity.uri
        if who not in self.policy.allowed_callers.get(rpc, []):
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"{who} is not allowed to call {rpc} by this silo's policy")
        with self._lock:
            if self._in_flight >= self.policy.max_concurrent_requests:
                raise SiloError(ErrorCode.RESOURCE_EXHAUSTED, f"this silo serves at most "
                                f"{self.policy.max_concurrent_requests} requests at once; retry shortly")
            day = self._today()
            if self._daily.get((who, day), 0) >= self.policy.daily_cap:
                raise SiloError(ErrorCode.RESOURCE_EXHAUSTED, f"{who} has used its daily cap of "
                                f"{self.policy.daily_cap} requests (resets at 00:00 UTC)")
            rate = self.policy.rate_limit
            now = self._clock()
            tokens, then = self._buckets.get(who, (float(rate.burst), now))
            tokens = min(float(rate.burst), tokens + (now - then) * rate.per_second)
            if tokens < 1.0:
                raise SiloError(ErrorCode.RESOURCE_EXHAUSTED, f"{who} is over this silo's rate limit of "
                                f"{rate.per_second:g} requests/s (burst {rate.burst}); slow down")
            self._buckets[who] = (tokens - 1.0, now)
            self._daily[(who, day)] = self._daily.get((who, day), 0) + 1
            self._daily = {key: n for key, n in self._daily.items() if key[1] == day}
            self._in_flight += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                with self._lock:
                    self._in_flight -= 1

        return release
