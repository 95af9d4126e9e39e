"""DTLS 1.2 key schedule (RFC 5246 §5, §6.3, RFC 7627, RFC 5705) and WebRTC certificates and fingerprints.

The TLS 1.2 PRF is not exposed by `cryptography`, so P_SHA256 is built on stdlib `hmac` here.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastsfu.types import DtlsFingerprint

MASTER_SECRET_LENGTH = 48
VERIFY_DATA_LENGTH = 12  # RFC 5246 §7.4.9 (the default for every TLS 1.2 suite)
# AES-128-GCM (RFC 5288 §3): 16-byte keys and a 4-byte implicit "salt" IV per direction, no MAC keys.
ENC_KEY_LENGTH = 16
FIXED_IV_LENGTH = 4
SRTP_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"  # RFC 5764 §4.2


@dataclass(frozen=True)
class SrtpProfile:
    """One RFC 5764 §4.1.2 / RFC 7714 §14.2 protection profile and its mediasoup cryptoSuite name."""

    value: int
    suite: str
    key_length: int
    salt_length: int


SRTP_PROFILES: dict[int, SrtpProfile] = {
    p.value: p
    for p in (
        SrtpProfile(0x0001, "AES_CM_128_HMAC_SHA1_80", 16, 14),
        SrtpProfile(0x0002, "AES_CM_128_HMAC_SHA1_32", 16, 14),
        SrtpProfile(0x0007, "AEAD_AES_128_GCM", 16, 12),
        SrtpProfile(0x0008, "AEAD_AES_256_GCM", 32, 12),
    )
}

# Fingerprint hash functions we accept from signaling, strongest first (docs/transports.md#fingerprints).
FINGERPRINT_ALGORITHMS: dict[str, str] = {"sha-512": "sha512", "sha-384": "sha384", "sha-256": "sha256"}


def prf(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.2 PRF with SHA-256 (RFC 5246 §5): P_SHA256(secret, label + seed) truncated to `length`."""
    seed = label + seed
    out = bytearray()
    a = seed
    while len(out) < length:
        a = hmac.digest(secret, a, "sha256")  # A(i) = HMAC(secret, A(i-1))
        out += hmac.digest(secret, a + seed, "sha256")
    return bytes(out[:length])


def extended_master_secret(pre_master_secret: bytes, session_hash: bytes) -> bytes:
    """RFC 7627 §4: session_hash covers the transcript up to and including ClientKeyExchange."""
    return prf(pre_master_secret, b"extended master secret", session_hash, MASTER_SECRET_LENGTH)


def legacy_master_secret(pre_master_secret: bytes, client_random: bytes, server_random: bytes) -> bytes:
    """RFC 5246 §8.1, only used when EMS is explicitly not required."""
    return prf(pre_master_secret, b"master secret", client_random + server_random, MASTER_SECRET_LENGTH)


@dataclass(frozen=True)
class KeyBlock:
    client_write_key: bytes
    server_write_key: bytes
    client_write_iv: bytes
    server_write_iv: bytes


def key_block(master_secret: bytes, client_random: bytes, server_random: bytes) -> KeyBlock:
    """RFC 5246 §6.3: note the seed order server_random + client_random (unlike the master secret)."""
    n = 2 * (ENC_KEY_LENGTH + FIXED_IV_LENGTH)
    block = prf(master_secret, b"key expansion", server_random + client_random, n)
    k, i = ENC_KEY_LENGTH, FIXED_IV_LENGTH
    return KeyBlock(block[0:k], block[k : 2 * k], block[2 * k : 2 * k + i], block[2 * k + i : 2 * k + 2 * i])


def verify_data(master_secret: bytes, finished_label: bytes, handshake_hash: bytes) -> bytes:
    """RFC 5246 §7.4.9: label is b"client finished" or b"server finished"."""
    return prf(master_secret, finished_label, handshake_hash, VERIFY_DATA_LENGTH)


def export_keying_material(
    master_secret: bytes, client_random: bytes, server_random: bytes, label: bytes, length: int
) -> bytes:
    """RFC 5705 §4 without a context value (the form RFC 5764 §4.2 uses)."""
    return prf(master_secret, label, client_random + server_random, length)


def srtp_keys(
    master_secret: bytes, client_random: bytes, server_random: bytes, profile: SrtpProfile
) -> tuple[bytes, bytes]:
    """RFC 5764 §4.2 split: returns (client key||salt, server key||salt)."""
    k, s = profile.key_length, profile.salt_length
    material = export_keying_material(
        master_secret, client_random, server_random, SRTP_EXPORTER_LABEL, 2 * (k + s)
    )
    client_key, server_key = material[:k], material[k : 2 * k]
    client_salt, server_salt = material[2 * k : 2 * k + s], material[2 * k + s :]
    return client_key + client_salt, server_key + server_salt


def fingerprint_der(der: bytes, algorithm: str = "sha-256") -> str:
    """RFC 8122 §5: hash of the DER certificate as uppercase colon-separated hex."""
    name = FINGERPRINT_ALGORITHMS.get(algorithm.lower())
    if name is None:
        raise ValueError(f"unsupported fingerprint algorithm {algorithm!r}")
    return hashlib.new(name, der).digest().hex(":").upper()


def match_fingerprint(der: bytes, fingerprints: list[DtlsFingerprint]) -> str | None:
    """Check `der` against the strongest supported remote fingerprint (docs/transports.md#fingerprints).

    Returns None when it matches, else the reason for failing.
    """
    by_algorithm: dict[str, str] = {}
    for entry in fingerprints:
        if not isinstance(entry, dict):
            continue
        algorithm, value = entry.get("algorithm"), entry.get("value")
        if isinstance(algorithm, str) and isinstance(value, str):
            by_algorithm.setdefault(algorithm.lower(), value)
    for algorithm in FINGERPRINT_ALGORITHMS:  # strongest first
        if algorithm in by_algorithm:
            expected = by_algorithm[algorithm].strip().upper()
            actual = fingerprint_der(der, algorithm)
            if hmac.compare_digest(expected.encode(), actual.encode()):
                return None
            return f"peer certificate does not match its {algorithm} fingerprint"
    return "no supported fingerprint algorithm (need sha-256, sha-384 or sha-512)"


@dataclass(frozen=True)
class DtlsCertificate:
    """Our ECDSA P-256 certificate and key (RFC 8827 §6.5); one per process is enough."""

    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    der: bytes

    @classmethod
    def generate(cls, common_name: str = "fastsfu") -> DtlsCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            # Random positive 63-bit serial (RFC 5280 §4.1.2.2 wants it positive and unique).
            .serial_number(secrets.randbits(63) | 1)
            # A day in the past tolerates peers whose clocks lag ours.
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, cert.public_bytes(serialization.Encoding.DER))

    @classmethod
    def load_pem(cls, cert_pem: bytes, key_pem: bytes) -> DtlsCertificate:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the DTLS key must be ECDSA P-256 (0x0403 is our only signature scheme)")
        if cert.public_key() != key.public_key():
            raise ValueError("the DTLS certificate does not belong to the private key")
        return cls(key, cert, cert.public_bytes(serialization.Encoding.DER))

    def fingerprint(self, algorithm: str = "sha-256") -> str:
        return fingerprint_der(self.der, algorithm)

    def fingerprints(self) -> list[DtlsFingerprint]:
        return [{"algorithm": a, "value": self.fingerprint(a)} for a in ("sha-256", "sha-384", "sha-512")]

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)
