/* Discord's "rtpsize" transport encryption (docs/transports.md#encryption-modes) for the datapath, in C.
 *
 * AES-256-GCM and ChaCha20-Poly1305 come from the OpenSSL that pylibsrtp's bundled libsrtp carries,
 * reached through function pointers installed at import (as libsrtp itself is), so there is no
 * build-time dependency. XChaCha20-Poly1305 is HChaCha20 (draft-irtf-cfrg-xchacha-03 §2.2) over
 * the first 16 nonce bytes, then ChaCha20-Poly1305 (RFC 8439) with the subkey and
 * 4 zero bytes || the last 8 nonce bytes. Nothing here allocates per packet.
 */
#ifndef FASTSFU_AEAD_H
#define FASTSFU_AEAD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct fsfu_evp_cipher fsfu_evp_cipher;
typedef struct fsfu_evp_ctx fsfu_evp_ctx;

typedef struct {
    fsfu_evp_ctx *(*ctx_new)(void);
    void (*ctx_free)(fsfu_evp_ctx *);
    int (*ctx_ctrl)(fsfu_evp_ctx *, int type, int arg, void *ptr);
    int (*enc_init)(fsfu_evp_ctx *, const fsfu_evp_cipher *, void *engine, const uint8_t *key,
                    const uint8_t *iv);
    int (*enc_update)(fsfu_evp_ctx *, uint8_t *out, int *outl, const uint8_t *in, int inl);
    int (*enc_final)(fsfu_evp_ctx *, uint8_t *out, int *outl);
    int (*dec_init)(fsfu_evp_ctx *, const fsfu_evp_cipher *, void *engine, const uint8_t *key,
                    const uint8_t *iv);
    int (*dec_update)(fsfu_evp_ctx *, uint8_t *out, int *outl, const uint8_t *in, int inl);
    int (*dec_final)(fsfu_evp_ctx *, uint8_t *out, int *outl);
    const fsfu_evp_cipher *(*aes_256_gcm)(void);
    const fsfu_evp_cipher *(*chacha20_poly1305)(void);
} fsfu_evp_api;

static fsfu_evp_api fsfu_evp;          /* filled in once at import */

/* Install the 11 OpenSSL entry points, in the order of fsfu_evp_api's fields. */
static inline void fsfu_evp_install(const uintptr_t *f) {
    fsfu_evp.ctx_new = (fsfu_evp_ctx *(*)(void))f[0];
    fsfu_evp.ctx_free = (void (*)(fsfu_evp_ctx *))f[1];
    fsfu_evp.ctx_ctrl = (int (*)(fsfu_evp_ctx *, int, int, void *))f[2];
    fsfu_evp.enc_init = (int (*)(fsfu_evp_ctx *, const fsfu_evp_cipher *, void *, const uint8_t *,
                                 const uint8_t *))f[3];
    fsfu_evp.enc_update = (int (*)(fsfu_evp_ctx *, uint8_t *, int *, const uint8_t *, int))f[4];
    fsfu_evp.enc_final = (int (*)(fsfu_evp_ctx *, uint8_t *, int *))f[5];
    fsfu_evp.dec_init = (int (*)(fsfu_evp_ctx *, const fsfu_evp_cipher *, void *, const uint8_t *,
                                 const uint8_t *))f[6];
    fsfu_evp.dec_update = (int (*)(fsfu_evp_ctx *, uint8_t *, int *, const uint8_t *, int))f[7];
    fsfu_evp.dec_final = (int (*)(fsfu_evp_ctx *, uint8_t *, int *))f[8];
    fsfu_evp.aes_256_gcm = (const fsfu_evp_cipher *(*)(void))f[9];
    fsfu_evp.chacha20_poly1305 = (const fsfu_evp_cipher *(*)(void))f[10];
}

static inline int fsfu_evp_installed(void) { return fsfu_evp.ctx_new != NULL; }

#define FSFU_EVP_CTRL_AEAD_GET_TAG 0x10 /* openssl/evp.h EVP_CTRL_AEAD_GET_TAG */
#define FSFU_EVP_CTRL_AEAD_SET_TAG 0x11 /* EVP_CTRL_AEAD_SET_TAG */

enum { FSFU_AEAD_AES256GCM = 1, FSFU_AEAD_XCHACHA20 = 2 };
/* Legacy modes (discontinued by Discord in 2024; offered only behind a setting): XSalsa20-Poly1305
 * secretbox from the libsodium PyNaCl bundles, through its NaCl-style entry points. */
