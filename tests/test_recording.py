"""Recording through real sockets (docs/recording.md): an SRTP client sends a tone to a
PlainTransport, the recorder writes Ogg Opus, opusdec decodes it. Gaps, loss, reordering and wraps;
the size and duration caps; a disk that fills up while forwarding goes on."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from discord_clients import opus_tone_frames
from helpers import SrtpClient, client_caps, producer_params
from recording_helpers import check_structure, decode, decode_ffmpeg, dominant_hz, needs_opusdec, rms

from fastsfu import Engine, Recorder, RecorderOptions, Settings
from fastsfu.plain_transport import PlainTransport
from fastsfu.producer import Producer
from fastsfu.rooms import Rooms
from fastsfu.router import Router
from fastsfu.rtp import RtpPacket
from fastsfu.server.recordings import RecordingCollector, Recordings

pytestmark = [pytest.mark.loopback, needs_opusdec]

SSRC = 4242
FRAME = 960


def run(coro: object, timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def speaker(
    settings: Settings | None = None, make_router: Callable[[Engine], Router] | None = None
) -> AsyncIterator[tuple[Router, SrtpClient, PlainTransport, Producer]]:
    async with Engine(settings or Settings()) as engine:
        router = make_router(engine) if make_router else engine.create_router()
        client = SrtpClient()
        t = router.create_plain_transport(enable_srtp=True)
        t.connect("127.0.0.1", client.port, client.srtp_parameters)
        client.set_server_parameters(t.srtp_parameters)  # type: ignore[arg-type]
        producer = t.produce(producer_params(SSRC))
        try:
            yield router, client, t, producer
        finally:
            client.close()


async def send(
    client: SrtpClient,
    t: PlainTransport,
    frames: list[bytes],
    *,
    seq0: int = 0,
    ts0: int = 0,
    gap_at: int = -1,
    gap_frames: int = 0,
    lose: frozenset[int] = frozenset(),
    swap: frozenset[int] = frozenset(),
    duplicate: frozenset[int] = frozenset(),
) -> None:
    """Frames every 20 ms in real time. Before frame `gap_at` nothing is sent for `gap_frames`
    frames while the timestamp runs on (DTX, a muted speaker); `lose`: frames never sent; `swap`:
    frame i goes after frame i+1; `duplicate`: frame i is sent twice."""
    server = (t.tuple["localIp"], t.tuple["localPort"])
    loop = asyncio.get_running_loop()
    start = loop.time()
    slot, held = 0, None
    for i, frame in enumerate(frames):
        if i == gap_at:
            slot += gap_frames
        seq = (seq0 + i) & 0xFFFF
        ts = (ts0 + slot * FRAME) & 0xFFFFFFFF
        packet = RtpPacket(111, seq, ts, SSRC, payload=frame)
        await asyncio.sleep(max(0.0, start + slot * 0.02 - loop.time()))
        slot += 1
        if i in lose:
            continue
        if i in swap:
            held = packet
            continue
        client.send_rtp(server, packet)
        if i in duplicate:
            client.send_rtp(server, packet)
        if held is not None:
            client.send_rtp(server, held)
            held = None


def durations(paths: list[str], tmp_path: Path) -> list[float]:
    out = []
    for path in paths:
        check_structure(Path(path))
        out.append(len(decode(Path(path), tmp_path)) / 48000)
    return out


def test_tone_gap_loss_reorder_and_wraps_decode_to_the_sent_timeline(tmp_path: Path) -> None:
    """1 s of 440 Hz, 0.6 s with nothing sent (timestamps run on), 1 s of 880 Hz; three packets
    lost, one pair swapped, one duplicated; the sequence number and the timestamp both wrap."""
    low, high = opus_tone_frames(50, 440.0), opus_tone_frames(50, 880.0)

    async def main() -> None:
        async with speaker() as (router, client, t, producer):
            recorder = router.create_recorder(str(tmp_path / "rec"))
            recorder.add_producer(producer, label="alice")
            await send(
                client,
                t,
                low + high,
                seq0=65500,  # wraps at frame 36
                ts0=(1 << 32) - 30 * FRAME,  # wraps at frame 30
                gap_at=50,
                gap_frames=30,
                lose=frozenset({10, 60, 61}),
                swap=frozenset({20, 70}),
                duplicate=frozenset({40}),
            )
            await asyncio.sleep(0.3)
            stats = recorder.stats()
            recorder.close()
            await recorder.wait_closed()
            assert recorder.close_reason == "close"
            # SRTP's replay check drops the duplicate; the swapped pairs were put back in order.
            assert router.engine.stats()["drops"]["srtp_replay"] == 1 and stats["late"] == 0
            assert stats["ring_full"] == 0 and stats["malformed"] == 0
            files = recorder.files
        assert len(files) == 1 and Path(files[0]).name.startswith("alice-")
        pcm = decode(Path(files[0]), tmp_path)
        sent = (50 + 30 + 50) * FRAME / 48000
        assert abs(len(pcm) / 48000 - sent) <= 0.01 * sent, (len(pcm) / 48000, sent)
        assert dominant_hz(pcm, 0.5) == 440
        assert rms(pcm, 1.25, 0.3) < 0.05 * rms(pcm, 0.5, 0.3)  # the gap decodes as silence
        assert dominant_hz(pcm, 2.1) == 880
        other = decode_ffmpeg(Path(files[0]))  # FFmpeg reads the same timeline
        assert abs(len(other) - len(pcm)) <= 480 and dominant_hz(other, 2.1) == 880
        assert rms(other, 1.25, 0.3) < 0.05 * rms(other, 0.5, 0.3)

    run(main())


def test_size_cap_rotates_files_each_within_the_cap(tmp_path: Path) -> None:
    frames = opus_tone_frames(100, 660.0, bitrate=64000)
    cap = 8192

    async def main() -> None:
        async with speaker() as (router, client, t, producer):
            recorder = router.create_recorder(str(tmp_path), RecorderOptions(max_file_bytes=cap))
            recorder.add_producer(producer)
            await send(client, t, frames)
            await asyncio.sleep(0.3)
            producer.close()  # the speaker leaves: its file ends
            await asyncio.sleep(0.05)
            assert recorder.producer_ids == [] and not recorder.closed
            recorder.close()
            await recorder.wait_closed()
            files = recorder.files
        assert len(files) >= 2
        assert all(os.path.getsize(f) <= cap for f in files)
        total = sum(durations(files, tmp_path))
        assert abs(total - 2.0) <= 0.02, total
        assert dominant_hz(decode(Path(files[-1]), tmp_path), 0.05) == 660

    run(main())


def test_duration_cap_stops_that_speaker(tmp_path: Path) -> None:
    frames = opus_tone_frames(100, 440.0)

    async def main() -> None:
        async with speaker() as (router, client, t, producer):
            options = RecorderOptions(max_file_seconds=1.0, on_cap="stop")
            recorder = router.create_recorder(str(tmp_path), options)
            recorder.add_producer(producer)
            await send(client, t, frames)
            await asyncio.sleep(0.3)
            recorder.close()
            await recorder.wait_closed()
            files = recorder.files
        assert len(files) == 1
        (seconds,) = durations(files, tmp_path)
        assert abs(seconds - 1.0) <= 0.01, seconds

    run(main())


@contextlib.contextmanager
def small_disk(path: Path, free: int) -> Iterator[Path]:
    """A 256 KiB tmpfs at `path` with about `free` bytes left (needs root, as CI runs)."""
    path.mkdir()
    try:
        mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)]
        subprocess.run(mount, check=True, timeout=10)
    except (subprocess.CalledProcessError, FileNotFoundError):
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    try:
        st = os.statvfs(path)
        filler = st.f_bavail * st.f_frsize - free
        (path / "filler").write_bytes(b"\0" * filler)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def test_full_disk_stops_the_recording_and_forwarding_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's room recording (fastsfu.server.recordings) on a disk that fills up: the
    recording stops with one logged error and one counted in the metrics; forwarding goes on."""
    frames = opus_tone_frames(150, 440.0, bitrate=64000)
    key = ("room", 1)
    registry: list[Rooms] = []

    def room_router(engine: Engine) -> Router:
        registry.append(Rooms(engine))
        return registry[0].acquire(key).router

    async def main() -> None:
        with small_disk(tmp_path / "disk", 8192) as disk:
            async with speaker(make_router=room_router) as (router, client, t, producer):
                listener = SrtpClient()
                lt = router.create_plain_transport(enable_srtp=True)
                lt.connect("127.0.0.1", listener.port, listener.srtp_parameters)
                listener.set_server_parameters(lt.srtp_parameters)  # type: ignore[arg-type]
                lt.consume(producer.id, client_caps(opus_pt=100))
                recordings = Recordings(registry[0], str(disk), RecorderOptions())
                recorder = recordings.start(key)
                assert recorder.producer_ids == [producer.id]
                closed: list[str] = []
                recorder.observer.on("close", closed.append)
                sending = asyncio.create_task(send(client, t, frames))
                for _ in range(300):
                    if recorder.closed:
                        break
                    await asyncio.sleep(0.02)
                assert closed == ["error"]
                assert recorder.error is not None and recorder.error.errno == errno.ENOSPC
                # Forwarding is untouched: the listener hears the packets sent after the error.
                got = await listener.receive_rtp(20, 3)
                assert len(got) == 20
                await sending
                listener.close()
                await recordings.close()
                metrics = {
                    sample.name: sample.value
                    for family in RecordingCollector(recordings).collect()
                    for sample in family.samples
                }
                assert metrics["fastsfu_recording_errors_total"] == 1
                assert metrics["fastsfu_recordings"] == 0 and metrics["fastsfu_recording_files_total"] == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "No space left" in errors[0], caplog.text

    run(main())


