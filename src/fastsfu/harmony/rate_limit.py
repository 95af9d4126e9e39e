"""Connection rate limit per remote address (docs/harmony.md#rate-limit), sans-I/O: a token bucket per address
with bounded memory. Both front-ends ask it before authenticating a new stream.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu.harmony.session import VoiceError


def address_key(address: str) -> str:
    """The bucket of an address: IPv4 as is, IPv6 by its /64 (one host usually owns a whole /64,
    so per-address buckets would not limit it); anything unparsable is its own key."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RateLimiter:
    """A token bucket per address: `burst` streams at once, then one more every `interval` seconds.

    Memory is bounded: a bucket that has refilled completely is forgotten (it is the same as a new
    one), and at most `max_addresses` buckets are kept (the least recently used goes first).
    """

    def __init__(
        self,
        burst: int,
        interval: float,
        max_addresses: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or not interval > 0 or max_addresses < 1:
            raise ValueError("rate limit: burst >= 1, interval > 0 and max_addresses >= 1 are required")
        self.burst = burst
        self.interval = interval
        self.max_addresses = max_addresses
        self.clock = clock
        self.rejected = 0  # streams refused so far (a metric)
        # key -> (tokens, time of last update), in order of last update (oldest first).
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, address: str) -> float:
        """Take one token for a new stream from `address`: 0.0 if allowed, else the seconds to wait."""
        now = self.clock()
        full_after = self.burst * self.interval
        # Buckets are ordered by last update, so the expired ones (surely full again) are in front.
        while self._buckets:
            _, (_, last) = next(iter(self._buckets.items()))
            if now - last < full_after:
                break
            self._buckets.popitem(last=False)
        key = address_key(address)
        entry = self._buckets.get(key)
        if entry is None:
            tokens = float(self.burst)
            if len(self._buckets) >= self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            tokens = min(float(self.burst), entry[0] + (now - entry[1]) / self.interval)
        if tokens < 1.0:
            self.rejected += 1
            # Not updated: a refused attempt costs nothing, so hammering does not extend the wait.
            return (1.0 - tokens) * self.interval
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        return 0.0


def rate_limited(retry_after: float) -> VoiceError:
    """hrpc.resource-exhausted with an hrpc.v1.RetryInfo (whole seconds, rounded up) in its details."""
    seconds = max(1, math.ceil(retry_after))
    info = hrpc_pb2.RetryInfo(retry_after=seconds).SerializeToString()
    return VoiceError(
        "hrpc.resource-exhausted", f"too many new streams from this address; retry in {seconds} s", info
    )
