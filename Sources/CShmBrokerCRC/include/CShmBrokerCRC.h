// CRC-64/XZ with carry-less multiplication (PCLMULQDQ, VPCLMULQDQ), which Swift cannot express.
#ifndef C_SHMBROKER_CRC_H
#define C_SHMBROKER_CRC_H

#include <stddef.h>
#include <stdint.h>

/// The implementations, from slowest to widest. A wider one is used only where the CPU has it.
enum {
    /// A byte table (the Swift side uses slicing-by-8 instead).
    SHMB_CRC64_PORTABLE = 0,
    /// PCLMULQDQ + SSE4.1: eight 128-bit accumulators, 128 bytes per iteration.
    SHMB_CRC64_CLMUL128 = 1,
    /// The same code in AVX's three-operand (VEX) encoding, which needs no register copies and
    /// spills none: about 1.4x the SSE encoding where the CPU has AVX but not VPCLMULQDQ.
    SHMB_CRC64_CLMUL128_AVX = 2,
    /// VPCLMULQDQ + AVX2: eight 256-bit accumulators, 256 bytes per iteration.
    SHMB_CRC64_VPCLMUL256 = 3,
    /// VPCLMULQDQ + AVX-512F: eight 512-bit accumulators, 512 bytes per iteration.
    SHMB_CRC64_VPCLMUL512 = 4,
};

/// The widest path this CPU and OS support (checked once with CPUID and XGETBV).
int shmb_crc64_best_path(void);

/// Whether `path` runs on this CPU.
int shmb_crc64_path_supported(int path);

/// Whether this CPU has at least PCLMULQDQ and SSE4.1.
int shmb_crc64_hardware_available(void);

/// Continues a CRC-64/XZ over `n` bytes with `path` (or the widest supported path below it).
/// `state` is the running, non-finalised value (start with ~0, finish with ~state).
uint64_t shmb_crc64_update_path(int path, uint64_t state, const void *data, size_t n);

/// The same, also copying the bytes to `destination` in the same pass (the buffers must not
/// overlap). The CRC is of the bytes as stored, even if another thread changes the source.
uint64_t shmb_crc64_copy_path(int path, uint64_t state, void *destination, const void *source, size_t n);

#endif
