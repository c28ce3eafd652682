/* Matrix-vector products for the one-token decode step on x86-64 CPUs with AVX-512: y = W x (+ bias) for
 * one activation row, W row-major (N, K) in float32, bfloat16 or int8 with one scale per row.
 *
 * Why not torch's kernels: a decode step is a stream of weight bytes, and oneDNN's packed GEMV and
 * `_weight_int8pack_mm` read them at 70-80% of what these loops reach (benchmarks/RESULTS.md). The loops
 * take ROWS rows at a time (ROWS independent accumulators, ROWS weight streams) and prefetch ahead
 * (prefetch_distance); threads split the row blocks through OpenMP, which resolves to torch's own libgomp
 * (it is loaded first), so the threads are torch's.
 *
 * Arithmetic: products summed in float32 (bfloat16 pairs by vdpbf16ps, as oneDNN does on these CPUs),
 * the bias added in float32, one rounding to the output type (round to nearest even). Oracle: F.linear
 * (tests/test_native.py). Built by qwenvl_cli/model/native/__init__.py, which also says when it is used.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ROWS 8
#define PREFETCH 2048
/* Below this many weights a matrix runs on the calling thread: the fork/join would cost more. */
#define PARALLEL_MIN (1 << 15)

int qv_abi(void) { return 1; }

/* Bytes ahead of each load to prefetch: the same place in the next block of ROWS rows while a block is at
 * most 16 KB (short rows: a 512-wide LM head's are 1 KB, a 2048-wide int8 matrix's 2 KB, where a distance
 * along the row would point back into the block being read), else PREFETCH along the row. Measured on
 * 3B shapes against 1 KB along the row: int8 1.4x -> 1.8x torch's kernel, float ones the same or better. */
static inline int64_t prefetch_distance(int64_t row_bytes) {
    return ROWS * row_bytes <= 16384 ? ROWS * row_bytes : PREFETCH;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* ---- bfloat16: 32 weights (64 bytes) per vector, pairs multiplied and summed by vdpbf16ps ---- */

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

BF16_TARGET static inline void bf16_block(const uint16_t *w, const uint16_t *x, int64_t k, int rows,
                                          float *sums) {
    int64_t ahead = prefetch_distance(k * 2);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    int64_t full = k / 32 * 32;
    if (rows == ROWS) {
        for (int64_t i = 0; i < full; i += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
            for (int r = 0; r < ROWS; r++) {
                const uint16_t *row = w + r * k + i;
                _mm_prefetch((const char *)row + ahead, _MM_HINT_T0);
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(row), xv);
            }
        }
    } else {
        for (int r = 0; r < rows; r++)
            for (int64_t i = 0; i < full; i += 32)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * k + i),
                                          (__m512bh)_mm512_loadu_si512(x + i));
    }
    if (full < k) {
        __mmask32 m = (__mmask32)((1ull << (k - full)) - 1);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + full);
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * k + full), xv);
    }
    for (int r = 0; r < rows; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

BF16_TARGET void qv_gemv_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                              int64_t n, int64_t k) {
    int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) if (n * k >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROWS;
        int rows = n - n0 < ROWS ? (int)(n - n0) : ROWS;
        float sums[ROWS];
        bf16_block(w + n0 * k, x, k, rows, sums);
        for (int r = 0; r < rows; r++)
            y[n0 + r] = f32_to_bf16(bias ? sums[r] + bf16_to_f32(bias[n0 + r]) : sums[r]);
    }
}

/* ---- float32: 16 weights (64 bytes) per vector ---- */

#define F32_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

F32_TARGET static inline void f32_block(const float *w, const float *x, int64_t k, int rows, float *sums) {
    int64_t ahead = prefetch_distance(k * 4);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    int64_t full = k / 16 * 16;
    if (rows == ROWS) {
        for (int64_t i = 0; i < full; i += 16) {
            __m512 xv = _mm512_loadu_ps(x + i);
            for (int r = 0; r < ROWS; r++) {
                const float *row = w + r * k + i;
                _mm_prefetch((const char *)row + ahead, _MM_HINT_T0);
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row), xv, acc[r]);
            }
        }
    } else {
        for (int r = 0; r < rows; r++)
            for (int64_t i = 0; i < full; i += 16)
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * k + i), _mm512_loadu_ps(x + i), acc[r]);
    }
    if (full < k) {
        __mmask16 m = (__mmask16)((1u << (k - full)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + full);
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + r * k + full), xv, acc[r]);
    }
    for (int r = 0; r < rows; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

F32_TARGET void qv_gemv_f32(const float *w, const float *x, const float *bias, float *y, int64_t n, int64_t k) {
    int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) if (n * k >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROWS;
        int rows = n - n0 < ROWS ? (int)(n - n0) : ROWS;
        float sums[ROWS];
        f32_block(w + n0 * k, x, k, rows, sums);
        for (int r = 0; r < rows; r++) y[n0 + r] = bias ? sums[r] + bias[n0 + r] : sums[r];
    }
}

/* ---- int8 weights, one bfloat16 scale per row, float32 activations: 64 weights (one line) a step ---- */

F32_TARGET static inline __m512 int8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

F32_TARGET static inline void int8_block(const int8_t *w, const float *x, int64_t k, int rows, float *sums) {
    int64_t ahead = prefetch_distance(k * 1);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    int64_t full = k / 64 * 64;
    if (rows == ROWS) {
        for (int64_t i = 0; i < full; i += 64) {
            __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
            __m512 x2 = _mm512_loadu_ps(x + i + 32), x3 = _mm512_loadu_ps(x + i + 48);
            for (int r = 0; r < ROWS; r++) {
                const int8_t *row = w + r * k + i;
                _mm_prefetch((const char *)row + ahead, _MM_HINT_T0);
                __m512 a = _mm512_fmadd_ps(int8x16(row), x0, acc[r]);
                a = _mm512_fmadd_ps(int8x16(row + 16), x1, a);
                a = _mm512_fmadd_ps(int8x16(row + 32), x2, a);
                acc[r] = _mm512_fmadd_ps(int8x16(row + 48), x3, a);
            }
        }
    } else {
        for (int r = 0; r < rows; r++)
            for (int64_t i = 0; i < full; i += 16)
                acc[r] = _mm512_fmadd_ps(int8x16(w + r * k + i), _mm512_loadu_ps(x + i), acc[r]);
    }
    for (int64_t i = full; i < k; i += 16) { /* the last < 64 weights of each row, 16 at a time */
        int64_t left = k - i;
        __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
        for (int r = 0; r < rows; r++) {
            __m128i q = _mm_maskz_loadu_epi8(m, w + r * k + i);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), xv, acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

F32_TARGET void qv_gemv_int8(const int8_t *w, const uint16_t *scales, const float *x, const float *bias, float *y,
                             int64_t n, int64_t k) {
    int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) if (n * k >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROWS;
        int rows = n - n0 < ROWS ? (int)(n - n0) : ROWS;
        float sums[ROWS];
        int8_block(w + n0 * k, x, k, rows, sums);
        for (int r = 0; r < rows; r++) {
            float v = sums[r] * bf16_to_f32(scales[n0 + r]);
            y[n0 + r] = bias ? v + bias[n0 + r] : v;
        }
    }
}
