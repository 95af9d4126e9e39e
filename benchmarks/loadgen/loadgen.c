/*
 * Native load generator and sink for the fastsfu loopback benchmark
 * (docs/benchmarks.md#the-loopback-load-benchmark).
 *
 * Built as a shared library and driven from Python (run_loadgen.py) with ctypes. SRTP comes
 * from the libsrtp 2.x bundled inside pylibsrtp: Python passes the srtp_protect/srtp_unprotect
 * function pointers and one srtp_t per session, so no libsrtp header or library is needed here.
 *
 * One lg_run_step() call runs one measurement step with two threads (they inherit the caller's
 * CPU affinity, so the launcher pins itself before calling in):
 *   - sender: every talking publisher (all, or the first `speakers` of each room) sends `rate`
 *     packets per second, publishers spread evenly over the period, woken on 1 ms ticks with an absolute clock_nanosleep;
 *   - receiver: drains every participant socket with recvmmsg, accounts loss/duplicates/reorders
 *     per subscription from sequence numbers, latency from the send time carried in a one-byte
 *     RTP header extension, and verifies the SRTP tag of a sample.
 * Loss is exact: both threads classify packets by the send stamp carried in the packet, so the
 * sender's per-publisher count of packets stamped inside the window is the sink's expectation.
 *
 * Discord's rtpsize AEAD modes (LG_OPEN_FIRST) plug in the same way: Python passes fastsfu's
 * aead_rtp_functions(), which have srtp_protect's signature, and AeadContext addresses. Those
 * modes encrypt the header extension elements, so the sink opens (verifies and decrypts) every
 * forwarded packet before it reads the send stamp.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef int (*srtp_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

/* lg_create flags */
#define LG_OPEN_FIRST 1 /* the stamp is encrypted (Discord rtpsize): unprotect every packet first */
#define STATUS_REPLAY_FAIL 9 /* srtp_err_status_replay_fail, also fastsfu's AEAD replay */
#define STATUS_REPLAY_OLD 10

#define MAX_PKT 1500
#define SRTP_MAX_TRAILER 144 /* room libsrtp may append after the packet */
#define SLOT 1664            /* >= MAX_PKT + SRTP_MAX_TRAILER, multiple of 64 */
#define RX_BATCH 64
#define RX_MAX_BATCHES_PER_WAKE 64 /* bound the drain of one socket so others are not starved */
#define TICK_NS 1000000LL
#define RTP_HDR 12
/* 0xBEDE block (RFC 8285 §4.2): the 8-byte send stamp, then ssrc-audio-level (RFC 6464 §3: one
 * byte, V flag + level in -dBov) as browsers send it on every Opus packet, then one padding byte. */
#define EXT_WORDS 3
#define GEN_HDR (RTP_HDR + 4 + 4 * EXT_WORDS)
#define OPUS_MIN 80
#define OPUS_SPAN 41 /* payload sizes 80..120 */

/* Latency histogram: 1 us buckets to 1 ms, 10 us to 10 ms, 100 us to 100 ms, 1 ms to 1 s. */
#define H_FINE 1000
#define H_SEG 900
#define H_N (H_FINE + 3 * H_SEG + 1)
#define CTRL_SLOT 64 /* one SCM_TIMESTAMPNS control message per received datagram */

/* ---- structures shared with Python (ctypes mirrors them; only fixed-width fields) ---- */

typedef struct {
    double rate;          /* packets per second per publisher */
    int64_t warmup_ns;    /* sent, not counted */
    int64_t duration_ns;  /* counted window */
    int64_t drain_ns;     /* receive-only tail so in-flight packets land */
    int32_t verify_every; /* verify the SRTP tag of every n-th packet per subscription; 0 = never */
    int32_t payload_size; /* 0 = Opus-like 80..120 bytes, otherwise fixed */
    /* 1: the sink polls without sleeping. A sleeping sink makes every SUT send to it pay a
     * cross-CPU wake-up (an IPI, expensive in a VM), a loopback artefact that a SUT sending to
     * a NIC never pays and that made the SUT's CPU per packet noisy. 2: polls the same way at
     * SCHED_IDLE, so it takes only what the CPU's other tasks (the join storm's client) leave;
     * its latency then comes from the kernel's arrival stamps (lg_result.klat_*). */
    int32_t sink_busy_poll;
    /* 1: SCHED_FIFO sender thread, so its 1 ms ticks preempt a busy sink on the same core. */
    int32_t sender_rt;
    /* Talking publishers per room (0: all): participant i sends iff i % room_size < speakers.
     * The others are muted, as a paused mediasoup-client producer is: they send nothing. */
    int32_t speakers;
    int32_t room_size;
    /* SRTCP receiver reports per second per participant (0: none), spread like the RTP; needs
     * lg_set_rtcp(). A browser sends one per received audio stream every ~5 s. */
    double rtcp_rate;
} lg_params;

