"""One request and token budget for every worker on every node: a Ray actor doing GCRA.

Each call reserves a start time for one request of ``tokens`` estimated tokens and returns how long
the caller must wait. Requests are spaced ``60 / rpm`` seconds apart and tokens ``60 / tpm`` seconds
each (the generic cell rate algorithm), with ``burst_s`` of credit after idle time, so over any
window of W seconds at most ``(W + burst_s) * rpm / 60`` requests start.

    tat (theoretical arrival time) ──┐
    start = max(now, tat_r - burst, tat_t - burst, paused_until)
    tat_r = max(tat_r, start) + 60/rpm ;  tat_t = max(tat_t, start) + tokens * 60/tpm

After a 429 any caller calls ``backoff(seconds)``: the whole fleet waits, not only the unlucky one.
Token estimates are reconciled from the reply's ``usage``.
"""

from __future__ import annotations

import time

import ray


class GCRABudget:
    """The arithmetic, separate from Ray so it can be tested and reused in one process."""

    def __init__(self, rpm: int = 0, tpm: int = 0, burst_s: float = 0.5, clock=time.monotonic):
        self.clock = clock
        self.rpm, self.tpm, self.burst_s = rpm, tpm, burst_s
        now = clock()
        self.tat_requests = self.tat_tokens = now
        self.paused_until = now
        self.granted = 0
        self.backoffs = 0
        self.backoff_seconds = 0.0

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm)

    def reserve(self, tokens: int = 0) -> float:
        now = self.clock()
        start = max(now, self.paused_until)
        if self.rpm:
            start = max(start, self.tat_requests - self.burst_s)
        if self.tpm:
            start = max(start, self.tat_tokens - self.burst_s)
        if self.rpm:
            self.tat_requests = max(self.tat_requests, start) + 60.0 / self.rpm
        if self.tpm:
            self.tat_tokens = max(self.tat_tokens, start) + tokens * 60.0 / self.tpm
        self.granted += 1
        return start - now

    def reconcile(self, estimated: int, actual: int) -> None:
        if self.tpm:
            self.tat_tokens += (actual - estimated) * 60.0 / self.tpm

    def backoff(self, seconds: float) -> None:
        until = self.clock() + seconds
        if until > self.paused_until:
            self.paused_until = until
            self.backoffs += 1
            self.backoff_seconds += seconds

    def learn(self, rpm: int, tpm: int) -> None:
        """Adopt limits the API announced (``x-ratelimit-limit-*``) when none were configured."""
        if rpm and not self.rpm:
            self.rpm = rpm
            self.tat_requests = self.clock()
        if tpm and not self.tpm:
            self.tpm = tpm
            self.tat_tokens = self.clock()

    def stats(self) -> dict:
        return {"rpm": self.rpm, "tpm": self.tpm, "granted": self.granted, "backoffs": self.backoffs,
                "backoff_seconds": round(self.backoff_seconds, 3)}


@ray.remote(num_cpus=0, max_concurrency=1)
class RateBudget(GCRABudget):
    """The shared budget as a Ray actor; calls are served one at a time, in order."""


def create_budget(rpm: int, tpm: int, burst_s: float, learn: bool):
    """A budget actor for this job, or None when there is no limit and none is to be learned."""
    if not (rpm or tpm or learn):
        return None
    return RateBudget.remote(rpm, tpm, burst_s)
