/* LoRA input dropout on CPU in one pass over x (see kernels/dropout.py and kernels/native.py).
 *
 * The keep-mask is a pure function of (seed, element index): element i reads the 16-bit lane
 * i % 4 (little-endian) of the 64-bit word SplitMix64(seed + (i / 4 + 1) * GAMMA), and is kept
 * when that lane is >= threshold (drop probability threshold / 65536). The numpy reference in
 * dropout.py computes the same words, so both paths draw the same masks for the same seed and
 * any thread count. Masks are stored packed, one bit per element, least significant bit first
 * (numpy's packbits(bitorder="little")); the last byte's spare bits are zero.
 *
 * forward:  xk = keep ? x * scale : 0, and the packed mask.
 * apply:    dst = keep ? src * scale : 0 for a saved mask (the backward pass: the input gradient and the
 *           dropped x; dst may be src).
 * unpack:   the saved mask as one 0/1 byte per element (the compiled backward multiplies by it inside
 *           its fused kernels, where a bit gather would run element by element).
 *
 * LoRA's A projection with the dropout inside it (AVX-512 only, rows a multiple of 64 long, so that
 * every row is whole mask blocks; dropout.py takes the steps above otherwise):
 * lora_a:        h = scale * (keep . x) @ A^T and the packed mask, without writing the dropped x
 *                (the rows are dropped into a small buffer that stays in cache).
 * lora_a_dx:     dx = scale * keep . (dh @ A), the input gradient, masked as it is written.
 * lora_a_dw:     dA = scale * dh^T @ (keep . x), x read once through the mask (masked loads).
 * A product with r = 8-64 columns is memory-bound: MKL's GEMM reaches ~70 GFLOP/s on these shapes,
 * and the separate dropout pass writes and reads a copy of x; these keep x's rows in registers/L1.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define TUNESMITH_AVX512 1
#endif

#define GAMMA 0x9E3779B97F4A7C15ULL
#define BLOCK 64 /* elements per block: 16 words, 8 mask bytes */

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#ifdef TUNESMITH_AVX512
static inline __m512i mix64x8(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ULL));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64((long long)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* The 64 keep bits of block `b` (bit j: element 64 * b + j). */
static inline uint64_t block_bits(uint64_t seed, int64_t b, uint16_t threshold) {
    const __m512i step = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);
    __m512i first = _mm512_add_epi64(_mm512_set1_epi64((long long)(b * (BLOCK / 4))), step);
    __m512i second = _mm512_add_epi64(first, _mm512_set1_epi64(8));
    __m512i gamma = _mm512_set1_epi64((long long)GAMMA), base = _mm512_set1_epi64((long long)seed);
    __m512i w0 = mix64x8(_mm512_add_epi64(base, _mm512_mullo_epi64(first, gamma)));
    __m512i w1 = mix64x8(_mm512_add_epi64(base, _mm512_mullo_epi64(second, gamma)));
    __m512i t = _mm512_set1_epi16((short)threshold);
    uint64_t lo = (uint32_t)_mm512_cmpge_epu16_mask(w0, t), hi = (uint32_t)_mm512_cmpge_epu16_mask(w1, t);
    return lo | (hi << 32);
}

static inline void unpack(uint8_t *out, uint64_t bits, int m) {
    if (m < BLOCK) {
        for (int j = 0; j < m; j++) out[j] = (uint8_t)((bits >> j) & 1);
        return;
    }
    _mm512_storeu_si512((void *)out, _mm512_maskz_set1_epi8((__mmask64)bits, 1));
}

static inline void apply(const float *src, float *dst, uint64_t bits, int m, float scale) {
    if (m < BLOCK) {
        for (int j = 0; j < m; j++) dst[j] = ((bits >> j) & 1) ? src[j] * scale : 0.0f;
        return;
    }
    __m512 s = _mm512_set1_ps(scale);
    for (int q = 0; q < 4; q++)
        _mm512_storeu_ps(dst + 16 * q, _mm512_maskz_mul_ps((__mmask16)(bits >> (16 * q)), _mm512_loadu_ps(src + 16 * q), s));
}
#else
/* Portable code shaped for the compiler's vectoriser: lanes compared into bytes, bytes gathered
 * into bits with one multiply per 8, bits expanded to bytes again for the masked multiply. */
