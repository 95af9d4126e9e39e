# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The fastsfu datapath: C tables programmed from Python, and the per-packet RTP forwarder.

Per packet: no Python call, no allocation, no exception (docs/architecture.md#principles, 1); the
rules mirror the reference forwarder of tests/reference_forwarder.py, and tests compare the two byte
for byte.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from "Python.h":
    int PyGC_Enable()                 # both return the collector's previous state (3.10+)
    int PyGC_Disable()
from libc.errno cimport EAGAIN, ECONNRESET, EINTR, EPIPE, errno
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from fastsfu._csys cimport (
    AF_INET, AF_INET6, AF_UNSPEC, CMSG_DATA, CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_SPACE, EFD_CLOEXEC, EFD_NONBLOCK,
    INET6_ADDRSTRLEN, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN,
    EPOLLOUT, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    PTHREAD_MUTEX_RECURSIVE, SCM_TIMESTAMPNS, SO_TIMESTAMPNS, SOL_SOCKET, close, cmsghdr, epoll_create1,
    epoll_ctl, epoll_event, epoll_wait, eventfd, fsfu_add_int, fsfu_load_int, fsfu_load_u32,
    fsfu_store_int, fsfu_store_u32, fsfu_xchg_int, htons, inet_ntop, inet_pton, iovec, mmsghdr, msghdr,
    ntohs, pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock, pthread_mutex_trylock,
    pthread_mutex_unlock, pthread_mutexattr_destroy, pthread_mutexattr_init, pthread_mutexattr_settype,
    pthread_mutexattr_t, connect, read, recv, recvmmsg, send, sendmmsg, setsockopt, sockaddr,
    sockaddr_in, sched_yield, sockaddr_in6, socklen_t, write,
)

import threading

# ---------------------------------------------------------------------------------------------
# Constants shared with Python (fastsfu.rtp mirrors them).

DROP_REASONS = (
    "malformed", "oversize", "unknown_protocol", "unknown_tuple", "unknown_ssrc", "unknown_pt",
    "decrypt_failed", "srtp_replay", "producer_paused", "no_consumers", "consumer_paused",
    "stale_seq", "seq_jump", "no_remote", "encrypt_failed", "send_failed", "queue_age", "recv_error",
    "aead_replay", "slow_ring_full", "red_malformed", "tcp_overflow",
)
# Why the datapath closed an ICE-TCP connection (take_tcp_closed), indexed by TCP_* (docs/transports.md).
TCP_CLOSE_REASONS = ("closed", "peer_closed", "error", "bad_first_frame", "frame_too_long", "send_overflow")

DEFAULT_MAX_QUEUE_AGE = DEFAULT_MAX_QUEUE_AGE_MS
LATE_THRESHOLD_MS = LATE_MS
SLOW_STUN = K_SLOW_STUN
SLOW_DTLS = K_SLOW_DTLS
SLOW_RTCP = K_SLOW_RTCP
SLOW_OTHER = K_SLOW_OTHER
EVENT_TUPLE_LEARNED = K_EVENT_TUPLE_LEARNED
EVENT_UNKNOWN_SSRC = K_EVENT_UNKNOWN_SSRC
EVENT_TCP_CLOSED = K_EVENT_TCP_CLOSED
OUTPUT_SEND = K_OUTPUT_SEND
OUTPUT_CAPTURE = K_OUTPUT_CAPTURE
OUTPUT_DISCARD = K_OUTPUT_DISCARD

cdef uint32_t WAKE_TAG = 0xFFFFFFFF       # the epoll tag of the thread's wake-up eventfd
cdef srtp_fn g_protect = NULL
cdef srtp_fn g_unprotect = NULL
cdef srtp_fn g_protect_rtcp = NULL
cdef srtp_fn g_unprotect_rtcp = NULL


def install_srtp_functions(uintptr_t protect, uintptr_t unprotect, uintptr_t protect_rtcp,
                           uintptr_t unprotect_rtcp) -> None:
    """Take libsrtp 2.x entry points (addresses inside pylibsrtp's bundled library)."""
    global g_protect, g_unprotect, g_protect_rtcp, g_unprotect_rtcp
    if not (protect and unprotect and protect_rtcp and unprotect_rtcp):
        raise ValueError("null libsrtp function pointer")
    g_protect = <srtp_fn>protect
    g_unprotect = <srtp_fn>unprotect
    g_protect_rtcp = <srtp_fn>protect_rtcp
    g_unprotect_rtcp = <srtp_fn>unprotect_rtcp


AEAD_MODES = {"aead_aes256_gcm_rtpsize": FSFU_AEAD_AES256GCM,
              "aead_xchacha20_poly1305_rtpsize": FSFU_AEAD_XCHACHA20,
              # legacy (docs/transports.md#encryption-modes): only behind a setting, with PyNaCl's libsodium
              "xsalsa20_poly1305_lite_rtpsize": FSFU_AEAD_XSALSA_LITE_RTPSIZE,
              "xsalsa20_poly1305_lite": FSFU_AEAD_XSALSA_LITE,
              "xsalsa20_poly1305_suffix": FSFU_AEAD_XSALSA_SUFFIX,
              "xsalsa20_poly1305": FSFU_AEAD_XSALSA}
AEAD_SUFFIX = FSFU_AEAD_SUFFIX
AEAD_MAX_OVERHEAD = FSFU_AEAD_MAX_OVERHEAD


def install_nacl_functions(uintptr_t secretbox, uintptr_t secretbox_open, uintptr_t randombytes) -> None:
    """Take libsodium's crypto_secretbox, crypto_secretbox_open and randombytes (PyNaCl's)."""
    if not (secretbox and secretbox_open and randombytes):
        raise ValueError("null libsodium function pointer")
    fsfu_nacl_install(secretbox, secretbox_open, randombytes)


def nacl_installed() -> bool:
    return bool(fsfu_nacl_installed())


def install_aead_functions(tuple addresses) -> None:
    """Take the 11 OpenSSL EVP entry points _aead.h uses (from pylibsrtp's bundled library)."""
    cdef uintptr_t f[11]
    cdef int i
    if len(addresses) != 11 or not all(addresses):
        raise ValueError("need 11 non-null OpenSSL function addresses")
    for i in range(11):
        f[i] = addresses[i]
    fsfu_evp_install(f)


cdef uint32_t g_ogg_crc[256]
cdef bint g_ogg_crc_ready = False


def ogg_crc(const uint8_t[:] data) -> int:
    """The Ogg page checksum (RFC 3533 §6: polynomial 0x04c11db7, no reflection, initial 0), for
    the recorder's pages; fastsfu.ogg.ogg_crc_reference is the same in Python (tests compare)."""
    global g_ogg_crc_ready
    cdef uint32_t crc = 0, r
    cdef Py_ssize_t i, n = data.shape[0]
    cdef int k
    if not g_ogg_crc_ready:
        for i in range(256):
            r = <uint32_t>i << 24
            for k in range(8):
                r = (r << 1) ^ 0x04C11DB7 if r & 0x80000000 else r << 1
            g_ogg_crc[i] = r
        g_ogg_crc_ready = True
    with nogil:
        for i in range(n):
            crc = (crc << 8) ^ g_ogg_crc[(crc >> 24) ^ data[i]]
    return crc


def hchacha20(const uint8_t[:] key, const uint8_t[:] nonce16) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha-03 §2.2), exposed for the known-answer test."""
    cdef uint8_t out[32]
    if key.shape[0] != 32 or nonce16.shape[0] != 16:
        raise ValueError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    fsfu_hchacha20(out, &key[0], &nonce16[0])
    return PyBytes_FromStringAndSize(<char *>out, 32)


cdef int aead_protect_rtp(void *ctx, void *hdr, int *len_ptr) noexcept nogil:
    """srtp_protect's shape over a Discord AEAD context (for C callers such as the benchmark's
    load generator, which take SRTP function pointers)."""
    cdef int clear = fsfu_aead_rtp_clear(<fsfu_aead *>ctx, <uint8_t *>hdr, len_ptr[0]), r
    if clear < 0:
        return 1
    r = fsfu_aead_seal(<fsfu_aead *>ctx, <uint8_t *>hdr, len_ptr[0], clear)
    if r < 0:
        return 1
    len_ptr[0] = r
    return 0


cdef int aead_unprotect_rtp(void *ctx, void *hdr, int *len_ptr) noexcept nogil:
    cdef int clear = fsfu_aead_rtp_clear(<fsfu_aead *>ctx, <uint8_t *>hdr, len_ptr[0]), r
    if clear < 0:
        return 1
    r = fsfu_aead_open(<fsfu_aead *>ctx, <uint8_t *>hdr, len_ptr[0], clear)
    if r < 0:
        return SRTP_STATUS_REPLAY_FAIL if r == FSFU_AEAD_REPLAY else 7  # 7: srtp_err_status_auth_fail
    len_ptr[0] = r
    return 0


def aead_rtp_functions() -> tuple[int, int]:
    """Addresses of (protect, unprotect) with srtp_protect's signature, taking an AeadContext's
    `address`: C code written for libsrtp drives Discord's modes unchanged."""
    return <uintptr_t>aead_protect_rtp, <uintptr_t>aead_unprotect_rtp


cdef class AeadContext:
    """One direction's state of a Discord rtpsize AEAD mode (docs/transports.md#encryption-modes): the key,
    cipher contexts, the outbound nonce counter and the inbound replay window. A transport owns
    one; `seal`/`open` exist for tests and the slow path, the datapath calls the C functions."""

    def __cinit__(self, str mode, const uint8_t[:] key):
        self.ready = 0
        if not fsfu_evp_installed():
            raise RuntimeError("OpenSSL functions are not installed (import fastsfu.discord.crypto)")
        if mode not in AEAD_MODES:
            raise ValueError(f"unknown transport encryption mode {mode!r}")
        if key.shape[0] != 32:
            raise ValueError("the secret key is 32 bytes")
        if AEAD_MODES[mode] >= FSFU_AEAD_XSALSA_LITE_RTPSIZE and not fsfu_nacl_installed():
            raise RuntimeError(f"{mode} needs PyNaCl (pip install 'fastsfu[discord-legacy]')")
        if fsfu_aead_init(&self.ctx, AEAD_MODES[mode], &key[0]) != 0:
            fsfu_aead_free(&self.ctx)
            raise MemoryError("cannot create the cipher contexts")
        self.ready = 1

    def __dealloc__(self):
        if self.ready:
            fsfu_aead_free(&self.ctx)

    @property
    def address(self) -> int:
        """The C context's address (for aead_rtp_functions); valid while this object lives."""
        return <uintptr_t>&self.ctx

    @property
    def out_counter(self) -> int:
        return self.ctx.out_counter

    @out_counter.setter
    def out_counter(self, uint32_t value) -> None:
        self.ctx.out_counter = value

    def seal(self, const uint8_t[:] packet, int clear) -> bytes:
        """packet[:clear] stays clear (AAD); the rest is encrypted; tag and counter appended."""
        cdef int n = packet.shape[0], r
        cdef bytearray buf
        if not 0 <= clear <= n:
            raise ValueError("clear part longer than the packet")
        buf = bytearray(n + FSFU_AEAD_MAX_OVERHEAD)
        if n:
            memcpy(<uint8_t *><char *>buf, &packet[0], n)
        r = fsfu_aead_seal(&self.ctx, <uint8_t *><char *>buf, n, clear)
        if r < 0:
            raise ValueError("encryption failed")
        return bytes(buf[:r])

    def rtp_clear(self, const uint8_t[:] packet) -> int:
        """This mode's clear part of an RTP packet (rtpsize: header, CSRCs, extension preamble;
        older modes: the fixed 12 bytes); ValueError if the packet is shorter."""
        cdef int r = fsfu_aead_rtp_clear(&self.ctx, &packet[0], packet.shape[0]) if packet.shape[0] else -1
        if r < 0:
            raise ValueError("short RTP packet")
        return r

    def open(self, const uint8_t[:] packet, int clear) -> bytes:
        """Authenticate and decrypt; ValueError on a bad tag, a replayed counter or a short packet."""
        cdef int n = packet.shape[0], r
        cdef bytearray buf = bytearray(packet)
        if n == 0 or clear < 0:
            raise ValueError("short packet")
        r = fsfu_aead_open(&self.ctx, <uint8_t *><char *>buf, n, clear)
        if r == FSFU_AEAD_REPLAY:
            raise ValueError("replayed nonce")
        if r < 0:
            raise ValueError("authentication failed" if r == FSFU_AEAD_FAIL else "short packet")
        return bytes(buf[:r])


# ---------------------------------------------------------------------------------------------
# Tables.

cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]

cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF

cdef inline void wr32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint32_t key_hash(const Key *k) noexcept nogil:
    cdef const uint64_t *w = <const uint64_t *>k
    cdef uint64_t h = w[0] * <uint64_t>0x9E3779B97F4A7C15ULL
    h ^= w[1] * <uint64_t>0xC2B2AE3D27D4EB4FULL
    h ^= w[2] * <uint64_t>0x165667B19E3779F9ULL
    h ^= h >> 29
    return <uint32_t>(h ^ (h >> 32))


cdef int table_init(Table *t, uint32_t min_capacity) except -1:
    cdef uint32_t cap = 16
    cdef uint32_t i
    while cap < min_capacity * 2:
        cap <<= 1
    t.entries = <Entry *>calloc(cap, sizeof(Entry))
    if t.entries == NULL:
        raise MemoryError()
    t.mask = cap - 1
    for i in range(cap):
        t.entries[i].value = -1
    return 0


cdef inline int32_t table_get(const Table *t, const Key *k) noexcept nogil:
    cdef uint32_t i = key_hash(k) & t.mask
    while t.entries[i].value >= 0:
        if memcmp(&t.entries[i].key, k, sizeof(Key)) == 0:
            return t.entries[i].value
        i = (i + 1) & t.mask
    return -1


cdef void table_put(Table *t, const Key *k, int32_t value) noexcept nogil:
    # Capacity is twice the table's maximum population (set at init), so a free slot exists.
    cdef uint32_t i = key_hash(k) & t.mask
    while t.entries[i].value >= 0:
        if memcmp(&t.entries[i].key, k, sizeof(Key)) == 0:
            break
        i = (i + 1) & t.mask
    t.entries[i].key = k[0]
    t.entries[i].value = value


cdef void table_del(Table *t, const Key *k) noexcept nogil:
    cdef uint32_t i = key_hash(k) & t.mask
    cdef uint32_t j, home
    while t.entries[i].value >= 0:
        if memcmp(&t.entries[i].key, k, sizeof(Key)) == 0:
            break
        i = (i + 1) & t.mask
    else:
        return
    # Backward-shift deletion keeps every probe chain unbroken without tombstones.
    j = i
    while True:
        j = (j + 1) & t.mask
        if t.entries[j].value < 0:
            break
        home = key_hash(&t.entries[j].key) & t.mask
        if ((j - home) & t.mask) >= ((j - i) & t.mask):
            t.entries[i] = t.entries[j]
            i = j
    t.entries[i].value = -1


