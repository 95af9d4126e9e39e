"""fastsfu: a voice SFU with a Cython datapath (mediasoup-style API: Engine, Router, transports)."""

# fastsfu.types: TypedDicts of the JSON shapes the API takes and returns (RtpParameters, ...).
from fastsfu import types as types
from fastsfu.consumer import Consumer
from fastsfu.engine import Engine, Settings
from fastsfu.observers import ActiveSpeakerObserver, AudioLevelObserver, RtpObserver
from fastsfu.ortc import OrtcError
from fastsfu.pipe_transport import PipeTransport
from fastsfu.plain_transport import PlainTransport
from fastsfu.producer import Producer
from fastsfu.recorder import Recorder, RecorderOptions
from fastsfu.router import Router, RouterLimitError
from fastsfu.transport import Transport, TransportError
from fastsfu.webrtc_transport import WebRtcTransport

__all__ = [
    "ActiveSpeakerObserver",
    "AudioLevelObserver",
    "Consumer",
    "Engine",
    "OrtcError",
    "PipeTransport",
    "PlainTransport",
    "Producer",
    "Recorder",
    "RecorderOptions",
    "Router",
    "RouterLimitError",
    "RtpObserver",
    "Settings",
    "Transport",
    "TransportError",
    "WebRtcTransport",
]
__version__ = "0.1.0"