static inline uint64_t block_bits(uint64_t seed, int64_t b, uint16_t threshold) {
    uint64_t words[BLOCK / 4];
    uint16_t lanes[BLOCK];
    uint8_t keep[BLOCK];
    for (int k = 0; k < BLOCK / 4; k++) words[k] = mix64(seed + (uint64_t)(b * (BLOCK / 4) + k + 1) * GAMMA);
    memcpy(lanes, words, sizeof(lanes));
    for (int j = 0; j < BLOCK; j++) keep[j] = lanes[j] >= threshold;
    uint64_t bits = 0;
    for (int q = 0; q < BLOCK / 8; q++) {
        uint64_t v;
        memcpy(&v, keep + 8 * q, 8); /* eight 0/1 bytes -> one byte, byte i -> bit i */
        bits |= ((v * 0x0102040810204080ULL) >> 56) << (8 * q);
    }
    return bits;
}

static inline void unpack(uint8_t *out, uint64_t bits, int m) {
    for (int j = 0; j < m; j++) out[j] = (uint8_t)((bits >> j) & 1);
}

static inline void apply(const float *src, float *dst, uint64_t bits, int m, float scale) {
    int32_t keep[BLOCK];
    for (int j = 0; j < BLOCK; j++) keep[j] = (int32_t)((bits >> j) & 1);
    for (int j = 0; j < m; j++) dst[j] = keep[j] ? src[j] * scale : 0.0f;
}
#endif

static inline int block_len(int64_t n, int64_t b) {
    int64_t left = n - b * BLOCK;
    return left < BLOCK ? (int)left : BLOCK;
}

void tunesmith_dropout_forward(const float *x, float *xk, uint8_t *packed, int64_t n, uint64_t seed,
                               uint32_t threshold, float scale, int threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int m = block_len(n, b);
        uint64_t bits = block_bits(seed, b, (uint16_t)threshold);
        if (m < BLOCK) bits &= (1ULL << m) - 1;
        memcpy(packed + b * 8, &bits, (size_t)(m + 7) / 8);
        apply(x + b * BLOCK, xk + b * BLOCK, bits, m, scale);
    }
}

static inline uint64_t saved_bits(const uint8_t *packed, int64_t b, int m) {
    uint64_t bits = 0;
    memcpy(&bits, packed + b * 8, (size_t)(m + 7) / 8);
    return bits;
}

void tunesmith_dropout_apply(const float *src, float *dst, const uint8_t *packed, int64_t n, float scale,
                             int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < (n + BLOCK - 1) / BLOCK; b++)
        apply(src + b * BLOCK, dst + b * BLOCK, saved_bits(packed, b, block_len(n, b)), block_len(n, b), scale);
}

void tunesmith_unpack_bits(const uint8_t *packed, uint8_t *out, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < (n + BLOCK - 1) / BLOCK; b++)
        unpack(out + b * BLOCK, saved_bits(packed, b, block_len(n, b)), block_len(n, b));
}

#ifdef TUNESMITH_AVX512
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ROWS 16 /* rows per micro-tile: independent FMA chains, one weight load shared by all */

/* h[R rows] = scale * xd[R][cols] @ At[cols][rank16], R fixed at compile time (the accumulators stay in registers). */
#define ROWS_TIMES_AT(R)                                                                                      \
    static void rows_times_at_##R(const float *xd, const float *at, float *h, int64_t cols, int64_t rank16,    \
                                  float scale) {                                                              \
        for (int64_t jb = 0; jb < rank16; jb += 16) {                                                          \
            __m512 acc[R];                                                                                    \
            for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                         \
            for (int64_t c = 0; c < cols; c++) {                                                              \
                __m512 a = _mm512_loadu_ps(at + c * rank16 + jb);                                             \
                for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xd[r * cols + c]), a, acc[r]); \
            }                                                                                                 \
            __m512 s = _mm512_set1_ps(scale);                                                                 \
            for (int r = 0; r < R; r++) _mm512_storeu_ps(h + r * rank16 + jb, _mm512_mul_ps(acc[r], s));      \
        }                                                                                                     \
    }
ROWS_TIMES_AT(16)
ROWS_TIMES_AT(1)

static void rows_times_at(const float *xd, const float *at, float *h, int R, int64_t cols, int64_t rank16, float scale) {
    if (R == ROWS) {
        rows_times_at_16(xd, at, h, cols, rank16, scale);
        return;
    }
    for (int r = 0; r < R; r++) rows_times_at_1(xd + r * cols, at, h + r * rank16, cols, rank16, scale);
}

