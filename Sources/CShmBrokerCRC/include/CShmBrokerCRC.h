// CRC-64/XZ with carry-less multiplication (PCLMULQDQ), which Swift cannot express directly.
#ifndef C_SHMBROKER_CRC_H
#define C_SHMBROKER_CRC_H

#include <stddef.h>
#include <stdint.h>

/// Whether this CPU has PCLMULQDQ and SSE4.1 (checked once with CPUID).
int shmb_crc64_hardware_available(void);

/// Continues a CRC-64/XZ over `n` bytes. `state` is the running, non-finalised value (start with
/// ~0, finish with ~state). Requires shmb_crc64_hardware_available().
uint64_t shmb_crc64_update_clmul(uint64_t state, const void *data, size_t n);

/// The same, also copying the bytes to `destination` in the same pass (the buffers must not overlap).
uint64_t shmb_crc64_copy_clmul(uint64_t state, void *destination, const void *source, size_t n);

#endif
