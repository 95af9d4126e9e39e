# The datapath's C interface: constants, tables and the Datapath class, for other Cython modules
# (transport-specific crypto, tests) to cimport. Implementation in _rtp.pyx.

from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t

from fastsfu._csys cimport epoll_event, iovec, mmsghdr, pthread_mutex_t, socklen_t

cdef enum:
    RECV_BATCH = 64
    RECV_SLOT = 2048          # larger datagrams arrive with MSG_TRUNC and are dropped
    OUT_SLOT = 3328           # worst case: 1.5x a one-byte extension block rewritten as two-byte + mid + trailer
    SRTP_TRAILER = 144        # SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN (libsrtp 2.x)
    SRTCP_TRAILER = 148       # + the 4-byte SRTCP index
    MAX_EXT_KINDS = 32
    KIND_MID = 1              # the extension kind whose value each consumer writes itself
    KIND_AUDIO_LEVEL = 2      # ssrc-audio-level (RFC 6464): read per producer when levels are on
    LEVEL_RECENT = 64         # levels kept per interval for the frame-wise speaker identification
    MID_MAX = 16
    SEND_BATCH = 64
    EVENT_CAP = 256
    CMSG_BUF = 64
    MAX_DROPOUT = 3000        # RFC 3550 A.1
    MAX_MISORDER = 100        # RFC 3550 A.1
    SRTP_KEEPALIVE_SEQ = 4096 # decrypt at least this often to keep libsrtp's rollover counter in step
    DEFAULT_MAX_QUEUE_AGE_MS = 200  # RTP older than this is dropped (docs/datapath.md)
    LATE_MS = 20              # RTP that waited longer than one 20 ms frame is counted as late
    SLOW_RING = 1024          # slow-path datagrams waiting for the event loop (power of two)
    LOCK_DATAGRAMS = 256      # the datapath thread releases the tables after this many datagrams
    LOCK_FORWARDS = 2048      # ... or this many forwarded packets (a join never waits long)
    MAX_TAPS = 64             # recording taps (docs/recording.md)
    TAP_SLOT = 1500           # largest RTP payload a tap copies; larger is a counted drop
    RED_MAX_BLOCKS = 16       # RFC 2198 header blocks accepted per packet (docs/transports.md#opus-red)
    NO_PT = 0xFF              # no RED payload type negotiated
    TCP_RXBUF = 4096          # per ICE-TCP connection: partial RFC 4571 frames wait here
    TCP_MAX_FRAME = RECV_SLOT # a longer announced frame closes the connection
    SLOW_DEFER_MS = 100       # slow-path RTCP alone waits this long for company before waking the loop

# Drop reasons; the names list below is the Python view, in the same order.
cdef enum:
    DROP_MALFORMED = 0
    DROP_OVERSIZE
    DROP_UNKNOWN_PROTOCOL
    DROP_UNKNOWN_TUPLE
    DROP_UNKNOWN_SSRC
    DROP_UNKNOWN_PT
    DROP_DECRYPT_FAILED
    DROP_SRTP_REPLAY
    DROP_PRODUCER_PAUSED
    DROP_NO_CONSUMERS
    DROP_CONSUMER_PAUSED
    DROP_STALE_SEQ
    DROP_SEQ_JUMP
    DROP_NO_REMOTE
    DROP_ENCRYPT_FAILED
    DROP_SEND_FAILED
    DROP_QUEUE_AGE
    DROP_RECV_ERROR
    DROP_AEAD_REPLAY                 # a Discord transport-encryption nonce seen before
    DROP_SLOW_RING_FULL              # the event loop is behind: a slow-path datagram had no room
    DROP_RED_MALFORMED               # RFC 2198 blocks past the packet, too many, or not Opus
    DROP_TCP_OVERFLOW                # an ICE-TCP receiver's send buffer was full: it is cut off
    N_DROPS

cdef enum:
    K_SLOW_STUN = 1
    K_SLOW_DTLS = 2
    K_SLOW_RTCP = 3
    K_SLOW_OTHER = 4
    K_EVENT_TUPLE_LEARNED = 1         # the datapath changed a transport's remote (learned, moved or lost)
    K_EVENT_UNKNOWN_SSRC = 2
    K_EVENT_TCP_CLOSED = 3            # the datapath closed an ICE-TCP connection (take_tcp_closed)
    K_OUTPUT_SEND = 0
    K_OUTPUT_CAPTURE = 1
    K_OUTPUT_DISCARD = 2