/* A [rank, cols] -> At [cols, rank16] (rank16: rank rounded up to 16, zero padded). */
static float *transpose_padded(const float *a, int64_t rank, int64_t cols, int64_t rank16) {
    float *at = (float *)aligned_alloc(64, (size_t)(cols * rank16 * sizeof(float) + 63) / 64 * 64);
    if (!at) return NULL;
    memset(at, 0, (size_t)(cols * rank16) * sizeof(float));
    for (int64_t j = 0; j < rank; j++)
        for (int64_t c = 0; c < cols; c++) at[c * rank16 + j] = a[j * cols + c];
    return at;
}

/* Returns 0 when done, -1 when it cannot run (rows not whole blocks, no memory): the caller falls back. */
int tunesmith_lora_a(const float *x, const float *a, float *h, uint8_t *packed, int64_t rows, int64_t cols,
                     int64_t rank, uint64_t seed, uint32_t threshold, float scale, int threads) {
    if (cols % BLOCK) return -1;
    if (threads < 1) threads = 1;
    int64_t rank16 = (rank + 15) / 16 * 16, blocks_per_row = cols / BLOCK, own = ROWS * (cols + rank16);
    float *at = transpose_padded(a, rank, cols, rank16);
    /* each thread's dropped rows and products (not calloc: see tunesmith_lora_a_dw) */
    float *scratch = (float *)aligned_alloc(64, (size_t)(threads * own * sizeof(float) + 63) / 64 * 64);
    if (!at || !scratch) {
        free(at);
        free(scratch);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *xd = scratch + t * own, *hh = xd + ROWS * cols;
#pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
            int R = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
            for (int r = 0; r < R; r++)
                for (int64_t k = 0; k < blocks_per_row; k++) {
                    int64_t b = (r0 + r) * blocks_per_row + k;
                    uint64_t bits = block_bits(seed, b, (uint16_t)threshold);
                    memcpy(packed + b * 8, &bits, 8);
                    apply(x + b * BLOCK, xd + r * cols + k * BLOCK, bits, BLOCK, 1.0f);
                }
            rows_times_at(xd, at, hh, R, cols, rank16, scale);
            for (int r = 0; r < R; r++) memcpy(h + (r0 + r) * rank, hh + r * rank16, (size_t)rank * sizeof(float));
        }
    }
    free(scratch);
    free(at);
    return 0;
}

/* dx for R rows from r0 (R fixed at compile time). */
#define DX_ROWS(R)                                                                                            \
    static void dx_rows_##R(const float *dh, const float *a, const uint8_t *packed, float *dx, int64_t r0,     \
                            int64_t cols, int64_t rank, __m512 s) {                                           \
        for (int64_t c = 0; c < cols; c += 16) {                                                              \
            __m512 acc[R];                                                                                    \
            for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                         \
            for (int64_t j = 0; j < rank; j++) {                                                              \
                __m512 w = _mm512_loadu_ps(a + j * cols + c);                                                 \
                for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(dh[(r0 + r) * rank + j]), w, acc[r]); \
            }                                                                                                 \
            for (int r = 0; r < R; r++) {                                                                     \
                int64_t i = (r0 + r) * cols + c; /* a multiple of 16: its 16 bits are one aligned uint16 */   \
                uint16_t keep;                                                                                \
                memcpy(&keep, packed + i / 8, 2);                                                             \
                _mm512_storeu_ps(dx + i, _mm512_maskz_mul_ps((__mmask16)keep, acc[r], s));                    \
            }                                                                                                 \
        }                                                                                                     \
    }
DX_ROWS(16)
DX_ROWS(1)

/* dx[rows, cols] = scale * keep . (dh[rows, rank] @ A[rank, cols]). */
int tunesmith_lora_a_dx(const float *dh, const float *a, const uint8_t *packed, float *dx, int64_t rows,
                        int64_t cols, int64_t rank, float scale, int threads) {
    if (cols % BLOCK) return -1;
    __m512 s = _mm512_set1_ps(scale);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        if (rows - r0 >= ROWS)
            dx_rows_16(dh, a, packed, dx, r0, cols, rank, s);
        else
            for (int64_t r = r0; r < rows; r++) dx_rows_1(dh, a, packed, dx, r, cols, rank, s);
    }
    return 0;
}