cdef inline void tuple_key_from_sockaddr(Key *k, int sock, const uint8_t *sa) noexcept nogil:
    # IPv4 is keyed as a v4-mapped IPv6 address so one key shape serves both families.
    cdef const sockaddr_in *s4
    cdef const sockaddr_in6 *s6
    memset(k, 0, sizeof(Key))
    k.a = <uint32_t>sock
    if (<const sockaddr *>sa).sa_family == AF_INET:
        s4 = <const sockaddr_in *>sa
        k.c = s4.sin_port
        k.addr[10] = 0xFF
        k.addr[11] = 0xFF
        memcpy(&k.addr[12], &s4.sin_addr, 4)
    else:
        s6 = <const sockaddr_in6 *>sa
        k.c = s6.sin6_port
        memcpy(k.addr, &s6.sin6_addr, 16)


cdef inline void ssrc_key(Key *k, int transport, uint32_t ssrc) noexcept nogil:
    memset(k, 0, sizeof(Key))
    k.a = <uint32_t>transport
    memcpy(k.addr, &ssrc, 4)


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t realtime_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# ---------------------------------------------------------------------------------------------
# Opus RED (RFC 2198 §3): find the primary block once per packet (docs/transports.md#opus-red).

cdef inline int red_parse(const uint8_t *d, int n, uint8_t opus_pt, int *prim_off) noexcept nogil:
    """Header blocks of a RED payload d[0:n] (the primary's included), with prim_off at the
    primary block's data; 0 if malformed: a header or a block past the end, more than
    RED_MAX_BLOCKS blocks, a block that is not Opus, or an empty primary."""
    cdef int pos = 0, blocks = 0, data = 0
    while True:
        if pos >= n or blocks == RED_MAX_BLOCKS or (d[pos] & 0x7F) != opus_pt:
            return 0
        blocks += 1
        if not d[pos] & 0x80:            # F clear: the last, one-byte header (the primary's)
            pos += 1
            break
        if pos + 4 > n:
            return 0
        # F set: PT, 14-bit timestamp offset, 10-bit block length
        data += ((d[pos + 2] & 0x03) << 8) | d[pos + 3]
        pos += 4
    if pos + data >= n:
        return 0
    prim_off[0] = pos + data
    return blocks


cdef int red_pt_entry(int red_pt, uint8_t opus_pt) except -1:
    """The table value for a producer's or consumer's RED PT red_pt (-1: none -> NO_PT); a RED PT
    must differ from the Opus PT its blocks carry, since the datapath tells them apart by PT."""
    if not -1 <= red_pt < 128 or red_pt == opus_pt:
        raise ValueError("RED payload type must be 0..127 (or -1) and not the Opus one")
    return NO_PT if red_pt < 0 else red_pt


# ---------------------------------------------------------------------------------------------
# RTP header extensions (RFC 8285): parse either form, rewrite IDs per consumer.

cdef inline int ext_next(const uint8_t *d, int n, int *pos, int two_byte, int *eid, int *elen) noexcept nogil:
    """Step to the next element; 1 with (eid, elen, pos at data), 0 at the end of the block."""
    cdef int p = pos[0]
    cdef int i, l
    while p < n:
        if d[p] == 0:                    # padding between elements (RFC 8285 §4.2, §4.3)
            p += 1
            continue
        if two_byte:
            if p + 2 > n:
                return 0
            i = d[p]
            l = d[p + 1]
            p += 2
        else:
            i = d[p] >> 4
            l = (d[p] & 0x0F) + 1
            if i == 15:                  # RFC 8285 §4.2: stop processing the block
                return 0
            p += 1
        if p + l > n:                    # an element past the block's end: ignore the rest
            return 0
        eid[0] = i
        elen[0] = l
        pos[0] = p + l
        return 1
    return 0


cdef int rewrite_extensions(const Producer *prod, const Consumer *cons, const uint8_t *blk,
                            int blk_len, int profile, uint8_t *out) noexcept nogil:
    """Write the consumer's extension block (4-byte header + elements + padding) into out.

    Returns its length, 0 when no element survives (then the X bit is cleared).
    The consumer's MID comes first, then the producer's elements in order, mapped by kind.
    """
    cdef int two_byte_in = 0
    cdef int two_byte_out = 0
    cdef int pos, eid, elen, kind, oid, w
    if profile == 0xBEDE:
        two_byte_in = 0
    elif (profile & 0xFFF0) == 0x1000:
        two_byte_in = 1
    else:
        blk_len = 0                      # a profile we cannot map: forward no extensions
    # Pass 1: the one-byte form holds IDs 1..14 and lengths 1..16 only.
    if cons.mid_len and cons.ext_id[KIND_MID] > 14:
        two_byte_out = 1
    pos = 0
    while ext_next(blk, blk_len, &pos, two_byte_in, &eid, &elen):
        kind = prod.ext_kind[eid]
        if kind == 0 or kind == KIND_MID:
            continue
        oid = cons.ext_id[kind]
        if oid and (oid > 14 or elen == 0 or elen > 16):
            two_byte_out = 1
    # Pass 2: write.
    w = 4
    if cons.mid_len and cons.ext_id[KIND_MID]:
        if two_byte_out:
            out[w] = cons.ext_id[KIND_MID]
            out[w + 1] = cons.mid_len
            w += 2
        else:
            out[w] = (cons.ext_id[KIND_MID] << 4) | (cons.mid_len - 1)
            w += 1
        memcpy(&out[w], cons.mid, cons.mid_len)
        w += cons.mid_len
    pos = 0
    while ext_next(blk, blk_len, &pos, two_byte_in, &eid, &elen):
        kind = prod.ext_kind[eid]
        if kind == 0 or kind == KIND_MID:
            continue
        oid = cons.ext_id[kind]
        if oid == 0:
            continue
        if two_byte_out:
            out[w] = oid
            out[w + 1] = elen
            w += 2
        else:
            out[w] = (oid << 4) | (elen - 1)
            w += 1
        memcpy(&out[w], &blk[pos - elen], elen)
        w += elen
    if w == 4:
        return 0
    while w & 3:
        out[w] = 0
        w += 1
    if two_byte_out:
        wr16(out, 0x1000)
    else:
        wr16(out, 0xBEDE)
    wr16(&out[2], (w - 4) >> 2)
    return w


cdef inline bint is_media_rtp(const uint8_t *buf, unsigned int n) noexcept nogil:
    """RTP as the age rule sees it: RFC 7983 §7 first byte 128-191, not RTCP (RFC 5761 §4:
    second byte 192-223), and at least the fixed 12-byte header (RFC 3550 §5.1). STUN (incl.
    Discord IP discovery), DTLS and Discord's 8-byte keep-alive never match."""
    return n >= 12 and 128 <= buf[0] <= 191 and not (192 <= buf[1] <= 223)


# ---------------------------------------------------------------------------------------------

cdef class TableLock:
    """The datapath tables' mutex as a context manager (`with datapath.tables_lock:`).

    The datapath thread holds it for one batch at a time; every Datapath method takes it, and so
    must Python code that changes an object the thread uses (an SRTP session's streams). It is
    recursive, and waited for with the GIL released: the thread never takes the GIL, so the two
    locks cannot deadlock. A caller that has to wait first takes `gate` and announces itself in
    `waiters`; the thread then releases the tables between two datagrams and sleeps on `gate`
    until the caller is done (a hand-off, rather than a race the thread would usually win).
    """

    def __cinit__(self):
        cdef pthread_mutexattr_t attr
        self.sync = <Sync *>calloc(1, sizeof(Sync))
        if self.sync == NULL:
            raise MemoryError()
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE)
        pthread_mutex_init(&self.sync.mu, &attr)
        pthread_mutexattr_destroy(&attr)
        pthread_mutex_init(&self.sync.gate, NULL)

    def __dealloc__(self):
        if self.sync != NULL:
            pthread_mutex_destroy(&self.sync.mu)
            pthread_mutex_destroy(&self.sync.gate)
            free(self.sync)

    def __enter__(self) -> None:
        cdef Sync *y = self.sync
        if pthread_mutex_trylock(&y.mu) != 0:
            with nogil:
                pthread_mutex_lock(&y.gate)
                fsfu_add_int(&y.waiters, 1)   # the thread hands the tables over at its next datagram
                pthread_mutex_lock(&y.mu)
                fsfu_add_int(&y.waiters, -1)
            y.gate_held = 1
        y.depth += 1
        if y.depth == 1:
            # No garbage collection while the tables are held: a full one (tens of ms in a busy
            # process) would keep the datapath thread waiting at the gate all that time. It runs
            # at the next allocation after the hold (docs/datapath.md, "Thread priority").
            self.gc_paused = PyGC_Disable() == 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        cdef Sync *y = self.sync
        cdef bint gate = False
        cdef bint last
        y.depth -= 1
        last = y.depth == 0
        if last and y.gate_held:
            y.gate_held = 0
            gate = True
        pthread_mutex_unlock(&y.mu)
        if gate:
            pthread_mutex_unlock(&y.gate)     # wakes the thread sleeping on it
        if last and self.gc_paused:
            self.gc_paused = False
            PyGC_Enable()
        return False

    def hand_back(self) -> bool:
        """For a caller holding the tables once (not nested) across many calls: if the datapath
        thread waits for them, let it take them, then take them back (it hands them over at its
        next datagram). Without the wait a plain release and retake would nearly always win the
        mutex again, and the thread would starve for the whole hold. True if handed back."""
        cdef Sync *y = self.sync
        cdef int spins = 0
        if y.depth != 1 or fsfu_load_int(&y.thread_waiting) == 0:
            return False
        self.__exit__(None, None, None)
        with nogil:
            # The woken thread decrements thread_waiting once it owns the mutex; bounded, in case
            # it stopped meanwhile.
            while fsfu_load_int(&y.thread_waiting) > 0 and spins < 10000:
                sched_yield()
                spins += 1
        self.__enter__()
        return True


