// dispatch.cu: can the portable CUDA path (sm80/) run this problem on this device?
//
// Requirements common to the forward and the backward: compute capability 8.0 or newer
// (mma.sync on bf16, cp.async), a kernel image in this build that the device can load,
// head dims that are multiples of 8 up to 256 (q's and k's d, and v's d_v, which may differ),
// float32/float16/bfloat16, lengths that fit 32-bit tile indices. The forward also
// needs its tile's shared memory within the device's per-block limit; every forward
// configuration is sized to fit the 99 KB that the smallest of these devices offer. The
// backward picks its full or its compact (99 KB) shapes by the same limit and checks it
// itself.
#include <cstdint>

#include <cuda_runtime.h>

#include "../backends.h"
#include "forward.cuh"

namespace fcsa {
namespace {

// Launched never: cudaFuncGetAttributes on it says whether this build holds code the
// current device can run (an sm_80..sm_90 build on a newer GPU without PTX cannot).
__global__ void sm80_image_probe() {}

constexpr int64_t kMaxSequence = (int64_t(1) << 31) - 1024;

} // namespace

fcsa_status sm80_supports(const Problem &p, bool backward) {
    const char *direction = backward ? "backward" : "forward";
    int major = 0, minor = 0;
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, p.device_index);
    if (err == cudaSuccess)
        err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, p.device_index);
    const int smem_optin = sm80_shared_memory_limit(p.device_index);
    if (err == cudaSuccess && smem_optin < 0) err = cudaErrorInvalidDevice;
    if (err != cudaSuccess) {
        cudaGetLastError();
        return set_error(FCSA_STATUS_CUDA_ERROR, "cuda-sm80: cannot query CUDA device %d: %s", int(p.device_index),
                         cudaGetErrorString(err));
    }
    if (major < 8)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 %s: CUDA device %d has compute capability %d.%d; 8.0 or newer is required",
                         direction, int(p.device_index), major, minor);
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, sm80_image_probe);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 %s: this build of fcsa (targets %s) has no code for CUDA device %d "
                         "(compute capability %d.%d): %s",
                         direction,
#if defined(FCSA_SM_TARGETS)
                         FCSA_SM_TARGETS,
#else
                         "unknown",
#endif
                         int(p.device_index), major, minor, cudaGetErrorString(err));
    }
    if (p.dtype != FCSA_DTYPE_FLOAT32 && p.dtype != FCSA_DTYPE_FLOAT16 && p.dtype != FCSA_DTYPE_BFLOAT16)
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "cuda-sm80 %s: dtype %d is not float32, float16 or bfloat16",
                         direction, int(p.dtype));
    if (p.d < 8 || p.d > 256 || p.d % 8 != 0)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 %s: head dim %lld is not supported on the GPU (a multiple of 8 from 8 to 256 "
                         "is required)",
                         direction, static_cast<long long>(p.d));
    if (p.d_v < 8 || p.d_v > 256 || p.d_v % 8 != 0)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 %s: value head dim %lld is not supported on the GPU (a multiple of 8 from 8 to "
                         "256 is required)",
                         direction, static_cast<long long>(p.d_v));
    if (p.nq > kMaxSequence || p.nk > kMaxSequence)
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "cuda-sm80 %s: sequence lengths nq = %lld, nk = %lld exceed %lld",
                         direction, static_cast<long long>(p.nq), static_cast<long long>(p.nk),
                         static_cast<long long>(kMaxSequence));
    if (p.b * p.h > (int64_t(1) << 31) - 1)
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "cuda-sm80 %s: batch * heads = %lld exceeds 2^31 - 1", direction,
                         static_cast<long long>(p.b * p.h));
    if (!backward) {
        const size_t needed = sm80::forward_smem_bytes(p.dtype, p.d, p.d_v);
        if (needed > size_t(smem_optin))
            return set_error(FCSA_STATUS_NOT_SUPPORTED,
                             "cuda-sm80 forward: head dims d = %lld, d_v = %lld need %zu bytes of shared memory per "
                             "block; CUDA device %d offers %d",
                             static_cast<long long>(p.d), static_cast<long long>(p.d_v), needed,
                             int(p.device_index), smem_optin);
    }
    return FCSA_STATUS_SUCCESS;
}

} // namespace fcsa
