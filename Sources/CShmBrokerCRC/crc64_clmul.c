// CRC-64/XZ by folding 128-bit blocks with carry-less multiplication (Gopal et al., "Fast CRC
// Computation for Generic Polynomials Using PCLMULQDQ", reflected variant). Eight accumulators
// fold 128 bytes per iteration (four, or one, for shorter input). Constants are bit-reflected
// x^n mod P for the ECMA-182 polynomial: for a fold over D bytes the low half uses n = 8D+63 and
// the high half n = 8D-1. The accumulators are combined by a shallow tree of folds onto the last
// one; its 128 bits become the 64-bit state by one fold (x^127) and one Barrett reduction; an
// 8-byte tail takes one more Barrett reduction and the last bytes a byte table.
//
// Wider paths, chosen at run time: with VPCLMULQDQ and AVX2, eight 256-bit accumulators fold 256
// bytes per iteration; with VPCLMULQDQ and AVX-512F, eight 512-bit accumulators fold 512. Each
// 128-bit lane of an accumulator folds exactly as in the 128-bit path, over the longer distance.
// At the end they are reduced in registers the same way (a tree onto the last accumulator, then
// its lanes onto its last lane), and the 128-bit path's finish handles the rest. The 128-bit
// code is compiled twice, in SSE and in VEX encoding. Target attributes stay on each function:
// no global -march.
#include "CShmBrokerCRC.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define SHMB_HAVE_CLMUL 1
#endif

static const uint64_t fold128_low = 0x8757d71d4fcc1000ull;   // x^1087 mod P, reflected
static const uint64_t fold128_high = 0xd7d86b2af73de740ull;  // x^1023 mod P, reflected
static const uint64_t fold16_low = 0xe05dd497ca393ae4ull;    // x^191 mod P, reflected
static const uint64_t fold16_high = 0xdabe95afc7875f40ull;   // x^127 mod P, reflected
// Barrett reduction of 64 message bits (reflected): mu = x^128 div P without its x^64 term, and
// the polynomial without its x^64 term, both bit-reflected.
static const uint64_t barrett_mu = 0x4e1f23360b94b1eaull;
static const uint64_t barrett_poly = 0xc96c5795d7870f42ull;
static const uint64_t fold256_low = 0x8260adf2381ad81cull;   // x^2111 mod P, reflected
static const uint64_t fold256_high = 0xf31fd9271e228b79ull;  // x^2047 mod P, reflected
static const uint64_t fold512_low = 0x6b6563c31e5df640ull;   // x^4159 mod P, reflected
static const uint64_t fold512_high = 0x430af18f45bfec70ull;  // x^4095 mod P, reflected
// The wider paths' reductions fold their accumulators onto the last one, over 64, 48 and 32 bytes.
static const uint64_t fold64_low = 0x6ae3efbb9dd441f3ull;    // x^575 mod P, reflected
static const uint64_t fold64_high = 0x081f6054a7842df4ull;   // x^511 mod P, reflected
static const uint64_t fold48_low = 0xb5ea1af9c013aca4ull;    // x^447 mod P, reflected
static const uint64_t fold48_high = 0x69a35d91c3730254ull;   // x^383 mod P, reflected
static const uint64_t fold32_low = 0x60095b008a9efa44ull;    // x^319 mod P, reflected
static const uint64_t fold32_high = 0x3be653a30fe1af51ull;   // x^255 mod P, reflected

static uint64_t table[256];

static void build_table(void) {
    for (int b = 0; b < 256; b++) {
        uint64_t c = (uint64_t)b;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0xC96C5795D7870F42ull : c >> 1;
        table[b] = c;
    }
}

static uint64_t bytewise(uint64_t state, const uint8_t *p, size_t n) {
    while (n--) state = table[(state ^ *p++) & 0xFF] ^ (state >> 8);
    return state;
}