# Why the datapath gave up an ICE-TCP connection; the names list in _rtp.pyx is the Python view.
cdef enum:
    TCP_OPEN = 0
    TCP_PEER_CLOSED
    TCP_ERROR
    TCP_BAD_FIRST_FRAME
    TCP_FRAME_TOO_LONG
    TCP_SEND_OVERFLOW

# libsrtp 2.x status codes we tell apart (srtp.h: srtp_err_status_replay_fail, _replay_old).
cdef enum:
    SRTP_STATUS_REPLAY_FAIL = 9
    SRTP_STATUS_REPLAY_OLD = 10

ctypedef int (*srtp_fn)(void *ctx, void *hdr, int *len_ptr) noexcept nogil

# Discord's rtpsize AEAD modes (docs/transports.md#encryption-modes), implemented in _aead.h.
cdef extern from "_aead.h" nogil:
    ctypedef struct fsfu_aead:
        int mode
        uint32_t out_counter
        int have_in
        uint32_t in_highest
    enum:
        FSFU_AEAD_AES256GCM
        FSFU_AEAD_XCHACHA20
        FSFU_AEAD_XSALSA_LITE_RTPSIZE
        FSFU_AEAD_XSALSA_LITE
        FSFU_AEAD_XSALSA_SUFFIX
        FSFU_AEAD_XSALSA
        FSFU_AEAD_SUFFIX
        FSFU_AEAD_MAX_OVERHEAD
        FSFU_AEAD_OK
        FSFU_AEAD_FAIL
        FSFU_AEAD_REPLAY
        FSFU_AEAD_SHORT
    void fsfu_evp_install(const uintptr_t *f)
    int fsfu_evp_installed()
    void fsfu_nacl_install(uintptr_t box, uintptr_t open, uintptr_t random)
    int fsfu_nacl_installed()
    int fsfu_aead_legacy(const fsfu_aead *a)
    int fsfu_aead_rtp_clear(const fsfu_aead *a, const uint8_t *p, int n)
    int fsfu_aead_init(fsfu_aead *a, int mode, const uint8_t *key)
    void fsfu_aead_free(fsfu_aead *a)
    int fsfu_aead_seal(fsfu_aead *a, uint8_t *buf, int n, int clear)
    int fsfu_aead_open(fsfu_aead *a, uint8_t *buf, int n, int clear)
    void fsfu_hchacha20(uint8_t *out, const uint8_t *key, const uint8_t *nonce16)


ctypedef struct Key:                 # 24 bytes: a 5-tuple (sock, port, v6 address) or (transport, ssrc)
    uint32_t a
    uint16_t b                       # always 0 (padding kept zero for memcmp)
    uint16_t c
    uint8_t addr[16]

ctypedef struct Entry:
    Key key
    int32_t value                    # -1: empty

ctypedef struct Table:               # open addressing, linear probing, backward-shift deletion
    Entry *entries
    uint32_t mask

ctypedef struct TcpConn:             # an accepted ICE-TCP connection (RFC 6544), RFC 4571 framing
    uint8_t peer[28]                 # the remote address, in the socket's family
    uint8_t *rx                      # TCP_RXBUF bytes: the start of the next frame, maybe partial
    int rx_len
    uint8_t *tx                      # tx_cap bytes of framed output the kernel did not take yet
    int tx_off
    int tx_len
    int tx_cap
    int started                      # the first frame was STUN
    int dead                         # TCP_* close reason once the datapath gave it up
    int want_out                     # EPOLLOUT is armed

ctypedef struct Socket:
    int in_use
    TcpConn *tcp                     # an ICE-TCP connection, or NULL for a UDP socket
    uint32_t gen                     # changes with every add_socket into this slot
    int fd
    int family
    int timestamps
    int comedia_transport            # a comedia transport with no remote yet, or -1
    int connect_peer                 # one transport owns the socket: connect(2) it to its remote
    int peer                         # the transport the socket is connected to, or -1
    int out_head
    int out_tail
    int out_count
    int dirty