typedef struct {
    /* sender */
    uint64_t sent_total, sent_window, send_errors, protect_errors;
    uint64_t wire_min, wire_max, wire_sum;
    int64_t max_send_lag_ns;
    /* sink, packets stamped inside the window */
    uint64_t expected, received, duplicates, reorders;
    uint64_t lat_count, lat_negative;
    int64_t lat_min_ns, lat_max_ns, lat_sum_ns;
    int64_t p50_ns, p90_ns, p99_ns, p999_ns;
    /* sink, all packets of the call */
    uint64_t received_total, out_of_window, rx_batches;
    uint64_t bad_packets, unknown_ssrc, misrouted, pt_mismatch, no_stamp, ext_not_rewritten;
    uint64_t verified, verify_failures;
    uint64_t rtcp;     /* RTCP from the SUT (RFC 5761 mux): counted, otherwise ignored */
    uint64_t replayed; /* LG_OPEN_FIRST: refused as a replay, so no stamp could be read */
    uint64_t rtcp_sent; /* receiver reports sent by the generator (whole call) */
    /* forwarded RTP stamped during this call (warm-up included): excludes packets left in the
     * sink's sockets by an earlier step, e.g. a backlog the SUT forwarded after that step ended */
    uint64_t received_call;
    /* timing */
    int64_t window_ns, elapsed_ns;
    int32_t sender_rt_ok, pad;
    /* The same packets' latency to the kernel's arrival stamp in the sink socket (SO_TIMESTAMPNS;
     * on loopback taken as the SUT's send enqueues it): the SUT's share without the sink's own
     * scheduling delay, which the join storm's client process on the sink's CPU adds to lat_*. */
    uint64_t klat_count;
    int64_t kp50_ns, kp99_ns, kp999_ns, klat_max_ns;
} lg_result;

typedef struct {
    uint64_t expected, received, duplicates, reorders, verify_failures;
    int64_t lat_max_ns;
} lg_sub_result;

/* ---- internal state ---- */

typedef struct {
    int fd;
    struct sockaddr_in dst;
    uint32_t ssrc;
    uint8_t pt, ext_id;
    void *up_ctx, *down_ctx;
    uint16_t seq;
    uint32_t ts;
    uint64_t prng;
    uint64_t sent_window; /* this step */
    int n_subs, rr_next; /* subscriptions this participant receives, for its receiver reports */
    uint32_t *sub_ssrc;
} lg_part;

typedef struct {
    int receiver, sender;
    uint32_t ssrc;
    /* sequence tracking persists across steps: seq continues, so dup/reorder state stays valid */
    int seen;
    uint64_t highest; /* extended seq, offset by 2^16 so early reorders stay positive */
    uint64_t window;  /* bit i = highest - i was received */
    uint64_t vcount;
    lg_sub_result r;
} lg_sub;

typedef struct lg {
    int n;
    uint8_t level_ext_id; /* 0: no audio-level element */
    lg_part *p;
    int n_cons;
    lg_sub *c;
    int32_t *hash; /* consumer ssrc -> consumer index, open addressing */
    uint32_t hash_mask;
    srtp_fn protect, unprotect, protect_rtcp;
    uint8_t consumer_pt, consumer_ext_id;
    int flags;
    int ep;
    uint8_t payload[MAX_PKT + 256];
    uint64_t hist[H_N];
    uint64_t khist[H_N]; /* kernel arrival stamps (lg_result.klat_*) */
} lg_t;

typedef struct {
    lg_t *g;
    lg_params prm;
    int64_t start, t0, t1, rx_end;
    lg_result res;
} lg_step;

/* ---- helpers ---- */

