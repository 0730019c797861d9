"""Token buckets keyed by client or kiosk, for the API and for MQTT ingest."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def delay(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self._burst), now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) / self._rate
            self._buckets[key] = (tokens - 1, now)
            return 0.0
