/* What the native kernels share: the bfloat16 conversions, the row blocking and prefetch rule of the
 * matrix-vector products, and the per-instruction-set pieces that gemv.c and attention.c drive.
 *
 * Two instruction sets: AVX-512 (avx512.c; bfloat16 pairs by AVX512-BF16, int4 by VBMI and VNNI) and
 * AVX2 with FMA (avx2.c; every x86-64 CPU since Haswell and Zen). Each file holds the inner loops for its
 * vectors; the drivers around them (threads, tails, bias, rounding) are one copy. Python's native module
 * picks the set for the CPU (and can be told the lower one, so that both are tested on AVX-512 machines).
 */
#ifndef QV_COMMON_H
#define QV_COMMON_H

#include <stdint.h>
#include <string.h>

/* The pieces below are the library's own; only the qv_ functions are its interface. */
#define INTERNAL __attribute__((visibility("hidden")))

#define ROWS 8
#define PREFETCH 2048
/* Below this many weights a matrix runs on the calling thread: the fork/join would cost more. */
#define PARALLEL_MIN (1 << 15)

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define AVX512BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define AVX512INT4_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))
#define AVX2_TARGET __attribute__((target("avx2,fma")))
/* Plain loops (the vision gather, RMSNorm) built for each set and picked at load time by the CPU: the
 * same bits from every clone (ISO C contracts no multiply-add, and no sum is reordered). */
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

/* Bytes ahead of each load to prefetch the same place in the next block of ROWS rows, while a block is at
 * most 16 KB (short rows: a 512-wide LM head's are 1 KB, a 2048-wide int8 matrix's 2 KB, where a distance
 * along the row would point back into the block being read); 0 for longer rows. */
static inline int64_t next_block(int64_t row_bytes) {
    return ROWS * row_bytes <= 16384 ? ROWS * row_bytes : 0;
}

/* The AVX-512 loops' distance: next_block, else PREFETCH along the row. Measured on 3B shapes against 1 KB
 * along the row: int8 1.4x -> 1.8x torch's kernel, float ones the same or better. */
static inline int64_t prefetch_distance(int64_t row_bytes) {
    int64_t next = next_block(row_bytes);
    return next ? next : PREFETCH;
}

#define AS_IS(v) (v) /* float32's "conversion", beside bf16_to_f32 / f32_to_bf16 in the loops' macros */

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

/* ---- one block of rows of a matrix-vector product: sums[r] = W[r] . x for rows <= ROWS rows of w, each
 * row k long (float32 sums, no bias) ---- */
typedef void (*f32_block_fn)(const float *w, const float *x, int64_t k, int rows, float *sums);
typedef void (*bf16_block_fn)(const uint16_t *w, const uint16_t *x, int64_t k, int rows, float *sums);
typedef void (*int8_block_fn)(const int8_t *w, const float *x, int64_t k, int rows, float *sums);
/* int8 on int16 activations (AVX2): xq the activations quantized in groups of INT8_GROUP (gemv.c:
 * quantize_x; zero-padded to a multiple of 16), xs each group's 2^e */
#define INT8_GROUP 128
typedef void (*int8q_block_fn)(const int8_t *w, const int16_t *xq, const float *xs, int64_t k, int rows,
                               float *sums);

INTERNAL void f32_block_avx512(const float *w, const float *x, int64_t k, int rows, float *sums);
INTERNAL void bf16_block_avx512(const uint16_t *w, const uint16_t *x, int64_t k, int rows, float *sums);
INTERNAL void int8_block_avx512(const int8_t *w, const float *x, int64_t k, int rows, float *sums);
INTERNAL void f32_block_avx2(const float *w, const float *x, int64_t k, int rows, float *sums);
/* bfloat16 weights on activations widened once a call (gemv.c: widen_x; AVX2, for bfloat16 and float32
 * activations alike) */
typedef void (*bf16w_block_fn)(const uint16_t *w, const float *xw, int64_t k, int rows, float *sums);
INTERNAL void bf16_block_avx2(const uint16_t *w, const float *xw, int64_t k, int rows, float *sums);
INTERNAL void int8_block_avx2(const int8_t *w, const int16_t *xq, const float *xs, int64_t k, int rows,
                              float *sums);

/* ---- int4 (gemv.c says the format): one block of INT4_ROWS_* rows in torch's pack for that set, given
 * the activations as int16 per group (xq), 2^e per group (xs) and 2^e * sum(xq) per group (xsum); sz the
 * block's first (scale, zero) pair of group 0, n the matrix's rows (the stride of a group's pairs) ---- */
#define INT4_ROWS_AVX512 64
#define INT4_ROWS_AVX2 32
typedef void (*int4_block_fn)(const uint8_t *w, const uint16_t *sz, const int16_t *xq, const float *xs,
                              const float *xsum, int64_t n, int64_t k, int64_t group, float *out);
INTERNAL void int4_block_avx512(const uint8_t *w, const uint16_t *sz, const int16_t *xq, const float *xs,
                                const float *xsum, int64_t n, int64_t k, int64_t group, float *out);
INTERNAL void int4_block_avx2(const uint8_t *w, const uint16_t *sz, const int16_t *xq, const float *xs,
                              const float *xsum, int64_t n, int64_t k, int64_t group, float *out);

/* ---- one head of the decode attention (attention.c): scores s[l] = (q . k_l) * scale over len rows of
 * hd, and out = sum_l p_l v_l; hd a multiple of the set's vector up to 256 ---- */
/* What changes from one decode step to the next, read by step.c's ops and the attention's step entry (the
 * caller rewrites it; every other argument of a step's calls stays the same). */
typedef struct {
    int64_t index;   /* the token's slot in the KV cache */
    const void *cos; /* # (hd,) the step's rope tables, in the activations' dtype */
    const void *sin; /* # (hd,) signed: rope.signed_sin */
} qv_step;

typedef void (*scores_fn)(const float *q, const void *k, int64_t len, int64_t hd, float scale, float *s);
typedef void (*mix_fn)(const float *p, const void *v, int64_t len, int64_t hd, float *out);
INTERNAL void scores_f32_avx512(const float *q, const void *k, int64_t len, int64_t hd, float scale,
                                float *s);
INTERNAL void scores_bf16_avx512(const float *q, const void *k, int64_t len, int64_t hd, float scale,
                                 float *s);
INTERNAL void mix_f32_avx512(const float *p, const void *v, int64_t len, int64_t hd, float *out);
INTERNAL void mix_bf16_avx512(const float *p, const void *v, int64_t len, int64_t hd, float *out);
INTERNAL void scores_f32_avx2(const float *q, const void *k, int64_t len, int64_t hd, float scale, float *s);
INTERNAL void scores_bf16_avx2(const float *q, const void *k, int64_t len, int64_t hd, float scale, float *s);
INTERNAL void mix_f32_avx2(const float *p, const void *v, int64_t len, int64_t hd, float *out);
INTERNAL void mix_bf16_avx2(const float *p, const void *v, int64_t len, int64_t hd, float *out);

#endif
