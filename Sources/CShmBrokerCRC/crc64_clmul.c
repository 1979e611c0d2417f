// CRC-64/XZ by folding 128-bit blocks with carry-less multiplication (Gopal et al., "Fast CRC
// Computation for Generic Polynomials Using PCLMULQDQ", reflected variant). Eight accumulators
// fold 128 bytes per iteration; the last 16-byte remainder and any tail go through a byte table,
// which avoids a Barrett reduction. Constants are bit-reflected x^n mod P for the ECMA-182
// polynomial: for a fold over D bytes the low half uses n = 8D+63 and the high half n = 8D-1.
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

int shmb_crc64_hardware_available(void) {
    static int cached = -1;
    if (cached < 0) {
        int ok = 0;
#ifdef SHMB_HAVE_CLMUL
        unsigned a, b, c, d;
        ok = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_PCLMUL) && (c & bit_SSE4_1);
#endif
        build_table();
        cached = ok;
    }
    return cached;
}

#ifdef SHMB_HAVE_CLMUL

__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold(__m128i x, __m128i constants) {
    return _mm_xor_si128(_mm_clmulepi64_si128(x, constants, 0x00), _mm_clmulepi64_si128(x, constants, 0x11));
}

__attribute__((target("pclmul,sse4.1")))
static uint64_t fold_all(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    // Whatever is copied is checksummed from the copy: the source may be memory another process
    // keeps writing (a producer's ring), and the CRC must match the bytes that were stored.
    if (n < 16) {
        if (destination) {
            memcpy(destination, p, n);
            p = destination;
        }
        return bytewise(state, p, n);
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
    // The folded remainder, read as 16 message bytes with a zero state, carries the whole CRC.
    uint8_t rest[16];
    _mm_storeu_si128((__m128i *)rest, acc);
    uint64_t result = bytewise(0, rest, 16);
    if (destination) {
        memcpy(destination, p, n);
        p = destination;
    }
    return bytewise(result, p, n);
}

#else
static uint64_t fold_all(uint64_t state, uint8_t *destination, const uint8_t *p, size_t n) {
    if (destination) {
        memcpy(destination, p, n);
        p = destination;
    }
    return bytewise(state, p, n);
}
#endif

uint64_t shmb_crc64_update_clmul(uint64_t state, const void *data, size_t n) {
    return fold_all(state, NULL, (const uint8_t *)data, n);
}

uint64_t shmb_crc64_copy_clmul(uint64_t state, void *destination, const void *source, size_t n) {
    return fold_all(state, (uint8_t *)destination, (const uint8_t *)source, n);
}
