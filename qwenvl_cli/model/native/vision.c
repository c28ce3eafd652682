/* The vision tower's attention around SDPA (model/vision.py, _segment_attention_native): q and k rotated
 * while gathered into padded segments, v gathered, and the output scattered back to token order. */
#include <string.h>

#include "common.h"

/* ---- the vision tower's attention around SDPA: rotary + gather into padded segments, and back ----
 *
 * qv_rope_gather: src # (N, row_stride) holding per token `heads` vectors of hd from column 0 (q, k or v
 * inside the qkv projection's output), gather # (slots,) the token of each padded slot (N: padding), dst
 * # (S, lmax, heads, hd) contiguous, slots = S * lmax (SDPA takes it as its (S, heads, lmax, hd)
 * transpose, the layout torch's own gather gives it). With `rotate`, each vector is rotated by its
 * token's cos/sin # (N, hd) float32 as vision.apply_vision_rotary does, in float32 with its roundings
 * (x * cos and rotate_half(x) * sin each rounded, then their sum, then the output dtype: ISO C contracts
 * no multiply-add), so the result is that function's to the bit. Padding slots are zeros.
 *
 * qv_scatter_rows: the way back, src # (S, heads, lmax, hd) with strides (elements; hd contiguous) ->
 * dst # (N, heads * hd), token t from slot scatter[t]. Both split their rows over the threads. */

#define ROPE_BODY(T, LOAD, STORE)                                                                              \
    for (int64_t j = j0; j < j1; j++) {                                                                    \
        int64_t t = gather[j];                                                                             \
        for (int64_t h = 0; h < heads; h++) {                                                              \
            T *d = dst + (j * heads + h) * hd;                                                             \
            if (t < 0 || t >= n) {                                                                         \
                memset(d, 0, (size_t)hd * sizeof(T));                                                      \
                continue;                                                                                  \
            }                                                                                              \
            const T *x = src + t * row_stride + h * hd;                                                    \
            if (!rotate) {                                                                                 \
                memcpy(d, x, (size_t)hd * sizeof(T));                                                      \
                continue;                                                                                  \
            }                                                                                              \
            const float *c = cos + t * hd, *sn = sin + t * hd;                                             \
            int64_t half = hd / 2;                                                                         \
            for (int64_t i = 0; i < half; i++) {                                                           \
                float a = LOAD(x[i]), b = LOAD(x[i + half]);                                               \
                float first = a * c[i], first_rot = -b * sn[i];                                            \
                float second = b * c[i + half], second_rot = a * sn[i + half];                             \
                d[i] = STORE(first + first_rot);                                                           \
                d[i + half] = STORE(second + second_rot);                                                  \
            }                                                                                              \
        }                                                                                                  \
    }

CLONES static void rope_gather_f32(const float *src, int64_t row_stride, int64_t heads, int64_t hd,
                                       const float *cos, const float *sin, const int64_t *gather, int64_t j0,
                                       int64_t j1, int64_t lmax, int64_t n, int rotate, float *dst) {
    ROPE_BODY(float, AS_IS, AS_IS)
}

CLONES static void rope_gather_bf16(const uint16_t *src, int64_t row_stride, int64_t heads, int64_t hd,
                                        const float *cos, const float *sin, const int64_t *gather, int64_t j0,
                                        int64_t j1, int64_t lmax, int64_t n, int rotate, uint16_t *dst) {
    ROPE_BODY(uint16_t, bf16_to_f32, f32_to_bf16)
}

void qv_rope_gather(const void *src, int64_t row_stride, int64_t heads, int64_t hd, const float *cos,
                    const float *sin, const int64_t *gather, int64_t slots, int64_t lmax, int64_t n, int64_t rotate,
                    int64_t bf16, void *dst) {
    int64_t chunks = (slots + 63) / 64;
#pragma omp parallel for schedule(static) if (slots * heads * hd >= PARALLEL_MIN)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t j0 = c * 64, j1 = j0 + 64 < slots ? j0 + 64 : slots;
        if (bf16)
            rope_gather_bf16((const uint16_t *)src, row_stride, heads, hd, cos, sin, gather, j0, j1, lmax, n,
                             (int)rotate, (uint16_t *)dst);
        else
            rope_gather_f32((const float *)src, row_stride, heads, hd, cos, sin, gather, j0, j1, lmax, n,
                            (int)rotate, (float *)dst);
    }
}

void qv_scatter_rows(const void *src, int64_t elem, int64_t heads, int64_t lmax, int64_t hd, int64_t stride_s,
                     int64_t stride_h, int64_t stride_l, const int64_t *scatter, int64_t n, void *dst) {
    int64_t vec = hd * elem; /* bytes of one head's vector */
#pragma omp parallel for schedule(static) if (n * heads * hd >= PARALLEL_MIN)
    for (int64_t t = 0; t < n; t++) {
        int64_t slot = scatter[t], s = slot / lmax, l = slot % lmax;
        for (int64_t h = 0; h < heads; h++)
            memcpy((char *)dst + (t * heads + h) * vec,
                   (const char *)src + (s * stride_s + h * stride_h + l * stride_l) * elem, (size_t)vec);
    }
}