/// The best path this CPU and OS support, found once with CPUID and XGETBV.
static int detect(void) {
    int best = SHMB_CRC64_PORTABLE;
#ifdef SHMB_HAVE_CLMUL
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return best;
    if (!(c & bit_PCLMUL) || !(c & bit_SSE4_1)) return best;
    best = SHMB_CRC64_CLMUL128;
    // 256- and 512-bit registers need the OS to save their state (OSXSAVE, then XCR0's bits).
    if (!(c & bit_OSXSAVE) || !(c & bit_AVX)) return best;
    unsigned xcr0_low, xcr0_high;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    if ((xcr0_low & 0x6) != 0x6) return best;
    best = SHMB_CRC64_CLMUL128_AVX;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return best;
    if (!(c & bit_VPCLMULQDQ) || !(b & bit_AVX2)) return best;
    best = SHMB_CRC64_VPCLMUL256;
    if ((b & bit_AVX512F) && (xcr0_low & 0xE6) == 0xE6) best = SHMB_CRC64_VPCLMUL512;
#endif
    return best;
}

static int best_path = -1;

int shmb_crc64_best_path(void) {
    if (best_path < 0) {
        build_table();
        best_path = detect();
    }
    return best_path;
}

int shmb_crc64_hardware_available(void) { return shmb_crc64_best_path() >= SHMB_CRC64_CLMUL128; }

int shmb_crc64_path_supported(int path) { return path >= SHMB_CRC64_PORTABLE && path <= shmb_crc64_best_path(); }

#ifdef SHMB_HAVE_CLMUL

/// The CRC state after feeding the 8 little-endian bytes of `v` to a zero state: v * x^64 mod P,
/// by Barrett reduction with two carry-less multiplies (instead of eight table steps).
__attribute__((target("pclmul,sse4.1")))
static inline uint64_t reduce64(uint64_t v) {
    const __m128i k = _mm_set_epi64x((long long)barrett_poly, (long long)barrett_mu);
    __m128i t = _mm_clmulepi64_si128(_mm_cvtsi64_si128((long long)v), k, 0x00);
    uint64_t q = v ^ ((uint64_t)_mm_cvtsi128_si64(t) << 1);
    __m128i r = _mm_clmulepi64_si128(_mm_cvtsi64_si128((long long)q), k, 0x10);
    return ((uint64_t)_mm_cvtsi128_si64(r) >> 63) | ((uint64_t)_mm_extract_epi64(r, 1) << 1);
}

/// Feeds fewer than 16 bytes: eight at a time by Barrett reduction, the rest through the table.
__attribute__((target("pclmul,sse4.1")))
static inline uint64_t short_tail(uint64_t state, const uint8_t *p, size_t n) {
    if (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        state = reduce64(state ^ word);
        p += 8;
        n -= 8;
    }
    return bytewise(state, p, n);
}

__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold(__m128i x, __m128i constants) {
    return _mm_xor_si128(_mm_clmulepi64_si128(x, constants, 0x00), _mm_clmulepi64_si128(x, constants, 0x11));
}

/// Folds the remaining whole 16-byte blocks into `acc`, reduces it to the CRC state and feeds the
/// last bytes (fewer than 16), copying them first when `destination` is set.
__attribute__((target("pclmul,sse4.1"), always_inline))
static inline uint64_t finish128(__m128i acc, uint8_t *destination, const uint8_t *p, size_t n) {
    const __m128i k16 = _mm_set_epi64x((long long)fold16_high, (long long)fold16_low);
    while (n >= 16) {
        __m128i block = _mm_loadu_si128((const __m128i *)p);
        if (destination) {
            _mm_storeu_si128((__m128i *)destination, block);
            destination += 16;
        }
        acc = _mm_xor_si128(fold(acc, k16), block);
        p += 16;
        n -= 16;
    }
    // The folded remainder, read as 16 message bytes with a zero state, carries the whole CRC. Its
    // first eight bytes times x^127 (one multiply) make a 128-bit value whose high half joins the
    // next eight, which one Barrett reduction brings to 64 bits: reduce64(reduce64(a) ^ b) in
    // three multiplies rather than four.
    __m128i moved = _mm_clmulepi64_si128(acc, k16, 0x10);
    uint64_t result = reduce64((uint64_t)_mm_cvtsi128_si64(moved) ^ (uint64_t)_mm_extract_epi64(acc, 1))
                      ^ (uint64_t)_mm_extract_epi64(moved, 1);
    if (destination) {
        memcpy(destination, p, n);
        p = destination;
    }
    return short_tail(result, p, n);
}

