/* Matrix-vector products for the one-token decode step on x86-64 CPUs with AVX-512: y = W x (+ bias) for
 * one activation row, W row-major (N, K) in float32, bfloat16 or int8 with one scale per row, or in torch's
 * int4 pack. After them: the vision attention's rotary gather and scatter, RMSNorm, and the decode step's
 * one-query attention.
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* ---- int4 in torch's CPU pack (_convert_weight_to_int4pack_for_cpu, its AVX-512 layout), groupwise
 * (scale, zero) in bfloat16: w[n, k] = (q - 8) * scale + zero, g = k / group; float32 activations ----
 *
 * The pack: rows in blocks of 64, each block k-major, 32 bytes a k: byte j holds row j (low nibble) and
 * row j + 32 (high). A last block of N % 64 rows (a multiple of 16) holds (N % 64) / 2 bytes a k, byte j
 * rows 2j (low) and 2j + 1 (high). model/int4.py decodes the same layout in torch ops (the oracle).
 *
 * Activations: each group of x as int16 times a power of two (2^e, the largest |x| of the group at
 * 2^14..2^15 - 1), so every bfloat16 value within 2^7 of the group's largest is exact and the rest are
 * off by at most 2^(e-1). Then the sums are integers: one vpermb a 16 rows spreads the nibbles of two
 * consecutive k into (q[n, k], q[n, k + 1]) word pairs, vpdpwssd multiplies them by (xq[k], xq[k + 1])
 * and adds into int32 lanes (exact: |sum| < 15 * 2^15 * 256). The same loop on bfloat16 pairs with
 * vdpbf16ps ran at half the rate from L1 (17 against 33 GB/s a core, 2 Xeon cores with AMX): there it
 * costs two FMA slots.
 * Per group: y += scale * 2^e * S + (zero - 8 * scale) * 2^e * X, S the group's sum, X that of xq. */

#define INT4_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))
#define INT4_BLOCK 64

/* vpermb indices: dword r of permute h (rows 16h + r of a half) takes byte 16h + r (k) and byte
 * 32 + 16h + r (k + 1) into its two words; the other bytes are masked to zero. */
static const uint8_t INT4_SPREAD[2][64] = {
    {0, 0, 32, 0, 1, 0, 33, 0, 2, 0, 34, 0, 3, 0, 35, 0, 4, 0, 36, 0, 5, 0, 37, 0, 6, 0, 38, 0, 7, 0, 39, 0, 8, 0, 40, 0, 9, 0, 41, 0, 10, 0, 42, 0, 11, 0, 43, 0, 12, 0, 44, 0, 13, 0, 45, 0, 14, 0, 46, 0, 15, 0, 47, 0},
    {16, 0, 48, 0, 17, 0, 49, 0, 18, 0, 50, 0, 19, 0, 51, 0, 20, 0, 52, 0, 21, 0, 53, 0, 22, 0, 54, 0, 23, 0, 55, 0, 24, 0, 56, 0, 25, 0, 57, 0, 26, 0, 58, 0, 27, 0, 59, 0, 28, 0, 60, 0, 29, 0, 61, 0, 30, 0, 62, 0, 31, 0, 63, 0}};

