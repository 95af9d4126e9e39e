"""Native helpers shared by the load generator and the baseline launchers.

Compiles the C benchmark libraries and hands pylibsrtp's bundled libsrtp to C as raw pointers.
For Discord suites it hands over fastsfu's rtpsize AEAD instead: `fastsfu._rtp.aead_rtp_functions()`
has srtp_protect's signature and takes an `AeadContext.address` where libsrtp takes an srtp_t.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pylibsrtp
from pylibsrtp import _binding

BENCH_DIR = Path(__file__).resolve().parents[1]
SRC_DIR = BENCH_DIR.parent / "src"
DEFAULT_BUILD_DIR = BENCH_DIR / ".build"
LOADGEN_SRC = BENCH_DIR / "loadgen" / "loadgen.c"
FORWARDER_SRC = BENCH_DIR / "baseline" / "forwarder.c"
CFLAGS = ["-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-std=gnu11"]
BUILD_TIMEOUT_S = 120

_ffi, _lib = _binding.ffi, _binding.lib

PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
}
# Discord suite -> fastsfu's rtpsize AEAD mode (benchconfig.DISCORD_MODES).
DISCORD_MODES = {
    "DISCORD_AES256_GCM": "aead_aes256_gcm_rtpsize",
    "DISCORD_XCHACHA20": "aead_xchacha20_poly1305_rtpsize",
}


class BuildError(RuntimeError):
    """The C compiler failed or is missing."""


def build_library(source: Path, build_dir: Path | None = None, cc: str | None = None) -> Path:
    """Compile `source` into `<build_dir>/<stem>.so` unless an up-to-date build exists.

    The output is written to a temporary name and renamed so that a concurrent run (a test and
    run.py at once) never dlopens a half-written file.
    """
    build_dir = Path(build_dir or DEFAULT_BUILD_DIR)
    build_dir.mkdir(parents=True, exist_ok=True)
    out = build_dir / f"{source.stem}.so"
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    compiler = cc or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise BuildError(f"C compiler {compiler!r} not found")
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}.", suffix=".so", dir=build_dir)
    os.close(fd)
    cmd = [compiler, *CFLAGS, "-o", tmp, str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_all(build_dir: Path | None = None, cc: str | None = None) -> dict[str, Path]:
    """Build both shared libraries; returns {"loadgen": path, "forwarder": path}."""
    return {
        "loadgen": build_library(LOADGEN_SRC, build_dir, cc),
        "forwarder": build_library(FORWARDER_SRC, build_dir, cc),
    }


def check_libsrtp_version() -> int:
    """Refuse to run on libsrtp 3.x, whose srtp_protect has a different signature."""
    version = int(ctypes.CDLL(_binding.__file__).srtp_get_version())
    if version >> 24 != 2:
        raise RuntimeError(f"pylibsrtp bundles libsrtp {version >> 24}.x; the benchmark needs 2.x")
    return version


def srtp_function(name: str) -> int:
    """Address of one of the bundled libsrtp entry points (srtp_protect, srtp_unprotect)."""
    return int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, name)))


def make_session(suite: str, key_hex: str, outbound: bool, ssrcs: tuple[int, ...] = ()) -> pylibsrtp.Session:
    """An SRTP session with an SSRC_ANY_* template plus one SSRC_SPECIFIC stream per known SSRC.

    The specific streams exist so that libsrtp does not clone (malloc) a stream on the first
    packet of each SSRC in the middle of a measurement.
    """
    if suite in DISCORD_MODES:
        raise ValueError(f"{suite} is a Discord transport mode, not an SRTP suite (no libsrtp session)")
    profile = PROFILES[suite]
    key = bytes.fromhex(key_hex)
    any_type = pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
    session = pylibsrtp.Session(policy=pylibsrtp.Policy(key=key, ssrc_type=any_type, srtp_profile=profile))
    for ssrc in ssrcs:
        session.add_stream(
            pylibsrtp.Policy(
                key=key, ssrc_type=pylibsrtp.Policy.SSRC_SPECIFIC, ssrc_value=ssrc, srtp_profile=profile
            )
        )
    return session


def session_pointer(session: pylibsrtp.Session) -> int:
    """The session's srtp_t as an int; the caller must keep `session` alive while C uses it."""
    return int(_ffi.cast("uintptr_t", session._srtp[0]))


def _discord_crypto() -> Any:
    """fastsfu.discord.crypto (importing it installs the OpenSSL pointers fastsfu's AEAD uses)."""
    try:
        import fastsfu.discord.crypto as crypto
    except ImportError:
        # Not installed in this environment: use the in-tree build (setup.py build_ext --inplace).
        if str(SRC_DIR) in sys.path:
            raise
        sys.path.insert(0, str(SRC_DIR))
        import fastsfu.discord.crypto as crypto
    return crypto


def crypto_functions(suite: str) -> tuple[int, int]:
    """(protect, unprotect) addresses with srtp_protect's signature for `suite`: libsrtp's for
    the SRTP suites, fastsfu's rtpsize AEAD for the Discord ones."""
    if suite in DISCORD_MODES:
        _discord_crypto()
        from fastsfu import _rtp

        protect, unprotect = _rtp.aead_rtp_functions()
        return int(protect), int(unprotect)
    return srtp_function("srtp_protect"), srtp_function("srtp_unprotect")


def make_context(suite: str, key_hex: str, outbound: bool, ssrcs: tuple[int, ...] = ()) -> tuple[Any, int]:
    """(owner, pointer) of one direction's crypto state for crypto_functions(suite).

    SRTP: make_session() and its srtp_t. Discord: a fresh `AeadContext` (its own nonce counter
    and replay window) and its address. Keep `owner` alive while C uses the pointer.
    """
    if suite in DISCORD_MODES:
        context = _discord_crypto().AeadContext(DISCORD_MODES[suite], bytes.fromhex(key_hex))
        return context, int(context.address)
    session = make_session(suite, key_hex, outbound, ssrcs)
    return session, session_pointer(session)


def pointer_array(values: list[int]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * max(1, len(values)))(*values)


def pin_current_thread(cpu: int | None) -> set[int] | None:
    """Pin the calling thread (threads it creates inherit the mask); returns the previous mask."""
    if cpu is None:
        return None
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    return previous