/// Four consecutive 16-byte blocks folded onto the last in one step: the first over 48 bytes, the
/// second over 32, the third over 16 (three independent multiplies rather than a chain of three).
__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold4(__m128i x0, __m128i x1, __m128i x2, __m128i x3) {
    const __m128i k48 = _mm_set_epi64x((long long)fold48_high, (long long)fold48_low);
    const __m128i k32 = _mm_set_epi64x((long long)fold32_high, (long long)fold32_low);
    const __m128i k16 = _mm_set_epi64x((long long)fold16_high, (long long)fold16_low);
    return _mm_xor_si128(_mm_xor_si128(fold(x0, k48), fold(x1, k32)), _mm_xor_si128(fold(x2, k16), x3));
}

/// The 128-bit path. Always inlined, so that each caller compiles it for its own target: SSE
/// encoding in ``fold128_sse``, VEX encoding in ``fold128_avx`` and in the wider paths' tails.
__attribute__((target("pclmul,sse4.1"), always_inline))
static inline uint64_t fold128(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    // Whatever is copied is checksummed from the copy: the source may be memory another process
    // keeps writing (a producer's ring), and the CRC must match the bytes that were stored.
    if (n < 16) {
        if (destination) {
            memcpy(destination, p, n);
            p = destination;
        }
        return short_tail(state, p, n);
    }
    // Eight accumulators from 128 bytes on, four from 64, one below; each set is combined by a
    // shallow tree so that a short payload does not wait on a chain of dependent multiplies.
    const __m128i initial = _mm_cvtsi64_si128((long long)state);
    __m128i acc;
    if (n >= 128) {
        const __m128i k128 = _mm_set_epi64x((long long)fold128_high, (long long)fold128_low);
        __m128i x[8];
        for (int i = 0; i < 8; i++) x[i] = _mm_loadu_si128((const __m128i *)(p + 16 * i));
        if (destination) {
            for (int i = 0; i < 8; i++) _mm_storeu_si128((__m128i *)(destination + 16 * i), x[i]);
            destination += 128;
        }
        x[0] = _mm_xor_si128(x[0], initial);
        p += 128;
        n -= 128;
        while (n >= 128) {
            for (int i = 0; i < 8; i++) {
                __m128i block = _mm_loadu_si128((const __m128i *)(p + 16 * i));
                if (destination) _mm_storeu_si128((__m128i *)(destination + 16 * i), block);
                x[i] = _mm_xor_si128(fold(x[i], k128), block);
            }
            if (destination) destination += 128;
            p += 128;
            n -= 128;
        }
        const __m128i k64 = _mm_set_epi64x((long long)fold64_high, (long long)fold64_low);
        for (int i = 0; i < 4; i++) x[i + 4] = _mm_xor_si128(fold(x[i], k64), x[i + 4]);
        acc = fold4(x[4], x[5], x[6], x[7]);
    } else if (n >= 64) {
        __m128i x0 = _mm_loadu_si128((const __m128i *)p), x1 = _mm_loadu_si128((const __m128i *)(p + 16));
        __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32)), x3 = _mm_loadu_si128((const __m128i *)(p + 48));
        if (destination) {
            _mm_storeu_si128((__m128i *)destination, x0);
            _mm_storeu_si128((__m128i *)(destination + 16), x1);
            _mm_storeu_si128((__m128i *)(destination + 32), x2);
            _mm_storeu_si128((__m128i *)(destination + 48), x3);
            destination += 64;
        }
        acc = fold4(_mm_xor_si128(x0, initial), x1, x2, x3);
        p += 64;
        n -= 64;
    } else {
        acc = _mm_loadu_si128((const __m128i *)p);
        if (destination) {
            _mm_storeu_si128((__m128i *)destination, acc);
            destination += 16;
        }
        acc = _mm_xor_si128(acc, initial);
        p += 16;
        n -= 16;
    }
    return finish128(acc, destination, p, n);
}

__attribute__((target("pclmul,sse4.1")))
static uint64_t fold128_sse(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    return fold128(state, destination, p, n);
}

