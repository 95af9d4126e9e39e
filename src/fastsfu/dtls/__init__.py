"""DTLS 1.2 for WebRTC (transport.md §3-4): sans-I/O handshake in both roles that exports SRTP keys."""

from fastsfu.dtls.crypto import DtlsCertificate
from fastsfu.dtls.handshake import DtlsClosed, DtlsConnected, DtlsFailed, DtlsTransport

__all__ = ["DtlsCertificate", "DtlsClosed", "DtlsConnected", "DtlsFailed", "DtlsTransport"]
