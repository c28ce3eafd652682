/* Matrix-vector products for the one-token decode step: y = W x (+ bias) for one activation row, W
 * row-major (N, K) in float32, bfloat16 or int8 with one scale per row, or in torch's int4 pack; each as
 * qv_gemv_<type>_<set>, the set's inner loops in avx512.c / avx2.c, the threads, tails and roundings here.
 * The library's other kernels: vision.c (the vision attention's rotary gather and scatter), norm.c
 * (RMSNorm), attention.c (the decode step's one-query attention).
 *
 * Why not torch's kernels: a decode step is a stream of weight bytes, and oneDNN's packed GEMV and
 * `_weight_int8pack_mm` read them at 70-80% of what these loops reach (benchmarks/RESULTS.md); MKL's
 * GEMV on AMD CPUs at a third. The loops take ROWS rows at a time (ROWS independent accumulators, ROWS
 * weight streams) and prefetch ahead (common.h: prefetch_distance); threads split the row blocks
 * through OpenMP, which resolves to torch's own libgomp (it is loaded first), so the threads are torch's.
 *
 * Arithmetic: products summed in float32 (int4, and int8 on AVX2: int16 activations, quantize_x, summed
 * exactly in int32 per group), the bias added in float32, one rounding to the output type (round to
 * nearest even). Oracle: F.linear (tests/test_native.py). Built by
 * qwenvl_cli/model/native/__init__.py, which also says when it is used.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

int qv_abi(void) { return 5; }

/* One product: its set's block loop, its tensors, and what the activations became (int16 groups: xq, xs,
 * xsum; see quantize_x). Each kind's *_rows computes rows [n0, n0 + rows) of y from it. */
typedef struct {
    union {
        f32_block_fn f32;
        bf16_block_fn bf16;
        bf16w_block_fn bf16w;
        int8_block_fn int8;
        int8q_block_fn int8q;
        int4_block_fn int4;
    } block;
    const void *w, *x, *bias;
    const uint16_t *scales; /* int8: one bfloat16 scale a row; int4: the (scale, zero) pairs */
    void *y;
    const int16_t *xq;
    const float *xs, *xsum;
    const float *xw; /* bf16w: x widened (widen_x) */
    int64_t n, k, group;
} product;

typedef void (*rows_fn)(const product *p, int64_t n0, int rows);

/* The threads split `blocks` blocks of block_rows rows (the last may be shorter) in contiguous runs: each
 * thread one sequential stream of weights. One thread below PARALLEL_MIN weights. */
static void for_blocks(rows_fn rows_of, const product *p, int64_t block_rows, int64_t blocks) {
#pragma omp parallel for schedule(static) if (p->n * p->k >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * block_rows;
        rows_of(p, n0, p->n - n0 < block_rows ? (int)(p->n - n0) : (int)block_rows);
    }
}

/* ... in blocks of ROWS rows */
static void for_rows(rows_fn rows_of, const product *p) { for_blocks(rows_of, p, ROWS, (p->n + ROWS - 1) / ROWS); }

/* rows [n0, n0 + rows) of y from their float32 sums: + bias, in float32 (store_f32) or rounded once to
 * bfloat16 (store_bf16, a bfloat16 bias) */
static inline void store_f32(const product *p, int64_t n0, int rows, const float *sums) {
    const float *bias = p->bias;
    float *y = p->y;
    for (int r = 0; r < rows; r++) y[n0 + r] = bias ? sums[r] + bias[n0 + r] : sums[r];
}

static inline void store_bf16(const product *p, int64_t n0, int rows, const float *sums) {
    const uint16_t *bias = p->bias;
    uint16_t *y = p->y;
    for (int r = 0; r < rows; r++) y[n0 + r] = f32_to_bf16(bias ? sums[r] + bf16_to_f32(bias[n0 + r]) : sums[r]);
}

static void f32_rows(const product *p, int64_t n0, int rows) {
    float sums[ROWS];
    p->block.f32((const float *)p->w + n0 * p->k, p->x, p->k, rows, sums);
    store_f32(p, n0, rows, sums);
}

static void bf16_rows(const product *p, int64_t n0, int rows) {
    float sums[ROWS];
    p->block.bf16((const uint16_t *)p->w + n0 * p->k, p->x, p->k, rows, sums);
    store_bf16(p, n0, rows, sums);
}

