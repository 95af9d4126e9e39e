"""Typed shapes of fastsfu's JSON: mediasoup v3's RTP/ICE/DTLS/SRTP types (same names, same optional
keys) and the dicts that get_stats(), dump() and Engine.stats() return."""

from typing import Literal, NotRequired, TypedDict

__all__ = [
    "ConsumerDump",
    "ConsumerStats",
    "DatapathConsumerStats",
    "DatapathProducerStats",
    "DatapathStats",
    "DatapathTransportStats",
    "DtlsFingerprint",
    "DtlsParameters",
    "DtlsRole",
    "EngineStats",
    "IceCandidate",
    "IceParameters",
    "MediaKind",
    "PlainTransportDump",
    "ProducerDump",
    "ProducerStats",
    "RouterDump",
    "RtcpFeedback",
    "RtcpParameters",
    "RtpCapabilities",
    "RtpCodecCapability",
    "RtpCodecParameters",
    "RtpEncodingParameters",
    "RtpEncodingRtx",
    "RtpHeaderExtension",
    "RtpHeaderExtensionDirection",
    "RtpHeaderExtensionParameters",
    "RtpParameters",
    "SrtpParameters",
    "TransportStats",
    "TransportTuple",
    "WebRtcTransportDump",
]

MediaKind = Literal["audio", "video"]
RtpHeaderExtensionDirection = Literal["sendrecv", "sendonly", "recvonly", "inactive"]
DtlsRole = Literal["auto", "client", "server"]
# fmtp-style codec/extension parameters (RFC 8866 §6.15): validation admits strings and numbers.
CodecParameters = dict[str, str | int | float]

# ---------------------------------------------------------------- RTP (mediasoup RtpParameters.ts)


class RtcpFeedback(TypedDict):
    type: str
    parameter: NotRequired[str]


class RtpCodecCapability(TypedDict):
    kind: MediaKind
    mimeType: str
    preferredPayloadType: NotRequired[int]
    clockRate: int
    channels: NotRequired[int]
    parameters: NotRequired[CodecParameters]
    rtcpFeedback: NotRequired[list[RtcpFeedback]]


class RtpHeaderExtension(TypedDict):
    # "" (any kind) is what older mediasoup v3 payloads send; validation accepts it.
    kind: MediaKind | Literal[""]
    uri: str
    preferredId: int
    preferredEncrypt: NotRequired[bool]
    direction: NotRequired[RtpHeaderExtensionDirection]


class RtpCapabilities(TypedDict):
    codecs: NotRequired[list[RtpCodecCapability]]
    headerExtensions: NotRequired[list[RtpHeaderExtension]]


class RtpCodecParameters(TypedDict):
    mimeType: str
    payloadType: int
    clockRate: int
    channels: NotRequired[int]
    parameters: NotRequired[CodecParameters]
    rtcpFeedback: NotRequired[list[RtcpFeedback]]


class RtpHeaderExtensionParameters(TypedDict):
    uri: str
    id: int
    encrypt: NotRequired[bool]
    parameters: NotRequired[CodecParameters]


class RtpEncodingRtx(TypedDict):
    ssrc: int


class RtpEncodingParameters(TypedDict):
    ssrc: NotRequired[int]
    rid: NotRequired[str]
    codecPayloadType: NotRequired[int]
    rtx: NotRequired[RtpEncodingRtx]
    dtx: NotRequired[bool]
    scalabilityMode: NotRequired[str]
    scaleResolutionDownBy: NotRequired[float]
    maxBitrate: NotRequired[float]


class RtcpParameters(TypedDict):
    cname: NotRequired[str]
    reducedSize: NotRequired[bool]


class RtpParameters(TypedDict):
    mid: NotRequired[str]
    codecs: list[RtpCodecParameters]
    headerExtensions: NotRequired[list[RtpHeaderExtensionParameters]]
    encodings: NotRequired[list[RtpEncodingParameters]]
    rtcp: NotRequired[RtcpParameters]


# ---------------------------------------------------------------- transports


class IceParameters(TypedDict):
    usernameFragment: str
    password: str
    iceLite: NotRequired[bool]


class IceCandidate(TypedDict):
    foundation: str
    priority: int
    ip: str  # mediasoup keeps it next to `address` (deprecated there, same value)
    address: str
    protocol: Literal["udp", "tcp"]
    port: int
    type: Literal["host"]
    tcpType: NotRequired[Literal["passive"]]


class DtlsFingerprint(TypedDict):
    algorithm: str
    value: str


class DtlsParameters(TypedDict):
    role: NotRequired[DtlsRole]
    fingerprints: list[DtlsFingerprint]


class SrtpParameters(TypedDict):
    cryptoSuite: str
    keyBase64: str


class TransportTuple(TypedDict):
    localIp: str
    localAddress: str
    localPort: int
    remoteIp: NotRequired[str]
    remotePort: NotRequired[int]
    protocol: Literal["udp", "tcp"]


# ---------------------------------------------------------------- get_stats() and dump()


