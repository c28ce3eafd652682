/* One query over the KV cache (the decode step's attention), grouped-query.
 *
 * q # (heads, hd) float32; k, v: kv_heads blocks of len rows of hd (float32 or bfloat16), block b at
 * b * kv_stride elements; scratch # (heads, len) float32; out # (heads, hd) float32. Per head, in float32:
 * s = (q . k_l) * scale, p = softmax(s) = exp(s - max) / sum, out = sum_l p_l v_l, as text.decode_attention
 * computes it with two matmuls (its oracle, with SDPA; the order of the sums differs). The two loops over
 * the cache are the set's (avx512.c: hd a multiple of 16, avx2.c: of 8; up to 256, the output row in
 * registers); the softmax is here. Threads split the heads.
 */
#include <math.h>
#include <omp.h>

#include "common.h"

/* e^x for x <= 0 within 2 ulp of float32, 8 at a time (GCC vector types: one AVX2 register, two SSE
 * ones in the default clone): Cephes' expf, 2^n * e^r with n = floor(x log2 e + 1/2), r = x - n ln 2 in two
 * parts, a degree-5 polynomial for e^r - 1 - r; 0 below -87 (e^-87 ~ 1.6e-38 beside the softmax's largest
 * term, 1). libm's expf, a call a score, took half of a 2362-key attention. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f exp8_nonpositive(v8f x) {
    v8i keep = x >= -87.0f;                                         /* all ones where x >= -87, else 0 */
    v8f xc = (v8f)(((v8i)x & keep) | ((v8i)((v8f){0} - 87.0f) & ~keep)); /* x, or -87 (and for NaN) */
    v8f t = xc * 1.44269504088896341f + 0.5f;
    v8f n = __builtin_convertvector(__builtin_convertvector(t, v8i), v8f); /* toward zero: t <= 0.5 */
    n = n + __builtin_convertvector(n > t, v8f);                   /* floor: -1 where truncation rounded up */
    v8f r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    v8f p = (v8f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    v8f y = (p * (r * r) + r) + 1.0f;
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;     /* n in [-126, 0]: a normal 2^n */
    v8f e = y * (v8f)bits;
    v8i nan = x != x; /* 0 below -87; NaN lanes keep x's NaN */
    return (v8f)(((v8i)e & keep) | ((v8i)x & nan));
}

/* s # (len,) -> softmax(s) in place: exp(s - max) / sum, the sum in 8 partial sums. */
CLONES static void softmax(float *s, int64_t len) {
    float top = -INFINITY;
    for (int64_t l = 0; l < len; l++) top = s[l] > top ? s[l] : top;
    v8f part = {0};
    int64_t l = 0;
    for (; l + 8 <= len; l += 8) {
        v8f v;
        memcpy(&v, s + l, sizeof v);
        v = exp8_nonpositive(v - top);
        memcpy(s + l, &v, sizeof v);
        part += v;
    }
    if (l < len) { /* the last < 8, through a padded copy (-inf: e^-inf = 0) */
        float tail[8];
        for (int j = 0; j < 8; j++) tail[j] = l + j < len ? s[l + j] - top : -INFINITY;
        v8f v;
        memcpy(&v, tail, sizeof v);
        v = exp8_nonpositive(v);
        memcpy(tail, &v, sizeof v);
        for (int j = 0; l + j < len; j++) s[l + j] = tail[j];
        part += v;
    }
    float total = 0.0f;
    for (int j = 0; j < 8; j++) total += part[j];
    for (l = 0; l < len; l++) s[l] = s[l] / total;
}

/* Keys a block: a block of K or V (about 64 KB) stays in L2 while every query head of its group reads it,
 * so that the cache comes from memory once a step, not once a query head (GQA: 4-8 heads a kv head). */
static int64_t key_block(int64_t hd, int64_t elem) {
    int64_t n = 65536 / (hd * elem);
    return n < 16 ? 16 : n;
}

/* Answers 0 (nothing written) for a head size the set does not take. Each thread takes a run of heads
 * (those of one or two kv heads): scores block by block for all its heads, their softmaxes, then the
 * mixes block by block, each block's partial output added in float32. */
static int64_t decode_attention(scores_fn scores, mix_fn mix, int64_t lanes, int64_t elem, const float *q,
                                const void *k, const void *v, int64_t heads, int64_t kv_heads, int64_t len,
                                int64_t hd, int64_t kv_stride, float scale, float *scratch, float *out) {
    if (hd % lanes || hd > 256 || kv_heads <= 0 || heads % kv_heads) return 0;
    int64_t group = heads / kv_heads, block = key_block(hd, elem);
#pragma omp parallel if (heads * len * hd >= 4 * PARALLEL_MIN)
    {
        int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t h0 = heads * t / threads, h1 = heads * (t + 1) / threads;
        for (int64_t b = 0; b < len; b += block) {
            int64_t n = len - b < block ? len - b : block;
            for (int64_t h = h0; h < h1; h++)
                scores(q + h * hd, (const char *)k + ((h / group) * kv_stride + b * hd) * elem, n, hd, scale,
                       scratch + h * len + b);
        }
        for (int64_t h = h0; h < h1; h++) softmax(scratch + h * len, len);
        float part[256];
        for (int64_t b = 0; b < len; b += block) {
            int64_t n = len - b < block ? len - b : block;
            for (int64_t h = h0; h < h1; h++) {
                float *o = out + h * hd;
                mix(scratch + h * len + b, (const char *)v + ((h / group) * kv_stride + b * hd) * elem, n, hd,
                    b ? part : o);
                if (b)
                    for (int64_t i = 0; i < hd; i++) o[i] += part[i];
            }
        }
    }
    return 1;
}

#define EXPORT_ATTENTION(T, KIND, SET, LANES)                                                                  \
    int64_t qv_decode_attention_##KIND##_##SET(const float *q, const T *k, const T *v, int64_t heads,          \
                                              int64_t kv_heads, int64_t len, int64_t hd, int64_t kv_stride, \
                                              float scale, float *scratch, float *out) {                   \
        return decode_attention(scores_##KIND##_##SET, mix_##KIND##_##SET, LANES, sizeof(T), q, k, v, heads,  \
                                kv_heads, len, hd, kv_stride, scale, scratch, out);                        \
    }                                                                                                      \
    /* the same over the cache up to the step's own slot (len = step->index + 1) */                          \
    int64_t qv_decode_attention_step_##KIND##_##SET(const qv_step *step, const float *q, const T *k,           \
                                                   const T *v, int64_t heads, int64_t kv_heads, int64_t hd,    \
                                                   int64_t kv_stride, float scale, float *scratch, float *out) { \
        return qv_decode_attention_##KIND##_##SET(q, k, v, heads, kv_heads, step->index + 1, hd, kv_stride,     \
                                                 scale, scratch, out);                                     \
    }

EXPORT_ATTENTION(float, f32, avx512, 16)
EXPORT_ATTENTION(uint16_t, bf16, avx512, 16)
EXPORT_ATTENTION(float, f32, avx2, 8)
EXPORT_ATTENTION(uint16_t, bf16, avx2, 8)