ctypedef struct Transport:
    int in_use
    int sock
    int home_sock                    # the socket it was made on (sock may be an ICE-TCP connection)
    int comedia
    int has_remote
    uint8_t remote[28]               # sockaddr_in or sockaddr_in6, in the socket's family
    socklen_t remote_len
    Key tuple_key
    void *srtp_in
    void *srtp_out
    fsfu_aead *aead                  # Discord transport encryption instead of SRTP, or NULL
    uint32_t last_unknown_ssrc
    int reported_unknown
    int roaming                      # roam_ssrc is in Datapath.roams (see set_transport_roaming)
    uint32_t roam_ssrc
    int yields_tuple                 # another roaming transport may take its tuple (set_transport_yields_tuple)
    uint64_t auth_packets            # RTP/RTCP that passed SRTP or AEAD authentication
    uint64_t rx_packets
    uint64_t rx_bytes
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t rtcp_rx
    uint64_t drops[N_DROPS]

ctypedef struct Producer:
    int in_use
    int transport
    int paused
    uint32_t ssrc
    uint8_t pt
    uint8_t red_pt                   # the producer's audio/red PT (RFC 2198), NO_PT: none
    uint8_t red_state                # the current packet (set by _rtp): 0 Opus, 1 RED, 2 malformed RED, 3 padding only
    uint8_t red_blocks               # ... a RED packet's header blocks (the primary's included)
    int red_prim_off                 # ... and its primary block's offset in the payload
    uint64_t red_packets             # well-formed RED packets parsed for receivers
    uint32_t clock_rate
    uint8_t ext_kind[256]            # extension ID -> kind (0: not forwarded)
    int32_t *consumers
    int n_consumers
    int cap_consumers
    int n_active
    uint32_t epoch                   # bumped on resume and on a sequence restart: consumers resync
    int have_seq
    int have_bad_seq
    uint16_t bad_seq                 # RFC 3550 A.1 probation: a jump is believed when seq follows it
    int64_t highest                  # extended sequence number (RFC 3550 A.1)
    int64_t base
    int64_t expected_prior
    int have_auth
    uint16_t last_auth_seq
    int have_transit
    uint32_t last_transit
    uint32_t jitter_q4               # jitter * 16 (RFC 3550 A.8)
    uint64_t packets
    uint64_t bytes
    uint64_t drops
    # ssrc-audio-level (RFC 6464) over the current interval, read and reset by take_levels()
    uint8_t level_id                 # the extension ID read when levels are on (0: off)
    uint8_t level_min                # the loudest level seen (dBov, 0 loudest .. 127 silence)
    uint32_t level_count
    uint32_t level_sum
    uint32_t level_voiced            # packets with the V (voice activity) bit set
    # The interval's last LEVEL_RECENT levels in arrival order (slot level_count % LEVEL_RECENT):
    # the dominant speaker identification wants one level per frame (docs/observers.md)
    uint8_t level_recent[LEVEL_RECENT]

ctypedef struct Consumer:
    int in_use
    void *srtp_out                   # its own one-stream libsrtp session, else NULL: the transport's
    int producer
    int transport
    int paused
    uint32_t ssrc
    uint8_t pt
    uint8_t red_pt                   # RED forwarded with this PT; NO_PT: unwrapped to Opus (pt)
    uint8_t ext_id[MAX_EXT_KINDS]    # kind -> extension ID on this receiver (0: drop)
    uint8_t mid_len
    uint8_t mid[MID_MAX]
    int passthrough                  # a pipe: the producer's seq and ts go out unchanged
    int sync_needed
    uint32_t epoch
    int has_sent
    int64_t sync_ext
    int64_t highest_sent
    uint16_t seq_off
    uint32_t ts_off
    uint16_t last_seq
    uint32_t last_ts
    int64_t last_ns
    uint64_t packets
    uint64_t bytes
    uint64_t drops
    int direct                       # a direct consumer: tap index + 1 (0: a transport consumer)

ctypedef struct TapSlot:             # one decrypted RTP payload copied for a recorder
    int32_t consumer                 # the direct consumer (one per recorded producer)
    int32_t len
    uint32_t ts
    uint32_t pad
    int64_t ext                      # extended sequence number (RFC 3550 A.1)
    int64_t arrival_ns               # CLOCK_MONOTONIC
    uint8_t data[TAP_SLOT]