INT4_TARGET static void int4_block(const uint8_t *w, const uint16_t *sz, const int16_t *xq, const float *xs,
                                   const float *xsum, int64_t n, int64_t k, int64_t group, float *out) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const __mmask64 spread = 0x5555555555555555ull;
    const __m512i idx[2] = {_mm512_loadu_si512(INT4_SPREAD[0]), _mm512_loadu_si512(INT4_SPREAD[1])};
    __m512 tot[4];
    for (int m = 0; m < 4; m++) tot[m] = _mm512_setzero_ps();
    int64_t groups = k / group;
    for (int64_t g = 0; g < groups; g++) {
        __m512i acc[4];
        for (int m = 0; m < 4; m++) acc[m] = _mm512_setzero_si512();
        const uint8_t *p = w + g * group * 32;
        const int16_t *xg = xq + g * group;
        if (g + 1 < groups)
            for (int line = 0; line < 4; line++)
                _mm_prefetch((const char *)(sz + ((g + 1) * n) * 2) + 64 * line, _MM_HINT_T0);
        for (int64_t i = 0; i < group; i += 2) {
            _mm_prefetch((const char *)p + 32 * i + 2048, _MM_HINT_T0);
            __m512i bytes = _mm512_loadu_si512(p + 32 * i); /* k = g * group + i and the next */
            __m512i lo = _mm512_and_si512(bytes, nib);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nib);
            int32_t pair;
            memcpy(&pair, xg + i, 4);
            __m512i xv = _mm512_set1_epi32(pair);
            acc[0] = _mm512_dpwssd_epi32(acc[0], _mm512_maskz_permutexvar_epi8(spread, idx[0], lo), xv);
            acc[1] = _mm512_dpwssd_epi32(acc[1], _mm512_maskz_permutexvar_epi8(spread, idx[1], lo), xv);
            acc[2] = _mm512_dpwssd_epi32(acc[2], _mm512_maskz_permutexvar_epi8(spread, idx[0], hi), xv);
            acc[3] = _mm512_dpwssd_epi32(acc[3], _mm512_maskz_permutexvar_epi8(spread, idx[1], hi), xv);
        }
        __m512 step = _mm512_set1_ps(xs[g]), total = _mm512_set1_ps(xsum[g]); /* 2^e, 2^e * X */
        const uint16_t *s = sz + (g * n) * 2; /* (scale, zero) of this block's rows in group g */
        for (int m = 0; m < 4; m++) {
            __m512i d = _mm512_loadu_si512(s + 32 * m); /* 16 (scale, zero) pairs */
            __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
            __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32((int)0xffff0000u)));
            __m512 base = _mm512_fmadd_ps(_mm512_set1_ps(-8.0f), scale, zero); /* zero - 8 scale */
            __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m]), step);
            tot[m] = _mm512_fmadd_ps(base, total, _mm512_fmadd_ps(scale, sum, tot[m]));
        }
    }
    for (int m = 0; m < 4; m++) _mm512_storeu_ps(out + 16 * m, tot[m]);
}

/* The last N % 64 rows, pairs of rows per byte: plain C, the same sums. */
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

/* x # (K,) -> xq # (K,) int16, per group xs = 2^e and xsum = 2^e * sum(xq). Returns 0 if x holds a NaN or
 * an infinity (the caller then answers NaN). */
INT4_TARGET static int int4_quantize_x(const float *x, int64_t k, int64_t group, int16_t *xq, float *xs,
                                       float *xsum) {
    for (int64_t g = 0; g < k / group; g++) {
        const float *xg = x + g * group;
        float top = 0.0f;
        for (int64_t i = 0; i < group; i++) {
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
        for (int64_t i = 0; i < group; i++) {
            int32_t v = (int32_t)nearbyint(xg[i] * up); /* exact scaling, round to nearest even */
            xq[g * group + i] = (int16_t)v;
            total += v;
        }
        xs[g] = ldexpf(1.0f, e);
        xsum[g] = (float)total * xs[g];
    }
    return 1;
}

/* Answers 0 (nothing written) when out of memory, else 1. */
INT4_TARGET int64_t qv_gemv_int4(const uint8_t *w, const uint16_t *sz, const float *x, const float *bias,
                                 float *y, int64_t n, int64_t k, int64_t group) {
    int64_t groups = k / group;
    int16_t *xq = (int16_t *)malloc((size_t)k * sizeof(int16_t) + 2 * (size_t)groups * sizeof(float));
    if (!xq) return 0;
    float *xs = (float *)(xq + k + (k & 1)), *xsum = xs + groups;
    if (!int4_quantize_x(x, k, group, xq, xs, xsum)) {
        for (int64_t i = 0; i < n; i++) y[i] = __builtin_nanf("");
        free(xq);
        return 1;
    }
    int64_t blocks = n / INT4_BLOCK, full = blocks * INT4_BLOCK;
#pragma omp parallel for schedule(static) if (n * k >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * INT4_BLOCK;
        int4_block(w + n0 * (k / 2), sz + n0 * 2, xq, xs, xsum, n, k, group, y + n0);
    }
    if (full < n) int4_tail(w + full * (k / 2), sz + full * 2, xq, xs, xsum, n, n - full, k, group, y + full);
    if (bias)
        for (int64_t i = 0; i < n; i++) y[i] += bias[i];
    free(xq);
    return 1;
}


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

