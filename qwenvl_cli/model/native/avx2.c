/* The AVX2 inner loops (common.h says what each computes; gemv.c and attention.c drive them), for CPUs
 * without AVX-512 (Zen 1-3, Intel client cores): 8 float32 lanes and 16 vector registers.
 *
 * float32, bfloat16 and int8: ROWS rows at a time (prefetch: next_block), except short rows (float32 up
 * to F32_ROW_MAX, bfloat16 up to BF16_ROW_MAX, int8 up to INT8_ROW_MAX), which run one after another. bfloat16 is widened by
 * unpacking with zeros (a bfloat16 is the top half of its float32), the activations through the same
 * shuffle so that lane for lane the right pairs multiply. int8 multiplies int16 activations (gemv.c:
 * quantize_x) by vpmaddwd. int4: torch's AVX2 pack (rows in blocks of 32), summed exactly in int32 by
 * vpshufb + vpmaddwd, the same sums as the AVX-512 kernel's.
 */
#include <immintrin.h>

#include "common.h"

/* Prefetch only the next block of short rows (common.h: next_block), none along longer rows: on Zen 3
 * the hardware's streams do better there (A/B of both builds on 3B shapes: float32 and bfloat16 7-15%
 * faster without; the 512-wide LM head the same). Rows run one after another: float32 ones prefetch
 * nothing, bfloat16 ones 256 bytes ahead (bf16_rows_avx2), int8 ones 1 KB ahead (int8_dot); long int8 rows
 * are longer than next_block takes. */
static inline void prefetch_row(const void *row, int64_t ahead) {
    if (ahead) _mm_prefetch((const char *)row + ahead, _MM_HINT_T0);
}

/* Masks of the first 0..8 lanes: TAIL + 8 - left. */
static const int32_t TAIL[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

AVX2_TARGET static inline __m256i first_lanes(int64_t left) {
    return _mm256_loadu_si256((const __m256i *)(TAIL + 8 - (left < 8 ? left : 8)));
}

AVX2_TARGET static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- float32: two vectors (one line) of each row a step ---- */

/* Rows of up to F32_ROW_MAX one after another, four vectors (two lines) a step: one sequential stream,
 * which Zen 3's prefetcher follows better than eight short ones (the 151936 x 512 LM head: 1.07-1.15x). */
#define F32_ROW_MAX 512

AVX2_TARGET static void f32_rows_avx2(const float *w, const float *x, int64_t k, int rows, float *sums) {
    int64_t full = k / 32 * 32;
    for (int r = 0; r < rows; r++) {
        const float *row = w + r * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < full; i += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 16), _mm256_loadu_ps(x + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 24), _mm256_loadu_ps(x + i + 24), a3);
        }
        for (int64_t i = full; i < k; i += 8) {
            __m256i m = first_lanes(k - i);
            a0 = _mm256_fmadd_ps(_mm256_maskload_ps(row + i, m), _mm256_maskload_ps(x + i, m), a0);
        }
        sums[r] = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

AVX2_TARGET void f32_block_avx2(const float *w, const float *x, int64_t k, int rows, float *sums) {
    if (k <= F32_ROW_MAX) {
        f32_rows_avx2(w, x, k, rows, sums);
        return;
    }
    int64_t ahead = next_block(k * 4);
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    int64_t full = k / 16 * 16;
    if (rows == ROWS) {
        for (int64_t i = 0; i < full; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            for (int r = 0; r < ROWS; r++) {
                const float *row = w + r * k + i;
                prefetch_row(row, ahead);
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row), x0, acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8), x1, acc[r]);
            }
        }
    } else {
        for (int r = 0; r < rows; r++)
            for (int64_t i = 0; i < full; i += 8)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k + i), _mm256_loadu_ps(x + i), acc[r]);
    }
    for (int64_t i = full; i < k; i += 8) {
        __m256i m = first_lanes(k - i);
        __m256 xv = _mm256_maskload_ps(x + i, m);
        for (int r = 0; r < rows; r++) acc[r] = _mm256_fmadd_ps(_mm256_maskload_ps(w + r * k + i, m), xv, acc[r]);
    }
    for (int r = 0; r < rows; r++) sums[r] = sum8(acc[r]);
}

/* ---- bfloat16: 16 weights (32 bytes) a vector, widened to two of float32 ---- */

/* Elements 0-3 and 8-11 of 16 bfloat16 as float32; _hi: 4-7 and 12-15. */
AVX2_TARGET static inline __m256 bf16_lo(__m256i v) {
    return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
}