enum {
    FSFU_AEAD_XSALSA_LITE_RTPSIZE = 3, /* rtpsize clear part, counter nonce, hdr|MAC|ct|counter4 */
    FSFU_AEAD_XSALSA_LITE = 4,         /* 12-byte clear part, counter nonce, hdr|MAC|ct|counter4 */
    FSFU_AEAD_XSALSA_SUFFIX = 5,       /* 12-byte clear part, random nonce, hdr|MAC|ct|nonce24 */
    FSFU_AEAD_XSALSA = 6,              /* 12-byte clear part, nonce = header, hdr|MAC|ct */
};
enum { FSFU_AEAD_TAG = 16, FSFU_AEAD_SUFFIX = 20 /* tag + 4-byte counter */ };
enum { FSFU_AEAD_MAX_OVERHEAD = 40 /* MAC + 24-byte nonce (suffix mode) */ };
enum { FSFU_SCRATCH = 3400 /* >= the datapath's OUT_SLOT + 32 */ };

typedef struct {
    int (*secretbox)(uint8_t *c, const uint8_t *m, unsigned long long mlen, const uint8_t *n,
                     const uint8_t *k);
    int (*secretbox_open)(uint8_t *m, const uint8_t *c, unsigned long long clen, const uint8_t *n,
                          const uint8_t *k);
    void (*randombytes)(uint8_t *buf, unsigned long long len);
} fsfu_nacl_api;

static fsfu_nacl_api fsfu_nacl;          /* filled in at import when PyNaCl is there */

static inline void fsfu_nacl_install(uintptr_t box, uintptr_t open, uintptr_t random) {
    fsfu_nacl.secretbox = (int (*)(uint8_t *, const uint8_t *, unsigned long long, const uint8_t *,
                                   const uint8_t *))box;
    fsfu_nacl.secretbox_open = (int (*)(uint8_t *, const uint8_t *, unsigned long long,
                                        const uint8_t *, const uint8_t *))open;
    fsfu_nacl.randombytes = (void (*)(uint8_t *, unsigned long long))random;
}

static inline int fsfu_nacl_installed(void) { return fsfu_nacl.secretbox != NULL; }
enum { FSFU_AEAD_OK = 0, FSFU_AEAD_FAIL = -1, FSFU_AEAD_REPLAY = -2, FSFU_AEAD_SHORT = -3 };

typedef struct {
    int mode;
    uint8_t key[32];
    fsfu_evp_ctx *enc;
    fsfu_evp_ctx *dec;
    uint32_t out_counter;              /* this receiver's own nonce counter */
    int have_in;
    uint32_t in_highest;               /* highest authenticated inbound counter */
    uint64_t in_window;                /* bit i: in_highest - i was seen (i < 64) */
    uint8_t *scratch;                  /* legacy modes: NaCl's zero-padded buffers (FSFU_SCRATCH) */
} fsfu_aead;

static inline int fsfu_aead_legacy(const fsfu_aead *a) { return a->mode >= FSFU_AEAD_XSALSA_LITE_RTPSIZE; }

/* The clear part of an RTP packet under this mode: rtpsize modes keep the CSRCs and the extension
 * preamble clear; the older modes only the 12-byte fixed header. -1: shorter than that. */
static inline int fsfu_aead_rtp_clear(const fsfu_aead *a, const uint8_t *p, int n) {
    int clear;
    if (n < 12) return -1;
    if (a->mode == FSFU_AEAD_AES256GCM || a->mode == FSFU_AEAD_XCHACHA20 ||
        a->mode == FSFU_AEAD_XSALSA_LITE_RTPSIZE)
        clear = 12 + 4 * (p[0] & 0x0F) + ((p[0] & 0x10) ? 4 : 0);
    else
        clear = 12;
    return clear <= n ? clear : -1;
}

static inline uint32_t fsfu_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void fsfu_put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

#define FSFU_ROTL32(v, n) (((v) << (n)) | ((v) >> (32 - (n))))
#define FSFU_QR(a, b, c, d) do {                               \
    a += b; d ^= a; d = FSFU_ROTL32(d, 16);                    \
    c += d; b ^= c; b = FSFU_ROTL32(b, 12);                    \
    a += b; d ^= a; d = FSFU_ROTL32(d, 8);                     \
    c += d; b ^= c; b = FSFU_ROTL32(b, 7);                     \
} while (0)

