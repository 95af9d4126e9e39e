/*
 * Bare C forwarder: the baseline the fastsfu datapath is measured against
 * (docs/benchmarks.md#the-bare-c-baseline).
 *
 * Does the same per-packet work as the SFU and nothing else: epoll over every participant socket,
 * recvmmsg (batch 64), srtp_unprotect once, then for every other member of the room: copy, set
 * the consumer SSRC, payload type and header-extension ID (seq and timestamp unchanged),
 * srtp_protect with the receiver's outbound session, queue, and sendmmsg every 32 packets per
 * destination socket or at the end of each received batch. RTCP from a participant (RFC 5761
 * mux) is authenticated and decrypted (srtp_unprotect_rtcp) and counted, never forwarded.
 *
 * Built as a shared library and driven by run_baseline.py (ctypes). libsrtp is the 2.x build
 * bundled in pylibsrtp, reached through function pointers passed in from Python.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

typedef int (*srtp_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

#define MAX_PKT 1500
#define SLOT 1664 /* >= MAX_PKT + 144 bytes of SRTP trailer room, multiple of 64 */
#define RX_BATCH 64
#define RX_MAX_BATCHES_PER_WAKE 16 /* bound one socket's drain so the others get their turn */
#define FLUSH_AT 32
#define MAX_EXT_PATCH 8
#define RTP_HDR 12

typedef struct {
    uint64_t received, forwarded, decrypt_failures, send_failures, protect_failures;
    uint64_t dropped_malformed, dropped_ssrc, dropped_pt;
    uint64_t rx_batches, tx_calls, wakeups;
    uint64_t rtcp_received, rtcp_failures;
} fw_counters;

typedef struct {
    int fd;
    uint32_t ssrc;
    uint8_t pt, ext_id;
    void *up_ctx, *down_ctx;
    struct sockaddr_in dst;
    /* fan-out of this participant's stream */
    int fan_n;
    int32_t *fan_recv;
    uint32_t *fan_ssrc;
    /* queue of packets towards this participant */
    int q_n, dirty;
    struct mmsghdr *q_msgs;
    struct iovec *q_iov;
    uint8_t *q_buf;
} fw_part;

typedef struct fw {
    int n;
    fw_part *p;
    int ep;
    srtp_fn protect, unprotect, unprotect_rtcp;
    uint8_t consumer_pt, consumer_ext_id;
    int stop;
    int n_dirty;
    int32_t *dirty;
    struct mmsghdr rx_msgs[RX_BATCH];
    struct iovec rx_iov[RX_BATCH];
    uint8_t *rx_buf;
    fw_counters c;
} fw_t;

static inline uint32_t rd32(const uint8_t *b) { return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3]; }
static inline uint16_t rd16(const uint8_t *b) { return (uint16_t)(b[0] << 8 | b[1]); }
static inline void wr32(uint8_t *b, uint32_t v) { b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = (uint8_t)v; }

/*
 * Offsets of the one-byte header-extension elements with ID `ext_from`, found once per incoming
 * packet so that each copy only patches bytes. Returns the count, or -1 if the packet is malformed.
 */
static int rtp_ext_offsets(const uint8_t *b, int len, int ext_from, int *offs)
{
    int cc = b[0] & 0x0f, off = RTP_HDR + 4 * cc, n = 0;
    if (off > len)
        return -1;
    if (!(b[0] & 0x10))
        return 0;
    if (off + 4 > len)
        return -1;
    int end = off + 4 + 4 * rd16(b + off + 2);
    if (end > len)
        return -1;
    if (rd16(b + off) != 0xBEDE)
        return 0; /* two-byte form (or another profile): nothing we rewrite */
    for (int i = off + 4; i < end;) {
        uint8_t h = b[i];
        if (h == 0) {
            i++;
            continue;
        }
        int id = h >> 4, l = (h & 0x0f) + 1;
        if (id == 15)
            break; /* reserved: stop parsing, as RFC 8285 says */
        if (i + 1 + l > end)
            return -1;
        if (id == ext_from && n < MAX_EXT_PATCH)
            offs[n++] = i;
        i += 1 + l;
    }
    return n;
}

