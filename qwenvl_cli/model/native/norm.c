/* RMSNorm of rows natively, to torch's bit (model/vision.py RMSNorm, the decoder's norms). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* ---- RMSNorm of rows (the decode step's two a layer and the final one; the vision tower's and the
 * prefill's), as vision.RMSNorm computes it: h = x in float32, r = 1 / sqrt(sum(h * h) / dim + eps),
 * y = weight * (h * r rounded to the dtype), the product rounded to the dtype. torch's rms_norm is five
 * ops on CPU (20-40 us a call for one row here) with float32 copies around them; this is one pass, with
 * the same bits: the sum of squares follows torch's own order (SumKernel.cpp's cascade_sum over 8-lane
 * vectors, 4 of them interleaved, levels of 16; tests/test_native.py holds it to torch's). */

#define SUM_LANES 8
#define SUM_ILP 4
#define SUM_LEVELS 4

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t bits = 0;
    for (x -= 1; x; x >>= 1) bits++;
    return bits;
}

/* torch's float32 sum of a contiguous row of n >= SUM_LANES values, in its order. */
static float torch_row_sum(const float *row, int64_t n) {
    int64_t vec_size = n / SUM_LANES, size_ilp = vec_size / SUM_ILP;
    int64_t power = ceil_log2(size_ilp) / SUM_LEVELS;
    if (power < 4) power = 4;
    int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[SUM_LEVELS][SUM_ILP][SUM_LANES];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + step <= size_ilp) {
        for (int64_t s = 0; s < step; s++, i++)
            for (int k = 0; k < SUM_ILP; k++)
                for (int l = 0; l < SUM_LANES; l++) acc[0][k][l] += row[(i * SUM_ILP + k) * SUM_LANES + l];
        for (int j = 1; j < SUM_LEVELS; j++) {
            for (int k = 0; k < SUM_ILP; k++)
                for (int l = 0; l < SUM_LANES; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < size_ilp; i++)
        for (int k = 0; k < SUM_ILP; k++)
            for (int l = 0; l < SUM_LANES; l++) acc[0][k][l] += row[(i * SUM_ILP + k) * SUM_LANES + l];
    for (int j = 1; j < SUM_LEVELS; j++)
        for (int k = 0; k < SUM_ILP; k++)
            for (int l = 0; l < SUM_LANES; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = size_ilp * SUM_ILP; v < vec_size; v++)
        for (int l = 0; l < SUM_LANES; l++) acc[0][0][l] += row[v * SUM_LANES + l];
    for (int k = 1; k < SUM_ILP; k++)
        for (int l = 0; l < SUM_LANES; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t t = vec_size * SUM_LANES; t < n; t++) total += row[t];
    for (int l = 0; l < SUM_LANES; l++) total += acc[0][0][l];
    return total;
}

#define NORM_ROW(LOAD, STORE, x, y)                                                                           \
    {                                                                                                      \
        for (int64_t i = 0; i < dim; i++) {                                                                \
            float h = LOAD(x[i]);                                                                          \
            sq[i] = h * h;                                                                                 \
        }                                                                                                  \
        float r = 1.0f / sqrtf(torch_row_sum(sq, dim) / (float)dim + eps);                                 \
        for (int64_t i = 0; i < dim; i++) y[i] = STORE(LOAD(weight[i]) * LOAD(STORE(LOAD(x[i]) * r)));     \
    }

/* rows x dim, contiguous; threads split the rows. Both answer 0 (nothing written) for rows shorter than a
 * vector, which torch sums another way, or when memory runs out. */
#define NORM_BODY(T, LOAD, STORE)                                                                              \
    if (dim < SUM_LANES) return 0;                                                                         \
    int64_t failed = 0;                                                                                    \
    _Pragma("omp parallel if (rows * dim >= PARALLEL_MIN) reduction(| : failed)")                           \
    {                                                                                                      \
        float stack[4096];                                                                                 \
        float *sq = dim <= 4096 ? stack : (float *)malloc((size_t)dim * sizeof(float));                    \
        _Pragma("omp for schedule(static)") /* every thread meets it, scratch or not */                    \
        for (int64_t row = 0; row < rows; row++) {                                                         \
            if (!sq) {                                                                                     \
                failed = 1;                                                                                \
                continue;                                                                                  \
            }                                                                                              \
            const T *xr = x + row * dim;                                                                   \
            T *yr = y + row * dim;                                                                         \
            NORM_ROW(LOAD, STORE, xr, yr)                                                                  \
        }                                                                                                  \
        if (sq && sq != stack) free(sq);                                                                   \
    }                                                                                                      \
    return !failed;

int64_t qv_rms_norm_f32(const float *x, const float *weight, float eps, float *y, int64_t rows, int64_t dim) {
    NORM_BODY(float, AS_IS, AS_IS)
}

int64_t qv_rms_norm_bf16(const uint16_t *x, const uint16_t *weight, float eps, uint16_t *y, int64_t rows,
                         int64_t dim) {
    NORM_BODY(uint16_t, bf16_to_f32, f32_to_bf16)
}