class TransportStats(TypedDict):
    """One entry of `transport.get_stats()`; the keys after `drops` belong to one transport class."""

    type: str
    transportId: str
    timestamp: int  # ms since the Unix epoch
    rtpPacketsReceived: int
    bytesReceived: int
    rtpPacketsSent: int
    bytesSent: int
    rtcpPacketsReceived: int
    rtcpPacketsMalformed: int
    rtcpPacketsByType: dict[int, int]
    drops: dict[str, int]
    # WebRtcTransport
    iceRole: NotRequired[str]
    iceState: NotRequired[str]
    dtlsState: NotRequired[str]
    iceSelectedTuple: NotRequired[TransportTuple | None]
    iceCounters: NotRequired[dict[str, int]]
    dtlsCounters: NotRequired[dict[str, int]]
    controlSendFailures: NotRequired[int]  # ICE/DTLS datagrams the socket refused
    # DiscordUdpTransport
    mode: NotRequired[str | None]
    ssrc: NotRequired[int]
    remote: NotRequired[list[str | int] | None]
    discoveries: NotRequired[int]
    discoveriesRefused: NotRequired[int]
    remoteMoves: NotRequired[int]
    keepalives: NotRequired[int]


class ProducerStats(TypedDict):
    type: Literal["inbound-rtp"]
    kind: MediaKind
    ssrc: int
    mimeType: str
    packetCount: int
    byteCount: int
    packetsLost: int
    jitter: int  # RTP timestamp units (RFC 3550 §6.4.1)
    highestSequenceNumber: int | None
    packetsDiscarded: int
    activeConsumers: int
    redPacketCount: int  # of packetCount, Opus RED (docs/transports.md#opus-red)


class ConsumerStats(TypedDict):
    type: Literal["outbound-rtp"]
    kind: MediaKind
    ssrc: int
    mimeType: str
    packetCount: int
    byteCount: int
    packetsDiscarded: int
    fractionLost: int  # of 256, from the receiver's last report (RFC 3550 §6.4.1)
    roundTripTime: float | None  # seconds


class RouterDump(TypedDict):
    id: str
    rtpCapabilities: RtpCapabilities
    transportIds: list[str]
    producerIds: list[str]


class WebRtcTransportDump(TypedDict):
    id: str
    iceParameters: IceParameters
    iceCandidates: list[IceCandidate]
    iceState: str
    iceSelectedTuple: TransportTuple | None
    dtlsParameters: DtlsParameters
    dtlsState: str
    producerIds: list[str]
    consumerIds: list[str]


class PlainTransportDump(TypedDict):
    id: str
    tuple: TransportTuple
    comedia: bool
    rtcpMux: bool
    srtpParameters: SrtpParameters | None
    producerIds: list[str]
    consumerIds: list[str]


class ProducerDump(TypedDict):
    id: str
    kind: MediaKind
    type: str
    paused: bool
    rtpParameters: RtpParameters
    consumerIds: list[str]


class ConsumerDump(TypedDict):
    id: str
    producerId: str
    kind: MediaKind
    type: str
    paused: bool
    producerPaused: bool
    rtpParameters: RtpParameters


# ---------------------------------------------------------------- the datapath's counters


class DatapathStats(TypedDict):
    rx_packets: int
    rx_bytes: int
    forwarded_packets: int
    forwarded_bytes: int
    batches: int
    slow_path_packets: int
    late_packets: int  # RTP forwarded after waiting over 20 ms in the socket queue
    table_hand_offs: int  # times the datapath thread handed its tables to a control-plane call
    loop_wakeups: int  # times the datapath thread woke the event loop (notify_fd writes)
    events_lost: int
    drops: dict[str, int]  # every reason of fastsfu._rtp.DROP_REASONS


class EngineStats(TypedDict):
    """`Engine.stats()`: the datapath's totals (DatapathStats' keys, repeated here rather than
    inherited: pdoc cannot place inherited TypedDict keys) plus the control plane's counters."""

    rx_packets: int
    rx_bytes: int
    forwarded_packets: int
    forwarded_bytes: int
    batches: int
    slow_path_packets: int
    late_packets: int  # RTP forwarded after waiting over 20 ms in the socket queue
    table_hand_offs: int  # times the datapath thread handed its tables to a control-plane call
    loop_wakeups: int  # times the datapath thread woke the event loop (notify_fd writes)
    events_lost: int
    drops: dict[str, int]
    unhandled_datagrams: int
    slow_path_errors: int
    dtls_failures: int
    ice_consent_expiries: int
    discord_discoveries_refused: int
    discord_remote_moves: int
    routers: int
    transports: int
    # ICE-TCP (Settings.ice_tcp): open "connections", "accepted", and closes by reason
    ice_tcp: dict[str, int]


class DatapathTransportStats(TypedDict):
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    rtcp_rx_packets: int
    has_remote: bool
    authenticated_packets: int
    remote: tuple[str, int] | None
    drops: dict[str, int]  # only the reasons that counted


class DatapathProducerStats(TypedDict):
    packets: int
    bytes: int
    drops: int
    highest_seq: int | None  # None until the first packet
    extended_highest_seq: int | None
    expected: int
    lost: int
    jitter: int
    epoch: int
    consumers: int
    active_consumers: int
    red_packets: int  # well-formed Opus RED (RFC 2198) packets parsed for receivers


class DatapathConsumerStats(TypedDict):
    packets: int
    bytes: int
    drops: int
    last_seq: int | None  # None until the first packet is sent
    last_timestamp: int | None
    last_send_ns: int | None