__attribute__((target("avx,pclmul,sse4.1")))
static uint64_t fold128_avx(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    return fold128(state, destination, p, n);
}

/// A 128-bit pair of fold constants for a distance: (x^(8D+63), x^(8D-1)) mod P, reflected.
#define SHMB_PAIR(low, high) (long long)(high), (long long)(low)

/// Folds the running `state` over n >= 256 bytes with eight 256-bit accumulators.
__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.1")))
static uint64_t fold256(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
#define FOLD256(x, k) _mm256_xor_si256(_mm256_clmulepi64_epi128((x), (k), 0x00), _mm256_clmulepi64_epi128((x), (k), 0x11))
    const __m256i k256 = _mm256_set_epi64x(SHMB_PAIR(fold256_low, fold256_high), SHMB_PAIR(fold256_low, fold256_high));
    __m256i x[8];
    for (int i = 0; i < 8; i++) x[i] = _mm256_loadu_si256((const __m256i *)(p + 32 * i));
    if (destination) {
        for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)(destination + 32 * i), x[i]);
        destination += 256;
    }
    x[0] = _mm256_xor_si256(x[0], _mm256_set_epi64x(0, 0, 0, (long long)state));
    p += 256;
    n -= 256;
    while (n >= 256) {
        for (int i = 0; i < 8; i++) {
            __m256i block = _mm256_loadu_si256((const __m256i *)(p + 32 * i));
            if (destination) _mm256_storeu_si256((__m256i *)(destination + 32 * i), block);
            x[i] = _mm256_xor_si256(FOLD256(x[i], k256), block);
        }
        if (destination) destination += 256;
        p += 256;
        n -= 256;
    }
    // In registers, a tree: the first four accumulators onto the last four (128 bytes on), then
    // two onto two (64), then one onto the last (32); whole 32-byte blocks left join that one.
    const __m256i k128 = _mm256_set_epi64x(SHMB_PAIR(fold128_low, fold128_high), SHMB_PAIR(fold128_low, fold128_high));
    const __m256i k64 = _mm256_set_epi64x(SHMB_PAIR(fold64_low, fold64_high), SHMB_PAIR(fold64_low, fold64_high));
    const __m256i k32 = _mm256_set_epi64x(SHMB_PAIR(fold32_low, fold32_high), SHMB_PAIR(fold32_low, fold32_high));
    for (int i = 0; i < 4; i++) x[i + 4] = _mm256_xor_si256(FOLD256(x[i], k128), x[i + 4]);
    for (int i = 4; i < 6; i++) x[i + 2] = _mm256_xor_si256(FOLD256(x[i], k64), x[i + 2]);
    __m256i acc = _mm256_xor_si256(FOLD256(x[6], k32), x[7]);
    while (n >= 32) {
        __m256i block = _mm256_loadu_si256((const __m256i *)p);
        if (destination) {
            _mm256_storeu_si256((__m256i *)destination, block);
            destination += 32;
        }
        acc = _mm256_xor_si256(FOLD256(acc, k32), block);
        p += 32;
        n -= 32;
    }
    const __m128i k16 = _mm_set_epi64x(SHMB_PAIR(fold16_low, fold16_high));
    __m128i last = _mm_xor_si128(fold(_mm256_castsi256_si128(acc), k16), _mm256_extracti128_si256(acc, 1));
    return finish128(last, destination, p, n);
#undef FOLD256
}

/// Folds the running `state` over n >= 512 bytes with eight 512-bit accumulators.
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1")))
static uint64_t fold512(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
// One fold and the XOR with the next block in a single three-way XOR (ternary logic 0x96).
#define FOLD512_XOR(x, k, y) _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128((x), (k), 0x00), \
                                                      _mm512_clmulepi64_epi128((x), (k), 0x11), (y), 0x96)