AVX2_TARGET static inline __m256 bf16_hi(__m256i v) {
    return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
}

/* The activations widened once a call (gemv.c: widen_x): xw # (K rounded up to 16,) float32, zero-padded,
 * each 16 in the order the weights widen in (bf16_lo, bf16_hi: 0-3 8-11, then 4-7 12-15), so that the
 * loops load them as they are. Bfloat16 activations (a bfloat16 model) and float32 ones (a float32 model on
 * a bfloat16 checkpoint's weights, their exact upcast) take the same loops. */

/* 16 weights (zero-padded past `left`) times their 16 widened activations, added to acc. */
AVX2_TARGET static inline __m256 bf16w_dot16(const uint16_t *w, int64_t left, const float *xw, __m256 acc) {
    __m256i v;
    if (left >= 16) {
        v = _mm256_loadu_si256((const __m256i *)w);
    } else {
        uint16_t wt[16] = {0};
        memcpy(wt, w, (size_t)left * 2);
        v = _mm256_loadu_si256((const __m256i *)wt);
    }
    acc = _mm256_fmadd_ps(bf16_lo(v), _mm256_loadu_ps(xw), acc);
    return _mm256_fmadd_ps(bf16_hi(v), _mm256_loadu_ps(xw + 8), acc);
}

/* Rows of up to BF16_ROW_MAX one after another (as f32_rows_avx2), each prefetched 256 bytes ahead along
 * itself: the 151936 x 512 LM head 21.5 -> 26-27 GB/s in a standalone study on Zen 3 (8-row blocks with
 * next_block; without the prefetch 24-26; longer rows do better in blocks: 2048-wide 30 against 28). */
#define BF16_ROW_MAX 512

AVX2_TARGET static void bf16_rows_avx2(const uint16_t *w, const float *xw, int64_t k, int rows, float *sums) {
    int64_t full = k / 32 * 32;
    for (int r = 0; r < rows; r++) {
        const uint16_t *row = w + r * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < full; i += 32) {
            prefetch_row(row + i, 256);
            __m256i a = _mm256_loadu_si256((const __m256i *)(row + i));
            __m256i b = _mm256_loadu_si256((const __m256i *)(row + i + 16));
            a0 = _mm256_fmadd_ps(bf16_lo(a), _mm256_loadu_ps(xw + i), a0);
            a1 = _mm256_fmadd_ps(bf16_hi(a), _mm256_loadu_ps(xw + i + 8), a1);
            a2 = _mm256_fmadd_ps(bf16_lo(b), _mm256_loadu_ps(xw + i + 16), a2);
            a3 = _mm256_fmadd_ps(bf16_hi(b), _mm256_loadu_ps(xw + i + 24), a3);
        }
        for (int64_t i = full; i < k; i += 16) a0 = bf16w_dot16(row + i, k - i, xw + i, a0); /* the last < 32 */
        sums[r] = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

AVX2_TARGET void bf16_block_avx2(const uint16_t *w, const float *xw, int64_t k, int rows, float *sums) {
    if (k <= BF16_ROW_MAX) {
        bf16_rows_avx2(w, xw, k, rows, sums);
        return;
    }
    int64_t ahead = next_block(k * 2);
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    int64_t full = k / 32 * 32;
    if (rows == ROWS) {
        for (int64_t i = 0; i < full; i += 32) {
            __m256 x0 = _mm256_loadu_ps(xw + i), x1 = _mm256_loadu_ps(xw + i + 8);
            __m256 x2 = _mm256_loadu_ps(xw + i + 16), x3 = _mm256_loadu_ps(xw + i + 24);
            for (int r = 0; r < ROWS; r++) {
                const uint16_t *row = w + r * k + i;
                prefetch_row(row, ahead);
                __m256i a = _mm256_loadu_si256((const __m256i *)row);
                __m256i b = _mm256_loadu_si256((const __m256i *)(row + 16));
                __m256 s = _mm256_fmadd_ps(bf16_lo(a), x0, acc[r]);
                s = _mm256_fmadd_ps(bf16_hi(a), x1, s);
                s = _mm256_fmadd_ps(bf16_lo(b), x2, s);
                acc[r] = _mm256_fmadd_ps(bf16_hi(b), x3, s);
            }
        }
    } else {
        for (int r = 0; r < rows; r++)
            for (int64_t i = 0; i < full; i += 16) acc[r] = bf16w_dot16(w + r * k + i, 16, xw + i, acc[r]);
    }
    for (int64_t i = full; i < k; i += 16) /* the last < 32 */
        for (int r = 0; r < rows; r++) acc[r] = bf16w_dot16(w + r * k + i, k - i, xw + i, acc[r]);
    for (int r = 0; r < rows; r++) sums[r] = sum8(acc[r]);
}

/* ---- int8 weights (the scale applied by the driver) times int16 activations (gemv.c: quantize_x, groups
 * of INT8_GROUP): 16 weights a step widened to int16 by vpmovsxbw and multiplied in pairs by vpmaddwd into
 * int32 lanes, exact; each group's lanes are converted to float32 and scaled by its 2^e: half the
 * instructions of widening to float32. Rows up to INT8_ROW_MAX run one after another (one sequential
 * stream, which the hardware's prefetcher follows, and the activations stay in L1); longer rows in 8-row
 * blocks (x read once a step for eight rows). A/B on Zen 3 against the float32-activation 8-row loop: the
 * 151936 x 512 LM head 1.5x (17.8 -> 26-28 GB/s), 1536 x 512 1.2x, 2048-wide rows the same; prefetching
 * 1 KB ahead along the rows then 1.06-1.15x more (151936 x 2048 20.2 -> 23.3 GB/s; 2 KB no better, 256 B
 * 1.0-1.08x). Lanes: a lane of a group sums
 * at most INT8_GROUP / 8 products of at most 128 * 32767, far from 2^31. ---- */

#define INT8_ROW_MAX 4096

AVX2_TARGET static inline __m256i int8_madd16(const int8_t *w, const int16_t *x) {
    return _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)),
                             _mm256_loadu_si256((const __m256i *)x));
}