ctypedef struct TapRing:             # written by whoever forwards, read by Python under the tables
    uint32_t cap                     # slots, a power of two
    uint32_t head
    uint32_t tail
    uint64_t packets
    uint64_t bytes
    uint64_t full                    # packets dropped: the ring was full
    uint64_t oversize                # packets dropped: payload larger than TAP_SLOT
    TapSlot *slots

ctypedef struct OutSlot:
    int next
    int len
    socklen_t dest_len
    uint8_t dest[28]
    uint8_t data[OUT_SLOT]

ctypedef struct SlowSlot:            # a slow-path datagram copied for the event loop
    int kind
    int transport
    int sock
    int len
    int64_t arrival_ns               # CLOCK_REALTIME when it was received (RTCP timing: RTT, DLSR)
    uint8_t addr[28]
    uint8_t data[RECV_SLOT]

ctypedef struct Sync:                # shared by the datapath thread and the event loop
    pthread_mutex_t mu               # the tables: held by the thread per batch, by Python per call
    pthread_mutex_t gate             # held by a Python caller from before it waits for mu until it
                                     # is done: the thread sleeps on it instead of taking mu back
    int waiters                      # Python callers blocked on mu: the thread yields to them
    int depth                        # TableLock nesting of mu's Python owner (guarded by mu)
    int gate_held                    # that owner holds gate too (guarded by mu)
    int thread_waiting               # the datapath thread is blocked on mu (or about to be)
    int stop
    int wake_pending                 # notify_fd written and not yet read by the loop
    int events_flag                  # events were added since take_events() last looked
    uint32_t ring_head               # written by the producer (whoever drains sockets)
    uint32_t ring_tail               # written by the consumer (take_slow)

ctypedef struct Event:
    int kind
    int transport
    uint32_t value


cdef class AeadContext:
    cdef fsfu_aead ctx
    cdef int ready


cdef class TableLock:
    cdef Sync *sync
    cdef bint gc_paused   # the outermost hold turned the garbage collector off


