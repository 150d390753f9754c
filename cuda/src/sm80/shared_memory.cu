// shared_memory.cu: the per-block shared-memory limit that the sm80 forward and
// backward size their tiles by (see backends.h).
#include <cstdlib>

#include <cuda_runtime.h>

#include "../backends.h"

namespace fcsa {

int sm80_shared_memory_limit(int device) {
    int limit = 0;
    if (cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    // A positive byte count below the device's own limit lowers it; anything else is ignored.
    if (const char *cap = std::getenv("FCSA_MAX_SHARED_MEMORY")) {
        char *end = nullptr;
        const long value = std::strtol(cap, &end, 10);
        if (end != cap && *end == '\0' && value > 0 && value < limit) limit = int(value);
    }
    return limit;
}

} // namespace fcsa