static inline void rtp_rewrite(uint8_t *o, uint32_t ssrc, uint8_t pt, const int *offs, int n_offs, uint8_t ext_to)
{
    o[1] = (uint8_t)((o[1] & 0x80) | pt); /* keep the marker bit */
    wr32(o + 8, ssrc);
    for (int k = 0; k < n_offs; k++)
        o[offs[k]] = (uint8_t)(ext_to << 4 | (o[offs[k]] & 0x0f));
}

static void flush(fw_t *f, fw_part *q)
{
    int off = 0;
    while (off < q->q_n) {
        int rc = sendmmsg(q->fd, q->q_msgs + off, (unsigned)(q->q_n - off), 0);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            /* The error belongs to the first unsent message: skip it so the loop always ends. */
            f->c.send_failures++;
            off++;
            continue;
        }
        f->c.tx_calls++;
        f->c.forwarded += (uint64_t)rc;
        off += rc;
    }
    q->q_n = 0;
}

static void flush_dirty(fw_t *f)
{
    for (int i = 0; i < f->n_dirty; i++) {
        fw_part *q = &f->p[f->dirty[i]];
        if (q->q_n)
            flush(f, q);
        q->dirty = 0;
    }
    f->n_dirty = 0;
}

static void handle_packet(fw_t *f, fw_part *s, uint8_t *b, int len)
{
    f->c.received++;
    if (len < RTP_HDR || (b[0] & 0xC0) != 0x80) {
        f->c.dropped_malformed++;
        return;
    }
    if (b[1] >= 192 && b[1] <= 223) { /* RTCP, RFC 5761 §4 */
        int rl = len;
        if (!f->unprotect_rtcp || f->unprotect_rtcp(s->up_ctx, b, &rl) != 0)
            f->c.rtcp_failures++;
        else
            f->c.rtcp_received++;
        return;
    }
    if (rd32(b + 8) != s->ssrc) {
        f->c.dropped_ssrc++;
        return;
    }
    /* The header is in clear: drop what we would not forward before paying for decryption. */
    if ((b[1] & 0x7f) != s->pt) {
        f->c.dropped_pt++;
        return;
    }
    int l = len;
    if (f->unprotect(s->up_ctx, b, &l) != 0) {
        f->c.decrypt_failures++;
        return;
    }
    int offs[MAX_EXT_PATCH];
    int n_offs = rtp_ext_offsets(b, l, s->ext_id, offs);
    if (n_offs < 0) {
        f->c.dropped_malformed++;
        return;
    }
    for (int k = 0; k < s->fan_n; k++) {
        fw_part *q = &f->p[s->fan_recv[k]];
        uint8_t *o = q->q_buf + (size_t)q->q_n * SLOT;
        memcpy(o, b, (size_t)l);
        rtp_rewrite(o, s->fan_ssrc[k], f->consumer_pt, offs, n_offs, f->consumer_ext_id);
        int ol = l;
        if (f->protect(q->down_ctx, o, &ol) != 0) {
            f->c.protect_failures++;
            continue;
        }
        q->q_iov[q->q_n].iov_len = (size_t)ol;
        q->q_n++;
        if (!q->dirty) {
            q->dirty = 1;
            f->dirty[f->n_dirty++] = s->fan_recv[k];
        }
        if (q->q_n == FLUSH_AT)
            flush(f, q);
    }
}

static void drain(fw_t *f, fw_part *s)
{
    for (int it = 0; it < RX_MAX_BATCHES_PER_WAKE; it++) {
        int got = recvmmsg(s->fd, f->rx_msgs, RX_BATCH, MSG_DONTWAIT, NULL);
        if (got <= 0)
            return;
        f->c.rx_batches++;
        for (int i = 0; i < got; i++)
            handle_packet(f, s, f->rx_buf + (size_t)i * SLOT, (int)f->rx_msgs[i].msg_len);
        flush_dirty(f);
        if (got < RX_BATCH)
            return;
    }
}

/* ---- public API ---- */

void fw_destroy(fw_t *f)
{
    if (!f)
        return;
    if (f->p) {
        for (int i = 0; i < f->n; i++) {
            fw_part *p = &f->p[i];
            if (p->fd >= 0)
                close(p->fd);
            free(p->fan_recv);
            free(p->fan_ssrc);
            free(p->q_msgs);
            free(p->q_iov);
            free(p->q_buf);
        }
    }
    if (f->ep >= 0)
        close(f->ep);
    free(f->p);
    free(f->dirty);
    free(f->rx_buf);
    free(f);
}

