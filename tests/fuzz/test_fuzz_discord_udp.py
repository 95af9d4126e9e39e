"""Fuzz the Discord UDP transport in the datapath (rtpsize AEAD modes): sealed packets from an
independent implementation (tests/discord_helpers.py), mutated or random, never crash it; each
datagram is forwarded, handed to the slow path or counted as one drop; what it sends opens under
the receiver's key, and a genuine fresh packet arrives with its payload intact."""

from __future__ import annotations

import socket
import struct

from discord_helpers import ref_open, ref_seal, rtp_packet
from hypothesis import example, given
from hypothesis import strategies as st
from mutations import apply_edits, budget, corpus, edits

from fastsfu import _rtp
from fastsfu.discord.crypto import MODES, rtp_clear_length

SSRC, OUT_SSRC, PT = 1001, 2002, 120
KEY_A, KEY_B = bytes(range(32)), bytes(range(32, 64))
A, B = ("127.0.0.1", 7000), ("127.0.0.1", 7001)


def packets() -> list[bytes]:
    """Plain RTP as Discord clients send it: Opus PT 120, some with CSRCs or a one-byte extension."""
    out = []
    for seq in range(1, 25):
        ext = b"\x10\x85\x30\x01\x02\x03" if seq % 3 == 0 else b""
        out.append(rtp_packet(SSRC, seq, bytes([seq]) * (20 + seq), csrcs=seq % 2, extension=ext))
    return out


PLAIN = packets()
OTHER_SEEDS = [struct.pack("!HHI66x", 1, 70, SSRC), *corpus("discord_udp")]


def setup(mode_a: str, mode_b: str) -> tuple[_rtp.Datapath, int]:
    dp = _rtp.Datapath(max_sockets=2, max_transports=4, max_producers=4, max_consumers=4)
    dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
    sock = dp.add_socket(-1, socket.AF_INET, False)
    ta, tb = dp.add_transport(sock), dp.add_transport(sock)
    for t, (ip, port), mode, key in ((ta, A, mode_a, KEY_A), (tb, B, mode_b, KEY_B)):
        dp.set_transport_remote(t, ip, port)
        dp.set_transport_aead(t, _rtp.AeadContext(mode, key))
    p = dp.add_producer(ta, SSRC, PT, 48000, {})
    dp.add_consumer(p, tb, OUT_SSRC, PT, {})
    return dp, sock


INPUT = st.one_of(
    st.tuples(st.integers(0, len(PLAIN) - 1), st.integers(0, 200), edits(6)),
    st.tuples(st.just(-1), st.integers(0, len(OTHER_SEEDS) - 1), edits(6)),
    st.binary(max_size=120),
)


@budget(150)
@given(st.sampled_from(MODES), st.sampled_from(MODES), st.lists(INPUT, min_size=1, max_size=20))
# Found in CI: an authentic packet dropped as stale_seq still spends its nonce, so a later packet
# with that nonce is a replay (the oracle had thought it fresh).
@example("aead_aes256_gcm_rtpsize", "aead_aes256_gcm_rtpsize", [(1, 0, []), (0, 1, []), (2, 1, [])])
def test_discord_udp_datapath(mode_a: str, mode_b: str, inputs: list[tuple[int, int, list] | bytes]) -> None:
    dp, sock = setup(mode_a, mode_b)
    highest = highest_seq = -1  # the highest authentic nonce counter, the highest seq forwarded
    now = 10**12
    for item in inputs:
        if isinstance(item, bytes):
            data = item
        else:
            index, counter, edit_list = item
            if index >= 0:
                plain = PLAIN[index]
                sealed = ref_seal(mode_a, KEY_A, plain, rtp_clear_length(plain), counter)
                data = apply_edits(sealed, edit_list)
            else:
                data = apply_edits(OTHER_SEEDS[counter % len(OTHER_SEEDS)], edit_list)
        now += 20_000_000
        drops_before = sum(dp.drop_counts().values())
        slow = dp.process(sock, data, *A, now)
        outputs = dp.take_captured()
        dropped = sum(dp.drop_counts().values()) - drops_before
        # One outcome per datagram: forwarded to the one consumer, slow path, or one counted drop.
        assert (len(outputs), bool(slow), dropped) in ((1, False, 0), (0, True, 0), (0, False, 1)), (
            outputs,
            slow,
            dp.drop_counts(),
        )
        for _, to, sealed in outputs:
            assert to == B
            opened, _ = ref_open(mode_b, KEY_B, sealed, rtp_clear_length(sealed))
            assert struct.unpack_from("!I", opened, 8)[0] == OUT_SSRC
        genuine = _open(mode_a, data)
        if genuine is not None:
            plain, counter = genuine
            ssrc, seq = struct.unpack_from("!I", plain, 8)[0], struct.unpack_from("!H", plain, 2)[0]
            if ssrc == SSRC and plain[1] & 0x7F == PT and counter > highest and seq > highest_seq:
                # Authentic, a nonce newer than any authentic packet so far (an authentic packet
                # dropped as stale_seq still spent its nonce: the replay window saw it), and newer
                # than anything forwarded (older is stale_seq).
                assert len(outputs) == 1, dp.drop_counts()
                opened, _ = ref_open(mode_b, KEY_B, outputs[0][2], rtp_clear_length(outputs[0][2]))
                assert opened[-10:] == plain[-10:]  # the Opus payload's tail, untouched
            highest = max(highest, counter)
            if outputs:
                highest_seq = max(highest_seq, seq)


def _open(mode: str, data: bytes) -> tuple[bytes, int] | None:
    """The packet as the reference implementation opens it, or None."""
    try:
        return ref_open(mode, KEY_A, data, rtp_clear_length(data))
    except Exception:
        return None
