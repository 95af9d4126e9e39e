"""The join storm's clients, in a process of their own (run.py pins it to the generator's CPU), so the
SUT's core does only the server's work: on each "start" line on stdin, RATE joins per second for
SECONDS, a --discord-share of them Discord voice joins through the SUT's gateway, the others WebRTC
joins whose server steps it asks for over the SUT's control socket (join_storm.py).

    storm_client.py --control PATH --rate 10 --seconds 30 [--hold 1] [--delay 0.5] [--discord-share 0.5]

WebRTC: an ICE check and the DTLS client handshake against the SUT's media port, then a producer
and consumers of the room. Discord: WebSocket HELLO, IDENTIFY, READY, IP discovery, SELECT_PROTOCOL
(aead_aes256_gcm_rtpsize), SESSION_DESCRIPTION, the room's members announced (op 5 for each), then
SPEAKING and a few sealed RTP packets. Each joiner leaves after --hold s. Prints READY once it has
the SUT's hello, `STORM {summary}` after each storm (the SUT adds its loop times), and a final JSON
line at EOF or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from discord_helpers import Observer, rtp_packet  # noqa: E402
from test_webrtc_transport import WebRtcClient  # noqa: E402

from fastsfu import stun  # noqa: E402
from fastsfu.dtls import DtlsCertificate  # noqa: E402
from fastsfu.harmony.auth import TokenAuth  # noqa: E402

JOIN_TIMEOUT_S = 10.0  # a join not set up by then fails
REQUEST_TIMEOUT_S = 15.0  # a control request not answered by then fails
MAX_LINE = 1 << 20
SSRC_BASE = 0x5E000000
DISCORD_USER_BASE = 1_000_000
DISCORD_PACKETS = 5
OPUS_FRAME = b"\xfc\xff" + bytes(60)  # a CELT frame's TOC and filler: Opus-shaped, never decoded


class StormError(Exception):
    """The SUT refused a control request, or a join went wrong (the message says where)."""


@dataclass
class RemoteTransport:
    """What WebRtcClient reads of a transport, here from the SUT's answer (a signaling offer)."""

    ice_parameters: dict[str, Any]
    ice_candidates: list[dict[str, Any]]
    dtls_parameters: dict[str, Any]


class StormClient(WebRtcClient):
    """The test client, but waiting for datagrams on the loop's reader instead of polling every
    2 ms: dozens of polling clients would load the generator's core far more than the joins do."""

    async def recv(self, timeout: float = 2.0) -> bytes | None:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        except TimeoutError:
            return None