/* sum of w[0..n) * x[0..n) in int32 lanes (n <= INT8_GROUP); the last n % 16 weights through a zero-padded
 * copy (x is read up to the next multiple of 16: gemv.c pads it with zeros). */
AVX2_TARGET static inline __m256i int8_dot(const int8_t *w, const int16_t *x, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        if (!(i & 63)) prefetch_row(w + i, 1024); /* once per 64-byte line, 1 KB ahead (into the next rows) */
        a0 = _mm256_add_epi32(a0, int8_madd16(w + i, x + i));
        a1 = _mm256_add_epi32(a1, int8_madd16(w + i + 16, x + i + 16));
    }
    for (; i < n; i += 16) {
        int8_t t[16] = {0};
        memcpy(t, w + i, (size_t)(n - i < 16 ? n - i : 16));
        a0 = _mm256_add_epi32(a0, int8_madd16(t, x + i));
    }
    return _mm256_add_epi32(a0, a1);
}

AVX2_TARGET void int8_block_avx2(const int8_t *w, const int16_t *xq, const float *xs, int64_t k, int rows,
                                 float *sums) {
    int64_t groups = (k + INT8_GROUP - 1) / INT8_GROUP;
    if (k <= INT8_ROW_MAX || rows < ROWS) {
        for (int r = 0; r < rows; r++) {
            __m256 tot = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                int64_t i = g * INT8_GROUP, len = k - i < INT8_GROUP ? k - i : INT8_GROUP;
                __m256 s = _mm256_cvtepi32_ps(int8_dot(w + r * k + i, xq + i, len));
                tot = _mm256_fmadd_ps(s, _mm256_set1_ps(xs[g]), tot);
            }
            sums[r] = sum8(tot);
        }
        return;
    }
    __m256 tot[ROWS];
    for (int r = 0; r < ROWS; r++) tot[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        int64_t i0 = g * INT8_GROUP, len = k - i0 < INT8_GROUP ? k - i0 : INT8_GROUP;
        __m256i acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_si256();
        int64_t full = len / 32 * 32;
        for (int64_t i = i0; i < i0 + full; i += 32) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + i));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + i + 16));
            for (int r = 0; r < ROWS; r++) {
                const int8_t *row = w + r * k + i;
                __m256i a = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)row)), x0);
                __m256i b = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + 16))), x1);
                acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(a, b));
            }
        }
        __m256 step = _mm256_set1_ps(xs[g]);
        for (int r = 0; r < ROWS; r++) {
            if (full < len) acc[r] = _mm256_add_epi32(acc[r], int8_dot(w + r * k + i0 + full, xq + i0 + full, len - full));
            tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), step, tot[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) sums[r] = sum8(tot[r]);
}