#define BROADCAST(low, high) _mm512_broadcast_i32x4(_mm_set_epi64x(SHMB_PAIR(low, high)))
    const __m512i k512 = BROADCAST(fold512_low, fold512_high);
    __m512i x[8];
    for (int i = 0; i < 8; i++) x[i] = _mm512_loadu_si512((const void *)(p + 64 * i));
    if (destination) {
        for (int i = 0; i < 8; i++) _mm512_storeu_si512((void *)(destination + 64 * i), x[i]);
        destination += 512;
    }
    x[0] = _mm512_xor_si512(x[0], _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, (long long)state));
    p += 512;
    n -= 512;
    while (n >= 512) {
        for (int i = 0; i < 8; i++) {
            __m512i block = _mm512_loadu_si512((const void *)(p + 64 * i));
            if (destination) _mm512_storeu_si512((void *)(destination + 64 * i), block);
            x[i] = FOLD512_XOR(x[i], k512, block);
        }
        if (destination) destination += 512;
        p += 512;
        n -= 512;
    }
    // In registers, a tree as in the 256-bit path: four onto four (256 bytes on), two onto two
    // (128), one onto the last (64); whole 64-byte blocks left join that one.
    const __m512i k256 = BROADCAST(fold256_low, fold256_high);
    const __m512i k128 = BROADCAST(fold128_low, fold128_high);
    const __m512i k64 = BROADCAST(fold64_low, fold64_high);
    for (int i = 0; i < 4; i++) x[i + 4] = FOLD512_XOR(x[i], k256, x[i + 4]);
    for (int i = 4; i < 6; i++) x[i + 2] = FOLD512_XOR(x[i], k128, x[i + 2]);
    __m512i acc = FOLD512_XOR(x[6], k64, x[7]);
    while (n >= 64) {
        __m512i block = _mm512_loadu_si512((const void *)p);
        if (destination) {
            _mm512_storeu_si512((void *)destination, block);
            destination += 64;
        }
        acc = FOLD512_XOR(acc, k64, block);
        p += 64;
        n -= 64;
    }
    // The four 128-bit lanes onto the last: the first over 48 bytes, the second 32, the third 16.
    const __m512i k_lanes = _mm512_set_epi64(0, 0, SHMB_PAIR(fold16_low, fold16_high),
                                             SHMB_PAIR(fold32_low, fold32_high), SHMB_PAIR(fold48_low, fold48_high));
    __m512i lanes = _mm512_xor_si512(_mm512_clmulepi64_epi128(acc, k_lanes, 0x00), _mm512_clmulepi64_epi128(acc, k_lanes, 0x11));
    __m128i last = _mm_xor_si128(_mm_xor_si128(_mm512_extracti32x4_epi32(lanes, 0), _mm512_extracti32x4_epi32(lanes, 1)),
                                 _mm_xor_si128(_mm512_extracti32x4_epi32(lanes, 2), _mm512_extracti32x4_epi32(acc, 3)));
    return finish128(last, destination, p, n);
#undef BROADCAST
#undef FOLD512_XOR
}

/// The wider paths start with one full set of accumulators: 256 or 512 bytes.
enum { wide256_minimum = 256, wide512_minimum = 512 };

static uint64_t fold_path(int path, uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    if (path >= SHMB_CRC64_VPCLMUL512 && n >= wide512_minimum) return fold512(state, destination, p, n);
    if (path >= SHMB_CRC64_VPCLMUL256 && n >= wide256_minimum) return fold256(state, destination, p, n);
    if (path >= SHMB_CRC64_CLMUL128_AVX) return fold128_avx(state, destination, p, n);
    if (path >= SHMB_CRC64_CLMUL128) return fold128_sse(state, destination, p, n);
    if (destination) {
        memcpy(destination, p, n);
        p = destination;
    }
    return bytewise(state, p, n);
}

#else
static uint64_t fold_path(int path, uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    (void)path;
    if (destination) {
        memcpy(destination, p, n);
        p = destination;
    }
    return bytewise(state, p, n);
}
#endif

static int clamp(int path) {
    int best = shmb_crc64_best_path();
    return path > best ? best : path;
}

uint64_t shmb_crc64_update_path(int path, uint64_t state, const void *data, size_t n) {
    return fold_path(clamp(path), state, NULL, (const uint8_t *)data, n);
}

uint64_t shmb_crc64_copy_path(int path, uint64_t state, void *destination, const void *source, size_t n) {
    return fold_path(clamp(path), state, (uint8_t *)destination, (const uint8_t *)source, n);
}