class Control:
    """JSON lines over the SUT's UNIX socket: requests carry an id, answers come back in any order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, path: str) -> Control:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
        return cls(reader, writer)

    async def request(self, op: str, timeout: float = REQUEST_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        if self._task.done():
            raise ConnectionError("the SUT closed the control socket")
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            self.writer.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
            await self.writer.drain()
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            raise StormError(f"{op}: {reply.get('error')}")
        return reply

    async def _read(self) -> None:
        try:
            while line := await self.reader.readline():
                reply = json.loads(line)
                future = self._pending.get(reply.get("id"))
                if future is not None and not future.done():
                    future.set_result(reply)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the SUT closed the control socket"))

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class Storms:
    """Runs storms against one SUT; the SUT's hello says where its gateway is and who is in the room."""

    def __init__(self, control: Control, hello: dict[str, Any], args: argparse.Namespace) -> None:
        self.control = control
        self.args = args
        self.members = {str(u) for u in hello["members"]}
        self.gateway = str(hello["gateway"])
        self.server_id = str(hello["server_id"])
        self.auth = TokenAuth(hello["token_secret"])
        self.cert = DtlsCertificate.generate()  # one client certificate for every WebRTC joiner
        self.http = aiohttp.ClientSession()
        self._ssrc = itertools.count(SSRC_BASE)
        self._users = itertools.count(DISCORD_USER_BASE)

    async def close(self) -> None:
        await self.http.close()

    async def storm(self) -> dict[str, Any]:
        """One storm: a join every 1/rate s for `seconds`, then wait for all of them to leave; the
        SUT's summary of it (its loop times per join, with our outcomes and setup times)."""
        a = self.args
        await asyncio.sleep(a.delay)
        begin = {"rate": a.rate, "seconds": a.seconds, "hold_s": a.hold, "discord_share": a.discord_share}
        await self.control.request("storm_begin", **begin)
        loop = asyncio.get_running_loop()
        tasks = []
        start = loop.time()
        for i in range(round(a.rate * a.seconds)):
            delay = start + i / a.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # Discord for the share, spread evenly: join i is Discord when (i + 1) * share passes an integer.
            discord = int((i + 1) * a.discord_share) > int(i * a.discord_share)
            tasks.append(asyncio.ensure_future(self._discord() if discord else self._webrtc()))
        results = await asyncio.gather(*tasks)
        reply = await self.control.request("storm_end", results=results)
        return dict(reply["summary"])

    async def _webrtc(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            created = await self.control.request("webrtc_create")
        except (StormError, OSError, TimeoutError) as exc:
            return {"kind": "webrtc", "key": None, "ok": False, "error": _why(exc)}
        jid = created["join"]
        remote = RemoteTransport(
            created["ice_parameters"], created["ice_candidates"], created["dtls_parameters"]
        )
        client = StormClient(remote, self.cert)
        result: dict[str, Any] = {"kind": "webrtc", "key": jid, "ok": True}
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                client.check()
                data = await client.recv()
                if data is None or stun.parse_message(data).message_type != stun.BINDING_SUCCESS:
                    raise StormError("no STUN binding success")
                # The signaling channel's connect(): our DTLS fingerprint, we are the DTLS client.
                await self.control.request("webrtc_connect", join=jid, fingerprints=self.cert.fingerprints())
                await client.handshake(role_seen_by_server=None)
                await self.control.request("webrtc_produce", join=jid, ssrc=next(self._ssrc))
            result["setup_s"] = time.perf_counter() - t0
            await asyncio.sleep(self.args.hold)
        except Exception as exc:  # a failed join (e.g. a handshake timeout) is counted, not fatal
            result.update(ok=False, error=_why(exc))
        finally:
            try:
                await self.control.request("webrtc_close", join=jid)
            except (StormError, OSError, TimeoutError) as exc:
                if result["ok"]:
                    result.update(ok=False, error=_why(exc))
            client.sock.close()
        return result

    async def _discord(self) -> dict[str, Any]:
        user = next(self._users)
        result: dict[str, Any] = {"kind": "discord", "key": str(user), "ok": True}
        t0 = time.perf_counter()
        observer: Observer | None = None
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                observer = await Observer.join(
                    self.http,
                    self.gateway,
                    server_id=self.server_id,
                    user_id=user,
                    token=self.auth.mint(user),
                )
                description = await self._joined(observer)
            result["setup_s"] = time.perf_counter() - t0
            udp = observer.udp
            udp.key = bytes(description["secret_key"])
            await observer.ws.send_json({"op": 5, "d": {"speaking": 1, "delay": 0, "ssrc": udp.ssrc}})
            for seq in range(DISCORD_PACKETS):
                udp.send_rtp(rtp_packet(udp.ssrc, seq, OPUS_FRAME))
            await asyncio.sleep(self.args.hold)
        except Exception as exc:
            result.update(ok=False, error=_why(exc))
        finally:
            if observer is not None:
                try:
                    await observer.close()  # code 1000: a leave, the session ends at once
                except Exception as exc:
                    if result["ok"]:
                        result.update(ok=False, error=_why(exc))
        return result

    async def _joined(self, observer: Observer) -> dict[str, Any]:
        """SESSION_DESCRIPTION's d, once every member of the room has been announced (op 5): the
        join is then in the room, consuming its producers."""
        description: dict[str, Any] | None = None
        pending = set(self.members)
        seen = 0
        while True:
            for _, message in observer.received[seen:]:
                d = message.get("d")
                if message.get("op") == 4 and isinstance(d, dict):
                    description = d
                elif message.get("op") == 5 and isinstance(d, dict):
                    pending.discard(str(d.get("user_id")))
            seen = len(observer.received)
            if description is not None and not pending:
                return description
            await observer.wait_received(seen + 1, JOIN_TIMEOUT_S)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = await Control.open(args.control)
    storms = Storms(control, await control.request("hello"), args)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("READY", flush=True)
    summaries: list[dict[str, Any]] = []
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            line_task = asyncio.ensure_future(stdin.readline())
            await asyncio.wait({line_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not line_task.done():
                line_task.cancel()
                break
            line = line_task.result()
            if not line:
                break  # EOF: run.py went away
            if line.strip() != b"start":
                continue
            storm = asyncio.ensure_future(storms.storm())
            await asyncio.wait({storm, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not storm.done():
                storm.cancel()
                break
            try:
                summary = storm.result()
            except Exception as exc:  # reported, so run.py does not wait for a storm that failed
                summary = {"error": _why(exc)}
            summaries.append(summary)
            print("STORM " + json.dumps(summary), flush=True)
    finally:
        stopped.cancel()
        await storms.close()
        await control.close()
    return {"join_storms": summaries, "ok": all("error" not in s for s in summaries)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--control", required=True, help="the SUT's socket (sut_fastsfu.py --storm-control)")
    ap.add_argument("--rate", type=float, required=True, help="joins per second")
    ap.add_argument("--seconds", type=float, required=True, help="seconds of joining")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds a joiner stays [1]")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds from 'start' to the first join [0]")
    ap.add_argument("--discord-share", type=float, default=0.5, help="share of Discord joins, 0 to 1 [0.5]")
    ap.add_argument("--cpu", type=int, default=-1, help="CPU to pin to (-1: leave affinity alone) [-1]")
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.hold < 0 or args.delay < 0:
        ap.error("--rate and --seconds must be > 0, --hold and --delay >= 0")
    if not 0.0 <= args.discord_share <= 1.0:
        ap.error("--discord-share must be in [0, 1]")
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    final = asyncio.run(run(args))
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