static inline int64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* SCM_TIMESTAMPNS of a received datagram (CLOCK_REALTIME ns), 0 when it carries none. */
static int64_t kernel_stamp(struct msghdr *mh)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        }
    return 0;
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t)
{
    struct timespec ts = {.tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static inline uint32_t rd32(const uint8_t *b) { return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3]; }
static inline uint16_t rd16(const uint8_t *b) { return (uint16_t)(b[0] << 8 | b[1]); }
static inline void wr16(uint8_t *b, uint16_t v) { b[0] = v >> 8; b[1] = (uint8_t)v; }
static inline void wr32(uint8_t *b, uint32_t v) { b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = (uint8_t)v; }
static inline void wr64(uint8_t *b, uint64_t v) { wr32(b, (uint32_t)(v >> 32)); wr32(b + 4, (uint32_t)v); }
static inline uint64_t rd64(const uint8_t *b) { return (uint64_t)rd32(b) << 32 | rd32(b + 4); }

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Find a one-byte (RFC 8285, 0xBEDE) header extension element; returns its length or -1. */
static int ext_find(const uint8_t *b, int len, int id, const uint8_t **val)
{
    if (!(b[0] & 0x10))
        return -1;
    int off = RTP_HDR + 4 * (b[0] & 0x0f);
    if (off + 4 > len || rd16(b + off) != 0xBEDE)
        return -1;
    int end = off + 4 + 4 * rd16(b + off + 2);
    if (end > len)
        return -1;
    for (int i = off + 4; i < end;) {
        uint8_t h = b[i];
        if (h == 0) { /* padding byte */
            i++;
            continue;
        }
        int eid = h >> 4, l = (h & 0x0f) + 1;
        if (eid == 15 || i + 1 + l > end)
            return -1;
        if (eid == id) {
            *val = b + i + 1;
            return l;
        }
        i += 1 + l;
    }
    return -1;
}

static inline uint32_t hash_ssrc(uint32_t ssrc) { return ssrc * 2654435761u; }

static int lookup_consumer(const lg_t *g, uint32_t ssrc)
{
    for (uint32_t h = hash_ssrc(ssrc) & g->hash_mask;; h = (h + 1) & g->hash_mask) {
        int32_t c = g->hash[h];
        if (c < 0)
            return -1;
        if (g->c[c].ssrc == ssrc)
            return c;
    }
}

static int hist_index(int64_t ns)
{
    int64_t us = ns < 0 ? 0 : ns / 1000;
    if (us < 1000)
        return (int)us;
    if (us < 10000)
        return H_FINE + (int)((us - 1000) / 10);
    if (us < 100000)
        return H_FINE + H_SEG + (int)((us - 10000) / 100);
    if (us < 1000000)
        return H_FINE + 2 * H_SEG + (int)((us - 100000) / 1000);
    return H_N - 1;
}

static int64_t hist_upper_ns(int i)
{
    if (i < H_FINE)
        return (int64_t)(i + 1) * 1000;
    if (i < H_FINE + H_SEG)
        return (1000 + (int64_t)(i - H_FINE + 1) * 10) * 1000;
    if (i < H_FINE + 2 * H_SEG)
        return (10000 + (int64_t)(i - H_FINE - H_SEG + 1) * 100) * 1000;
    if (i < H_FINE + 3 * H_SEG)
        return (100000 + (int64_t)(i - H_FINE - 2 * H_SEG + 1) * 1000) * 1000;
    return INT64_MAX;
}

/* Upper edge of the bucket holding the q-quantile, clamped to the exact maximum. */
static int64_t hist_quantile(const uint64_t *hist, uint64_t count, double q, int64_t max_ns)
{
    if (count == 0)
        return -1;
    uint64_t rank = (uint64_t)(q * (double)count);
    if (rank < 1)
        rank = 1;
    if (rank > count)
        rank = count;
    uint64_t acc = 0;
    for (int i = 0; i < H_N; i++) {
        acc += hist[i];
        if (acc >= rank) {
            int64_t v = hist_upper_ns(i);
            return v < max_ns ? v : max_ns;
        }
    }
    return max_ns;
}

/* ---- sender ---- */

static void send_one(lg_step *st, lg_part *p, uint8_t *buf, int64_t due)
{
    lg_t *g = st->g;
    lg_result *r = &st->res;
    int plen = st->prm.payload_size;
    uint64_t rnd = xorshift(&p->prng);
    if (plen <= 0)
        plen = OPUS_MIN + (int)(rnd % OPUS_SPAN);
    buf[0] = 0x90; /* V=2, X=1, CC=0 */
    buf[1] = p->pt;
    wr16(buf + 2, p->seq);
    wr32(buf + 4, p->ts);
    wr32(buf + 8, p->ssrc);
    buf[12] = 0xBE;
    buf[13] = 0xDE;
    wr16(buf + 14, EXT_WORDS);
    buf[16] = (uint8_t)(p->ext_id << 4 | 7); /* L field = length - 1 */
    buf[25] = buf[26] = buf[27] = 0;
    if (g->level_ext_id) {
        buf[25] = (uint8_t)(g->level_ext_id << 4); /* L = 0: one byte */
        buf[26] = (uint8_t)(rnd >> 40 & 0x7f);     /* level 0..127 -dBov, V flag clear */
    }
    memcpy(buf + GEN_HDR, g->payload + ((rnd >> 16) & 0xff), (size_t)plen);
    p->seq++;
    p->ts += 960; /* 20 ms at 48 kHz */

    /* Stamp as late as possible: everything after this line is charged to the SUT. */
    int64_t stamp = now_ns();
    wr64(buf + 17, (uint64_t)stamp);
    int len = GEN_HDR + plen;
    if (g->protect(p->up_ctx, buf, &len) != 0) {
        r->protect_errors++;
        return;
    }
    if (sendto(p->fd, buf, (size_t)len, 0, (struct sockaddr *)&p->dst, sizeof p->dst) != len) {
        r->send_errors++;
        return;
    }
    r->sent_total++;
    if (stamp >= st->t0 && stamp < st->t1) {
        r->sent_window++;
        p->sent_window++;
    }
    if (r->wire_min == 0 || (uint64_t)len < r->wire_min)
        r->wire_min = (uint64_t)len;
    if ((uint64_t)len > r->wire_max)
        r->wire_max = (uint64_t)len;
    r->wire_sum += (uint64_t)len;
    if (stamp - due > r->max_send_lag_ns)
        r->max_send_lag_ns = stamp - due;
}

/* One RTCP receiver report (RFC 3550 §6.4.2) about one of the streams `p` receives (round robin),
 * SRTCP-protected with p's upstream session, as a client's receive stream reports to the SFU. */
static void send_rtcp(lg_step *st, lg_part *p, uint8_t *buf)
{
    lg_t *g = st->g;
    if (!g->protect_rtcp || p->n_subs == 0)
        return;
    uint32_t about = p->sub_ssrc[p->rr_next++ % p->n_subs];
    memset(buf, 0, 32);
    buf[0] = 0x81; /* V=2, RC=1 */
    buf[1] = 201;  /* RR */
    wr16(buf + 2, 7); /* length in 32-bit words minus one */
    wr32(buf + 4, p->ssrc);
    wr32(buf + 8, about);
    /* fraction lost, cumulative lost, highest seq, jitter, LSR, DLSR: all zero (nothing lost) */
    int len = 32;
    if (g->protect_rtcp(p->up_ctx, buf, &len) != 0) {
        st->res.protect_errors++;
        return;
    }
    if (sendto(p->fd, buf, (size_t)len, 0, (struct sockaddr *)&p->dst, sizeof p->dst) != len) {
        st->res.send_errors++;
        return;
    }
    st->res.rtcp_sent++;
}

static void *sender_main(void *arg)
{
    lg_step *st = arg;
    lg_t *g = st->g;
    uint8_t buf[SLOT] __attribute__((aligned(64)));
    if (st->prm.rate <= 0 || g->n == 0)
        return NULL; /* receive-only step */
    /* The j-th send overall belongs to publisher j % n and is due at start + j * period / n:
     * every publisher keeps the same period, phases spread evenly across it. */
    int n_active = 0;
    int *active = malloc((size_t)g->n * sizeof *active);
    if (!active)
        return NULL;
    for (int i = 0; i < g->n; i++)
        if (st->prm.speakers <= 0 || st->prm.room_size <= 0 || i % st->prm.room_size < st->prm.speakers)
            active[n_active++] = i;
    if (n_active == 0) {
        free(active);
        return NULL;
    }
    double step = 1e9 / st->prm.rate / n_active;
    uint64_t j = 0, k = 0;
    /* Receiver reports come from every participant (muted ones receive too), offset by half a
     * slot so they do not coincide with the RTP sends. */
    double rstep = st->prm.rtcp_rate > 0 && g->protect_rtcp ? 1e9 / st->prm.rtcp_rate / g->n : 0;
    if (st->prm.sender_rt) {
        struct sched_param sp = {.sched_priority = 1};
        st->res.sender_rt_ok = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0;
    }
    for (;;) {
        int64_t due = st->start + (int64_t)((double)j * step);
        int64_t rdue = rstep > 0 ? st->start + (int64_t)(((double)k + 0.5) * rstep) : INT64_MAX;
        int rtcp = rdue < due;
        if (rtcp)
            due = rdue;
        if (due >= st->t1)
            break;
        int64_t now = now_ns();
        if (due > now) {
            /* Sleep to the 1 ms tick on or after the next due time. */
            int64_t tick = st->start + ((due - st->start + TICK_NS - 1) / TICK_NS) * TICK_NS;
            sleep_until(tick);
            continue;
        }
        if (rtcp) {
            send_rtcp(st, &g->p[k % (uint64_t)g->n], buf);
            k++;
            continue;
        }
        send_one(st, &g->p[active[j % (uint64_t)n_active]], buf, due);
        j++;
    }
    free(active);
    return NULL;
}

/* ---- receiver ---- */

enum { SEQ_NEW, SEQ_REORDER, SEQ_DUP };

static int seq_track(lg_sub *s, uint16_t seq)
{
    if (!s->seen) {
        s->seen = 1;
        s->highest = 65536 + seq;
        s->window = 1;
        return SEQ_NEW;
    }
    int16_t delta = (int16_t)(seq - (uint16_t)s->highest);
    if (delta > 0) {
        s->window = delta >= 64 ? 1 : (s->window << delta) | 1;
        s->highest += (uint64_t)delta;
        return SEQ_NEW;
    }
    int back = -delta;
    if (back >= 64)
        return SEQ_REORDER; /* too old to tell a duplicate from a late packet */
    if (s->window >> back & 1)
        return SEQ_DUP;
    s->window |= 1ULL << back;
    return SEQ_REORDER;
}

static void sink_packet(lg_step *st, int rcv, uint8_t *b, int len, int64_t now, int64_t karrival)
{
    lg_t *g = st->g;
    lg_result *r = &st->res;
    r->received_total++;
    if (len < RTP_HDR || (b[0] & 0xC0) != 0x80) {
        r->bad_packets++;
        return;
    }
    if (b[1] >= 192 && b[1] <= 223) {
        r->rtcp++;
        return;
    }
    int c = lookup_consumer(g, rd32(b + 8));
    if (c < 0) {
        r->unknown_ssrc++;
        return;
    }
    lg_sub *s = &g->c[c];
    if (s->receiver != rcv) {
        r->misrouted++;
        return;
    }
    if ((b[1] & 0x7f) != g->consumer_pt)
        r->pt_mismatch++;
    if (g->flags & LG_OPEN_FIRST) {
        /* The extension elements are encrypted: open the packet (tag check and decryption in
         * place) before reading the stamp. Every packet is verified; one that fails is also lost. */
        int l = len, rc = g->unprotect(g->p[rcv].down_ctx, b, &l);
        r->verified++;
        if (rc == STATUS_REPLAY_FAIL || rc == STATUS_REPLAY_OLD) {
            r->replayed++;
            return;
        }
        if (rc != 0) {
            r->verify_failures++;
            s->r.verify_failures++;
            return;
        }
        len = l;
    }
    const uint8_t *v;
    if (ext_find(b, len, g->consumer_ext_id, &v) != 8) {
        if (ext_find(b, len, g->p[s->sender].ext_id, &v) == 8)
            r->ext_not_rewritten++;
        else
            r->no_stamp++;
        return;
    }
    int64_t stamp = (int64_t)rd64(v);
    int kind = seq_track(s, rd16(b + 2));
    if (stamp >= st->start)
        r->received_call++;
    if (stamp >= st->t0 && stamp < st->t1) {
        if (kind == SEQ_DUP) {
            r->duplicates++;
            s->r.duplicates++;
        } else {
            int64_t lat = now - stamp;
            r->received++;
            s->r.received++;
            if (kind == SEQ_REORDER) {
                r->reorders++;
                s->r.reorders++;
            }
            if (lat < 0)
                r->lat_negative++;
            if (r->lat_count == 0 || lat < r->lat_min_ns)
                r->lat_min_ns = lat;
            if (lat > r->lat_max_ns)
                r->lat_max_ns = lat;
            if (lat > s->r.lat_max_ns)
                s->r.lat_max_ns = lat;
            r->lat_count++;
            r->lat_sum_ns += lat;
            g->hist[hist_index(lat)]++;
            if (karrival > 0) {
                int64_t klat = karrival - stamp;
                r->klat_count++;
                if (klat > r->klat_max_ns)
                    r->klat_max_ns = klat;
                g->khist[hist_index(klat)]++;
            }
        }
    } else {
        r->out_of_window++;
    }
    /* Verify after the header is read: unprotect decrypts in place. Duplicates would only
     * fail the replay check, which says nothing about the tag. */
    if (!(g->flags & LG_OPEN_FIRST) && kind != SEQ_DUP && st->prm.verify_every > 0 &&
        s->vcount++ % (uint64_t)st->prm.verify_every == 0) {
        int l = len;
        r->verified++;
        if (g->unprotect(g->p[rcv].down_ctx, b, &l) != 0) {
            r->verify_failures++;
            s->r.verify_failures++;
        }
    }
}

static void *receiver_main(void *arg)
{
    lg_step *st = arg;
    lg_t *g = st->g;
    struct mmsghdr *msgs = calloc(RX_BATCH, sizeof *msgs);
    struct iovec *iov = calloc(RX_BATCH, sizeof *iov);
    uint8_t *bufs = aligned_alloc(64, (size_t)RX_BATCH * SLOT);
    struct epoll_event evs[256];
    uint8_t *ctrl = calloc(RX_BATCH, CTRL_SLOT);
    if (!msgs || !iov || !bufs || !ctrl)
        goto out;
    for (int i = 0; i < RX_BATCH; i++) {
        iov[i].iov_base = bufs + (size_t)i * SLOT;
        iov[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = ctrl + (size_t)i * CTRL_SLOT;
    }
    if (st->prm.sink_busy_poll == 2) {
        struct sched_param sp = {.sched_priority = 0};
        pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    }
    for (;;) {
        int64_t now = now_ns();
        if (now >= st->rx_end)
            break;
        int64_t left_ms = (st->rx_end - now + 999999) / 1000000;
        int n = epoll_wait(g->ep, evs, 256, st->prm.sink_busy_poll ? 0 : left_ms > 5 ? 5 : (int)left_ms);
        for (int e = 0; e < n; e++) {
            int rcv = (int)evs[e].data.u32;
            for (int it = 0; it < RX_MAX_BATCHES_PER_WAKE; it++) {
                for (int k = 0; k < RX_BATCH; k++)
                    msgs[k].msg_hdr.msg_controllen = CTRL_SLOT; /* the kernel shrinks it */
                int got = recvmmsg(g->p[rcv].fd, msgs, RX_BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0)
                    break;
                /* One clock read per batch: the time this sink saw these packets. The kernel's
                 * stamps are CLOCK_REALTIME: shift them by the clocks' offset read now. */
                int64_t t = now_ns(), to_mono = t - realtime_ns();
                st->res.rx_batches++;
                for (int k = 0; k < got; k++) {
                    int64_t karrival = kernel_stamp(&msgs[k].msg_hdr);
                    sink_packet(st, rcv, bufs + (size_t)k * SLOT, (int)msgs[k].msg_len, t,
                                karrival > 0 ? karrival + to_mono : 0);
                }
                if (got < RX_BATCH)
                    break;
            }
        }
    }
out:
    free(msgs);
    free(iov);
    free(bufs);
    free(ctrl);
    return NULL;
}

/* ---- public API ---- */

void lg_struct_sizes(int32_t *params, int32_t *result, int32_t *sub)
{
    *params = (int32_t)sizeof(lg_params);
    *result = (int32_t)sizeof(lg_result);
    *sub = (int32_t)sizeof(lg_sub_result);
}

/* SRTCP for the receiver reports: srtp_protect_rtcp of the same libsrtp as the RTP. */
void lg_set_rtcp(lg_t *g, void *protect_rtcp_fn) { g->protect_rtcp = (srtp_fn)protect_rtcp_fn; }

/* A participant's socket, e.g. for Discord IP discovery from Python before the first step. */
int lg_fd(const lg_t *g, int i) { return g && i >= 0 && i < g->n ? g->p[i].fd : -1; }

void lg_destroy(lg_t *g)
{
    if (!g)
        return;
    if (g->p)
        for (int i = 0; i < g->n; i++) {
            if (g->p[i].fd >= 0)
                close(g->p[i].fd);
            free(g->p[i].sub_ssrc);
        }
    if (g->ep >= 0)
        close(g->ep);
    free(g->p);
    free(g->c);
    free(g->hash);
    free(g);
}

lg_t *lg_create(int n, const uint16_t *gen_ports, const uint16_t *sut_ports, const uint32_t *ssrcs,
                const uint8_t *pts, const uint8_t *ext_ids, void *protect_fn, void *const *up_ctx,
                void *unprotect_fn, void *const *down_ctx, int n_cons, const int32_t *cons_recv,
                const int32_t *cons_send, const uint32_t *cons_ssrc, int consumer_pt, int consumer_ext_id,
                int level_ext_id, uint64_t seed, int rcvbuf, int flags, char *err, int errlen)
{
    lg_t *g = calloc(1, sizeof *g);
    if (!g) {
        snprintf(err, (size_t)errlen, "out of memory");
        return NULL;
    }
    g->ep = -1;
    g->n = n;
    g->n_cons = n_cons;
    g->protect = (srtp_fn)protect_fn;
    g->unprotect = (srtp_fn)unprotect_fn;
    g->consumer_pt = (uint8_t)consumer_pt;
    g->consumer_ext_id = (uint8_t)consumer_ext_id;
    g->flags = flags;
    g->level_ext_id = (uint8_t)(level_ext_id > 0 && level_ext_id < 15 ? level_ext_id : 0);
    uint32_t hsize = 16;
    while (hsize < 2u * (uint32_t)n_cons)
        hsize <<= 1;
    g->hash_mask = hsize - 1;
    g->p = calloc((size_t)n, sizeof *g->p);
    g->c = calloc((size_t)(n_cons > 0 ? n_cons : 1), sizeof *g->c);
    g->hash = malloc(hsize * sizeof *g->hash);
    if (!g->p || !g->c || !g->hash) {
        snprintf(err, (size_t)errlen, "out of memory");
        goto fail;
    }
    for (int i = 0; i < n; i++)
        g->p[i].fd = -1;
    memset(g->hash, 0xff, hsize * sizeof *g->hash);
    uint64_t rs = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < sizeof g->payload; i++)
        g->payload[i] = (uint8_t)(xorshift(&rs) >> 24);

    g->ep = epoll_create1(EPOLL_CLOEXEC);
    if (g->ep < 0) {
        snprintf(err, (size_t)errlen, "epoll_create1: %s", strerror(errno));
        goto fail;
    }
    for (int i = 0; i < n; i++) {
        lg_part *p = &g->p[i];
        p->ssrc = ssrcs[i];
        p->pt = pts[i];
        p->ext_id = ext_ids[i];
        p->up_ctx = up_ctx[i];
        p->down_ctx = down_ctx[i];
        p->prng = (seed + 1) * 0x9E3779B97F4A7C15ULL ^ (uint64_t)(i + 1) * 0xBF58476D1CE4E5B9ULL;
        if (!p->prng)
            p->prng = 1;
        p->seq = (uint16_t)(xorshift(&p->prng) >> 20);
        p->ts = (uint32_t)(xorshift(&p->prng) >> 16);
        p->dst.sin_family = AF_INET;
        p->dst.sin_port = htons(sut_ports[i]);
        p->dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        p->fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (p->fd < 0) {
            snprintf(err, (size_t)errlen, "socket: %s", strerror(errno));
            goto fail;
        }
        if (rcvbuf > 0) {
            /* A roomy sink buffer so that loss is the SUT's, not the sink's; FORCE needs
             * CAP_NET_ADMIN and falls back to the rmem_max-capped option. */
            if (setsockopt(p->fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
                setsockopt(p->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        }
        /* Arrival stamps for lg_result.klat_*: best effort, the sink still has its own clock. */
        int on = 1;
        setsockopt(p->fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(gen_ports[i])};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(p->fd, (struct sockaddr *)&a, sizeof a) != 0) {
            snprintf(err, (size_t)errlen, "bind 127.0.0.1:%u: %s", gen_ports[i], strerror(errno));
            goto fail;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(g->ep, EPOLL_CTL_ADD, p->fd, &ev) != 0) {
            snprintf(err, (size_t)errlen, "epoll_ctl: %s", strerror(errno));
            goto fail;
        }
    }
    for (int c = 0; c < n_cons; c++) {
        lg_sub *s = &g->c[c];
        if (cons_recv[c] < 0 || cons_recv[c] >= n || cons_send[c] < 0 || cons_send[c] >= n) {
            snprintf(err, (size_t)errlen, "consumer %d: participant index out of range", c);
            goto fail;
        }
        s->receiver = cons_recv[c];
        s->sender = cons_send[c];
        s->ssrc = cons_ssrc[c];
        if (lookup_consumer(g, s->ssrc) >= 0) {
            snprintf(err, (size_t)errlen, "duplicate consumer ssrc %u", s->ssrc);
            goto fail;
        }
        uint32_t h = hash_ssrc(s->ssrc) & g->hash_mask;
        while (g->hash[h] >= 0)
            h = (h + 1) & g->hash_mask;
        g->hash[h] = c;
        g->p[s->receiver].n_subs++;
    }
    for (int i = 0; i < n; i++) {
        g->p[i].sub_ssrc = calloc((size_t)g->p[i].n_subs + 1, sizeof *g->p[i].sub_ssrc);
        if (!g->p[i].sub_ssrc) {
            snprintf(err, (size_t)errlen, "out of memory");
            goto fail;
        }
        g->p[i].n_subs = 0;
    }
    for (int c = 0; c < n_cons; c++) {
        lg_part *r = &g->p[g->c[c].receiver];
        r->sub_ssrc[r->n_subs++] = g->c[c].ssrc;
    }
    return g;
fail:
    lg_destroy(g);
    return NULL;
}

/* Run one step; fills `res` and `subs` (n_cons entries). Returns 0, or -1 with `err` set.
 * rate 0 is a receive-only step, used to drain a SUT's backlog between steps. */
int lg_run_step(lg_t *g, const lg_params *prm, lg_result *res, lg_sub_result *subs, char *err, int errlen)
{
    if (!(prm->rate >= 0 && prm->rate <= 100000) || prm->warmup_ns < 0 || prm->duration_ns <= 0 ||
        prm->drain_ns < 0 || prm->duration_ns > 3600LL * 1000000000LL || prm->payload_size < 0 ||
        prm->payload_size > MAX_PKT - GEN_HDR - SRTP_MAX_TRAILER || prm->speakers < 0 || prm->room_size < 0 ||
        !(prm->rtcp_rate >= 0 && prm->rtcp_rate <= 10000)) {
        snprintf(err, (size_t)errlen, "invalid step parameters");
        return -1;
    }
    lg_step st;
    memset(&st, 0, sizeof st);
    st.g = g;
    st.prm = *prm;
    memset(g->hist, 0, sizeof g->hist);
    memset(g->khist, 0, sizeof g->khist);
    for (int i = 0; i < g->n; i++)
        g->p[i].sent_window = 0;
    for (int c = 0; c < g->n_cons; c++)
        memset(&g->c[c].r, 0, sizeof g->c[c].r);
    /* Start on a whole tick a few ms ahead so both threads are up before the first send. */
    int64_t t = now_ns() + 5 * TICK_NS;
    st.start = (t / TICK_NS + 1) * TICK_NS;
    st.t0 = st.start + prm->warmup_ns;
    st.t1 = st.t0 + prm->duration_ns;
    st.rx_end = st.t1 + prm->drain_ns;

    pthread_t rx, tx;
    if (pthread_create(&rx, NULL, receiver_main, &st) != 0) {
        snprintf(err, (size_t)errlen, "pthread_create: %s", strerror(errno));
        return -1;
    }
    if (pthread_create(&tx, NULL, sender_main, &st) != 0) {
        /* The receiver still ends on its own deadline. */
        pthread_join(rx, NULL);
        snprintf(err, (size_t)errlen, "pthread_create: %s", strerror(errno));
        return -1;
    }
    pthread_join(tx, NULL);
    pthread_join(rx, NULL);

    lg_result *r = &st.res;
    for (int c = 0; c < g->n_cons; c++) {
        lg_sub *s = &g->c[c];
        s->r.expected = g->p[s->sender].sent_window;
        r->expected += s->r.expected;
        subs[c] = s->r;
    }
    r->p50_ns = hist_quantile(g->hist, r->lat_count, 0.50, r->lat_max_ns);
    r->p90_ns = hist_quantile(g->hist, r->lat_count, 0.90, r->lat_max_ns);
    r->p99_ns = hist_quantile(g->hist, r->lat_count, 0.99, r->lat_max_ns);
    r->p999_ns = hist_quantile(g->hist, r->lat_count, 0.999, r->lat_max_ns);
    r->kp50_ns = hist_quantile(g->khist, r->klat_count, 0.50, r->klat_max_ns);
    r->kp99_ns = hist_quantile(g->khist, r->klat_count, 0.99, r->klat_max_ns);
    r->kp999_ns = hist_quantile(g->khist, r->klat_count, 0.999, r->klat_max_ns);
    r->window_ns = prm->duration_ns;
    r->elapsed_ns = now_ns() - st.start;
    *res = *r;
    return 0;
}
