"""The one NATS connection of a node (docs/cluster.md#the-bus): connect with bounded timeouts,
publish and subscribe JSON messages, the key-value buckets, and counts of requests and failures.
The only module that imports `nats`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import APIError, KeyNotFoundError, KeyValueError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from fastsfu.cluster.placement import loads_shallow

# The key-value answers the registry handles (re-exported: no other module imports nats).
__all__ = ["Bus", "BusError", "KeyNotFoundError", "KeyValue", "KeyWrongLastSequenceError", "NoResponders"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # seconds for one connection attempt
REQUEST_TIMEOUT = 2.0  # seconds for a JetStream (KV) operation
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's error codes for a failed expected-last-sequence
STREAM_EXISTS = 10058  # JetStream: the stream exists with another configuration (e.g. its replicas)
CANNOT_REPLICATE = (10074, 10023)  # JetStream: not clustered / not enough servers for the replicas
MAX_REPLICAS = 3  # of the rooms bucket, when the NATS cluster has that many JetStream servers


async def _connection_error(exc: Exception) -> None:
    """nats-py's report of a connection error (it reconnects by itself): one line, no traceback."""
    log.debug("NATS connection: %s", exc)


class BusError(Exception):
    """The bus could not do it (down, timed out, refused): the caller turns it into a clear error."""


class NoResponders(BusError):
    """Nobody listens on the subject of a request (e.g. its node is reconnecting): nothing was done."""


class Bus:
    """A connected NATS client. `requests` and `failures` count the operations that needed the
    server's answer (KV reads and writes), for the node's metrics."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        self.requests = 0
        self.failures = 0
        self.dropped: Counter[str] = Counter()  # messages ignored, by the kind of subject they came on
        self.outages = 0  # connections lost so far (a node hears nothing while one lasts)
        self.resumed_at = time.monotonic()  # when the connection was last (re-)established

    @classmethod
    async def connect(cls, url: str, name: str) -> Bus:
        """Connect to the servers in `url` (one URL, or several separated by commas: the servers of
        one NATS cluster, tried in turn); NATS reconnects by itself afterwards, to any of them or of
        the cluster's other servers (media never waits for it)."""
        servers = [u.strip() for u in url.split(",") if u.strip()]
        holder: list[Bus] = []

        async def disconnected() -> None:
            if holder:
                holder[0].outages += 1

        async def reconnected() -> None:
            if holder:
                holder[0].resumed_at = time.monotonic()

        try:
            # Bounded here: with unlimited reconnects nats-py retries a first connection forever.
            nc = await asyncio.wait_for(
                nats.connect(
                    servers,
                    name=name,
                    connect_timeout=CONNECT_TIMEOUT,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=_connection_error,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                ),
                CONNECT_TIMEOUT * len(servers) + 1.0,
            )
        except Exception as exc:  # nats raises its own errors and OSError alike
            raise BusError(f"cannot connect to NATS at {url}: {str(exc) or 'no server answered'}") from exc
        holder.append(cls(nc))
        return holder[0]

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def drop(self, kind: str, why: object) -> None:
        """Count and ignore a message that is not one this version understands (never raised)."""
        self.dropped[kind] += 1
        log.debug("dropped a %s message: %s", kind, why)

    async def bucket(self, name: str, ttl: float | None = None) -> KeyValue:
        """The key-value bucket `name`, created if absent: replicated on MAX_REPLICAS servers when
        the NATS cluster has them (a server lost loses no room), else on one; an existing bucket is
        used as it is, whatever replicas it was created with."""
        for replicas in (MAX_REPLICAS, 1):
            try:
                kv: KeyValue = await self.call(
                    # direct: any replica answers a read (a read goes on while a leader is elected)
                    self.js.create_key_value(bucket=name, ttl=ttl, history=1, replicas=replicas, direct=True)
                )
                return kv
            except BusError as exc:
                code = getattr(exc.__cause__, "err_code", None)
                if code != STREAM_EXISTS and (code not in CANNOT_REPLICATE or replicas == 1):
                    raise
                self.failures -= 1  # an answer that says which bucket to use, not a failure
                if code == STREAM_EXISTS:
                    opened: KeyValue = await self.call(self.js.key_value(name))
                    return opened
        raise AssertionError("unreachable")

    async def call(self, op: Awaitable[Any]) -> Any:
        """Await one bus operation, counted; its failure (other than a KV's own answers, which the
        caller handles) becomes BusError. While the connection is being re-established nats-py
        holds the request, so a server lost from a cluster costs no failure; an outage costs
        REQUEST_TIMEOUT."""
        self.requests += 1
        try:
            return await op
        except KeyValueError:  # an answer (no such key, wrong revision), not a failure
            raise
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:  # a compare-and-set lost (e.g. a delete's)
                raise KeyWrongLastSequenceError(description=exc.description) from exc
            self.failures += 1
            raise BusError(str(exc)) from exc
        except NoRespondersError as exc:
            self.failures += 1
            raise NoResponders(str(exc) or "no responders") from exc
        except Exception as exc:
            self.failures += 1
            raise BusError(str(exc) or type(exc).__name__) from exc

    @staticmethod
    def encode(message: dict[str, object]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode()

    @staticmethod
    def loads(data: bytes) -> Any:
        """JSON (ValueError for anything else, deep nesting included, refused before parsing)."""
        return loads_shallow(data)

    @staticmethod
    def decode(data: bytes) -> dict[str, Any]:
        """A JSON object of this version (ValueError for anything else)."""
        message = Bus.loads(data)
        if not isinstance(message, dict) or message.get("v") != 1:
            raise ValueError("not a v1 message")
        return message

    async def publish(self, subject: str, message: dict[str, object]) -> None:
        try:
            await self.nc.publish(subject, self.encode(message))
        except Exception as exc:  # closed or reconnecting with a full buffer
            self.failures += 1
            raise BusError(str(exc) or type(exc).__name__) from exc

    async def subscribe(self, subject: str, kind: str, handler: Callable[[object], None]) -> None:
        """Call `handler` with each JSON message on `subject`; a message that is not JSON, or that
        `handler` refuses (ValueError), is counted as a drop of `kind`."""

        async def on_msg(msg: Msg) -> None:
            try:
                handler(self.loads(msg.data))
            except ValueError as exc:  # also UnicodeDecodeError
                self.drop(kind, exc)

        await self.nc.subscribe(subject, cb=on_msg)
        await self.flush(REQUEST_TIMEOUT)  # the server has the interest now

    async def flush(self, timeout: float) -> None:
        """Return once the server has every command given so far (BusError if not in `timeout` s
        per round trip). nats-py writes flush()'s PING straight to the socket, ahead of commands
        still queued for its flusher task (a SUB, a PUB), so its PONG can come back before they
        arrive: another node's message published in between then misses a new subscription. The
        flusher runs before that PONG is read, so a second round trip follows the queued commands."""
        for _ in range(2):
            await self.call(self.nc.flush(timeout=max(1, round(timeout))))

    async def close(self) -> None:
        """Drain (flush what is pending) when connected, else just close."""
        if self.nc.is_closed:
            return
        if self.nc.is_connected:
            try:
                await self.nc.drain()
                return
            except Exception as exc:  # the connection went away meanwhile
                log.debug("NATS drain failed: %s", exc)
        try:
            await self.nc.close()
        except Exception as exc:  # a lost connection's flush fails; closed all the same
            log.debug("NATS close: %s", exc)