fw_t *fw_create(int n, const uint16_t *sut_ports, const uint16_t *gen_ports, const uint32_t *ssrcs,
                const uint8_t *pts, const uint8_t *ext_ids, void *unprotect_fn, void *const *up_ctx,
                void *protect_fn, void *const *down_ctx, int n_cons, const int32_t *cons_recv,
                const int32_t *cons_send, const uint32_t *cons_ssrc, int consumer_pt, int consumer_ext_id,
                int rcvbuf, char *err, int errlen)
{
    fw_t *f = calloc(1, sizeof *f);
    if (!f) {
        snprintf(err, (size_t)errlen, "out of memory");
        return NULL;
    }
    f->ep = -1;
    f->n = n;
    f->unprotect = (srtp_fn)unprotect_fn;
    f->protect = (srtp_fn)protect_fn;
    f->consumer_pt = (uint8_t)consumer_pt;
    f->consumer_ext_id = (uint8_t)consumer_ext_id;
    f->p = calloc((size_t)n, sizeof *f->p);
    f->dirty = calloc((size_t)n, sizeof *f->dirty);
    f->rx_buf = aligned_alloc(64, (size_t)RX_BATCH * SLOT);
    if (!f->p || !f->dirty || !f->rx_buf) {
        snprintf(err, (size_t)errlen, "out of memory");
        goto fail;
    }
    for (int i = 0; i < n; i++)
        f->p[i].fd = -1;
    for (int i = 0; i < RX_BATCH; i++) {
        f->rx_iov[i].iov_base = f->rx_buf + (size_t)i * SLOT;
        f->rx_iov[i].iov_len = MAX_PKT;
        f->rx_msgs[i].msg_hdr.msg_iov = &f->rx_iov[i];
        f->rx_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    /* Fan-out lists: sender -> (receiver, consumer ssrc), in config order. */
    for (int c = 0; c < n_cons; c++) {
        if (cons_recv[c] < 0 || cons_recv[c] >= n || cons_send[c] < 0 || cons_send[c] >= n) {
            snprintf(err, (size_t)errlen, "consumer %d: participant index out of range", c);
            goto fail;
        }
        f->p[cons_send[c]].fan_n++;
    }
    for (int i = 0; i < n; i++) {
        fw_part *p = &f->p[i];
        p->fan_recv = calloc((size_t)(p->fan_n + 1), sizeof *p->fan_recv);
        p->fan_ssrc = calloc((size_t)(p->fan_n + 1), sizeof *p->fan_ssrc);
        p->q_msgs = calloc(FLUSH_AT, sizeof *p->q_msgs);
        p->q_iov = calloc(FLUSH_AT, sizeof *p->q_iov);
        p->q_buf = aligned_alloc(64, (size_t)FLUSH_AT * SLOT);
        if (!p->fan_recv || !p->fan_ssrc || !p->q_msgs || !p->q_iov || !p->q_buf) {
            snprintf(err, (size_t)errlen, "out of memory");
            goto fail;
        }
        p->fan_n = 0;
    }
    for (int c = 0; c < n_cons; c++) {
        fw_part *s = &f->p[cons_send[c]];
        s->fan_recv[s->fan_n] = cons_recv[c];
        s->fan_ssrc[s->fan_n] = cons_ssrc[c];
        s->fan_n++;
    }

    f->ep = epoll_create1(EPOLL_CLOEXEC);
    if (f->ep < 0) {
        snprintf(err, (size_t)errlen, "epoll_create1: %s", strerror(errno));
        goto fail;
    }
    for (int i = 0; i < n; i++) {
        fw_part *p = &f->p[i];
        p->ssrc = ssrcs[i];
        p->pt = pts[i];
        p->ext_id = ext_ids[i];
        p->up_ctx = up_ctx[i];
        p->down_ctx = down_ctx[i];
        p->dst.sin_family = AF_INET;
        p->dst.sin_port = htons(gen_ports[i]);
        p->dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        for (int k = 0; k < FLUSH_AT; k++) {
            p->q_iov[k].iov_base = p->q_buf + (size_t)k * SLOT;
            p->q_msgs[k].msg_hdr.msg_name = &p->dst;
            p->q_msgs[k].msg_hdr.msg_namelen = sizeof p->dst;
            p->q_msgs[k].msg_hdr.msg_iov = &p->q_iov[k];
            p->q_msgs[k].msg_hdr.msg_iovlen = 1;
        }
        /* Blocking socket: sends wait for buffer space (back-pressure) while receives use
         * MSG_DONTWAIT. */
        p->fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (p->fd < 0) {
            snprintf(err, (size_t)errlen, "socket: %s", strerror(errno));
            goto fail;
        }
        if (rcvbuf > 0 && setsockopt(p->fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
            setsockopt(p->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(sut_ports[i])};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(p->fd, (struct sockaddr *)&a, sizeof a) != 0) {
            snprintf(err, (size_t)errlen, "bind 127.0.0.1:%u: %s", sut_ports[i], strerror(errno));
            goto fail;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(f->ep, EPOLL_CTL_ADD, p->fd, &ev) != 0) {
            snprintf(err, (size_t)errlen, "epoll_ctl: %s", strerror(errno));
            goto fail;
        }
    }
    return f;
fail:
    fw_destroy(f);
    return NULL;
}

/* Forward until fw_stop(); returns 0, or -1 if epoll fails. */
int fw_run(fw_t *f)
{
    struct epoll_event evs[64];
    while (!__atomic_load_n(&f->stop, __ATOMIC_RELAXED)) {
        /* The timeout only bounds how long a stop request waits. */
        int n = epoll_wait(f->ep, evs, 64, 50);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        f->c.wakeups++;
        for (int e = 0; e < n; e++)
            drain(f, &f->p[evs[e].data.u32]);
    }
    flush_dirty(f);
    return 0;
}

/* Accept SRTCP from participants: srtp_unprotect_rtcp of the same libsrtp. */
void fw_set_rtcp(fw_t *f, void *unprotect_rtcp_fn) { f->unprotect_rtcp = (srtp_fn)unprotect_rtcp_fn; }

void fw_stop(fw_t *f) { __atomic_store_n(&f->stop, 1, __ATOMIC_RELAXED); }

void fw_get_counters(const fw_t *f, fw_counters *out) { *out = f->c; }

int fw_counters_size(void) { return (int)sizeof(fw_counters); }

/*
 * The forwarder's per-packet work on one packet in memory, for byte-for-byte comparison with the
 * fastsfu datapath: unprotect `in` with up_ctx, rewrite for one consumer (ssrc, pt, ext_from ->
 * ext_to), protect with down_ctx into `out`. Returns the output length, or -1 bad arguments,
 * -2 unprotect failed, -3 malformed RTP, -4 protect failed; *srtp_status gets libsrtp's code.
 */
int fw_transform(void *unprotect_fn, void *up_ctx, void *protect_fn, void *down_ctx, const uint8_t *in,
                 int in_len, uint8_t *out, int out_cap, uint32_t ssrc, int pt, int ext_from, int ext_to,
                 int *srtp_status)
{
    uint8_t buf[SLOT];
    *srtp_status = 0;
    if (in_len < RTP_HDR || in_len > MAX_PKT || out_cap < in_len + 144)
        return -1;
    memcpy(buf, in, (size_t)in_len);
    int l = in_len;
    int rc = ((srtp_fn)unprotect_fn)(up_ctx, buf, &l);
    if (rc != 0) {
        *srtp_status = rc;
        return -2;
    }
    int offs[MAX_EXT_PATCH];
    int n_offs = rtp_ext_offsets(buf, l, ext_from, offs);
    if (n_offs < 0)
        return -3;
    memcpy(out, buf, (size_t)l);
    rtp_rewrite(out, ssrc, (uint8_t)pt, offs, n_offs, (uint8_t)ext_to);
    int ol = l;
    rc = ((srtp_fn)protect_fn)(down_ctx, out, &ol);
    if (rc != 0) {
        *srtp_status = rc;
        return -4;
    }
    return ol;
}