def test_a_full_tap_is_a_counted_drop(tmp_path: Path) -> None:
    frames = opus_tone_frames(40, 440.0)

    async def main() -> None:
        async with speaker(Settings(datapath_thread=False)) as (router, client, t, producer):
            recorder = router.create_recorder(str(tmp_path), RecorderOptions(tap_slots=16, interval=5))
            recorder.add_producer(producer)
            server = (t.tuple["localIp"], t.tuple["localPort"])
            for i, frame in enumerate(frames):
                client.send_rtp(server, RtpPacket(111, i, i * FRAME, SSRC, payload=frame))
            await asyncio.sleep(0.3)
            stats = recorder.stats()
            assert stats["tap_packets"] == 16 and stats["ring_full"] == 24
            recorder.close()
            await recorder.wait_closed()

    run(main())


def test_recorder_of_a_closing_router_ends_its_files(tmp_path: Path) -> None:
    frames = opus_tone_frames(25, 440.0)

    async def main() -> None:
        async with speaker() as (router, client, t, producer):
            recorder: Recorder = router.create_recorder(str(tmp_path), record_all=True)
            assert recorder.producer_ids == [producer.id]
            await send(client, t, frames)
            await asyncio.sleep(0.2)
            router.close()
            assert recorder.closed and recorder.close_reason == "routerclose"
            await recorder.wait_closed()
            (seconds,) = durations(recorder.files, tmp_path)
            assert abs(seconds - 0.5) <= 0.005

    run(main())


def test_remove_producer_ends_its_file_and_close_leaves_no_listeners(tmp_path: Path) -> None:
    first, later = opus_tone_frames(25, 440.0), opus_tone_frames(15, 440.0)

    async def main() -> None:
        async with speaker() as (router, client, t, producer):
            before = (
                router.observer.listener_count("close"),
                router.observer.listener_count("newtransport"),
                t.observer.listener_count("newproducer"),
                producer.observer.listener_count("close"),
            )
            recorder = router.create_recorder(str(tmp_path), record_all=True)
            done: list[str] = []
            recorder.observer.on("filedone", done.append)
            await send(client, t, first)
            await asyncio.sleep(0.2)
            recorder.remove_producer(producer)
            assert done == recorder.files and recorder.producer_ids == []
            await send(client, t, later, seq0=25, ts0=25 * FRAME)  # not recorded any more
            recorder.close()
            await recorder.wait_closed()
            after = (
                router.observer.listener_count("close"),
                router.observer.listener_count("newtransport"),
                t.observer.listener_count("newproducer"),
                producer.observer.listener_count("close"),
            )
            assert after == before
            (seconds,) = durations(recorder.files, tmp_path)
            assert abs(seconds - 0.5) <= 0.005

    run(main())
