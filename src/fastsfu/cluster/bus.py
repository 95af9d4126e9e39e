"""The one NATS connection of a node (docs/cluster.md#the-bus): connect with bounded timeouts,
publish and subscribe JSON messages, the key-value buckets, and counts of requests and failures.
The only module that imports `nats`."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import APIError, KeyNotFoundError, KeyValueError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

# The key-value answers the registry handles (re-exported: no other module imports nats).
__all__ = ["Bus", "BusError", "KeyNotFoundError", "KeyValue", "KeyWrongLastSequenceError"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # seconds for one connection attempt
REQUEST_TIMEOUT = 2.0  # seconds for a JetStream (KV) operation
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's error codes for a failed expected-last-sequence


async def _connection_error(exc: Exception) -> None:
    """nats-py's report of a connection error (it reconnects by itself): one line, no traceback."""
    log.debug("NATS connection: %s", exc)


class BusError(Exception):
    """The bus could not do it (down, timed out, refused): the caller turns it into a clear error."""


class Bus:
    """A connected NATS client. `requests` and `failures` count the operations that needed the
    server's answer (KV reads and writes), for the node's metrics."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        self.requests = 0
        self.failures = 0

    @classmethod
    async def connect(cls, url: str, name: str) -> Bus:
        """Connect to `url`; NATS reconnects by itself afterwards (media never waits for it)."""
        try:
            nc = await nats.connect(
                url,
                name=name,
                connect_timeout=CONNECT_TIMEOUT,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )
        except Exception as exc:  # nats raises its own errors and OSError alike
            raise BusError(f"cannot connect to NATS at {url}: {exc}") from exc
        return cls(nc)

    async def bucket(self, name: str, ttl: float | None = None) -> KeyValue:
        """The key-value bucket `name` (created if absent; every node asks with the same settings)."""
        kv: KeyValue = await self.call(self.js.create_key_value(bucket=name, ttl=ttl, history=1))
        return kv

    async def call(self, op: Awaitable[Any]) -> Any:
        """Await one bus operation, counted; its failure (other than a KV's own answers, which the
        caller handles) becomes BusError."""
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
        except Exception as exc:
            self.failures += 1
            raise BusError(str(exc) or type(exc).__name__) from exc

    @staticmethod
    def encode(message: dict[str, object]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes) -> dict[str, Any]:
        """A JSON object of this version (ValueError for anything else)."""
        message = json.loads(data)
        if not isinstance(message, dict) or message.get("v") != 1:
            raise ValueError("not a v1 message")
        return message

    async def publish(self, subject: str, message: dict[str, object]) -> None:
        try:
            await self.nc.publish(subject, self.encode(message))
        except Exception as exc:  # closed or reconnecting with a full buffer
            self.failures += 1
            raise BusError(str(exc) or type(exc).__name__) from exc

    async def subscribe(self, subject: str, handler: Callable[[object], None]) -> None:
        """Call `handler` with each JSON message on `subject`; a message that is not JSON is dropped."""

        async def on_msg(msg: Msg) -> None:
            try:
                data = json.loads(msg.data)
            except ValueError:
                log.debug("dropped a message on %s that is not JSON", subject)
                return
            handler(data)

        await self.nc.subscribe(subject, cb=on_msg)
        await self.call(self.nc.flush(timeout=round(REQUEST_TIMEOUT)))  # the server has the interest now

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