/* acc[j0 .. j0+J, all columns] += g[RB rows][rank] (from column j0)^T @ xb[RB rows][cols], J fixed at compile time:
 * per 16-column tile the J accumulators stay in registers while the block's rows (in L1) stream through. */
#define DW_BLOCK(J)                                                                                           \
    static void dw_block_##J(const float *g, const float *xb, float *acc, int rb, int64_t cols, int64_t rank,  \
                             int64_t j0) {                                                                    \
        for (int64_t c = 0; c < cols; c += 16) {                                                              \
            __m512 sum[J];                                                                                    \
            for (int j = 0; j < J; j++) sum[j] = _mm512_loadu_ps(acc + (j0 + j) * cols + c);                  \
            for (int r = 0; r < rb; r++) {                                                                    \
                __m512 xv = _mm512_loadu_ps(xb + r * cols + c);                                               \
                for (int j = 0; j < J; j++) sum[j] = _mm512_fmadd_ps(_mm512_set1_ps(g[r * rank + j0 + j]), xv, sum[j]); \
            }                                                                                                 \
            for (int j = 0; j < J; j++) _mm512_storeu_ps(acc + (j0 + j) * cols + c, sum[j]);                  \
        }                                                                                                     \
    }
DW_BLOCK(16)
DW_BLOCK(8)
DW_BLOCK(1)

#define DW_ROWS 8 /* rows of x dropped into an L1 buffer at a time (read in order: the prefetchers keep up) */

/* dA[rank, cols] = scale * dh[rows, rank]^T @ (keep . x[rows, cols]); each thread sums its rows, then the sums add. */
int tunesmith_lora_a_dw(const float *dh, const float *x, const uint8_t *packed, float *da, int64_t rows,
                        int64_t cols, int64_t rank, float scale, int threads) {
    if (cols % BLOCK) return -1;
    if (threads < 1) threads = 1;
    int64_t size = rank * cols, own = size + DW_ROWS * cols, blocks_per_row = cols / BLOCK;
    /* each thread's sums and dropped rows; not calloc: jemalloc's hands back fresh zero pages for it,
     * page-faulted in at every call (4x slower) */
    float *scratch = (float *)aligned_alloc(64, (size_t)(threads * own * sizeof(float) + 63) / 64 * 64);
    if (!scratch) return -1;
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, n = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
#pragma omp single
        used = n;
        float *acc = scratch + t * own, *xb = acc + size;
        memset(acc, 0, (size_t)size * sizeof(float));
        int64_t begin = rows * t / n, end = rows * (t + 1) / n;
        for (int64_t r0 = begin; r0 < end; r0 += DW_ROWS) {
            int rb = end - r0 < DW_ROWS ? (int)(end - r0) : DW_ROWS;
            for (int r = 0; r < rb; r++)
                for (int64_t k = 0; k < blocks_per_row; k++) {
                    int64_t b = (r0 + r) * blocks_per_row + k;
                    apply(x + b * BLOCK, xb + r * cols + k * BLOCK, saved_bits(packed, b, BLOCK), BLOCK, 1.0f);
                }
            const float *g = dh + r0 * rank;
            int64_t j0 = 0;
            for (; j0 + 16 <= rank; j0 += 16) dw_block_16(g, xb, acc, rb, cols, rank, j0);
            for (; j0 + 8 <= rank; j0 += 8) dw_block_8(g, xb, acc, rb, cols, rank, j0);
            for (; j0 < rank; j0++) dw_block_1(g, xb, acc, rb, cols, rank, j0);
        }
    }
    for (int64_t i = 0; i < size; i++) {
        float sum = 0.0f;
        for (int t = 0; t < used; t++) sum += scratch[t * own + i];
        da[i] = sum * scale;
    }
    free(scratch);
    return 0;
}
#else
int tunesmith_lora_a(const float *x, const float *a, float *h, uint8_t *packed, int64_t rows, int64_t cols,
                     int64_t rank, uint64_t seed, uint32_t threshold, float scale, int threads) {
    return -1;
}
int tunesmith_lora_a_dx(const float *dh, const float *a, const uint8_t *packed, float *dx, int64_t rows,
                        int64_t cols, int64_t rank, float scale, int threads) {
    return -1;
}
int tunesmith_lora_a_dw(const float *dh, const float *x, const uint8_t *packed, float *da, int64_t rows,
                        int64_t cols, int64_t rank, float scale, int threads) {
    return -1;
}
#endif
