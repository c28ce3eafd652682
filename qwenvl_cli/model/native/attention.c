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

#include "common.h"

/* Answers 0 (nothing written) for a head size the set does not take. */
static int64_t decode_attention(scores_fn scores, mix_fn mix, int64_t lanes, int64_t elem, const float *q,
                                const void *k, const void *v, int64_t heads, int64_t kv_heads, int64_t len,
                                int64_t hd, int64_t kv_stride, float scale, float *scratch, float *out) {
    if (hd % lanes || hd > 256 || kv_heads <= 0 || heads % kv_heads) return 0;
    int64_t group = heads / kv_heads;
#pragma omp parallel for schedule(static) if (heads * len * hd >= 4 * PARALLEL_MIN)
    for (int64_t h = 0; h < heads; h++) {
        int64_t offset = (h / group) * kv_stride * elem; /* bytes */
        float *s = scratch + h * len;
        scores(q + h * hd, (const char *)k + offset, len, hd, scale, s);
        float top = -INFINITY;
        for (int64_t l = 0; l < len; l++) top = s[l] > top ? s[l] : top;
        float total = 0.0f;
        for (int64_t l = 0; l < len; l++) {
            s[l] = expf(s[l] - top);
            total += s[l];
        }
        for (int64_t l = 0; l < len; l++) s[l] = s[l] / total;
        mix(s, (const char *)v + offset, len, hd, out + h * hd);
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