/* HChaCha20: the ChaCha20 block function without the final addition; output words 0-3, 12-15. */
static inline void fsfu_hchacha20(uint8_t out[32], const uint8_t key[32], const uint8_t in[16]) {
    uint32_t x[16];
    int i;
    x[0] = 0x61707865; x[1] = 0x3320646e; x[2] = 0x79622d32; x[3] = 0x6b206574;
    for (i = 0; i < 8; i++) x[4 + i] = fsfu_le32(key + 4 * i);
    for (i = 0; i < 4; i++) x[12 + i] = fsfu_le32(in + 4 * i);
    for (i = 0; i < 10; i++) {
        FSFU_QR(x[0], x[4], x[8], x[12]); FSFU_QR(x[1], x[5], x[9], x[13]);
        FSFU_QR(x[2], x[6], x[10], x[14]); FSFU_QR(x[3], x[7], x[11], x[15]);
        FSFU_QR(x[0], x[5], x[10], x[15]); FSFU_QR(x[1], x[6], x[11], x[12]);
        FSFU_QR(x[2], x[7], x[8], x[13]); FSFU_QR(x[3], x[4], x[9], x[14]);
    }
    for (i = 0; i < 4; i++) {
        fsfu_put_le32(out + 4 * i, x[i]);
        fsfu_put_le32(out + 16 + 4 * i, x[12 + i]);
    }
}

/* Create the cipher contexts; 0 on success. AES-GCM keys once, XChaCha re-keys per packet. */
static inline int fsfu_aead_init(fsfu_aead *a, int mode, const uint8_t key[32]) {
    const fsfu_evp_cipher *cipher;
    memset(a, 0, sizeof(*a));
    if (mode >= FSFU_AEAD_XSALSA_LITE_RTPSIZE && mode <= FSFU_AEAD_XSALSA) {
        if (!fsfu_nacl_installed()) return -1;
        a->mode = mode;
        memcpy(a->key, key, 32);
        a->scratch = (uint8_t *)malloc(FSFU_SCRATCH);   /* once, at the control plane */
        return a->scratch == NULL ? -1 : 0;
    }
    if (mode == FSFU_AEAD_AES256GCM) cipher = fsfu_evp.aes_256_gcm();
    else if (mode == FSFU_AEAD_XCHACHA20) cipher = fsfu_evp.chacha20_poly1305();
    else return -1;
    a->mode = mode;
    memcpy(a->key, key, 32);
    a->enc = fsfu_evp.ctx_new();
    a->dec = fsfu_evp.ctx_new();
    if (a->enc == NULL || a->dec == NULL) return -1;
    if (mode == FSFU_AEAD_AES256GCM) {
        if (fsfu_evp.enc_init(a->enc, cipher, NULL, key, NULL) != 1) return -1;
        if (fsfu_evp.dec_init(a->dec, cipher, NULL, key, NULL) != 1) return -1;
    } else {
        if (fsfu_evp.enc_init(a->enc, cipher, NULL, NULL, NULL) != 1) return -1;
        if (fsfu_evp.dec_init(a->dec, cipher, NULL, NULL, NULL) != 1) return -1;
    }
    return 0;
}

static inline void fsfu_aead_free(fsfu_aead *a) {
    if (a->enc != NULL) fsfu_evp.ctx_free(a->enc);
    if (a->dec != NULL) fsfu_evp.ctx_free(a->dec);
    a->enc = a->dec = NULL;
    if (a->scratch != NULL) free(a->scratch);
    a->scratch = NULL;
    memset(a->key, 0, 32);
}

/* The 24-byte nonce of a legacy packet being sealed; writes the wire suffix, returns its length. */
static inline int fsfu_legacy_nonce(fsfu_aead *a, const uint8_t *hdr, uint8_t nonce[24], uint8_t suffix[24]) {
    uint32_t counter;
    memset(nonce, 0, 24);
    switch (a->mode) {
    case FSFU_AEAD_XSALSA_SUFFIX:
        fsfu_nacl.randombytes(nonce, 24);
        memcpy(suffix, nonce, 24);
        return 24;
    case FSFU_AEAD_XSALSA:
        memcpy(nonce, hdr, 12);
        return 0;
    default:
        counter = a->out_counter++;
        nonce[0] = (uint8_t)(counter >> 24); nonce[1] = (uint8_t)(counter >> 16);
        nonce[2] = (uint8_t)(counter >> 8); nonce[3] = (uint8_t)counter;
        memcpy(suffix, nonce, 4);
        return 4;
    }
}

