// CRC-64/XZ by folding 128-bit blocks with carry-less multiplication (Gopal et al., "Fast CRC
// Computation for Generic Polynomials Using PCLMULQDQ", reflected variant). Eight accumulators
// fold 128 bytes per iteration; the last 16-byte remainder and any tail go through a byte table,
// which avoids a Barrett reduction. Constants are bit-reflected x^n mod P for the ECMA-182
// polynomial: for a fold over D bytes the low half uses n = 8D+63 and the high half n = 8D-1.
//
// Wider paths, chosen at run time: with VPCLMULQDQ and AVX2, eight 256-bit accumulators fold 256
// bytes per iteration; with VPCLMULQDQ and AVX-512F, eight 512-bit accumulators fold 512. Each
// 128-bit lane of an accumulator folds exactly as in the 128-bit path, over the longer distance.
// At the end the accumulators, stored in order, are a message whose CRC from a zero state is the
// running state (the same fact the 128-bit path uses for its last block), so the 128-bit path
// reduces them and handles the tail. Target attributes stay on each function: no global -march.
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

__attribute__((target("pclmul,sse4.1")))
static uint64_t fold128(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    // Whatever is copied is checksummed from the copy: the source may be memory another process
    // keeps writing (a producer's ring), and the CRC must match the bytes that were stored.
    if (n < 16) {
        if (destination) {
            memcpy(destination, p, n);
            p = destination;
        }
        return short_tail(state, p, n);
    }
    const __m128i k16 = _mm_set_epi64x((long long)fold16_high, (long long)fold16_low);
    __m128i acc;
    if (n >= 128) {
        const __m128i k128 = _mm_set_epi64x((long long)fold128_high, (long long)fold128_low);
        __m128i x[8];
        for (int i = 0; i < 8; i++) x[i] = _mm_loadu_si128((const __m128i *)(p + 16 * i));
        if (destination) {
            for (int i = 0; i < 8; i++) _mm_storeu_si128((__m128i *)(destination + 16 * i), x[i]);
            destination += 128;
        }
        x[0] = _mm_xor_si128(x[0], _mm_cvtsi64_si128((long long)state));
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
        acc = x[0];
        for (int i = 1; i < 8; i++) acc = _mm_xor_si128(fold(acc, k16), x[i]);
    } else {
        // 16 to 127 bytes: one accumulator, so that short payloads need only 16 table steps.
        acc = _mm_loadu_si128((const __m128i *)p);
        if (destination) {
            _mm_storeu_si128((__m128i *)destination, acc);
            destination += 16;
        }
        acc = _mm_xor_si128(acc, _mm_cvtsi64_si128((long long)state));
        p += 16;
        n -= 16;
    }
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
    // The folded remainder, read as 16 message bytes with a zero state, carries the whole CRC:
    // its first eight bytes, then the next eight, each reduced by Barrett.
    uint64_t result = reduce64(reduce64((uint64_t)_mm_cvtsi128_si64(acc)) ^ (uint64_t)_mm_extract_epi64(acc, 1));
    if (destination) {
        memcpy(destination, p, n);
        p = destination;
    }
    return short_tail(result, p, n);
}

/// Folds the running `state` over n >= 512 bytes with eight 256-bit accumulators.
__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.1")))
static uint64_t fold256(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    const __m256i k = _mm256_set_epi64x((long long)fold256_high, (long long)fold256_low,
                                        (long long)fold256_high, (long long)fold256_low);
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
            x[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_clmulepi64_epi128(x[i], k, 0x00),
                                                     _mm256_clmulepi64_epi128(x[i], k, 0x11)), block);
        }
        if (destination) destination += 256;
        p += 256;
        n -= 256;
    }
    uint8_t folded[256];
    for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)(folded + 32 * i), x[i]);
    return fold128(fold128(0, NULL, folded, sizeof folded), destination, p, n);
}

/// Folds the running `state` over n >= 1024 bytes with eight 512-bit accumulators.
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1")))
static uint64_t fold512(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    const __m512i k = _mm512_set_epi64((long long)fold512_high, (long long)fold512_low,
                                       (long long)fold512_high, (long long)fold512_low,
                                       (long long)fold512_high, (long long)fold512_low,
                                       (long long)fold512_high, (long long)fold512_low);
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
            x[i] = _mm512_xor_si512(_mm512_xor_si512(_mm512_clmulepi64_epi128(x[i], k, 0x00),
                                                     _mm512_clmulepi64_epi128(x[i], k, 0x11)), block);
        }
        if (destination) destination += 512;
        p += 512;
        n -= 512;
    }
    uint8_t folded[512];
    for (int i = 0; i < 8; i++) _mm512_storeu_si512((void *)(folded + 64 * i), x[i]);
    return fold128(fold128(0, NULL, folded, sizeof folded), destination, p, n);
}

/// Below these lengths the wider paths' fixed cost (one reduction of 256 or 512 bytes) does not pay.
enum { wide256_minimum = 1024, wide512_minimum = 2048 };

static uint64_t fold_path(int path, uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    if (path >= SHMB_CRC64_VPCLMUL512 && n >= wide512_minimum) return fold512(state, destination, p, n);
    if (path >= SHMB_CRC64_VPCLMUL256 && n >= wide256_minimum) return fold256(state, destination, p, n);
    if (path >= SHMB_CRC64_CLMUL128) return fold128(state, destination, p, n);
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
