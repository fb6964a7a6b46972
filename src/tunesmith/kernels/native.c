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