/* secretbox over buf[clear:n]: hdr | MAC16 | ct | suffix. NaCl's API wants 32 leading zero bytes
 * in, and gives 16 leading zero bytes out, hence the scratch buffer. */
static inline int fsfu_legacy_seal(fsfu_aead *a, uint8_t *buf, int n, int clear) {
    uint8_t nonce[24], suffix[24];
    int body = n - clear, extra;
    if (body < 0 || body + 32 > FSFU_SCRATCH) return -1;
    extra = fsfu_legacy_nonce(a, buf, nonce, suffix);
    memset(a->scratch, 0, 32);
    memcpy(a->scratch + 32, buf + clear, (size_t)body);
    if (fsfu_nacl.secretbox(a->scratch, a->scratch, (unsigned long long)body + 32, nonce, a->key) != 0)
        return -1;
    memcpy(buf + clear, a->scratch + 16, (size_t)body + 16);
    memcpy(buf + clear + 16 + body, suffix, (size_t)extra);
    return n + 16 + extra;
}

/* The key and IV of one packet: Discord's nonce is the counter (big-endian) and zeros. */
static inline void fsfu_aead_packet_key(const fsfu_aead *a, uint32_t counter, uint8_t subkey[32],
                                        uint8_t iv[12], const uint8_t **key_out) {
    uint8_t n16[16];
    memset(iv, 0, 12);
    if (a->mode == FSFU_AEAD_AES256GCM) {
        iv[0] = (uint8_t)(counter >> 24); iv[1] = (uint8_t)(counter >> 16);
        iv[2] = (uint8_t)(counter >> 8); iv[3] = (uint8_t)counter;
        *key_out = NULL;               /* keyed at init */
    } else {
        /* 24-byte nonce = counter || 20 zeros: HChaCha20 over bytes 0-15, IV = 0^4 || bytes 16-23. */
        memset(n16, 0, 16);
        n16[0] = (uint8_t)(counter >> 24); n16[1] = (uint8_t)(counter >> 16);
        n16[2] = (uint8_t)(counter >> 8); n16[3] = (uint8_t)counter;
        fsfu_hchacha20(subkey, a->key, n16);
        *key_out = subkey;
    }
}

/* Encrypt buf[clear:n] in place with buf[0:clear] as AAD, append tag and counter.
 * Returns the new length (n + 20), or FSFU_AEAD_FAIL. buf must have 20 spare bytes. */
static inline int fsfu_aead_seal(fsfu_aead *a, uint8_t *buf, int n, int clear) {
    uint8_t subkey[32], iv[12];
    const uint8_t *key;
    int outl = 0, fin = 0;
    uint32_t counter;
    if (fsfu_aead_legacy(a)) return fsfu_legacy_seal(a, buf, n, clear);
    counter = a->out_counter++;
    fsfu_aead_packet_key(a, counter, subkey, iv, &key);
    if (fsfu_evp.enc_init(a->enc, NULL, NULL, key, iv) != 1) return FSFU_AEAD_FAIL;
    if (clear > 0 && fsfu_evp.enc_update(a->enc, NULL, &outl, buf, clear) != 1) return FSFU_AEAD_FAIL;
    if (n > clear && fsfu_evp.enc_update(a->enc, buf + clear, &outl, buf + clear, n - clear) != 1)
        return FSFU_AEAD_FAIL;
    if (fsfu_evp.enc_final(a->enc, buf + n, &fin) != 1 || fin != 0) return FSFU_AEAD_FAIL;
    if (fsfu_evp.ctx_ctrl(a->enc, FSFU_EVP_CTRL_AEAD_GET_TAG, FSFU_AEAD_TAG, buf + n) != 1)
        return FSFU_AEAD_FAIL;
    buf[n + 16] = (uint8_t)(counter >> 24); buf[n + 17] = (uint8_t)(counter >> 16);
    buf[n + 18] = (uint8_t)(counter >> 8); buf[n + 19] = (uint8_t)counter;
    memset(subkey, 0, sizeof(subkey));
    return n + FSFU_AEAD_SUFFIX;
}

/* Replay window over the 32-bit counter, wrap-aware (RFC 3711 §3.3.2's idea, 64 wide). */
static inline int fsfu_aead_replayed(const fsfu_aead *a, uint32_t counter) {
    int32_t delta;
    if (!a->have_in) return 0;
    delta = (int32_t)(counter - a->in_highest);
    if (delta > 0) return 0;
    if (delta <= -64) return 1;
    return (int)((a->in_window >> (uint32_t)(-delta)) & 1u);
}

