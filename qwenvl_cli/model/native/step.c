/* The decode step's small ops between its products (model/native_step.py strings them together with the
 * products and the attention into one list of calls), for one token of float32 or bfloat16 activations.
 * Each computes in float32 and rounds to the dtype where text.Attention.decode's torch ops round: a
 * bfloat16 product or sum is rounded after each op, so the bits are torch's (silu aside: libm's expf
 * against torch's vectorized exp, within an ulp). Oracles: those torch ops (tests/test_native.py).
 *
 * What changes from step to step (the position) is read from a qv_step the caller rewrites, so that every
 * call of the list keeps the same arguments.
 */
#include <math.h>

#include "common.h"

int64_t qv_rms_norm_f32(const float *x, const float *weight, float eps, float *y, int64_t rows, int64_t dim);
int64_t qv_rms_norm_bf16(const uint16_t *x, const uint16_t *weight, float eps, uint16_t *y, int64_t rows,
                         int64_t dim);

/* x += d (the residual, rounded to the dtype), then y = rms_norm(x) (norm.c's bits). x, d, y # (dim,) */
int64_t qv_add_rms_norm_f32(float *x, const float *d, const float *weight, float eps, float *y, int64_t dim) {
    for (int64_t i = 0; i < dim; i++) x[i] = x[i] + d[i];
    return qv_rms_norm_f32(x, weight, eps, y, 1, dim);
}

int64_t qv_add_rms_norm_bf16(uint16_t *x, const uint16_t *d, const uint16_t *weight, float eps, uint16_t *y,
                             int64_t dim) {
    for (int64_t i = 0; i < dim; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(d[i]));
    return qv_rms_norm_bf16(x, weight, eps, y, 1, dim);
}

/* qkv # ((heads + 2 kv) hd,): q heads, k heads, v heads of one token. The q and k heads rotate as
 * text.Attention.decode rotates them, u * cos + roll(u, hd / 2) * sin (sin signed; each product and the
 * sum rounded to the dtype); the q heads go to q # (heads, hd) float32 (the attention's input), the k
 * heads to cache slot step->index of k (head j at j * stride elements), the v heads, copied, to v's. */
#define ROPE_KV_BODY(T, LOAD, STORE)                                                                          \
    const T *cs = (const T *)step->cos, *sn = (const T *)step->sin;                                           \
    int64_t half = hd / 2;                                                                                   \
    for (int64_t j = 0; j < heads + kv; j++) {                                                               \
        const T *u = qkv + j * hd;                                                                           \
        T *to = j < heads ? NULL : k + (j - heads) * stride + step->index * hd;                              \
        for (int64_t i = 0; i < hd; i++) {                                                                   \
            float a = LOAD(STORE(LOAD(u[i]) * LOAD(cs[i])));                                                 \
            float b = LOAD(STORE(LOAD(u[(i + half) % hd]) * LOAD(sn[i])));                                   \
            T r = STORE(a + b);                                                                              \
            if (to)                                                                                          \
                to[i] = r;                                                                                   \
            else                                                                                             \
                q[j * hd + i] = LOAD(r);                                                                     \
        }                                                                                                    \
    }                                                                                                        \
    for (int64_t j = 0; j < kv; j++)                                                                         \
        memcpy(v + j * stride + step->index * hd, qkv + (heads + kv + j) * hd, (size_t)hd * sizeof(T));

void qv_rope_kv_f32(const qv_step *step, const float *qkv, int64_t heads, int64_t kv, int64_t hd, float *k,
                    float *v, int64_t stride, float *q) {
    ROPE_KV_BODY(float, AS_IS, AS_IS)
}

void qv_rope_kv_bf16(const qv_step *step, const uint16_t *qkv, int64_t heads, int64_t kv, int64_t hd,
                     uint16_t *k, uint16_t *v, int64_t stride, float *q) {
    ROPE_KV_BODY(uint16_t, bf16_to_f32, f32_to_bf16)
}

/* gu # (2n,): gate then up -> out # (n,) = silu(gate) * up, silu(g) = g / (1 + exp(-g)) rounded to the
 * dtype, then the product rounded (F.silu(gate) * up). */
void qv_silu_mul_f32(const float *gu, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float g = gu[i];
        out[i] = (g / (1.0f + expf(-g))) * gu[n + i];
    }
}

void qv_silu_mul_bf16(const uint16_t *gu, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        float g = bf16_to_f32(gu[i]);
        out[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g)))) * bf16_to_f32(gu[n + i]));
    }
}

/* float32 -> bfloat16, round to nearest even (the attention's output into a bfloat16 product) */
void qv_f32_to_bf16(const float *x, int64_t n, uint16_t *y) {
    for (int64_t i = 0; i < n; i++) y[i] = f32_to_bf16(x[i]);
}