cdef class Datapath:
    """C tables (sockets, transports, producers, consumers) and the RTP forwarder over them.

    Two ways to run it: inline, where the event loop calls poll() (or drain()) when epoll_fd is
    readable; or on its own thread (start()), which waits on epoll_fd, forwards and sends with
    the GIL released, and hands slow-path datagrams to the loop through take_slow() when
    notify_fd is readable (docs/datapath.md).
    """

    def __cinit__(self, int max_sockets=256, int max_transports=4096, int max_producers=4096,
                  int max_consumers=65536, int out_slots=1024, double max_queue_age_ms=DEFAULT_MAX_QUEUE_AGE_MS,
                  int tcp_send_buffer=65536):
        cdef int i
        if min(max_sockets, max_transports, max_producers, max_consumers) < 1 or out_slots < SEND_BATCH:
            raise ValueError("datapath capacities must be positive (out_slots >= 64)")
        if not OUT_SLOT + 2 <= tcp_send_buffer <= 1 << 24:
            raise ValueError("tcp_send_buffer must hold at least one packet (3330 bytes .. 16 MiB)")
        self.tcp_tx_cap = tcp_send_buffer
        self.max_sockets = max_sockets
        self.max_transports = max_transports
        self.max_producers = max_producers
        self.max_consumers = max_consumers
        self.sockets = <Socket *>calloc(max_sockets, sizeof(Socket))
        self.transports = <Transport *>calloc(max_transports, sizeof(Transport))
        self.producers = <Producer *>calloc(max_producers, sizeof(Producer))
        self.consumers = <Consumer *>calloc(max_consumers, sizeof(Consumer))
        self.rbuf = <uint8_t *>calloc(RECV_BATCH, RECV_SLOT)
        self.out = <OutSlot *>calloc(out_slots, sizeof(OutSlot))
        self.dirty = <int *>calloc(max_sockets, sizeof(int))
        self.ring = <SlowSlot *>calloc(SLOW_RING, sizeof(SlowSlot))
        self.notify_fd = -1
        self.wake_fd = -1
        self.tables_lock = TableLock()
        self.sync = self.tables_lock.sync
        if not (self.sockets and self.transports and self.producers and self.consumers and self.rbuf
                and self.out and self.dirty and self.ring):
            raise MemoryError()
        table_init(&self.tuples, max_transports)
        table_init(&self.ssrcs, max_producers)
        table_init(&self.roams, max_transports)
        self.n_out = out_slots
        for i in range(out_slots):
            self.out[i].next = i + 1
        self.out[out_slots - 1].next = -1
        self.out_free = 0
        self.max_queue_age_ns = <int64_t>(max_queue_age_ms * 1e6)
        self.epoll_fd = epoll_create1(EPOLL_CLOEXEC)
        if self.epoll_fd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.output_mode = K_OUTPUT_SEND
        self.captured = []
        self.keepalive = [None] * max_transports
        self.consumer_srtp = {}
        for i in range(RECV_BATCH):
            self.riov[i].iov_base = self.rbuf + i * RECV_SLOT
            self.riov[i].iov_len = RECV_SLOT
            self.rmsgs[i].msg_hdr.msg_iov = &self.riov[i]
            self.rmsgs[i].msg_hdr.msg_iovlen = 1
            self.rmsgs[i].msg_hdr.msg_name = self.raddr[i]
            self.rmsgs[i].msg_hdr.msg_control = self.rctl[i]

    def __dealloc__(self):
        # No thread can be running here: it holds a reference to this object until stop() joins it.
        cdef int i
        if self.epoll_fd >= 0:
            close(self.epoll_fd)
        if self.sockets != NULL:
            for i in range(self.max_sockets):
                if self.sockets[i].tcp != NULL:
                    free(self.sockets[i].tcp.rx)
                    free(self.sockets[i].tcp.tx)
                    free(self.sockets[i].tcp)
        if self.notify_fd >= 0:
            close(self.notify_fd)
        if self.wake_fd >= 0:
            close(self.wake_fd)
        free(self.ring)
        for i in range(MAX_TAPS):
            if self.taps[i] != NULL:
                free(self.taps[i].slots)
                free(self.taps[i])
        if self.producers != NULL:
            for i in range(self.max_producers):
                free(self.producers[i].consumers)
        free(self.sockets)
        free(self.transports)
        free(self.producers)
        free(self.consumers)
        free(self.rbuf)
        free(self.out)
        free(self.dirty)
        free(self.tuples.entries)
        free(self.ssrcs.entries)
        free(self.roams.entries)

    def close(self) -> None:
        """Stop the thread, then release the epoll descriptor (sockets belong to the caller)."""
        self.stop()
        if self.epoll_fd >= 0:
            close(self.epoll_fd)
            self.epoll_fd = -1

    # ----------------------------------------------------------------- the datapath thread

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def thread_id(self) -> int | None:
        """The datapath thread's kernel thread id (for its scheduling priority), or None inline."""
        return None if self._thread is None else self._thread.native_id

    def start(self) -> None:
        """Run the datapath on its own thread: epoll_wait, recvmmsg, forward, sendmmsg, all with
        the GIL released. Slow-path datagrams and events then wait for take_slow()/take_events(),
        announced by notify_fd; poll(), drain() and process*() are refused until stop()."""
        cdef epoll_event ev
        if self._thread is not None:
            return
        if self.epoll_fd < 0:
            raise RuntimeError("datapath closed")
        if self.output_mode == K_OUTPUT_CAPTURE:
            raise ValueError("capture mode needs the inline datapath (it makes Python objects)")
        self.notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        ev.events = EPOLLIN
        ev.data.u32 = WAKE_TAG
        if self.notify_fd < 0 or self.wake_fd < 0 or epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, self.wake_fd, &ev) != 0:
            err = errno
            self._close_thread_fds()
            raise OSError(err, "cannot set up the datapath thread's descriptors")
        fsfu_store_int(&self.sync.stop, 0)
        fsfu_store_int(&self.sync.wake_pending, 0)
        thread = threading.Thread(target=self._run, name="fastsfu-datapath", daemon=True)
        thread.start()
        self._thread = thread

    def stop(self) -> None:
        """Stop and join the thread (idempotent); queued slow-path datagrams stay for take_slow()."""
        cdef uint64_t one = 1
        if self._thread is None:
            return
        fsfu_store_int(&self.sync.stop, 1)
        write(self.wake_fd, &one, 8)
        self._thread.join()                # releases the GIL; the thread exits after its batch
        self._thread = None
        epoll_ctl(self.epoll_fd, EPOLL_CTL_DEL, self.wake_fd, NULL)
        self._close_thread_fds()

    def _close_thread_fds(self) -> None:
        if self.notify_fd >= 0:
            close(self.notify_fd)
            self.notify_fd = -1
        if self.wake_fd >= 0:
            close(self.wake_fd)
            self.wake_fd = -1

    def _run(self) -> None:
        with nogil:
            self._thread_loop()

    cdef void _hand_off(self) noexcept nogil:
        """Give the tables to the control-plane call waiting for them, then take them back."""
        self.hand_offs += 1
        pthread_mutex_unlock(&self.sync.mu)
        self._wait_gate()
        fsfu_add_int(&self.sync.thread_waiting, 1)   # TableLock.hand_back() looks at it
        pthread_mutex_lock(&self.sync.mu)
        fsfu_add_int(&self.sync.thread_waiting, -1)

    cdef void _wait_gate(self) noexcept nogil:
        """Wait until the waiting control-plane caller (which holds gate) is done with the tables.
        Counted as waiting: a long hold of the caller's hands the tables back (hand_back), and a
        caller that came in through the gate holds it for its whole hold."""
        fsfu_add_int(&self.sync.thread_waiting, 1)
        pthread_mutex_lock(&self.sync.gate)
        fsfu_add_int(&self.sync.thread_waiting, -1)
        pthread_mutex_unlock(&self.sync.gate)

    cdef void _thread_loop(self) noexcept nogil:
        """Wait, then drain the ready sockets a batch each under the table mutex, flush, release;
        wake the event loop when slow-path datagrams or events are waiting (_notify_due)."""
        cdef int n, i, s, total, timeout
        cdef int64_t left
        cdef uint64_t fwd0, one = 1, junk
        cdef bint notify, waiting
        self.notify_deadline = 0
        while not fsfu_load_int(&self.sync.stop):
            timeout = -1
            if self.notify_deadline:
                left = self.notify_deadline - monotonic_ns()
                timeout = 0 if left <= 0 else <int>((left + 999999) // 1000000)
            n = epoll_wait(self.epoll_fd, self.ready, RECV_BATCH, timeout)
            if n < 0:
                if errno == EINTR:
                    continue
                self.drops[DROP_RECV_ERROR] += 1
                break                      # the epoll descriptor is gone: nothing left to wait on
            if n == 0:
                # Deferred RTCP's time is up and nothing else arrived.
                pthread_mutex_lock(&self.sync.mu)
                notify = self._notify_due()
                pthread_mutex_unlock(&self.sync.mu)
                if notify:
                    write(self.notify_fd, &one, 8)
                continue
            i = 0
            while i < n:
                fsfu_add_int(&self.sync.thread_waiting, 1)   # TableLock.hand_back() looks at it
                pthread_mutex_lock(&self.sync.mu)
                fsfu_add_int(&self.sync.thread_waiting, -1)
                total = 0
                fwd0 = self.fwd_packets
                while i < n and total < LOCK_DATAGRAMS and self.fwd_packets - fwd0 < LOCK_FORWARDS:
                    s = <int>self.ready[i].data.u32
                    i += 1
                    if <uint32_t>s == WAKE_TAG:
                        read(self.wake_fd, &junk, 8)
                    elif 0 <= s < self.max_sockets and self.sockets[s].in_use:
                        # One batch per ready socket per round; epoll is level-triggered, so a
                        # socket with more waiting is ready again next round (fair across rooms).
                        total += self._socket_ready(s, self.ready[i - 1].events, True)
                self._flush_all(True)
                notify = self._notify_due()
                waiting = fsfu_load_int(&self.sync.waiters) > 0
                if waiting:
                    self.hand_offs += 1       # counted under the mutex, like every counter
                pthread_mutex_unlock(&self.sync.mu)
                if notify:
                    write(self.notify_fd, &one, 8)
                if waiting:
                    self._wait_gate()         # a control-plane call has the tables now: wait for it

    cdef bint _notify_due(self) noexcept nogil:
        """Whether the thread writes notify_fd now (called under the table mutex).

        Events and every slow-path datagram but RTCP wake the loop at once: an ICE check, a DTLS
        flight or a Discord keep-alive is answered while its sender waits. RTCP alone waits up to
        SLOW_DEFER_MS for company: a receiver report a second or more apart needs no prompt
        answer, its arrival time travels with it (take_slow(stamped=True)), and each wake-up of
        the loop costs it far more than the report itself (docs/datapath.md)."""
        cdef int64_t now
        if self.pending_events == 0 and self.sync.ring_head == fsfu_load_u32(&self.sync.ring_tail):
            self.notify_deadline = 0       # the loop took everything (woken by something else)
            self.slow_urgent = 0
            return False
        if not (self.pending_events > 0 or self.slow_urgent or self._ring_room() < SLOW_RING // 2):
            now = monotonic_ns()
            if not self.notify_deadline:
                self.notify_deadline = now + <int64_t>SLOW_DEFER_MS * 1000000
                return False
            if now < self.notify_deadline:
                return False
        self.notify_deadline = 0
        self.slow_urgent = 0
        if fsfu_xchg_int(&self.sync.wake_pending, 1):
            return False                   # the loop has not read the last one: it takes these too
        self.loop_wakeups += 1
        return True

    # ----------------------------------------------------------------- programming the tables

    def add_socket(self, int fd, int family, bint timestamps=True) -> int:
        """Register a non-blocking UDP socket; returns its slot."""
        cdef int s, one = 1
        cdef epoll_event ev
        with self.tables_lock:
            if family != AF_INET and family != AF_INET6:
                raise ValueError("socket family must be AF_INET or AF_INET6")
            for s in range(self.max_sockets):
                if not self.sockets[s].in_use:
                    break
            else:
                raise OverflowError("datapath socket table is full")
            memset(&self.sockets[s], 0, sizeof(Socket))
            self.sockets[s].in_use = 1
            self.socket_gen += 1
            self.sockets[s].gen = self.socket_gen
            self.sockets[s].fd = fd
            self.sockets[s].family = family
            self.sockets[s].comedia_transport = -1
            self.sockets[s].peer = -1
            self.sockets[s].out_head = -1
            self.sockets[s].out_tail = -1
            # Kernel arrival times let us drop RTP that queued longer than max_queue_age.
            if fd >= 0 and timestamps and self.max_queue_age_ns > 0:
                self.sockets[s].timestamps = setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one)) == 0
            if fd >= 0:
                ev.events = EPOLLIN
                ev.data.u32 = s
                if epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0:
                    self.sockets[s].in_use = 0
                    raise OSError(errno, "epoll_ctl(ADD) failed")
            return s

    def remove_socket(self, int sock) -> None:
        cdef int t
        with self.tables_lock:
            self._check_socket(sock)
            if self.sockets[sock].tcp != NULL:
                raise ValueError("a TCP connection is removed with close_tcp_connection()")
            for t in range(self.max_transports):
                if self.transports[t].in_use and self.transports[t].sock == sock:
                    raise ValueError("socket still has transports")
            self._discard_queue(sock)
            if self.sockets[sock].fd >= 0:
                epoll_ctl(self.epoll_fd, EPOLL_CTL_DEL, self.sockets[sock].fd, NULL)
            self.sockets[sock].in_use = 0

    def set_socket_connect(self, int sock, bint on) -> None:
        """on: the socket serves one transport, so connect(2) it to that transport's remote
        whenever it has one, and send without a destination address (docs/datapath.md,
        "Connected sockets"); off: disconnect it. Only for a socket no other transport shares."""
        cdef int t
        with self.tables_lock:
            self._check_socket(sock)
            self.sockets[sock].connect_peer = on
            self._connect_peer(sock, -1)
            if on:
                for t in range(self.max_transports):
                    if self.transports[t].in_use and self.transports[t].sock == sock and self.transports[t].has_remote:
                        self._connect_peer(sock, t)
                        break

    def socket_peer(self, int sock) -> int:
        """The transport the socket is connect(2)ed to (sends carry no address), or -1."""
        with self.tables_lock:
            self._check_socket(sock)
            return self.sockets[sock].peer

    def add_transport(self, int sock, bint comedia=False) -> int:
        cdef int t
        with self.tables_lock:
            self._check_socket(sock)
            for t in range(self.max_transports):
                if not self.transports[t].in_use:
                    break
            else:
                raise OverflowError("datapath transport table is full")
            if comedia and self.sockets[sock].comedia_transport >= 0:
                raise ValueError("the socket already has a comedia transport waiting for its remote")
            memset(&self.transports[t], 0, sizeof(Transport))
            self.transports[t].in_use = 1
            self.transports[t].sock = sock
            self.transports[t].home_sock = sock
            self.transports[t].comedia = comedia
            if comedia:
                self.sockets[sock].comedia_transport = t
            return t

    def set_transport_comedia(self, int t, bint comedia) -> None:
        """Let the first authenticated RTP packet from an unknown tuple on this socket fix the remote."""
        cdef Transport *tr
        with self.tables_lock:
            self._check_transport(t)
            tr = &self.transports[t]
            if comedia == tr.comedia:
                return
            if comedia:
                if self.sockets[tr.sock].comedia_transport >= 0:
                    raise ValueError("the socket already has a comedia transport waiting for its remote")
                if not tr.has_remote:
                    self.sockets[tr.sock].comedia_transport = t
            elif self.sockets[tr.sock].comedia_transport == t:
                self.sockets[tr.sock].comedia_transport = -1
            tr.comedia = comedia

    def remove_transport(self, int t) -> None:
        cdef int p, c
        with self.tables_lock:
            self._check_transport(t)
            for c in range(self.max_consumers):
                if self.consumers[c].in_use and self.consumers[c].transport == t:
                    self.remove_consumer(c)
            for p in range(self.max_producers):
                if self.producers[p].in_use and self.producers[p].transport == t:
                    self.remove_producer(p)
            self._clear_remote(t)
            self.set_transport_roaming(t, None)
            if self.sockets[self.transports[t].sock].comedia_transport == t:
                self.sockets[self.transports[t].sock].comedia_transport = -1
            self.transports[t].in_use = 0
            self.keepalive[t] = None

    def set_transport_remote(self, int t, str ip, int port) -> None:
        """Admit the 5-tuple (local socket, ip, port) and send this transport's packets there."""
        cdef Transport *tr
        cdef Socket *so
        cdef sockaddr_in *s4
        cdef sockaddr_in6 *s6
        cdef bytes ipb = ip.encode("ascii")
        cdef uint8_t v4[4]
        cdef Key k
        with self.tables_lock:
            self._check_transport(t)
            if not 0 < port < 65536:
                raise ValueError("port must be 1..65535")
            tr = &self.transports[t]
            if tr.sock != tr.home_sock:
                self._clear_remote(t)       # back from an ICE-TCP connection to its own socket
                tr.sock = tr.home_sock
            so = &self.sockets[tr.sock]
            self._clear_remote(t)
            memset(tr.remote, 0, 28)
            if so.family == AF_INET:
                s4 = <sockaddr_in *>tr.remote
                s4.sin_family = AF_INET
                s4.sin_port = htons(port)
                if inet_pton(AF_INET, ipb, &s4.sin_addr) != 1:
                    raise ValueError(f"not an IPv4 address for an IPv4 socket: {ip!r}")
                tr.remote_len = sizeof(sockaddr_in)
            else:
                s6 = <sockaddr_in6 *>tr.remote
                s6.sin6_family = AF_INET6
                s6.sin6_port = htons(port)
                if inet_pton(AF_INET6, ipb, &s6.sin6_addr) != 1:
                    if inet_pton(AF_INET, ipb, v4) != 1:
                        raise ValueError(f"not an IP address: {ip!r}")
                    s6.sin6_addr.s6_addr[10] = 0xFF
                    s6.sin6_addr.s6_addr[11] = 0xFF
                    memcpy(&s6.sin6_addr.s6_addr[12], v4, 4)
                tr.remote_len = sizeof(sockaddr_in6)
            tuple_key_from_sockaddr(&k, tr.sock, tr.remote)
            if table_get(&self.tuples, &k) >= 0:
                raise ValueError(f"the tuple {ip}:{port} already belongs to another transport")
            self._bind_tuple(t, &k)

    def clear_transport_remote(self, int t) -> None:
        with self.tables_lock:
            self._check_transport(t)
            self._clear_remote(t)

    def set_transport_roaming(self, int t, object ssrc) -> None:
        """Let an RTP packet with this SSRC from an unknown address on the transport's socket move
        the transport's remote there, if it authenticates with the transport's AEAD context (a
        client whose NAT rebound); None: never. SSRCs must be unique per socket (Discord
        transports' are), and the mode must have a replay window (the rtpsize AEAD modes), or a
        recorded packet could be replayed from anywhere."""
        cdef Transport *tr
        cdef Key k
        cdef uint32_t value
        with self.tables_lock:
            self._check_transport(t)
            tr = &self.transports[t]
            if ssrc is not None:
                value = ssrc
                if tr.aead == NULL or fsfu_aead_legacy(tr.aead):
                    raise ValueError("roaming needs an rtpsize AEAD context (a replay window)")
                ssrc_key(&k, tr.sock, value)
                if table_get(&self.roams, &k) not in (-1, t):
                    raise ValueError(f"SSRC {value} already roams on this socket")
            if tr.roaming:
                ssrc_key(&k, tr.sock, tr.roam_ssrc)
                table_del(&self.roams, &k)
                tr.roaming = 0
            if ssrc is not None:
                ssrc_key(&k, tr.sock, value)
                table_put(&self.roams, &k, t)
                tr.roaming = 1
                tr.roam_ssrc = value

    def set_transport_yields_tuple(self, int t, bint yields) -> None:
        """Let another roaming transport of the socket take this transport's remote tuple when an
        RTP packet from that tuple names the other's SSRC and authenticates with the other's key
        (the OS gave a departed client's port to a new client while this session waits for
        RESUME). Only a transport whose client is gone should yield: a live one never does."""
        with self.tables_lock:
            self._check_transport(t)
            self.transports[t].yields_tuple = yields

    def set_transport_srtp(self, int t, inbound, outbound) -> None:
        """Install SRTP contexts (objects with an `address` of a libsrtp srtp_t), or None for plain RTP."""
        with self.tables_lock:
            self._check_transport(t)
            if (inbound is not None or outbound is not None) and g_protect == NULL:
                raise RuntimeError("libsrtp functions are not installed (import fastsfu.srtp)")
            if self.transports[t].aead != NULL:
                raise ValueError("the transport uses Discord transport encryption")
            self.transports[t].srtp_in = <void *><uintptr_t>(inbound.address if inbound is not None else 0)
            self.transports[t].srtp_out = <void *><uintptr_t>(outbound.address if outbound is not None else 0)
            self.keepalive[t] = (inbound, outbound)

    def set_consumer_srtp(self, int c, outbound) -> None:
        """Give a consumer an SRTP session of its own (an object with the `address` of a libsrtp
        srtp_t holding the consumer's one stream), or None to use its transport's session.

        libsrtp finds a stream by walking its session's list; in the transport's session every
        forwarded packet walked past the transport's other consumers (benchmarks/README.md,
        "Where the time goes at 24.5 k")."""
        with self.tables_lock:
            self._check_consumer(c)
            if outbound is not None and g_protect == NULL:
                raise RuntimeError("libsrtp functions are not installed (import fastsfu.srtp)")
            self.consumers[c].srtp_out = <void *><uintptr_t>(outbound.address if outbound is not None else 0)
            if outbound is None:
                self.consumer_srtp.pop(c, None)
            else:
                self.consumer_srtp[c] = outbound

    def set_transport_aead(self, int t, AeadContext context) -> None:
        """Protect this transport with a Discord rtpsize AEAD mode (None: none). Its receivers get
        CC 0 and no CSRCs, as Discord clients require (docs/transports.md#encryption-modes)."""
        with self.tables_lock:
            self._check_transport(t)
            if context is not None and (self.transports[t].srtp_in != NULL or self.transports[t].srtp_out != NULL):
                raise ValueError("the transport uses SRTP")
            self.transports[t].aead = &context.ctx if context is not None else NULL
            self.keepalive[t] = context

    def add_producer(self, int t, uint32_t ssrc, int payload_type, uint32_t clock_rate,
                     dict ext_kinds) -> int:
        """Route RTP with this SSRC arriving on transport t; ext_kinds maps extension ID -> kind."""
        cdef int p
        cdef Key k
        cdef Producer *pr
        with self.tables_lock:
            self._check_transport(t)
            if not 0 <= payload_type < 128 or clock_rate == 0:
                raise ValueError("payload type must be 0..127 and clock rate positive")
            ssrc_key(&k, t, ssrc)
            if table_get(&self.ssrcs, &k) >= 0:
                raise ValueError(f"SSRC {ssrc} is already produced on this transport")
            for p in range(self.max_producers):
                if not self.producers[p].in_use:
                    break
            else:
                raise OverflowError("datapath producer table is full")
            memset(&self.producers[p], 0, sizeof(Producer))
            pr = &self.producers[p]
            for eid, kind in ext_kinds.items():
                if not 1 <= eid <= 255 or not 0 <= kind < MAX_EXT_KINDS:
                    raise ValueError("extension IDs must be 1..255 and kinds 0..31")
                pr.ext_kind[eid] = kind
            pr.in_use = 1
            pr.transport = t
            pr.ssrc = ssrc
            pr.pt = payload_type
            pr.red_pt = NO_PT
            pr.clock_rate = clock_rate
            pr.level_min = 127               # no level yet: silence (RFC 6464 §3)
            table_put(&self.ssrcs, &k, p)
            return p

    def set_producer_red(self, int p, int red_pt) -> None:
        """p may also send audio/red (RFC 2198) with PT red_pt, its blocks in p's Opus PT; -1: not."""
        with self.tables_lock:
            self._check_producer(p)
            self.producers[p].red_pt = red_pt_entry(red_pt, self.producers[p].pt)

    def set_consumer_red(self, int c, int red_pt) -> None:
        """Forward RED to c as PT red_pt (its blocks in c's Opus PT); -1: unwrap RED to Opus."""
        with self.tables_lock:
            self._check_consumer(c)
            self.consumers[c].red_pt = red_pt_entry(red_pt, self.consumers[c].pt)

    def set_producer_paused(self, int p, bint paused) -> None:
        with self.tables_lock:
            self._check_producer(p)
            if self.producers[p].paused and not paused:
                self.producers[p].epoch += 1     # consumers continue seamlessly after a resume
            self.producers[p].paused = paused

    def set_producer_levels(self, int p, bint on) -> bool:
        """Read ssrc-audio-level (RFC 6464) from p's packets (an observer wants them); False if
        p did not negotiate the extension. Packets are then authenticated even with no receiver."""
        cdef int eid
        cdef Producer *pr
        with self.tables_lock:
            self._check_producer(p)
            pr = &self.producers[p]
            pr.level_id = 0
            if on:
                for eid in range(1, 256):
                    if pr.ext_kind[eid] == KIND_AUDIO_LEVEL:
                        pr.level_id = eid
                        break
            pr.level_count = pr.level_sum = pr.level_voiced = 0
            pr.level_min = 127
            return pr.level_id != 0

    def take_levels(self, list slots) -> list:
        """(count, sum, min, voiced, recent) of each producer's levels since the last call, and reset:
        one table hold for a whole room, on a timer (never per packet). `recent`: the last
        LEVEL_RECENT levels (-dBov) in arrival order, one per packet."""
        cdef int p
        cdef Producer *pr
        out = []
        with self.tables_lock:
            for p in slots:
                self._check_producer(p)
                pr = &self.producers[p]
                out.append((pr.level_count, pr.level_sum, pr.level_min, pr.level_voiced, self._recent_levels(pr)))
                pr.level_count = pr.level_sum = pr.level_voiced = 0
                pr.level_min = 127
        return out

    cdef bytes _recent_levels(self, Producer *pr):
        """The interval's last (up to LEVEL_RECENT) levels, oldest first, from the ring."""
        cdef uint32_t n = pr.level_count, head = pr.level_count % LEVEL_RECENT
        cdef const char *ring = <const char *>pr.level_recent
        if n <= LEVEL_RECENT:
            return ring[:n]
        return ring[head:LEVEL_RECENT] + ring[:head]

    def remove_producer(self, int p) -> None:
        cdef Key k
        cdef Producer *pr
        with self.tables_lock:
            self._check_producer(p)
            pr = &self.producers[p]
            while pr.n_consumers:
                self.remove_consumer(pr.consumers[pr.n_consumers - 1])
            ssrc_key(&k, pr.transport, pr.ssrc)
            table_del(&self.ssrcs, &k)
            free(pr.consumers)
            pr.consumers = NULL
            pr.cap_consumers = 0
            pr.in_use = 0

    def add_consumer(self, int p, int t, uint32_t ssrc, int payload_type, dict ext_ids,
                     bytes mid=b"", bint paused=False, bint passthrough=False, outbound=None) -> int:
        """Forward producer p to transport t as SSRC ssrc; ext_ids maps kind -> extension ID.

        passthrough (a pipe consumer, docs/transports.md): sequence numbers and timestamps go out
        as the producer sent them, with no resync after a pause and no stale-packet drop.
        outbound: the consumer's own SRTP session (set_consumer_srtp), in place from its first packet.
        """
        cdef int c
        cdef int32_t *grown
        cdef Producer *pr
        cdef Consumer *co
        with self.tables_lock:
            self._check_producer(p)
            self._check_transport(t)
            if not 0 <= payload_type < 128 or len(mid) > MID_MAX:
                raise ValueError("payload type must be 0..127 and mid at most 16 bytes")
            # First fit, from the first slot that may be free: a scan from 0 walked every consumer
            # in use (microseconds each at thousands, under the mutex) for each one added.
            for c in range(self.consumer_hint, self.max_consumers):
                if not self.consumers[c].in_use:
                    break
            else:
                self.consumer_hint = self.max_consumers
                raise OverflowError("datapath consumer table is full")
            pr = &self.producers[p]
            if pr.n_consumers == pr.cap_consumers:
                grown = <int32_t *>realloc(pr.consumers, (pr.cap_consumers * 2 + 4) * sizeof(int32_t))
                if grown == NULL:
                    raise MemoryError()
                pr.consumers = grown
                pr.cap_consumers = pr.cap_consumers * 2 + 4
            memset(&self.consumers[c], 0, sizeof(Consumer))
            co = &self.consumers[c]
            for kind, eid in ext_ids.items():
                if not 0 < kind < MAX_EXT_KINDS or not 0 <= eid <= 255:
                    raise ValueError("extension kinds must be 1..31 and IDs 0..255")
                co.ext_id[kind] = eid
            co.mid_len = len(mid)
            memcpy(co.mid, <const char *>mid, len(mid))
            co.in_use = 1
            self.consumer_hint = c + 1
            co.producer = p
            co.transport = t
            co.paused = paused
            co.ssrc = ssrc
            co.pt = payload_type
            co.red_pt = NO_PT
            co.passthrough = passthrough
            co.sync_needed = 1
            co.epoch = pr.epoch
            if outbound is not None:
                if g_protect == NULL:
                    raise RuntimeError("libsrtp functions are not installed (import fastsfu.srtp)")
                co.srtp_out = <void *><uintptr_t>outbound.address
                self.consumer_srtp[c] = outbound
            pr.consumers[pr.n_consumers] = c
            pr.n_consumers += 1
            if not paused:
                pr.n_active += 1
            return c

    # ----------------------------------------------------------------- recording taps

    def add_tap(self, int slots=512) -> int:
        """A bounded ring that direct consumers copy decrypted payloads into (docs/recording.md)."""
        cdef int r
        cdef uint32_t cap = 16
        cdef TapRing *ring
        if not 16 <= slots <= 65536:
            raise ValueError("tap slots must be 16..65536")
        while cap < <uint32_t>slots:
            cap <<= 1
        with self.tables_lock:
            for r in range(MAX_TAPS):
                if self.taps[r] == NULL:
                    break
            else:
                raise OverflowError("too many recording taps")
            ring = <TapRing *>calloc(1, sizeof(TapRing))
            if ring == NULL:
                raise MemoryError()
            ring.slots = <TapSlot *>calloc(cap, sizeof(TapSlot))
            if ring.slots == NULL:
                free(ring)
                raise MemoryError()
            ring.cap = cap
            self.taps[r] = ring
            return r

    def remove_tap(self, int r) -> None:
        """Remove the tap and its direct consumers."""
        cdef int c
        with self.tables_lock:
            self._check_tap(r)
            for c in range(self.max_consumers):
                if self.consumers[c].in_use and self.consumers[c].direct == r + 1:
                    self.remove_consumer(c)
            free(self.taps[r].slots)
            free(self.taps[r])
            self.taps[r] = NULL

    def add_direct_consumer(self, int p, int r) -> int:
        """Copy producer p's decrypted payloads into tap r (a consumer with no transport)."""
        cdef int c
        with self.tables_lock:
            self._check_tap(r)
            self._check_producer(p)
            # Borrow the producer's own transport for the checks; direct marks it as a tap.
            c = self.add_consumer(p, self.producers[p].transport, 0, self.producers[p].pt, {})
            self.consumers[c].transport = -1
            self.consumers[c].direct = r + 1
            return c

    def take_tap(self, int r) -> bytes:
        """The packets waiting in tap r, packed: per packet a 32-byte little-endian header
        (consumer i32, length i32, timestamp u32, pad u32, extended seq i64, arrival ns i64)
        and the payload. One copy under the tables; the caller parses it off the lock."""
        cdef TapRing *ring
        cdef TapSlot *slot
        cdef uint32_t i
        cdef Py_ssize_t total = 0, off = 0
        cdef bytes out
        cdef char *o
        with self.tables_lock:
            self._check_tap(r)
            ring = self.taps[r]
            for i in range(ring.tail, ring.head):
                total += 32 + ring.slots[i & (ring.cap - 1)].len
            out = PyBytes_FromStringAndSize(NULL, total)
            o = <char *>out
            while ring.tail != ring.head:
                slot = &ring.slots[ring.tail & (ring.cap - 1)]
                memcpy(o + off, slot, 32)
                memcpy(o + off + 32, slot.data, slot.len)
                off += 32 + slot.len
                ring.tail += 1
            return out

    def tap_stats(self, int r) -> dict:
        cdef TapRing *ring
        with self.tables_lock:
            self._check_tap(r)
            ring = self.taps[r]
            return {"packets": ring.packets, "bytes": ring.bytes, "ring_full": ring.full,
                    "oversize": ring.oversize, "waiting": ring.head - ring.tail, "slots": ring.cap}

    cdef int _check_tap(self, int r) except -1:
        if not (0 <= r < MAX_TAPS and self.taps[r] != NULL):
            raise KeyError(f"no tap {r}")
        return 0

    def set_consumer_paused(self, int c, bint paused) -> None:
        cdef Consumer *co
        with self.tables_lock:
            self._check_consumer(c)
            co = &self.consumers[c]
            if co.paused == paused:
                return
            co.paused = paused
            if paused:
                self.producers[co.producer].n_active -= 1
            else:
                self.producers[co.producer].n_active += 1
                co.sync_needed = 1             # seq/ts continue from the last packet sent (no gap)

    def remove_consumer(self, int c) -> None:
        cdef int i
        cdef Consumer *co
        cdef Producer *pr
        with self.tables_lock:
            self._check_consumer(c)
            co = &self.consumers[c]
            pr = &self.producers[co.producer]
            for i in range(pr.n_consumers):
                if pr.consumers[i] == c:
                    # Keep creation order: fan-out order stays predictable (and matches the reference).
                    memmove(&pr.consumers[i], &pr.consumers[i + 1], (pr.n_consumers - i - 1) * sizeof(int32_t))
                    pr.n_consumers -= 1
                    break
            if not co.paused:
                pr.n_active -= 1
            co.in_use = 0
            if c < self.consumer_hint:
                self.consumer_hint = c
            co.srtp_out = NULL
            self.consumer_srtp.pop(c, None)

    # ----------------------------------------------------------------- I/O

    def drain(self, int sock, int budget=4096):
        """Receive from one socket until EAGAIN (or budget datagrams), forward RTP in C, flush.

        Returns the slow-path datagrams as a list of (kind, transport, data, (ip, port), socket),
        or None when there were none. Inline mode only.
        """
        with self.tables_lock:
            self._check_inline()
            self._check_socket(sock)
            with nogil:
                self._drain(sock, budget)
                self._flush_all()
            return self._take_slow()

    def poll(self, int budget=4096):
        """Drain every ready socket (epoll, no wait), then send everything with one sendmmsg per
        destination socket. One Python call per loop wake-up, whatever the number of sockets;
        returns the slow-path datagrams like drain(). Inline mode only."""
        cdef int n, i, s, total = 0
        with self.tables_lock:
            self._check_inline()
            with nogil:
                while total < budget and self._ring_room() >= RECV_BATCH:
                    n = epoll_wait(self.epoll_fd, self.ready, RECV_BATCH, 0)
                    if n <= 0:
                        break
                    for i in range(n):
                        s = <int>self.ready[i].data.u32
                        if 0 <= s < self.max_sockets and self.sockets[s].in_use:
                            if self.sockets[s].tcp != NULL:
                                total += self._tcp_ready(s, self.ready[i].events, False)
                            else:
                                total += self._drain(s, budget)
                    self._flush_all()
            return self._take_slow()

    def take_slow(self, bint stamped=False):
        """The slow-path datagrams the thread queued, like poll()'s result (None if none); reads
        notify_fd. Call it from the one consumer thread (the event loop). stamped: each tuple
        ends with its arrival time (CLOCK_REALTIME ns): RTCP may wait in the ring (_notify_due)."""
        cdef uint64_t junk
        if self.notify_fd >= 0:
            read(self.notify_fd, &junk, 8)
        # Clear before reading the ring: a datagram queued after this writes notify_fd again.
        fsfu_xchg_int(&self.sync.wake_pending, 0)
        return self._take_slow(stamped)

    cdef object _take_slow(self, bint stamped=False):
        """Copy the ring's datagrams out as Python tuples (consumer side; no table mutex needed)."""
        cdef uint32_t tail = self.sync.ring_tail
        cdef uint32_t head = fsfu_load_u32(&self.sync.ring_head)
        cdef SlowSlot *slot
        if tail == head:
            return None
        out = []
        while tail != head:
            slot = &self.ring[tail & (SLOW_RING - 1)]
            if stamped:
                out.append((slot.kind, slot.transport, PyBytes_FromStringAndSize(<char *>slot.data, slot.len),
                            self._addr_tuple(slot.addr), slot.sock, slot.arrival_ns))
            else:
                out.append((slot.kind, slot.transport, PyBytes_FromStringAndSize(<char *>slot.data, slot.len),
                            self._addr_tuple(slot.addr), slot.sock))
            tail += 1
        fsfu_store_u32(&self.sync.ring_tail, tail)
        return out

    cdef inline uint32_t _ring_room(self) noexcept nogil:
        return SLOW_RING - (self.sync.ring_head - fsfu_load_u32(&self.sync.ring_tail))

    cdef void _slow_push(self, int kind, int t, int i, int n, int sock, int64_t wall) noexcept nogil:
        """Copy datagram i, received at wall (CLOCK_REALTIME ns; 0: now), into the slow-path ring
        (producer side); a full ring is a counted drop."""
        cdef uint32_t head = self.sync.ring_head
        cdef SlowSlot *slot
        if self._ring_room() == 0:
            self._drop(&self.transports[t] if t >= 0 else NULL, DROP_SLOW_RING_FULL)
            return
        if kind != K_SLOW_RTCP:
            self.slow_urgent = 1
        slot = &self.ring[head & (SLOW_RING - 1)]
        slot.kind = kind
        slot.transport = t
        slot.sock = sock
        slot.len = n
        # The kernel's receive time when the socket stamps datagrams, else the batch's clock.
        slot.arrival_ns = wall - self._queue_age(i, wall) if wall else realtime_ns()
        memcpy(slot.addr, self.raddr[i], 28)
        memcpy(slot.data, self.rbuf + i * RECV_SLOT, n)
        fsfu_store_u32(&self.sync.ring_head, head + 1)
        self.slow_packets += 1

    cdef int _check_inline(self) except -1:
        if self._thread is not None:
            raise RuntimeError("the datapath runs on its own thread: use take_slow()")
        return 0

    cdef int _drain(self, int sock, int budget) noexcept nogil:
        """recvmmsg until the queue is empty or budget; outputs stay queued for the caller's flush.
        Inline, it stops while the slow-path ring could overflow: the rest waits in the kernel."""
        cdef int n, total = 0
        while total < budget and self._ring_room() >= RECV_BATCH:
            n = self._drain_batch(sock, False)
            total += n
            if n < RECV_BATCH:
                break                      # the queue is empty; a new datagram wakes us again
        return total

    cdef int _drain_batch(self, int sock, bint on_thread) noexcept nogil:
        """One recvmmsg (up to RECV_BATCH datagrams), each handled; returns how many arrived.

        On the thread, a control-plane call waiting for the tables gets them between two
        datagrams: with a large fan-out one batch is thousands of sends, too long to wait for."""
        cdef int n, i, kind, t, m, fd
        cdef int64_t now, wall, age
        cdef uint32_t gen = self.sockets[sock].gen
        fd = self.sockets[sock].fd
        while True:
            for i in range(RECV_BATCH):
                self.rmsgs[i].msg_hdr.msg_namelen = 28
                self.rmsgs[i].msg_hdr.msg_controllen = CMSG_BUF if self.sockets[sock].timestamps else 0
                self.rmsgs[i].msg_hdr.msg_flags = 0
            n = recvmmsg(fd, self.rmsgs, RECV_BATCH, MSG_DONTWAIT, NULL)
            if n >= 0:
                break
            if errno != EINTR:
                if errno != EAGAIN:        # EWOULDBLOCK == EAGAIN on Linux
                    self.drops[DROP_RECV_ERROR] += 1
                return 0
        self.batches += 1
        now = monotonic_ns()
        wall = realtime_ns() if self.sockets[sock].timestamps else 0
        for i in range(n):
            if on_thread:
                if (i & 15) == 15:
                    # Send as we go: a flush can hand the tables over between its chunks, a
                    # fan-out in progress cannot, so the output slots never fill up.
                    self._flush_all(True)
                if fsfu_load_int(&self.sync.waiters) > 0:
                    # No flush first: the queued packets wait in their slots for the length of
                    # the control-plane call.
                    self._hand_off()
                if not self.sockets[sock].in_use or self.sockets[sock].gen != gen:
                    return n               # the socket went away during a hand-off: so does the rest
            if self.rmsgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                self.drops[DROP_OVERSIZE] += 1
                continue
            if wall and is_media_rtp(self.rbuf + i * RECV_SLOT, self.rmsgs[i].msg_len):
                # Only RTP ages out (docs/datapath.md): STUN, DTLS, RTCP, keep-alives and
                # IP discovery are kept however long they queued; losing one costs a
                # retransmission timeout or a failed handshake, not 20 ms of audio.
                age = self._queue_age(i, wall)
                if age > self.max_queue_age_ns:
                    self.drops[DROP_QUEUE_AGE] += 1
                    continue
                if age > <int64_t>LATE_MS * 1000000:
                    self.late_packets += 1
            kind = self._handle(sock, self.rbuf + i * RECV_SLOT, self.rmsgs[i].msg_len,
                                self.raddr[i], now, &t, &m)
            if kind:
                self._slow_push(kind, t, i, m, sock, wall)
        return n

    def process(self, int sock, const uint8_t[:] data, str ip, int port, int64_t now_ns):
        """Handle one datagram as if it arrived on sock from (ip, port) at now_ns (tests, benchmarks)."""
        cdef int t, m, kind, n = data.shape[0]
        with self.tables_lock:
            self._check_inline()
            self._check_socket(sock)
            if n > RECV_SLOT:
                self.drops[DROP_OVERSIZE] += 1
                return None
            self._fake_source(sock, ip, port)
            if n:
                memcpy(self.rbuf, &data[0], n)
            kind = self._handle(sock, self.rbuf, n, self.raddr[0], now_ns, &t, &m)
            self._flush_all()
            if kind:
                return [self._slow_item(kind, t, 0, m, sock)]
            return None

    def process_many(self, int sock, const uint8_t[:] packed, const uint32_t[:] lengths, str ip,
                     int port, int64_t now_ns, int64_t step_ns=0) -> int:
        """Handle back-to-back datagrams (lengths[i] bytes each) from one source; returns the count.

        The in-memory benchmark entry point: one Python call for the whole run.
        """
        cdef int i, t, m, kind, off = 0, n = lengths.shape[0]
        cdef int total = packed.shape[0]
        with self.tables_lock:
            self._check_inline()
            self._check_socket(sock)
            self._fake_source(sock, ip, port)
            for i in range(n):
                if lengths[i] > RECV_SLOT or off + <int>lengths[i] > total:
                    raise ValueError("lengths do not fit the packed buffer")
                memcpy(self.rbuf, &packed[off], lengths[i])
                off += lengths[i]
                kind = self._handle(sock, self.rbuf, lengths[i], self.raddr[0], now_ns + i * step_ns, &t, &m)
                if (i & 63) == 63:
                    self._flush_all()
            self._flush_all()
            return n

    def flush(self) -> None:
        """Send everything queued (after send_rtcp(..., flush=False) calls)."""
        with self.tables_lock:
            with nogil:
                self._flush_all()

    def send_rtcp(self, int t, const uint8_t[:] data, bint flush=True) -> bool:
        """Protect (SRTCP) and queue one compound RTCP packet on transport t; send it unless flush=False."""
        cdef int slot, n = data.shape[0]
        cdef Transport *tr
        with self.tables_lock:
            self._check_transport(t)
            tr = &self.transports[t]
            if not tr.has_remote:
                self.drops[DROP_NO_REMOTE] += 1
                return False
            if n < 8 or n + SRTCP_TRAILER > OUT_SLOT:
                raise ValueError("RTCP packet size out of range")
            slot = self._alloc_out()
            memcpy(self.out[slot].data, &data[0], n)
            if tr.srtp_out != NULL and g_protect_rtcp(tr.srtp_out, self.out[slot].data, &n) != 0:
                self._release_out(slot)
                self.drops[DROP_ENCRYPT_FAILED] += 1
                return False
            if tr.aead != NULL:
                n = fsfu_aead_seal(tr.aead, self.out[slot].data, n, 8)
                if n < 0:
                    self._release_out(slot)
                    self.drops[DROP_ENCRYPT_FAILED] += 1
                    return False
            self.out[slot].len = n
            self._enqueue(slot, tr)
            if flush:
                with nogil:
                    self._flush_all()
            return True

    # ----------------------------------------------------------------- output modes and stats

    def set_output_mode(self, int mode) -> None:
        """K_OUTPUT_SEND (sendmmsg), K_OUTPUT_CAPTURE (keep for take_captured) or K_OUTPUT_DISCARD."""
        with self.tables_lock:
            if mode not in (K_OUTPUT_SEND, K_OUTPUT_CAPTURE, K_OUTPUT_DISCARD):
                raise ValueError("unknown output mode")
            if mode == K_OUTPUT_CAPTURE and self._thread is not None:
                raise ValueError("capture mode needs the inline datapath (it makes Python objects)")
            self.output_mode = mode

    def take_captured(self) -> list:
        """Datagrams kept in K_OUTPUT_CAPTURE mode: (socket slot, (ip, port), bytes)."""
        out, self.captured = self.captured, []
        return out

    def take_events(self) -> list:
        """(kind, transport, value) events since the last call: learned tuples, unknown SSRCs."""
        cdef int i
        # Most wake-ups carry slow-path datagrams only: do not stop the thread to learn that.
        if not fsfu_xchg_int(&self.sync.events_flag, 0):
            return []
        with self.tables_lock:
            out = [(self.events[i].kind, self.events[i].transport, self.events[i].value)
                   for i in range(self.pending_events)]
            self.pending_events = 0
            return out

    def drop_counts(self) -> dict:
        with self.tables_lock:
            return {DROP_REASONS[i]: self.drops[i] for i in range(N_DROPS)}

    def stats(self) -> dict:
        with self.tables_lock:
            return {"rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                    "forwarded_packets": self.fwd_packets, "forwarded_bytes": self.fwd_bytes,
                    "batches": self.batches, "slow_path_packets": self.slow_packets,
                    "late_packets": self.late_packets, "table_hand_offs": self.hand_offs,
                    "loop_wakeups": self.loop_wakeups,
                    "events_lost": self.events_lost, "drops": self.drop_counts()}

    def transport_stats(self, int t) -> dict:
        cdef Transport *tr
        with self.tables_lock:
            self._check_transport(t)
            tr = &self.transports[t]
            return {"rx_packets": tr.rx_packets, "rx_bytes": tr.rx_bytes, "tx_packets": tr.tx_packets,
                    "tx_bytes": tr.tx_bytes, "rtcp_rx_packets": tr.rtcp_rx, "has_remote": bool(tr.has_remote),
                    "authenticated_packets": tr.auth_packets,
                    "remote": self._remote_tuple(tr) if tr.has_remote else None,
                    "drops": {DROP_REASONS[i]: tr.drops[i] for i in range(N_DROPS) if tr.drops[i]}}

    def producer_stats(self, int p) -> dict:
        cdef Producer *pr
        cdef int64_t expected
        with self.tables_lock:
            self._check_producer(p)
            pr = &self.producers[p]
            expected = pr.expected_prior + (pr.highest - pr.base + 1 if pr.have_seq else 0)
            return {"packets": pr.packets, "bytes": pr.bytes, "drops": pr.drops,
                    "highest_seq": (pr.highest & 0xFFFF) if pr.have_seq else None,
                    "extended_highest_seq": pr.highest if pr.have_seq else None,
                    "expected": expected, "lost": max(0, expected - <int64_t>pr.packets),
                    "jitter": pr.jitter_q4 >> 4, "epoch": pr.epoch,
                    "consumers": pr.n_consumers, "active_consumers": pr.n_active,
                    "red_packets": pr.red_packets}

    def consumer_stats(self, int c) -> dict:
        cdef Consumer *co
        with self.tables_lock:
            self._check_consumer(c)
            co = &self.consumers[c]
            return {"packets": co.packets, "bytes": co.bytes, "drops": co.drops,
                    "last_seq": co.last_seq if co.has_sent else None,
                    "last_timestamp": co.last_ts if co.has_sent else None,
                    "last_send_ns": co.last_ns if co.has_sent else None}

    def sender_states(self, list slots) -> list:
        """For each consumer slot: (last RTP timestamp, its send time in ns, packets, bytes), or
        None before its first packet. A transport's RTCP report reads all its streams in one call
        under one hold of the mutex."""
        cdef int c
        cdef Consumer *co
        out = []
        with self.tables_lock:
            for c in slots:
                self._check_consumer(c)
                co = &self.consumers[c]
                out.append((co.last_ts, co.last_ns, co.packets, co.bytes) if co.has_sent else None)
        return out

    # ----------------------------------------------------------------- internals (control path)

    cdef int _check_socket(self, int s) except -1:
        if not (0 <= s < self.max_sockets and self.sockets[s].in_use):
            raise KeyError(f"no socket {s}")
        return 0

    cdef int _check_transport(self, int t) except -1:
        if not (0 <= t < self.max_transports and self.transports[t].in_use):
            raise KeyError(f"no transport {t}")
        return 0

    cdef int _check_producer(self, int p) except -1:
        if not (0 <= p < self.max_producers and self.producers[p].in_use):
            raise KeyError(f"no producer {p}")
        return 0

    cdef int _check_consumer(self, int c) except -1:
        if not (0 <= c < self.max_consumers and self.consumers[c].in_use):
            raise KeyError(f"no consumer {c}")
        return 0

    cdef void _bind_tuple(self, int t, Key *k) noexcept nogil:
        cdef Transport *tr = &self.transports[t]
        tr.tuple_key = k[0]
        tr.has_remote = 1
        table_put(&self.tuples, k, t)
        if self.sockets[tr.sock].comedia_transport == t:
            self.sockets[tr.sock].comedia_transport = -1
        if self.sockets[tr.sock].connect_peer:
            if self.sockets[tr.sock].peer >= 0 and self.sockets[tr.sock].peer != t:
                # A second remote on the socket after all: addressed sends from now on.
                self.sockets[tr.sock].connect_peer = 0
                self._connect_peer(tr.sock, -1)
            else:
                self._connect_peer(tr.sock, t)

    cdef void _connect_peer(self, int sock, int t) noexcept nogil:
        """Connect the socket to transport t's remote (-1: disconnect it). A connected UDP
        socket sends without a per-datagram route lookup and only receives from its peer, so a
        socket is connected only while exactly one transport, t, uses it."""
        cdef Socket *so = &self.sockets[sock]
        cdef sockaddr unspec
        if so.peer >= 0:
            # Queued datagrams were meant for the old peer: send them before it changes.
            self._flush_socket(sock, False)
            so.peer = -1
            if so.fd >= 0:
                memset(&unspec, 0, sizeof(unspec))
                unspec.sa_family = AF_UNSPEC      # connect(2): AF_UNSPEC dissolves the association
                connect(so.fd, &unspec, sizeof(unspec))
        if t < 0 or not so.connect_peer:
            return
        if so.fd < 0 or connect(so.fd, <sockaddr *>self.transports[t].remote, self.transports[t].remote_len) == 0:
            so.peer = t

    cdef void _clear_remote(self, int t) noexcept nogil:
        cdef Transport *tr = &self.transports[t]
        if tr.has_remote:
            table_del(&self.tuples, &tr.tuple_key)
            tr.has_remote = 0
            if self.sockets[tr.sock].peer == t:
                self._connect_peer(tr.sock, -1)
            if tr.comedia:
                self.sockets[tr.sock].comedia_transport = t

    cdef object _remote_tuple(self, Transport *tr):
        return self._addr_tuple(tr.remote)

    cdef object _addr_tuple(self, const uint8_t *sa):
        cdef char text[64]
        cdef const sockaddr_in *s4
        cdef const sockaddr_in6 *s6
        if (<const sockaddr *>sa).sa_family == AF_INET:
            s4 = <const sockaddr_in *>sa
            inet_ntop(AF_INET, &s4.sin_addr, text, 64)
            return (text.decode("ascii"), ntohs(s4.sin_port))
        s6 = <const sockaddr_in6 *>sa
        inet_ntop(AF_INET6, &s6.sin6_addr, text, 64)
        return (text.decode("ascii"), ntohs(s6.sin6_port))

    cdef object _slow_item(self, int kind, int t, int i, int n, int sock):
        self.slow_packets += 1
        return (kind, t, PyBytes_FromStringAndSize(<char *>(self.rbuf + i * RECV_SLOT), n),
                self._addr_tuple(self.raddr[i]), sock)

    cdef int _fake_source(self, int sock, str ip, int port) except -1:
        cdef sockaddr_in *s4 = <sockaddr_in *>self.raddr[0]
        cdef sockaddr_in6 *s6 = <sockaddr_in6 *>self.raddr[0]
        cdef bytes ipb = ip.encode("ascii")
        memset(self.raddr[0], 0, 28)
        if ":" in ip:
            s6.sin6_family = AF_INET6
            s6.sin6_port = htons(port)
            if inet_pton(AF_INET6, ipb, &s6.sin6_addr) != 1:
                raise ValueError(f"bad address {ip!r}")
        else:
            s4.sin_family = AF_INET
            s4.sin_port = htons(port)
            if inet_pton(AF_INET, ipb, &s4.sin_addr) != 1:
                raise ValueError(f"bad address {ip!r}")
        return 0

    cdef int64_t _queue_age(self, int i, int64_t wall) noexcept nogil:
        """How long datagram i waited in the socket queue (kernel arrival time), 0 if unknown."""
        cdef msghdr *m = &self.rmsgs[i].msg_hdr
        cdef cmsghdr *cm = CMSG_FIRSTHDR(m)
        cdef timespec ts
        while cm != NULL:
            if cm.cmsg_level == SOL_SOCKET and cm.cmsg_type == SCM_TIMESTAMPNS:
                memcpy(&ts, CMSG_DATA(cm), sizeof(timespec))
                return wall - (<int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec)
            cm = CMSG_NXTHDR(m, cm)
        return 0

    cdef inline void _event(self, int kind, int t, uint32_t value) noexcept nogil:
        if self.pending_events == EVENT_CAP:
            self.events_lost += 1
            return
        self.events[self.pending_events].kind = kind
        self.events[self.pending_events].transport = t
        self.events[self.pending_events].value = value
        self.pending_events += 1
        fsfu_store_int(&self.sync.events_flag, 1)

    cdef inline void _drop(self, Transport *tr, int reason) noexcept nogil:
        self.drops[reason] += 1
        if tr != NULL:
            tr.drops[reason] += 1

    # ----------------------------------------------------------------- the per-packet path

    cdef int _handle(self, int sock, uint8_t *buf, int n, const uint8_t *src, int64_t now,
                     int *out_t, int *out_n) noexcept nogil:
        """Classify one datagram (RFC 7983 §7) and forward it if it is RTP; returns a SLOW_* kind or 0."""
        cdef Key k
        cdef int t, tentative = 0, status
        cdef uint8_t b0
        cdef Transport *tr
        self.rx_packets += 1
        out_t[0] = -1
        if n < 1:
            self._drop(NULL, DROP_MALFORMED)
            return 0
        self.rx_bytes += n
        b0 = buf[0]
        tuple_key_from_sockaddr(&k, sock, src)
        t = table_get(&self.tuples, &k)
        if t >= 0 and self.transports[t].aead != NULL and n == 8:
            # A Discord keep-alive (docs/transports.md#keep-alives): classified by length, its first
            # byte is arbitrary.
            out_t[0] = t
            out_n[0] = n
            return K_SLOW_OTHER
        if b0 <= 3:
            out_t[0] = t                  # ICE finds the transport of an unknown tuple by ufrag
            out_n[0] = n                  # (and Discord IP discovery by SSRC)
            return K_SLOW_STUN
        if t < 0 and 128 <= b0 <= 191 and n >= 12 and not 192 <= buf[1] <= 223:
            # RTP from a new address naming a roaming transport's SSRC (a client behind a NAT that
            # rebound its port): the tuple moves only if the packet authenticates (_rtp).
            ssrc_key(&k, sock, rd32(&buf[8]))
            t = table_get(&self.roams, &k)
            if t >= 0 and (self.transports[t].aead == NULL or fsfu_aead_legacy(self.transports[t].aead)):
                t = -1
            tentative = t >= 0
        if t < 0:
            if 128 <= b0 <= 191 and self.sockets[sock].comedia_transport >= 0:
                t = self.sockets[sock].comedia_transport
                tentative = 1             # comedia: learn the tuple once a packet authenticates
            else:
                self._drop(NULL, DROP_UNKNOWN_TUPLE if (20 <= b0 <= 63 or 128 <= b0 <= 191)
                           else DROP_UNKNOWN_PROTOCOL)
                return 0
        tr = &self.transports[t]
        if 20 <= b0 <= 63 and tr.aead == NULL:
            out_t[0] = t
            out_n[0] = n
            return K_SLOW_DTLS
        if not 128 <= b0 <= 191:
            # TURN channels (64-79) and anything else, from a tuple we admitted: C has no use for
            # it, the transport may (hand it up; Python counts what it does not handle).
            out_t[0] = t
            out_n[0] = n
            return K_SLOW_OTHER
        if n >= 2 and 192 <= buf[1] <= 223:
            # RTCP (RFC 5761 §4): unprotect here, hand plaintext to Python.
            if tentative or n < 8 or (b0 >> 6) != 2:
                self._drop(tr, DROP_UNKNOWN_TUPLE if tentative else DROP_MALFORMED)
                return 0
            if tr.srtp_in != NULL and g_unprotect_rtcp(tr.srtp_in, buf, &n) != 0:
                self._drop(tr, DROP_DECRYPT_FAILED)
                return 0
            if tr.aead != NULL:
                # rtpsize AEAD: the 8-byte fixed RTCP header is the clear part.
                status = fsfu_aead_open(tr.aead, buf, n, 8)
                if status < 0:
                    self._drop(tr, DROP_AEAD_REPLAY if status == FSFU_AEAD_REPLAY else DROP_DECRYPT_FAILED)
                    return 0
                n = status
            if tr.srtp_in != NULL or tr.aead != NULL:
                tr.auth_packets += 1
            tr.rtcp_rx += 1
            out_t[0] = t
            out_n[0] = n
            return K_SLOW_RTCP
        self._rtp(t, tr, buf, n, src, now, tentative)
        return 0

    cdef void _rtp(self, int t, Transport *tr, uint8_t *buf, int n, const uint8_t *src, int64_t now,
                   int tentative) noexcept nogil:
        cdef int hlen, cc, status, p, decrypt, i, c, clear, body
        cdef int ext_off = 0, ext_len = 0, profile = 0
        cdef uint16_t seq
        cdef uint32_t ssrc, ts
        cdef Key k
        cdef Producer *pr
        cdef int64_t ext
        # RFC 3550 §5.1 header; every length checked before use.
        if n < 12 or (buf[0] >> 6) != 2:
            self._drop(tr, DROP_MALFORMED)
            return
        if tr.aead != NULL and fsfu_aead_legacy(tr.aead):
            # Discord's older modes (but lite_rtpsize) encrypt everything after the fixed 12
            # bytes, CSRCs and extension included: open the packet before reading those.
            status = fsfu_aead_rtp_clear(tr.aead, buf, n)
            if status >= 0:
                status = fsfu_aead_open(tr.aead, buf, n, status)
            if status < 0:
                self._drop(tr, DROP_AEAD_REPLAY if status == FSFU_AEAD_REPLAY else DROP_DECRYPT_FAILED)
                return
            n = status
            tr.auth_packets += 1
        cc = buf[0] & 0x0F
        hlen = 12 + 4 * cc
        if buf[0] & 0x10:
            if hlen + 4 > n:
                self._drop(tr, DROP_MALFORMED)
                return
            profile = rd16(&buf[hlen])
            ext_len = 4 * rd16(&buf[hlen + 2])
            ext_off = hlen + 4
            hlen = ext_off + ext_len
        # Discord's rtpsize modes leave the fixed header, CSRCs and extension preamble clear and
        # encrypt the extension elements with the payload (docs/transports.md#encryption-modes).
        clear = ext_off if ext_off else hlen
        if hlen > n:
            self._drop(tr, DROP_MALFORMED)
            return
        ssrc = rd32(&buf[8])
        ssrc_key(&k, t, ssrc)
        p = table_get(&self.ssrcs, &k)
        if p < 0:
            if not tentative and tr.yields_tuple and tr.aead != NULL and not fsfu_aead_legacy(tr.aead):
                # Another session's SSRC from this (yielding) transport's tuple: the port was
                # reused by that session's client. It takes the tuple if the packet authenticates
                # with its key (the tentative path below); only the roams table names it, so the
                # SSRC must be a roaming (rtpsize AEAD) transport's of this socket.
                ssrc_key(&k, tr.sock, ssrc)
                p = table_get(&self.roams, &k)
                if p >= 0 and p != t:
                    self._rtp(p, &self.transports[p], buf, n, src, now, 1)
                    return
            self._drop(tr, DROP_UNKNOWN_SSRC)
            if not tentative and not (tr.reported_unknown and tr.last_unknown_ssrc == ssrc):
                tr.reported_unknown = 1
                tr.last_unknown_ssrc = ssrc
                self._event(K_EVENT_UNKNOWN_SSRC, t, ssrc)
            return
        pr = &self.producers[p]
        if (buf[1] & 0x7F) != pr.pt and (buf[1] & 0x7F) != pr.red_pt:
            self._drop(tr, DROP_UNKNOWN_PT)
            pr.drops += 1
            return
        seq = rd16(&buf[2])
        # Drop early: a packet nobody receives is not decrypted, except now and then so that
        # libsrtp's rollover counter keeps up (RFC 3711 §3.3.1) and a comedia tuple can be learned.
        if tr.aead != NULL and not fsfu_aead_legacy(tr.aead):
            # No rollover counter to keep up: decrypt only what someone receives.
            if tentative or (not pr.paused and (pr.n_active > 0 or pr.level_id)):
                status = fsfu_aead_open(tr.aead, buf, n, clear)
                if status < 0:
                    self._drop(tr, DROP_AEAD_REPLAY if status == FSFU_AEAD_REPLAY else DROP_DECRYPT_FAILED)
                    pr.drops += 1
                    return
                n = status
                pr.have_auth = 1
                pr.last_auth_seq = seq
                tr.auth_packets += 1
        decrypt = (tr.srtp_in != NULL and
                   (tentative or (not pr.paused and (pr.n_active > 0 or pr.level_id)) or not pr.have_auth
                    or <uint16_t>(seq - pr.last_auth_seq) >= SRTP_KEEPALIVE_SEQ))
        if decrypt:
            status = g_unprotect(tr.srtp_in, buf, &n)
            if status != 0:
                self._drop(tr, DROP_SRTP_REPLAY if status == SRTP_STATUS_REPLAY_FAIL or
                           status == SRTP_STATUS_REPLAY_OLD else DROP_DECRYPT_FAILED)
                pr.drops += 1
                return
            pr.have_auth = 1
            pr.last_auth_seq = seq
            tr.auth_packets += 1
        if (buf[0] & 0x20) and (n <= hlen or buf[n - 1] == 0 or hlen + buf[n - 1] > n):
            self._drop(tr, DROP_MALFORMED)   # RFC 3550 §5.1 padding count past the payload
            pr.drops += 1
            return
        if hlen > n:
            self._drop(tr, DROP_MALFORMED)
            pr.drops += 1
            return
        if tentative:
            if tr.has_remote:
                self._clear_remote(t)     # a roaming transport moves: the key was proven (_handle)
            tuple_key_from_sockaddr(&k, tr.sock, src)
            c = table_get(&self.tuples, &k)
            if c >= 0 and c != t:
                # The tuple was a yielding transport's (its client's port, reused): it loses it.
                self._clear_remote(c)
                self._event(K_EVENT_TUPLE_LEARNED, c, 0)
            memcpy(tr.remote, src, 28)
            tr.remote_len = sizeof(sockaddr_in) if (<const sockaddr *>src).sa_family == AF_INET else sizeof(sockaddr_in6)
            self._bind_tuple(t, &k)
            self._event(K_EVENT_TUPLE_LEARNED, t, 0)
        tr.rx_packets += 1
        tr.rx_bytes += n
        ts = rd32(&buf[4])
        ext = self._track(pr, seq, ts, now)
        pr.packets += 1
        pr.bytes += n
        if ext < 0:
            self._drop(tr, DROP_SEQ_JUMP)
            return
        if pr.paused:
            self._drop(tr, DROP_PRODUCER_PAUSED)
            return
        if pr.level_id and ext_len:
            self._read_level(pr, &buf[ext_off], ext_len, profile)
        if pr.n_active == 0:
            self._drop(tr, DROP_NO_CONSUMERS)
            return
        pr.red_state = 0
        body = n - hlen - (buf[n - 1] if buf[0] & 0x20 else 0)   # padding (RFC 3550 §5.1) is not RED
        if body <= 0:
            pr.red_state = 3   # padding only: a sender's bandwidth probe, no media (_forward)
        elif (buf[1] & 0x7F) == pr.red_pt:
            # Parsed once for every receiver.
            pr.red_blocks = red_parse(&buf[hlen], body, pr.pt, &pr.red_prim_off)
            pr.red_state = 1 if pr.red_blocks else 2
            pr.red_packets += pr.red_state == 1
        for i in range(pr.n_consumers):
            c = pr.consumers[i]
            if self.consumers[c].direct:
                self._tap_push(&self.consumers[c], buf, n, hlen, ext, now)
            else:
                self._forward(pr, &self.consumers[c], buf, n, hlen, ext_off, ext_len, profile, ext, now)

    cdef void _tap_push(self, Consumer *co, const uint8_t *buf, int n, int hlen, int64_t ext,
                        int64_t now) noexcept nogil:
        """Copy the decrypted payload (padding removed, RFC 3550 §5.1) into the consumer's tap."""
        cdef TapRing *r = self.taps[co.direct - 1]
        cdef TapSlot *slot
        cdef Producer *pr = &self.producers[co.producer]
        cdef int body = n - hlen - (buf[n - 1] if buf[0] & 0x20 else 0)
        if co.paused:
            co.drops += 1
            return
        if pr.red_state == 2:
            co.drops += 1
            return
        if pr.red_state == 1:            # a recording holds Opus: the RED packet's primary block
            hlen += pr.red_prim_off
            body -= pr.red_prim_off
        if body > TAP_SLOT:
            r.oversize += 1
            co.drops += 1
            return
        if r.head - r.tail >= r.cap:
            r.full += 1                  # the recorder's timer is behind: never wait for it
            co.drops += 1
            return
        slot = &r.slots[r.head & (r.cap - 1)]
        slot.consumer = <int32_t>(co - self.consumers)
        slot.len = body
        slot.ts = rd32(&buf[4])
        slot.ext = ext
        slot.arrival_ns = now
        memcpy(slot.data, &buf[hlen], body)
        r.head += 1
        r.packets += 1
        r.bytes += body
        co.packets += 1
        co.bytes += body

    cdef void _read_level(self, Producer *pr, const uint8_t *blk, int blk_len, int profile) noexcept nogil:
        """Add the packet's ssrc-audio-level (RFC 6464 §3: the V bit, then the level in -dBov,
        in the element's first byte) to the producer's interval: sums, no Python, no allocation."""
        cdef int pos = 0, eid, elen, two_byte
        cdef uint8_t v
        if profile == 0xBEDE:
            two_byte = 0
        elif (profile & 0xFFF0) == 0x1000:
            two_byte = 1
        else:
            return
        while ext_next(blk, blk_len, &pos, two_byte, &eid, &elen):
            if eid == pr.level_id:
                if elen == 0:            # the two-byte form allows empty elements (RFC 8285 §4.3)
                    return
                v = blk[pos - elen]
                pr.level_recent[pr.level_count % LEVEL_RECENT] = v & 0x7F
                pr.level_count += 1
                pr.level_sum += v & 0x7F
                if (v & 0x7F) < pr.level_min:
                    pr.level_min = v & 0x7F
                if v & 0x80:
                    pr.level_voiced += 1
                return

    cdef int64_t _track(self, Producer *pr, uint16_t seq, uint32_t ts, int64_t now) noexcept nogil:
        """Extended sequence number, restart detection (RFC 3550 A.1) and jitter (A.8)."""
        cdef int delta
        cdef int64_t ext
        cdef uint32_t arrival, transit
        cdef int32_t d
        if not pr.have_seq:
            pr.have_seq = 1
            pr.highest = seq
            pr.base = seq
            pr.have_transit = 0
            ext = seq
        else:
            delta = <int16_t>(seq - <uint16_t>pr.highest)
            if delta >= MAX_DROPOUT or delta < -MAX_MISORDER:
                if not (pr.have_bad_seq and seq == pr.bad_seq):
                    # One stray packet is not a restart: wait for the next in sequence.
                    pr.have_bad_seq = 1
                    pr.bad_seq = seq + 1
                    return -1
                # The sender restarted its sequence: continue the extended space above the old one.
                pr.have_bad_seq = 0
                pr.expected_prior += pr.highest - pr.base + 1
                ext = ((pr.highest + 65536) & ~(<int64_t>0xFFFF)) | seq
                pr.highest = ext
                pr.base = ext
                pr.epoch += 1
                pr.have_transit = 0
                return ext
            ext = pr.highest + delta
            if delta <= 0:
                return ext               # reordered or duplicate: no jitter sample
            pr.highest = ext
        arrival = <uint32_t>((<uint64_t>(now // 1000) * pr.clock_rate) // 1000000)
        transit = arrival - ts
        if pr.have_transit:
            d = <int32_t>(transit - pr.last_transit)
            if d < 0:
                d = -d
            # J += (|D| - J) / 16, kept as J*16 (RFC 3550 A.8)
            pr.jitter_q4 = <uint32_t>(<int64_t>pr.jitter_q4 + d - ((<int64_t>pr.jitter_q4 + 8) >> 4))
        pr.last_transit = transit
        pr.have_transit = 1
        return ext

    cdef void _forward(self, Producer *pr, Consumer *co, const uint8_t *buf, int n, int hlen,
                       int ext_off, int ext_len, int profile, int64_t ext, int64_t now) noexcept nogil:
        cdef Transport *dst = &self.transports[co.transport]
        cdef int slot, w, body, cc, src_off, src_len, i
        cdef int64_t gap
        cdef uint16_t out_seq
        cdef uint32_t out_ts
        cdef uint8_t *o
        if co.paused:
            co.drops += 1
            self._drop(dst, DROP_CONSUMER_PAUSED)
            return
        if not dst.has_remote:
            co.drops += 1
            self._drop(dst, DROP_NO_REMOTE)
            return
        if pr.red_state == 2:
            # Malformed RED: its block PTs cannot be rewritten nor its primary found.
            co.drops += 1
            self._drop(dst, DROP_RED_MALFORMED)
            return
        if co.passthrough:
            pass                         # a pipe: the far side tracks the producer's own numbering
        elif co.sync_needed or co.epoch != pr.epoch:
            # Resync so the receiver sees one continuous stream (mediasoup's SeqManager idea).
            if co.has_sent:
                co.seq_off = <uint16_t>(co.last_seq + 1 - <uint16_t>ext)
                # 64-bit: a pause of hours must not wrap before the modulo-2^32 timestamp math.
                gap = ((now - co.last_ns) // 1000) * pr.clock_rate // 1000000 if now > co.last_ns else 0
                if gap < 1:
                    gap = 1
                co.ts_off = <uint32_t>(co.last_ts + <uint32_t>gap - rd32(&buf[4]))
            else:
                co.seq_off = 0
                co.ts_off = 0
            co.sync_ext = ext
            co.highest_sent = ext - 1
            co.sync_needed = 0
            co.epoch = pr.epoch
        elif ext < co.sync_ext:
            co.drops += 1
            self._drop(dst, DROP_STALE_SEQ)
            return
        if pr.red_state == 3 and not co.passthrough:
            # A padding-only packet carries no media (a sender's bandwidth probe, e.g. Chromium's
            # at the RED PT): receivers do not get it, as mediasoup's do not (a decoder handed an
            # empty payload may stop: aiortc's does), and their sequence stays continuous. A pipe
            # carries it; the far side's receivers skip it the same way.
            co.seq_off = <uint16_t>(co.seq_off - 1)
            return
        out_seq = <uint16_t>(<uint16_t>ext + co.seq_off)
        out_ts = rd32(&buf[4]) + co.ts_off
        slot = self._alloc_out()
        o = self.out[slot].data
        # Discord clients read a 12-byte header and ignore CC: send them none.
        cc = 0 if dst.aead != NULL else buf[0] & 0x0F
        # Fixed header and CSRCs, then the rewritten extension block, then the payload.
        o[0] = (buf[0] & 0xE0) | cc
        o[1] = (buf[1] & 0x80) | co.pt
        # RED to a receiver that did not negotiate it: the primary block alone, unpadded.
        src_off = hlen
        src_len = n - hlen
        if pr.red_state == 1:
            if co.red_pt == NO_PT:
                o[0] &= 0xDF
                src_off = hlen + pr.red_prim_off
                src_len = n - src_off - (buf[n - 1] if buf[0] & 0x20 else 0)
            else:
                o[1] = (buf[1] & 0x80) | co.red_pt
        wr16(&o[2], out_seq)
        wr32(&o[4], out_ts)
        wr32(&o[8], co.ssrc)
        memcpy(&o[12], &buf[12], 4 * cc)
        w = 12 + 4 * cc
        if ext_off or co.mid_len:
            body = rewrite_extensions(pr, co, &buf[ext_off], ext_len, profile, &o[w])
            if body:
                o[0] |= 0x10
                w += body
        if w + src_len + SRTP_TRAILER > OUT_SLOT:
            self._release_out(slot)
            co.drops += 1
            self._drop(dst, DROP_OVERSIZE)
            return
        memcpy(&o[w], &buf[src_off], src_len)
        if pr.red_state == 1 and co.red_pt != NO_PT and co.pt != pr.pt:
            # Forwarded RED: every block header names the receiver's Opus PT (F bit kept).
            for i in range(pr.red_blocks):
                o[w + 4 * i] = (o[w + 4 * i] & 0x80) | co.pt
        w += src_len
        if dst.srtp_out != NULL and g_protect(co.srtp_out if co.srtp_out != NULL else dst.srtp_out, o, &w) != 0:
            self._release_out(slot)
            co.drops += 1
            self._drop(dst, DROP_ENCRYPT_FAILED)
            return
        if dst.aead != NULL:
            # Clear part: the 12-byte header, plus (rtpsize modes) the extension preamble we wrote.
            w = fsfu_aead_seal(dst.aead, o, w, fsfu_aead_rtp_clear(dst.aead, o, w))
            if w < 0:
                self._release_out(slot)
                co.drops += 1
                self._drop(dst, DROP_ENCRYPT_FAILED)
                return
        self.out[slot].len = w
        if ext > co.highest_sent:
            co.highest_sent = ext
            co.last_seq = out_seq
            co.last_ts = out_ts
            co.last_ns = now
        co.has_sent = 1
        co.packets += 1
        co.bytes += w
        self.fwd_packets += 1
        self.fwd_bytes += w
        self._enqueue(slot, dst)

    # ----------------------------------------------------------------- output queue

    cdef int _alloc_out(self) noexcept nogil:
        cdef int slot
        if self.out_free < 0:
            self._flush_all()
        slot = self.out_free
        self.out_free = self.out[slot].next
        return slot

    cdef inline void _release_out(self, int slot) noexcept nogil:
        self.out[slot].next = self.out_free
        self.out_free = slot

    cdef inline void _enqueue(self, int slot, Transport *dst) noexcept nogil:
        cdef Socket *so = &self.sockets[dst.sock]
        cdef OutSlot *o = &self.out[slot]
        memcpy(o.dest, dst.remote, 28)
        o.dest_len = dst.remote_len
        o.next = -1
        if so.out_tail >= 0:
            self.out[so.out_tail].next = slot
        else:
            so.out_head = slot
        so.out_tail = slot
        so.out_count += 1
        dst.tx_packets += 1
        dst.tx_bytes += o.len
        if not so.dirty:
            so.dirty = 1
            self.dirty[self.n_dirty] = dst.sock
            self.n_dirty += 1

    cdef void _flush_all(self, bint on_thread=False) noexcept nogil:
        """Send every socket's queue. On the thread, a waiting control-plane call may take the
        tables between two sendmmsg chunks and flush or extend these queues itself: the loop
        re-reads the dirty list, and each queue stays consistent at every chunk boundary."""
        cdef int i = 0, sock
        while i < self.n_dirty:
            sock = self.dirty[i]
            i += 1
            self.sockets[sock].dirty = 0
            self._flush_socket(sock, on_thread)
        self.n_dirty = 0

    cdef void _discard_queue(self, int sock) noexcept nogil:
        cdef Socket *so = &self.sockets[sock]
        cdef int slot, nxt
        slot = so.out_head
        while slot >= 0:
            nxt = self.out[slot].next
            self._release_out(slot)
            slot = nxt
        so.out_head = -1
        so.out_tail = -1
        so.out_count = 0

    cdef void _flush_socket(self, int sock, bint on_thread) noexcept nogil:
        cdef Socket *so = &self.sockets[sock]
        cdef int slot, nxt, m, sent, i, fd
        if so.tcp != NULL and self.output_mode == K_OUTPUT_SEND:
            self._tcp_flush(sock)
            return
        if self.output_mode != K_OUTPUT_SEND:
            if self.output_mode == K_OUTPUT_CAPTURE:
                # Tests only, never on the thread (start() refuses capture mode).
                with gil:
                    slot = so.out_head
                    while slot >= 0:
                        try:
                            self.captured.append((sock, self._addr_tuple(self.out[slot].dest),
                                                  PyBytes_FromStringAndSize(<char *>self.out[slot].data,
                                                                            self.out[slot].len)))
                        except MemoryError:
                            pass
                        slot = self.out[slot].next
            self._discard_queue(sock)
            return
        while so.out_head >= 0:
            fd = so.fd
            slot = so.out_head
            m = 0
            while slot >= 0 and m < SEND_BATCH:
                self.siov[m].iov_base = self.out[slot].data
                self.siov[m].iov_len = self.out[slot].len
                if so.peer >= 0:
                    # Connected: the kernel uses the socket's cached route (docs/datapath.md).
                    self.smsgs[m].msg_hdr.msg_name = NULL
                    self.smsgs[m].msg_hdr.msg_namelen = 0
                else:
                    self.smsgs[m].msg_hdr.msg_name = self.out[slot].dest
                    self.smsgs[m].msg_hdr.msg_namelen = self.out[slot].dest_len
                self.smsgs[m].msg_hdr.msg_iov = &self.siov[m]
                self.smsgs[m].msg_hdr.msg_iovlen = 1
                self.smsgs[m].msg_hdr.msg_control = NULL
                self.smsgs[m].msg_hdr.msg_controllen = 0
                self.smsgs[m].msg_hdr.msg_flags = 0
                m += 1
                slot = self.out[slot].next
            i = 0
            while i < m:
                sent = sendmmsg(fd, &self.smsgs[i], m - i, MSG_DONTWAIT)
                if sent < 0:
                    if errno == EINTR:
                        continue
                    if errno == EAGAIN:
                        # Never queue in user space: the kernel is full, drop the rest (counted).
                        self.drops[DROP_SEND_FAILED] += m - i
                        break
                    self.drops[DROP_SEND_FAILED] += 1   # this destination failed; go on
                    i += 1
                    continue
                i += sent
            # Release the chunk: the queue now starts at the first datagram not yet sent.
            i = so.out_head
            while i != slot:
                nxt = self.out[i].next
                self._release_out(i)
                i = nxt
            so.out_head = slot
            so.out_count -= m
            if slot < 0:
                so.out_tail = -1
            elif on_thread and fsfu_load_int(&self.sync.waiters) > 0:
                self._hand_off()

    # ----------------------------------------------------------------- ICE over TCP (RFC 6544)
    # An accepted TCP connection is a socket slot of its own with a TcpConn: RFC 4571 frames (a
    # 2-byte length, then one STUN, DTLS, RTP or RTCP packet) are cut out of the stream and handled
    # like datagrams from the connection's peer; output is framed into a bounded buffer
    # (docs/transports.md, "ICE over TCP"). Accepting, and closing what the datapath gave up, is
    # the event loop's work.

    def add_tcp_connection(self, int fd, int family, str ip, int port) -> int:
        """Register an accepted, non-blocking TCP connection from (ip, port); returns its socket slot."""
        cdef int s
        cdef TcpConn *c
        with self.tables_lock:
            c = <TcpConn *>calloc(1, sizeof(TcpConn))
            if c == NULL:
                raise MemoryError()
            c.rx = <uint8_t *>calloc(1, TCP_RXBUF)
            c.tx = <uint8_t *>calloc(1, self.tcp_tx_cap)
            c.tx_cap = self.tcp_tx_cap
            if c.rx == NULL or c.tx == NULL:
                free(c.rx)
                free(c.tx)
                free(c)
                raise MemoryError()
            try:
                self._fake_source(-1, ip, port)
                if (<sockaddr *>self.raddr[0]).sa_family != family:
                    raise ValueError("the peer address is not in the socket's family")
                s = self.add_socket(fd, family, False)
            except BaseException:
                free(c.rx)
                free(c.tx)
                free(c)
                raise
            memcpy(c.peer, self.raddr[0], 28)
            self.sockets[s].tcp = c
            return s

    def close_tcp_connection(self, int sock) -> None:
        """Forget an ICE-TCP connection (the caller closes the descriptor afterwards): a transport
        sending over it loses its remote and returns to its own socket."""
        cdef TcpConn *c
        with self.tables_lock:
            self._check_socket(sock)
            c = self.sockets[sock].tcp
            if c == NULL:
                raise ValueError(f"socket {sock} is not a TCP connection")
            if c.dead:
                self.tcp_dead -= 1
            else:
                self._tcp_detach(sock)
            self._discard_queue(sock)
            self.sockets[sock].tcp = NULL
            self.sockets[sock].in_use = 0
            free(c.rx)
            free(c.tx)
            free(c)

    def take_tcp_closed(self) -> list:
        """(socket slot, reason) of every ICE-TCP connection the datapath gave up (the peer closed
        it, a bad frame, a receiver that stopped reading) and Python has not closed yet."""
        cdef int s
        out = []
        with self.tables_lock:
            if self.tcp_dead:
                for s in range(self.max_sockets):
                    if self.sockets[s].in_use and self.sockets[s].tcp != NULL and self.sockets[s].tcp.dead:
                        out.append((s, TCP_CLOSE_REASONS[self.sockets[s].tcp.dead]))
        return out

    def tcp_send(self, int sock, const uint8_t[:] data) -> bool:
        """Frame one packet (STUN, DTLS) onto an ICE-TCP connection and send what the kernel takes;
        False if the connection is gone or its buffer is full (which cuts it off)."""
        cdef TcpConn *c
        cdef int n = data.shape[0]
        with self.tables_lock:
            self._check_socket(sock)
            c = self.sockets[sock].tcp
            if c == NULL:
                raise ValueError(f"socket {sock} is not a TCP connection")
            if not 0 < n <= 0xFFFF:
                raise ValueError("an RFC 4571 frame holds 1..65535 bytes")
            if c.dead:
                return False
            if not self._tcp_append(c, &data[0], n):
                self._drop(NULL, DROP_TCP_OVERFLOW)
                self._tcp_fail(sock, TCP_SEND_OVERFLOW)
                return False
            with nogil:
                self._tcp_push(sock)
            return not c.dead

    def set_transport_tcp(self, int t, int sock) -> None:
        """Admit ICE-TCP connection `sock` (its peer) for transport t and send t's packets over it."""
        cdef Transport *tr
        cdef TcpConn *c
        cdef Key k
        cdef int owner
        with self.tables_lock:
            self._check_transport(t)
            self._check_socket(sock)
            c = self.sockets[sock].tcp
            if c == NULL or c.dead:
                raise ValueError(f"socket {sock} is not an open TCP connection")
            tuple_key_from_sockaddr(&k, sock, c.peer)
            owner = table_get(&self.tuples, &k)
            if owner >= 0 and owner != t:
                raise ValueError("the connection already belongs to another transport")
            tr = &self.transports[t]
            self._clear_remote(t)
            c.started = 1                   # ICE is done with the first-frame rule: it is claimed
            tr.sock = sock
            memcpy(tr.remote, c.peer, 28)
            tr.remote_len = sizeof(sockaddr_in) if (<sockaddr *>c.peer).sa_family == AF_INET else sizeof(sockaddr_in6)
            self._bind_tuple(t, &k)

    def tcp_stats(self, int sock) -> dict:
        """One ICE-TCP connection: bytes waiting to be read as a frame, and to be sent."""
        cdef TcpConn *c
        with self.tables_lock:
            self._check_socket(sock)
            c = self.sockets[sock].tcp
            if c == NULL:
                raise ValueError(f"socket {sock} is not a TCP connection")
            return {"rx_pending": c.rx_len, "tx_pending": c.tx_len, "tx_capacity": c.tx_cap,
                    "closed": TCP_CLOSE_REASONS[c.dead] if c.dead else None}

    cdef int _socket_ready(self, int s, uint32_t events, bint on_thread) noexcept nogil:
        if self.sockets[s].tcp != NULL:
            return self._tcp_ready(s, events, on_thread)
        return self._drain_batch(s, on_thread)

    cdef int _tcp_ready(self, int s, uint32_t events, bint on_thread) noexcept nogil:
        """Send what waits (EPOLLOUT), then one recv: every complete frame is handled like a
        datagram from the peer, a partial one waits in the connection's buffer. Returns frames."""
        cdef Socket *so = &self.sockets[s]
        cdef TcpConn *c = so.tcp
        cdef uint32_t gen = so.gen
        cdef ssize_t r
        cdef int off = 0, flen, n = 0, kind, t, m
        cdef int64_t now
        cdef uint8_t *frame
        if c == NULL or c.dead:
            return 0
        if events & EPOLLOUT:
            self._tcp_push(s)
            if c.dead:
                return 0
        if not events & (EPOLLIN | EPOLLHUP | EPOLLERR):
            return 0
        while True:
            r = recv(so.fd, c.rx + c.rx_len, TCP_RXBUF - c.rx_len, MSG_DONTWAIT)
            if r >= 0 or errno != EINTR:
                break
        if r == 0:
            self._tcp_fail(s, TCP_PEER_CLOSED)
            return 0
        if r < 0:
            if errno != EAGAIN:
                self._tcp_fail(s, TCP_PEER_CLOSED if errno == ECONNRESET else TCP_ERROR)
            return 0
        c.rx_len += <int>r
        now = monotonic_ns()
        while c.rx_len - off >= 2:
            flen = rd16(c.rx + off)
            if flen > TCP_MAX_FRAME:
                # RFC 4571 allows 65535, but nothing we carry is longer than a datagram we read.
                self._tcp_fail(s, TCP_FRAME_TOO_LONG)
                return n
            if c.rx_len - off - 2 < flen:
                break                       # a partial frame: the rest comes with a later read
            frame = c.rx + off + 2
            off += 2 + flen
            if not c.started:
                # RFC 6544: the peer opens a passive candidate's connection to run its
                # connectivity check, so the first frame is a Binding request; anything else
                # is not ICE.
                if flen < 20 or frame[0] > 3:
                    self._tcp_fail(s, TCP_BAD_FIRST_FRAME)
                    return n
                c.started = 1
            if flen:
                memcpy(self.rbuf, frame, flen)
            memcpy(self.raddr[0], c.peer, 28)
            kind = self._handle(s, self.rbuf, flen, self.raddr[0], now, &t, &m)
            if kind:
                self._slow_push(kind, t, 0, m, s, 0)  # a TCP read has no kernel timestamp: now
            n += 1
            if on_thread and fsfu_load_int(&self.sync.waiters) > 0:
                self._hand_off()
            if not so.in_use or so.gen != gen or so.tcp != c or c.dead:
                return n                    # closed while we worked (a hand-off, or our own send failed)
        if off:
            memmove(c.rx, c.rx + off, c.rx_len - off)
            c.rx_len -= off
        return n

    cdef void _tcp_detach(self, int s) noexcept nogil:
        """Stop using connection s: out of the epoll set; a transport sending over it loses its
        remote and returns to its own socket (ICE picks another path or ends)."""
        cdef int t
        cdef Transport *tr
        if self.sockets[s].fd >= 0:
            epoll_ctl(self.epoll_fd, EPOLL_CTL_DEL, self.sockets[s].fd, NULL)
        for t in range(self.max_transports):
            tr = &self.transports[t]
            if tr.in_use and tr.sock == s:
                self._clear_remote(t)
                tr.sock = tr.home_sock

    cdef void _tcp_fail(self, int s, int reason) noexcept nogil:
        """Give up connection s (counted by reason); the loop learns it from take_tcp_closed()."""
        cdef TcpConn *c = self.sockets[s].tcp
        if c == NULL or c.dead:
            return
        c.dead = reason
        self._tcp_detach(s)
        self.tcp_dead += 1
        self._event(K_EVENT_TCP_CLOSED, -1, <uint32_t>s)

    cdef int _tcp_append(self, TcpConn *c, const uint8_t *data, int n) noexcept nogil:
        """Frame data into the send buffer (RFC 4571 §2); 0 if it does not fit."""
        if c.tx_len + 2 + n > c.tx_cap:
            return 0
        if c.tx_off + c.tx_len + 2 + n > c.tx_cap:
            memmove(c.tx, c.tx + c.tx_off, c.tx_len)
            c.tx_off = 0
        wr16(c.tx + c.tx_off + c.tx_len, <uint16_t>n)
        memcpy(c.tx + c.tx_off + c.tx_len + 2, data, n)
        c.tx_len += 2 + n
        return 1

    cdef void _tcp_flush(self, int s) noexcept nogil:
        """Frame the socket's queued packets into its buffer and send. A receiver whose buffer is
        full is not reading: it is cut off rather than allowed to hold memory or the thread."""
        cdef TcpConn *c = self.sockets[s].tcp
        cdef int slot = self.sockets[s].out_head, overflow = 0
        while slot >= 0:
            if not c.dead and not overflow:
                if not self._tcp_append(c, self.out[slot].data, self.out[slot].len):
                    overflow = 1
            if overflow or c.dead:
                self._drop(NULL, DROP_TCP_OVERFLOW if overflow else DROP_NO_REMOTE)
            slot = self.out[slot].next
        self._discard_queue(s)
        if overflow:
            self._tcp_fail(s, TCP_SEND_OVERFLOW)
        elif not c.dead:
            self._tcp_push(s)

    cdef void _tcp_push(self, int s) noexcept nogil:
        """send() what the buffer holds until the kernel refuses; wait for EPOLLOUT while some is left."""
        cdef Socket *so = &self.sockets[s]
        cdef TcpConn *c = so.tcp
        cdef ssize_t r
        cdef epoll_event ev
        while c.tx_len > 0:
            r = send(so.fd, c.tx + c.tx_off, c.tx_len, MSG_DONTWAIT | MSG_NOSIGNAL)
            if r > 0:
                c.tx_off += <int>r
                c.tx_len -= <int>r
            elif r < 0 and errno == EINTR:
                continue
            elif r < 0 and errno == EAGAIN:
                break
            else:
                self._tcp_fail(s, TCP_PEER_CLOSED if errno == ECONNRESET or errno == EPIPE else TCP_ERROR)
                return
        if c.tx_len == 0:
            c.tx_off = 0
        if (c.tx_len > 0) != (c.want_out != 0):
            c.want_out = c.tx_len > 0
            ev.events = EPOLLIN | (EPOLLOUT if c.want_out else 0)
            ev.data.u32 = s
            epoll_ctl(self.epoll_fd, EPOLL_CTL_MOD, so.fd, &ev)