static inline void fsfu_aead_accept(fsfu_aead *a, uint32_t counter) {
    int32_t delta;
    if (!a->have_in) {
        a->have_in = 1;
        a->in_highest = counter;
        a->in_window = 1;
        return;
    }
    delta = (int32_t)(counter - a->in_highest);
    if (delta > 0) {
        a->in_window = delta >= 64 ? 1 : (a->in_window << delta) | 1u;
        a->in_highest = counter;
    } else {
        a->in_window |= (uint64_t)1 << (uint32_t)(-delta);
    }
}

static inline int fsfu_legacy_open(fsfu_aead *a, uint8_t *buf, int n, int clear) {
    uint8_t nonce[24];
    int trailer, body;
    uint32_t counter = 0;
    trailer = a->mode == FSFU_AEAD_XSALSA_SUFFIX ? 24 : a->mode == FSFU_AEAD_XSALSA ? 0 : 4;
    if (n < clear + 16 + trailer) return FSFU_AEAD_SHORT;
    body = n - clear - 16 - trailer;
    if (body + 32 > FSFU_SCRATCH) return FSFU_AEAD_SHORT;
    memset(nonce, 0, 24);
    if (a->mode == FSFU_AEAD_XSALSA) {
        memcpy(nonce, buf, 12);
    } else if (a->mode == FSFU_AEAD_XSALSA_SUFFIX) {
        memcpy(nonce, buf + n - 24, 24);
    } else {
        memcpy(nonce, buf + n - 4, 4);
        counter = ((uint32_t)nonce[0] << 24) | ((uint32_t)nonce[1] << 16) | ((uint32_t)nonce[2] << 8) | nonce[3];
        if (fsfu_aead_replayed(a, counter)) return FSFU_AEAD_REPLAY;
    }
    memset(a->scratch, 0, 16);
    memcpy(a->scratch + 16, buf + clear, (size_t)body + 16);
    if (fsfu_nacl.secretbox_open(a->scratch, a->scratch, (unsigned long long)body + 32, nonce, a->key) != 0)
        return FSFU_AEAD_FAIL;
    memcpy(buf + clear, a->scratch + 32, (size_t)body);
    if (trailer == 4) fsfu_aead_accept(a, counter);
    return clear + body;
}

/* Authenticate and decrypt buf (clear header, ciphertext, tag, counter) in place.
 * Returns the plaintext length (n - 20) or FSFU_AEAD_FAIL / _REPLAY / _SHORT. */
static inline int fsfu_aead_open(fsfu_aead *a, uint8_t *buf, int n, int clear) {
    uint8_t subkey[32], iv[12];
    const uint8_t *key;
    int outl = 0, fin = 0, body;
    uint32_t counter;
    if (fsfu_aead_legacy(a)) return fsfu_legacy_open(a, buf, n, clear);
    if (n < clear + FSFU_AEAD_SUFFIX) return FSFU_AEAD_SHORT;
    counter = ((uint32_t)buf[n - 4] << 24) | ((uint32_t)buf[n - 3] << 16) |
              ((uint32_t)buf[n - 2] << 8) | (uint32_t)buf[n - 1];
    if (fsfu_aead_replayed(a, counter)) return FSFU_AEAD_REPLAY;
    body = n - FSFU_AEAD_SUFFIX - clear;
    fsfu_aead_packet_key(a, counter, subkey, iv, &key);
    if (fsfu_evp.dec_init(a->dec, NULL, NULL, key, iv) != 1) return FSFU_AEAD_FAIL;
    if (clear > 0 && fsfu_evp.dec_update(a->dec, NULL, &outl, buf, clear) != 1) return FSFU_AEAD_FAIL;
    if (body > 0 && fsfu_evp.dec_update(a->dec, buf + clear, &outl, buf + clear, body) != 1)
        return FSFU_AEAD_FAIL;
    if (fsfu_evp.ctx_ctrl(a->dec, FSFU_EVP_CTRL_AEAD_SET_TAG, FSFU_AEAD_TAG,
                          buf + n - FSFU_AEAD_SUFFIX) != 1)
        return FSFU_AEAD_FAIL;
    memset(subkey, 0, sizeof(subkey));
    if (fsfu_evp.dec_final(a->dec, buf + clear + body, &fin) != 1) {
        memset(buf + clear, 0, (size_t)body);   /* never hand on unauthenticated plaintext */
        return FSFU_AEAD_FAIL;
    }
    fsfu_aead_accept(a, counter);
    return n - FSFU_AEAD_SUFFIX;
}

#endif