/* x # (K,) bfloat16 (from_bf16) or float32 -> # (K rounded up to 16,) float32 in bf16_block_avx2's order
 * (each 16: 0-3 8-11 4-7 12-15), zero-padded; exact. NULL when out of memory (free it after). */
static float *widen_x(const void *x, int from_bf16, int64_t k) {
    static const int ORDER[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    int64_t padded = (k + 15) / 16 * 16;
    float *xw = (float *)calloc((size_t)padded, sizeof(float));
    if (!xw) return NULL;
    for (int64_t g = 0; g < padded; g += 16)
        for (int j = 0; j < 16; j++) {
            int64_t i = g + ORDER[j];
            if (i < k) xw[g + j] = from_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        }
    return xw;
}

static void bf16w_rows(const product *p, int64_t n0, int rows) { /* bfloat16 out */
    float sums[ROWS];
    p->block.bf16w((const uint16_t *)p->w + n0 * p->k, p->xw, p->k, rows, sums);
    store_bf16(p, n0, rows, sums);
}

static void bf16w_f32_rows(const product *p, int64_t n0, int rows) { /* float32 out, float32 bias */
    float sums[ROWS];
    p->block.bf16w((const uint16_t *)p->w + n0 * p->k, p->xw, p->k, rows, sums);
    store_f32(p, n0, rows, sums);
}

/* The bfloat16 weights' AVX2 products on widened activations; 0 (nothing written) when out of memory. */
static int64_t gemv_bf16w(rows_fn rows_of, int from_bf16, const uint16_t *w, const void *x, const void *bias,
                          void *y, int64_t n, int64_t k) {
    float *xw = widen_x(x, from_bf16, k);
    if (!xw) return 0;
    for_rows(rows_of, &(product){.block.bf16w = bf16_block_avx2, .w = w, .x = x, .xw = xw, .bias = bias, .y = y,
                                 .n = n, .k = k});
    free(xw);
    return 1;
}

/* rows of int8 products: y = sums * scale (+ bias) */
static inline void int8_store(const product *p, int64_t n0, int rows, const float *sums) {
    const float *bias = p->bias;
    float *y = p->y;
    for (int r = 0; r < rows; r++) {
        float v = sums[r] * bf16_to_f32(p->scales[n0 + r]);
        y[n0 + r] = bias ? v + bias[n0 + r] : v;
    }
}

static void int8_rows(const product *p, int64_t n0, int rows) {
    float sums[ROWS];
    p->block.int8((const int8_t *)p->w + n0 * p->k, p->x, p->k, rows, sums);
    int8_store(p, n0, rows, sums);
}

static void int8q_rows(const product *p, int64_t n0, int rows) {
    float sums[ROWS];
    p->block.int8q((const int8_t *)p->w + n0 * p->k, p->xq, p->xs, p->k, rows, sums);
    int8_store(p, n0, rows, sums);
}

static void int4_rows(const product *p, int64_t n0, int rows) {
    (void)rows; /* always a whole block of the pack */
    p->block.int4((const uint8_t *)p->w + n0 * (p->k / 2), p->scales + n0 * 2, p->xq, p->xs, p->xsum, p->n, p->k,
                  p->group, (float *)p->y + n0);
}

/* The int4 and the AVX2 int8 products take the activations as int16: each group of x (the last may be
 * shorter) as int16 times a power of two (2^e, the largest |x| of the group at 2^14..2^15 - 1), so every
 * bfloat16 value within 2^7 of the group's largest is exact and the rest are off by at most 2^(e-1).
 * x # (K,) -> xq # (K,), per group xs = 2^e and, unless xsum is NULL, xsum = 2^e * sum(xq). Returns 0 if x
 * holds a NaN or an infinity (the caller then answers NaN). */
static int quantize_x(const float *x, int64_t k, int64_t group, int16_t *xq, float *xs, float *xsum) {
    for (int64_t g = 0; g * group < k; g++) {
        const float *xg = x + g * group;
        int64_t len = k - g * group < group ? k - g * group : group;
        float top = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            float a = fabsf(xg[i]);
            if (!(a <= 3.0e38f)) return 0; /* NaN or infinite */
            top = a > top ? a : top;
        }
        int e = 0;
        if (top > 0.0f) {
            frexpf(top, &e);      /* top = f * 2^e, f in [0.5, 1) */
            e -= 15;              /* top / 2^e in [2^14, 2^15) */
            if (ldexpf(top, -e) >= 32767.5f) e += 1;
        }
        double up = ldexp(1.0, -e); /* in double: 2^-e overflows float for groups of subnormals */
        int32_t total = 0;
        for (int64_t i = 0; i < len; i++) {
            int32_t v = (int32_t)nearbyint(xg[i] * up); /* exact scaling, round to nearest even */
            xq[g * group + i] = (int16_t)v;
            total += v;
        }
        xs[g] = ldexpf(1.0f, e);
        if (xsum) xsum[g] = (float)total * xs[g];
    }
    return 1;
}