cdef class Datapath:
    cdef Socket *sockets
    cdef Transport *transports
    cdef Producer *producers
    cdef Consumer *consumers
    cdef int max_sockets, max_transports, max_producers, max_consumers
    cdef int consumer_hint               # every consumer slot below it is in use (first fit from here)
    cdef Table tuples
    cdef Table ssrcs
    cdef Table roams                     # (socket, SSRC) -> transport that may move on proof of key
    cdef uint64_t drops[N_DROPS]
    cdef uint64_t rx_packets, rx_bytes, fwd_packets, fwd_bytes, batches, slow_packets, late_packets
    cdef int64_t max_queue_age_ns
    cdef int output_mode
    cdef list captured
    cdef list keepalive                  # Python objects owning the SRTP contexts, per transport
    cdef dict consumer_srtp              # consumer slot -> the object owning its own SRTP session
    # receive side
    cdef mmsghdr rmsgs[RECV_BATCH]
    cdef iovec riov[RECV_BATCH]
    cdef uint8_t raddr[RECV_BATCH][28]
    cdef uint8_t rctl[RECV_BATCH][CMSG_BUF]
    cdef uint8_t *rbuf
    # send side
    cdef OutSlot *out
    cdef int n_out, out_free
    cdef int *dirty
    cdef int n_dirty
    cdef mmsghdr smsgs[SEND_BATCH]
    cdef iovec siov[SEND_BATCH]
    cdef int sidx[SEND_BATCH]
    cdef Event events[EVENT_CAP]
    cdef readonly int pending_events
    cdef readonly int epoll_fd           # readable when any registered socket is: one loop reader
    cdef epoll_event ready[RECV_BATCH]
    cdef uint64_t events_lost
    cdef uint32_t socket_gen
    cdef uint64_t hand_offs              # times the thread gave the tables to a waiting Python call
    # the thread and what it shares with the event loop
    cdef readonly TableLock tables_lock
    cdef Sync *sync
    cdef SlowSlot *ring
    cdef readonly int notify_fd          # eventfd: readable when slow-path datagrams or events wait
    cdef int wake_fd                     # eventfd in the epoll set: wakes the thread to stop
    cdef object _thread
    cdef TapRing *taps[MAX_TAPS]         # recording taps (NULL: free)
    cdef readonly int tcp_dead           # ICE-TCP connections given up and not yet closed by Python
    cdef int tcp_tx_cap
    # the thread's alone (no other reader): when to wake the loop (docs/datapath.md)
    cdef int64_t notify_deadline         # CLOCK_MONOTONIC ns by which deferred RTCP wakes the loop; 0: none
    cdef int slow_urgent                 # a datagram other than RTCP was queued since the last wake-up
    cdef uint64_t loop_wakeups           # notify_fd writes (guarded by the table mutex, like every counter)

    cdef object _take_slow(self, bint stamped=*)
    cdef int _drain(self, int sock, int budget) noexcept nogil
    cdef int _drain_batch(self, int sock, bint on_thread) noexcept nogil
    cdef void _thread_loop(self) noexcept nogil
    cdef void _wait_gate(self) noexcept nogil
    cdef void _hand_off(self) noexcept nogil
    cdef void _tap_push(self, Consumer *co, const uint8_t *buf, int n, int hlen, int64_t ext,
                        int64_t now) noexcept nogil
    cdef bint _notify_due(self) noexcept nogil
    cdef void _slow_push(self, int kind, int t, int i, int n, int sock, int64_t wall) noexcept nogil
    cdef uint32_t _ring_room(self) noexcept nogil
    cdef int _check_inline(self) except -1
    cdef int _check_socket(self, int s) except -1
    cdef int _check_transport(self, int t) except -1
    cdef int _check_producer(self, int p) except -1
    cdef int _check_consumer(self, int c) except -1
    cdef int _check_tap(self, int r) except -1
    cdef void _bind_tuple(self, int t, Key *k) noexcept nogil
    cdef void _clear_remote(self, int t) noexcept nogil
    cdef void _connect_peer(self, int sock, int t) noexcept nogil
    cdef object _remote_tuple(self, Transport *tr)
    cdef object _addr_tuple(self, const uint8_t *sa)
    cdef object _slow_item(self, int kind, int t, int i, int n, int sock)
    cdef int _fake_source(self, int sock, str ip, int port) except -1
    cdef int64_t _queue_age(self, int i, int64_t wall) noexcept nogil
    cdef void _event(self, int kind, int t, uint32_t value) noexcept nogil
    cdef void _drop(self, Transport *tr, int reason) noexcept nogil
    cdef int _handle(self, int sock, uint8_t *buf, int n, const uint8_t *src, int64_t now, int *out_t, int *out_n) noexcept nogil
    cdef void _rtp(self, int t, Transport *tr, uint8_t *buf, int n, const uint8_t *src, int64_t now, int tentative) noexcept nogil
    cdef void _read_level(self, Producer *pr, const uint8_t *blk, int blk_len, int profile) noexcept nogil
    cdef bytes _recent_levels(self, Producer *pr)
    cdef int64_t _track(self, Producer *pr, uint16_t seq, uint32_t ts, int64_t now) noexcept nogil
    cdef void _forward(self, Producer *pr, Consumer *co, const uint8_t *buf, int n, int hlen, int ext_off, int ext_len, int profile, int64_t ext, int64_t now) noexcept nogil
    cdef int _alloc_out(self) noexcept nogil
    cdef void _release_out(self, int slot) noexcept nogil
    cdef void _enqueue(self, int slot, Transport *dst) noexcept nogil
    cdef void _flush_all(self, bint on_thread=*) noexcept nogil
    cdef void _discard_queue(self, int sock) noexcept nogil
    cdef void _flush_socket(self, int sock, bint on_thread) noexcept nogil
    cdef int _socket_ready(self, int s, uint32_t events, bint on_thread) noexcept nogil
    cdef int _tcp_ready(self, int s, uint32_t events, bint on_thread) noexcept nogil
    cdef void _tcp_fail(self, int s, int reason) noexcept nogil
    cdef void _tcp_detach(self, int s) noexcept nogil
    cdef void _tcp_flush(self, int s) noexcept nogil
    cdef void _tcp_push(self, int s) noexcept nogil
    cdef int _tcp_append(self, TcpConn *c, const uint8_t *data, int n) noexcept nogil