/* ---- int4, torch's AVX2 pack: rows in blocks of 32, each block k-major, 16 bytes a k, byte j holding
 * row j (low nibble) and row j + 16 (high). A step takes k and k + 1 (32 bytes), moves the quarters so
 * that each 128-bit lane holds 8 rows of k then the same 8 of k + 1, and one vpshufb a quarter of the
 * rows puts (q[n, k], q[n, k + 1]) into word pairs, zero-extended; vpmaddwd multiplies them by
 * (xq[k], xq[k + 1]) into int32 lanes (exact, as in avx512.c). Accumulator m holds rows FIRST[m] + 0..3
 * in its low lane and FIRST[m] + 8..11 in its high one. ---- */

static const uint8_t INT4_PAIRS[2][32] = {
    {0, 128, 8, 128, 1, 128, 9, 128, 2, 128, 10, 128, 3, 128, 11, 128,
     0, 128, 8, 128, 1, 128, 9, 128, 2, 128, 10, 128, 3, 128, 11, 128},
    {4, 128, 12, 128, 5, 128, 13, 128, 6, 128, 14, 128, 7, 128, 15, 128,
     4, 128, 12, 128, 5, 128, 13, 128, 6, 128, 14, 128, 7, 128, 15, 128}};
static const int INT4_FIRST[4] = {0, 4, 16, 20};

AVX2_TARGET void int4_block_avx2(const uint8_t *w, const uint16_t *sz, const int16_t *xq, const float *xs,
                                 const float *xsum, int64_t n, int64_t k, int64_t group, float *out) {
    const __m256i nib = _mm256_set1_epi8(0x0f);
    const __m256i pairs_a = _mm256_loadu_si256((const __m256i *)INT4_PAIRS[0]);
    const __m256i pairs_b = _mm256_loadu_si256((const __m256i *)INT4_PAIRS[1]);
    __m256 tot[4];
    for (int m = 0; m < 4; m++) tot[m] = _mm256_setzero_ps();
    int64_t groups = k / group;
    for (int64_t g = 0; g < groups; g++) {
        __m256i acc[4];
        for (int m = 0; m < 4; m++) acc[m] = _mm256_setzero_si256();
        const uint8_t *p = w + g * group * 16;
        const int16_t *xg = xq + g * group;
        if (g + 1 < groups)
            for (int line = 0; line < 2; line++)
                _mm_prefetch((const char *)(sz + ((g + 1) * n) * 2) + 64 * line, _MM_HINT_T0);
        for (int64_t i = 0; i < group; i += 2) {
            if (!(i & 2)) _mm_prefetch((const char *)p + 16 * i + 2048, _MM_HINT_T0);
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 16 * i)); /* k = g * group + i, k + 1 */
            __m256i t = _mm256_permute4x64_epi64(bytes, _MM_SHUFFLE(3, 1, 2, 0));
            __m256i lo = _mm256_and_si256(t, nib);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), nib);
            int32_t pair;
            memcpy(&pair, xg + i, 4);
            __m256i xv = _mm256_set1_epi32(pair);
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_shuffle_epi8(lo, pairs_a), xv));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_shuffle_epi8(lo, pairs_b), xv));
            acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(_mm256_shuffle_epi8(hi, pairs_a), xv));
            acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(_mm256_shuffle_epi8(hi, pairs_b), xv));
        }
        __m256 step = _mm256_set1_ps(xs[g]), total = _mm256_set1_ps(xsum[g]); /* 2^e, 2^e * X */
        const uint16_t *s = sz + (g * n) * 2; /* (scale, zero) of this block's rows in group g */
        for (int m = 0; m < 4; m++) {
            __m128i low = _mm_loadu_si128((const __m128i *)(s + 2 * INT4_FIRST[m]));
            __m128i high = _mm_loadu_si128((const __m128i *)(s + 2 * (INT4_FIRST[m] + 8)));
            __m256i d = _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1); /* 8 (scale, zero) */
            __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
            __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32((int)0xffff0000u)));
            __m256 base = _mm256_fmadd_ps(_mm256_set1_ps(-8.0f), scale, zero); /* zero - 8 scale */
            __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m]), step);
            tot[m] = _mm256_fmadd_ps(base, total, _mm256_fmadd_ps(scale, sum, tot[m]));
        }
    }
    for (int m = 0; m < 4; m++) {
        _mm_storeu_ps(out + INT4_FIRST[m], _mm256_castps256_ps128(tot[m]));
        _mm_storeu_ps(out + INT4_FIRST[m] + 8, _mm256_extractf128_ps(tot[m], 1));
    }
}

/* ---- the decode attention's two loops over the cache, 8 lanes: float32 rows, or bfloat16 rows widened
 * by a shift ---- */

AVX2_TARGET static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }

AVX2_TARGET static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Scores eight keys at a time: eight independent chains of FMAs (one key's chain alone waits on the FMA
 * latency: 2362 keys x 8 heads took 248 us a layer on Zen 3; four chains still half of the FMA rate), the
 * query read from L1 as an operand (a copy in a runtime-sized array went through the stack), each four
 * summed across lanes together by hadd; the last < 8 keys of a block one at a time. */
#define SCORES_256(T, LOAD8)                                                                               \
    const T *kh = (const T *)k;                                                                            \
    int64_t l = 0;                                                                                         \
    for (; l + 8 <= len; l += 8) {                                                                         \
        const T *k0 = kh + l * hd;                                                                         \
        __m256 d[8];                                                                                       \
        __m256 q0 = _mm256_loadu_ps(q);                                                                    \
        for (int r = 0; r < 8; r++) d[r] = _mm256_mul_ps(q0, LOAD8(k0 + r * hd));                          \
        for (int64_t j = 8; j < hd; j += 8) {                                                              \
            __m256 qj = _mm256_loadu_ps(q + j);                                                            \
            for (int r = 0; r < 8; r++) d[r] = _mm256_fmadd_ps(qj, LOAD8(k0 + r * hd + j), d[r]);          \
        }                                                                                                  \
        __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));                 \
        __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));                 \
        __m256 eight = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)); \
        _mm256_storeu_ps(s + l, _mm256_mul_ps(eight, _mm256_set1_ps(scale)));                              \
    }                                                                                                      \
    for (; l < len; l++) {                                                                                 \
        __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(q), LOAD8(kh + l * hd));                                \
        for (int64_t j = 8; j < hd; j += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), LOAD8(kh + l * hd + j), dot); \
        s[l] = sum8(dot) * scale;                                                                          \
    }

/* out = sum_l p_l v_l, the row 64 dims (8 registers) at a time over all keys: a fixed count of
 * accumulators the compiler keeps in registers (a runtime-sized array of them went through the stack, a
 * store-to-load wait a key); a narrower last chunk (hd not a multiple of 64) has its own fixed count. */
#define MIX_CHUNK(T, LOAD8, N)                                                                             \
    case N: {                                                                                              \
        __m256 acc[N];                                                                                     \
        for (int j = 0; j < N; j++) acc[j] = _mm256_setzero_ps();                                          \
        for (int64_t l = 0; l < len; l++) {                                                                \
            __m256 pl = _mm256_set1_ps(p[l]);                                                              \
            const T *row = vh + l * hd + c;                                                                \
            for (int j = 0; j < N; j++) acc[j] = _mm256_fmadd_ps(pl, LOAD8(row + 8 * j), acc[j]);          \
        }                                                                                                  \
        for (int j = 0; j < N; j++) _mm256_storeu_ps(out + c + 8 * j, acc[j]);                             \
        break;                                                                                             \
    }

#define MIX_256(T, LOAD8)                                                                                  \
    const T *vh = (const T *)v;                                                                            \
    for (int64_t c = 0; c < hd; c += 64) {                                                                 \
        switch ((hd - c) / 8 < 8 ? (hd - c) / 8 : 8) {                                                     \
            MIX_CHUNK(T, LOAD8, 8)                                                                         \
            MIX_CHUNK(T, LOAD8, 7)                                                                         \
            MIX_CHUNK(T, LOAD8, 6)                                                                         \
            MIX_CHUNK(T, LOAD8, 5)                                                                         \
            MIX_CHUNK(T, LOAD8, 4)                                                                         \
            MIX_CHUNK(T, LOAD8, 3)                                                                         \
            MIX_CHUNK(T, LOAD8, 2)                                                                         \
            MIX_CHUNK(T, LOAD8, 1)                                                                         \
        }                                                                                                  \
    }

AVX2_TARGET void scores_f32_avx2(const float *q, const void *k, int64_t len, int64_t hd, float scale, float *s) {
    SCORES_256(float, load8_f32)
}

AVX2_TARGET void scores_bf16_avx2(const float *q, const void *k, int64_t len, int64_t hd, float scale, float *s) {
    SCORES_256(uint16_t, load8_bf16)
}

AVX2_TARGET void mix_f32_avx2(const float *p, const void *v, int64_t len, int64_t hd, float *out) {
    MIX_256(float, load8_f32)
}

AVX2_TARGET void mix_bf16_avx2(const float *p, const void *v, int64_t len, int64_t hd, float *out) {
    MIX_256(uint16_t, load8_bf16)
}