/* The activations of an int16 product (gemv_int8q, gemv_int4) in p: quantize_x in groups of p->group into
 * one allocation (free p->xq after), padded to `padded` values. Answers 0 when out of memory, -1 when x holds
 * a NaN or an infinity (y is then all NaN), else 1. */
static int quantize_for(product *p, int64_t padded, int sums) {
    int64_t groups = (p->k + p->group - 1) / p->group;
    int16_t *xq = (int16_t *)calloc((size_t)padded * sizeof(int16_t) + (1 + sums) * (size_t)groups * sizeof(float), 1);
    if (!xq) return 0;
    float *xs = (float *)(xq + padded), *xsum = sums ? xs + groups : NULL;
    p->xq = xq, p->xs = xs, p->xsum = xsum;
    if (quantize_x(p->x, p->k, p->group, xq, xs, xsum)) return 1;
    for (int64_t i = 0; i < p->n; i++) ((float *)p->y)[i] = __builtin_nanf("");
    free(xq);
    return -1;
}

/* int8 weights with one bfloat16 scale per row on int16 activations (AVX2; the AVX-512 loops take x in
 * float32): y = (W xq) * xs * scale (+ bias), xq quantize_x's in groups of INT8_GROUP. Answers 0 (nothing
 * written) when out of memory, else 1. */
static int64_t gemv_int8q(int8q_block_fn block, const int8_t *w, const uint16_t *scales, const float *x,
                          const float *bias, float *y, int64_t n, int64_t k) {
    product p = {.block.int8q = block, .w = w, .x = x, .bias = bias, .scales = scales, .y = y, .n = n, .k = k,
                 .group = INT8_GROUP};
    int got = quantize_for(&p, (k + 15) / 16 * 16, 0);
    if (got == 1) {
        for_rows(int8q_rows, &p);
        free((void *)p.xq);
    }
    return got != 0;
}

void qv_gemv_f32_avx512(const float *w, const float *x, const float *bias, float *y, int64_t n, int64_t k) {
    for_rows(f32_rows, &(product){.block.f32 = f32_block_avx512, .w = w, .x = x, .bias = bias, .y = y, .n = n, .k = k});
}

void qv_gemv_f32_avx2(const float *w, const float *x, const float *bias, float *y, int64_t n, int64_t k) {
    for_rows(f32_rows, &(product){.block.f32 = f32_block_avx2, .w = w, .x = x, .bias = bias, .y = y, .n = n, .k = k});
}

/* The bfloat16 products answer 0 (nothing written) when out of memory, else 1. */
int64_t qv_gemv_bf16_avx512(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int64_t n,
                            int64_t k) {
    for_rows(bf16_rows, &(product){.block.bf16 = bf16_block_avx512, .w = w, .x = x, .bias = bias, .y = y, .n = n, .k = k});
    return 1;
}

int64_t qv_gemv_bf16_avx2(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int64_t n,
                          int64_t k) {
    return gemv_bf16w(bf16w_rows, 1, w, x, bias, y, n, k);
}

/* bfloat16 weights, float32 activations, bias and output (a float32 model on a bfloat16 checkpoint's
 * weights): the products of their exact float32 upcast, summed as qv_gemv_bf16_avx2 sums. AVX2, on every
 * CPU the library serves. */
int64_t qv_gemv_bf16w_f32_avx2(const uint16_t *w, const float *x, const float *bias, float *y, int64_t n, int64_t k) {
    return gemv_bf16w(bf16w_f32_rows, 0, w, x, bias, y, n, k);
}