#define AS_IS(v) (v)

F32_TARGET static void rope_gather_f32(const float *src, int64_t row_stride, int64_t heads, int64_t hd,
                                       const float *cos, const float *sin, const int64_t *gather, int64_t j0,
                                       int64_t j1, int64_t lmax, int64_t n, int rotate, float *dst) {
    ROPE_BODY(float, AS_IS, AS_IS)
}

F32_TARGET static void rope_gather_bf16(const uint16_t *src, int64_t row_stride, int64_t heads, int64_t hd,
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

/* ---- one query over the KV cache (the decode step's attention), grouped-query ----
 * q # (heads, hd) float32; k, v: kv_heads blocks of len rows of hd (float32 or bfloat16), block b at
 * b * kv_stride elements; scratch # (heads, len) float32; out # (heads, hd) float32. Per head, in float32:
 * s = (q . k_l) * scale, p = softmax(s) = exp(s - max) / sum, out = sum_l p_l v_l, as text.decode_attention
 * computes it with two matmuls (its oracle, with SDPA; the order of the sums differs). hd a multiple of 16
 * up to 256: the output row stays in registers. Threads split the heads. */

F32_TARGET static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

F32_TARGET static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

#define ATTN_BODY(T, LOAD16)                                                                                   \
    if (hd % 16 || hd > 256 || kv_heads <= 0 || heads % kv_heads) return 0;                                \
    int64_t group = heads / kv_heads, vecs = hd / 16;                                                      \
    _Pragma("omp parallel for schedule(static) if (heads * len * hd >= 4 * PARALLEL_MIN)")                 \
    for (int64_t h = 0; h < heads; h++) {                                                                  \
        const float *qh = q + h * hd;                                                                      \
        const T *kh = k + (h / group) * kv_stride, *vh = v + (h / group) * kv_stride;                      \
        float *s = scratch + h * len, *o = out + h * hd;                                                   \
        __m512 qv[16], acc[16];                                                                            \
        for (int64_t j = 0; j < vecs; j++) {                                                               \
            qv[j] = _mm512_loadu_ps(qh + 16 * j);                                                          \
            acc[j] = _mm512_setzero_ps();                                                                  \
        }                                                                                                  \
        float top = -INFINITY;                                                                             \
        for (int64_t l = 0; l < len; l++) {                                                                \
            __m512 dot = _mm512_mul_ps(qv[0], LOAD16(kh + l * hd));                                        \
            for (int64_t j = 1; j < vecs; j++) dot = _mm512_fmadd_ps(qv[j], LOAD16(kh + l * hd + 16 * j), dot); \
            s[l] = _mm512_reduce_add_ps(dot) * scale;                                                      \
            top = s[l] > top ? s[l] : top;                                                                 \
        }                                                                                                  \
        float total = 0.0f;                                                                                \
        for (int64_t l = 0; l < len; l++) {                                                                \
            s[l] = expf(s[l] - top);                                                                       \
            total += s[l];                                                                                 \
        }                                                                                                  \
        for (int64_t l = 0; l < len; l++) {                                                                \
            __m512 p = _mm512_set1_ps(s[l] / total);                                                       \
            for (int64_t j = 0; j < vecs; j++) acc[j] = _mm512_fmadd_ps(p, LOAD16(vh + l * hd + 16 * j), acc[j]); \
        }                                                                                                  \
        for (int64_t j = 0; j < vecs; j++) _mm512_storeu_ps(o + 16 * j, acc[j]);                           \
    }                                                                                                      \
    return 1;

/* Both answer 0 (nothing written) for a head size they do not take. */
F32_TARGET int64_t qv_decode_attention_f32(const float *q, const float *k, const float *v, int64_t heads,
                                           int64_t kv_heads, int64_t len, int64_t hd, int64_t kv_stride,
                                           float scale, float *scratch, float *out) {
    ATTN_BODY(float, load16_f32)
}

F32_TARGET int64_t qv_decode_attention_bf16(const float *q, const uint16_t *k, const uint16_t *v, int64_t heads,
                                            int64_t kv_heads, int64_t len, int64_t hd, int64_t kv_stride,
                                            float scale, float *scratch, float *out) {
    ATTN_BODY(uint16_t, load16_bf16)
}
