"""DTLS 1.2 for WebRTC (docs/transports.md#dtls): sans-I/O handshake in both roles that exports SRTP keys."""

from fastsfu.dtls.crypto import DtlsCertificate
from fastsfu.dtls.handshake import DtlsClosed, DtlsConnected, DtlsFailed, DtlsTransport

__all__ = ["DtlsCertificate", "DtlsClosed", "DtlsConnected", "DtlsFailed", "DtlsTransport"]
