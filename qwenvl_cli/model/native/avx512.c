/* The AVX-512 inner loops (common.h says what each computes; gemv.c and attention.c drive them).
 *
 * float32 and int8: 16 float32 lanes, ROWS rows at a time (ROWS accumulators, ROWS weight streams), one
 * prefetch a 64-byte line. bfloat16: pairs multiplied and summed by vdpbf16ps, as oneDNN does on these
 * CPUs. int4: torch's AVX-512 pack (rows in blocks of 64), summed exactly in int32 by vpermb + vpdpwssd.
 */
#include <immintrin.h>

#include "common.h"

/* ---- bfloat16: 32 weights (64 bytes) per vector ---- */

AVX512BF16_TARGET void bf16_block_avx512(const uint16_t *w, const uint16_t *x, int64_t k, int rows,
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

/* ---- float32: 16 weights (64 bytes) per vector ---- */

AVX512_TARGET void f32_block_avx512(const float *w, const float *x, int64_t k, int rows, float *sums) {
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

/* ---- int8 weights (the scale applied by the driver), float32 activations: 64 weights (one line) a step ---- */

AVX512_TARGET static inline __m512 int8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

AVX512_TARGET void int8_block_avx512(const int8_t *w, const float *x, int64_t k, int rows, float *sums) {
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

/* ---- int4, torch's AVX-512 pack: rows in blocks of 64, each block k-major, 32 bytes a k, byte j holding
 * row j (low nibble) and row j + 32 (high). One vpermb a 16 rows spreads the nibbles of two consecutive k
 * into (q[n, k], q[n, k + 1]) word pairs, vpdpwssd multiplies them by (xq[k], xq[k + 1]) and adds into
 * int32 lanes (exact: |sum| < 15 * 2^15 * 256). The same loop on bfloat16 pairs with vdpbf16ps ran at
 * half the rate from L1 (17 against 33 GB/s a core, 2 Xeon cores with AMX): there it costs two FMA slots.
 * Per group: y += scale * 2^e * S + (zero - 8 * scale) * 2^e * X, S the group's sum, X that of xq. ---- */

/* vpermb indices: dword r of permute h (rows 16h + r of a half) takes byte 16h + r (k) and byte
 * 32 + 16h + r (k + 1) into its two words; the other bytes are masked to zero. */
static const uint8_t INT4_SPREAD[2][64] = {
    {0, 0, 32, 0, 1, 0, 33, 0, 2, 0, 34, 0, 3, 0, 35, 0, 4, 0, 36, 0, 5, 0, 37, 0, 6, 0, 38, 0, 7, 0, 39, 0, 8, 0, 40, 0, 9, 0, 41, 0, 10, 0, 42, 0, 11, 0, 43, 0, 12, 0, 44, 0, 13, 0, 45, 0, 14, 0, 46, 0, 15, 0, 47, 0},
    {16, 0, 48, 0, 17, 0, 49, 0, 18, 0, 50, 0, 19, 0, 51, 0, 20, 0, 52, 0, 21, 0, 53, 0, 22, 0, 54, 0, 23, 0, 55, 0, 24, 0, 56, 0, 25, 0, 57, 0, 26, 0, 58, 0, 27, 0, 59, 0, 28, 0, 60, 0, 29, 0, 61, 0, 30, 0, 62, 0, 31, 0, 63, 0}};

AVX512INT4_TARGET void int4_block_avx512(const uint8_t *w, const uint16_t *sz, const int16_t *xq,
                                         const float *xs, const float *xsum, int64_t n, int64_t k,
                                         int64_t group, float *out) {
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

/* ---- the decode attention's two loops over the cache, 16 lanes: float32 rows, or bfloat16 rows widened
 * by a shift ---- */

AVX512_TARGET static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

AVX512_TARGET static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* s[l] = (q . k_l) * scale: the products of 16 lanes summed along the row, then across the lanes. */
#define SCORES_512(T, LOAD16)                                                                              \
    const T *kh = (const T *)k;                                                                            \
    __m512 qv[16];                                                                                         \
    for (int64_t j = 0; j < hd / 16; j++) qv[j] = _mm512_loadu_ps(q + 16 * j);                             \
    for (int64_t l = 0; l < len; l++) {                                                                    \
        __m512 dot = _mm512_mul_ps(qv[0], LOAD16(kh + l * hd));                                            \
        for (int64_t j = 1; j < hd / 16; j++) dot = _mm512_fmadd_ps(qv[j], LOAD16(kh + l * hd + 16 * j), dot); \
        s[l] = _mm512_reduce_add_ps(dot) * scale;                                                          \
    }

/* out = sum_l p[l] v_l, the output row in registers. */
#define MIX_512(T, LOAD16)                                                                                 \
    const T *vh = (const T *)v;                                                                            \
    __m512 acc[16];                                                                                        \
    for (int64_t j = 0; j < hd / 16; j++) acc[j] = _mm512_setzero_ps();                                    \
    for (int64_t l = 0; l < len; l++) {                                                                    \
        __m512 pl = _mm512_set1_ps(p[l]);                                                                  \
        for (int64_t j = 0; j < hd / 16; j++) acc[j] = _mm512_fmadd_ps(pl, LOAD16(vh + l * hd + 16 * j), acc[j]); \
    }                                                                                                      \
    for (int64_t j = 0; j < hd / 16; j++) _mm512_storeu_ps(out + 16 * j, acc[j]);

AVX512_TARGET void scores_f32_avx512(const float *q, const void *k, int64_t len, int64_t hd, float scale,
                                     float *s) {
    SCORES_512(float, load16_f32)
}

AVX512_TARGET void scores_bf16_avx512(const float *q, const void *k, int64_t len, int64_t hd, float scale,
                                      float *s) {
    SCORES_512(uint16_t, load16_bf16)
}

AVX512_TARGET void mix_f32_avx512(const float *p, const void *v, int64_t len, int64_t hd, float *out) {
    MIX_512(float, load16_f32)
}

AVX512_TARGET void mix_bf16_avx512(const float *p, const void *v, int64_t len, int64_t hd, float *out) {
    MIX_512(uint16_t, load16_bf16)
}