int64_t qv_gemv_int8_avx512(const int8_t *w, const uint16_t *scales, const float *x, const float *bias, float *y,
                            int64_t n, int64_t k) {
    for_rows(int8_rows, &(product){.block.int8 = int8_block_avx512, .w = w, .x = x, .bias = bias, .scales = scales,
                                   .y = y, .n = n, .k = k});
    return 1;
}

int64_t qv_gemv_int8_avx2(const int8_t *w, const uint16_t *scales, const float *x, const float *bias, float *y,
                          int64_t n, int64_t k) {
    return gemv_int8q(int8_block_avx2, w, scales, x, bias, y, n, k);
}

/* ---- int4 in torch's CPU pack (_convert_weight_to_int4pack_for_cpu), groupwise (scale, zero) in
 * bfloat16: w[n, k] = (q - 8) * scale + zero, g = k / group; float32 activations ----
 *
 * The pack: rows in blocks of B (64 in torch's AVX-512 build, 32 in its AVX2 one), each block k-major,
 * B / 2 bytes a k: byte j holds row j (low nibble) and row j + B / 2 (high). A last block of N % B rows (a
 * multiple of 16) holds (N % B) / 2 bytes a k, byte j rows 2j (low) and 2j + 1 (high). model/int4.py
 * decodes the same layouts in torch ops (the oracle).
 *
 * Activations: quantize_x in the weights' groups; the sums are integers, summed exactly in int32 lanes
 * (avx512.c, avx2.c: the same sums and roundings, so both sets give the same bits). */

/* The last rows of a matrix (N % block, a multiple of 16), pairs of rows per byte: plain C, the same sums. */
static void int4_tail(const uint8_t *w, const uint16_t *sz, const int16_t *xq, const float *xs,
                      const float *xsum, int64_t n, int64_t rows, int64_t k, int64_t group, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        float total = 0.0f;
        for (int64_t g = 0; g < k / group; g++) {
            int32_t sum = 0;
            for (int64_t i = g * group; i < (g + 1) * group; i++) {
                uint8_t b = w[i * (rows / 2) + r / 2];
                sum += ((r & 1 ? b >> 4 : b) & 15) * (int32_t)xq[i];
            }
            float scale = bf16_to_f32(sz[(g * n) * 2 + 2 * r]), zero = bf16_to_f32(sz[(g * n) * 2 + 2 * r + 1]);
            float base = fmaf(-8.0f, scale, zero);
            total = fmaf(base, xsum[g], fmaf(scale, (float)sum * xs[g], total));
        }
        out[r] = total;
    }
}

/* Answers 0 (nothing written) when out of memory, else 1. */
static int64_t gemv_int4(int4_block_fn block, int64_t block_rows, const uint8_t *w, const uint16_t *sz,
                         const float *x, const float *bias, float *y, int64_t n, int64_t k, int64_t group) {
    product p = {.block.int4 = block, .w = w, .x = x, .scales = sz, .y = y, .n = n, .k = k, .group = group};
    int got = quantize_for(&p, k + (k & 1), 1);
    if (got != 1) return got != 0;
    int64_t blocks = n / block_rows, full = blocks * block_rows;
    for_blocks(int4_rows, &p, block_rows, blocks);
    if (full < n) int4_tail(w + full * (k / 2), sz + full * 2, p.xq, p.xs, p.xsum, n, n - full, k, group, y + full);
    if (bias)
        for (int64_t i = 0; i < n; i++) y[i] += bias[i];
    free((void *)p.xq);
    return 1;
}

int64_t qv_gemv_int4_avx512(const uint8_t *w, const uint16_t *sz, const float *x, const float *bias, float *y,
                            int64_t n, int64_t k, int64_t group) {
    return gemv_int4(int4_block_avx512, INT4_ROWS_AVX512, w, sz, x, bias, y, n, k, group);
}

int64_t qv_gemv_int4_avx2(const uint8_t *w, const uint16_t *sz, const float *x, const float *bias, float *y,
                          int64_t n, int64_t k, int64_t group) {
    return gemv_int4(int4_block_avx2, INT4_ROWS_AVX2, w, sz, x, bias, y, n, k, group);
}
