"""Discord's transport encryption (docs/transports.md#encryption-modes): the rtpsize AEAD modes in C.

The datapath's `_aead.h` calls OpenSSL through function pointers taken here, once, from the library
pylibsrtp bundles (the same one libsrtp uses), so nothing new is needed at build or run time.
"""

from __future__ import annotations

import ctypes

from pylibsrtp import _binding

from fastsfu import _rtp
from fastsfu._rtp import AEAD_SUFFIX, AeadContext, hchacha20

# READY's order: both bots take the first mode they support (docs/transports.md#encryption-modes).
MODES: tuple[str, ...] = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")
# Discontinued by Discord in 2024; offered only behind a setting, after MODES, and only with PyNaCl.
LEGACY_MODES: tuple[str, ...] = (
    "xsalsa20_poly1305_lite_rtpsize",
    "xsalsa20_poly1305_lite",
    "xsalsa20_poly1305_suffix",
    "xsalsa20_poly1305",
)

_EVP_FUNCTIONS = (
    "EVP_CIPHER_CTX_new",
    "EVP_CIPHER_CTX_free",
    "EVP_CIPHER_CTX_ctrl",
    "EVP_EncryptInit_ex",
    "EVP_EncryptUpdate",
    "EVP_EncryptFinal_ex",
    "EVP_DecryptInit_ex",
    "EVP_DecryptUpdate",
    "EVP_DecryptFinal_ex",
    "EVP_aes_256_gcm",
    "EVP_chacha20_poly1305",
)


def _install() -> None:
    library = ctypes.CDLL(_binding.__file__)  # already loaded: dlopen returns the same handle
    try:
        addresses = tuple(
            int(ctypes.cast(getattr(library, name), ctypes.c_void_p).value or 0) for name in _EVP_FUNCTIONS
        )
    except AttributeError as exc:
        raise ImportError(
            f"pylibsrtp's bundled OpenSSL lacks {exc}; Discord transports are unavailable"
        ) from None
    _rtp.install_aead_functions(addresses)


def _install_nacl() -> bool:
    """libsodium's secretbox from PyNaCl (optional: `fastsfu[discord-legacy]`), for LEGACY_MODES."""
    try:
        from nacl._sodium import ffi, lib  # type: ignore[import-not-found]  # compiled, no stubs
    except ImportError:
        return False

    def address(name: str) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))

    _rtp.install_nacl_functions(
        address("crypto_secretbox"), address("crypto_secretbox_open"), address("randombytes")
    )
    return True


def legacy_modes_available() -> bool:
    return _rtp.nacl_installed()


def rtp_clear_length(packet: bytes) -> int:
    """The clear part of an rtpsize packet: fixed header, CSRCs and the extension preamble."""
    if len(packet) < 12:
        raise ValueError("short RTP packet")
    clear = 12 + 4 * (packet[0] & 0x0F) + (4 if packet[0] & 0x10 else 0)
    if clear > len(packet):
        raise ValueError("RTP header longer than the packet")
    return clear


_install()
_install_nacl()

__all__ = [
    "AEAD_SUFFIX",
    "LEGACY_MODES",
    "MODES",
    "AeadContext",
    "hchacha20",
    "legacy_modes_available",
    "rtp_clear_length",
]
