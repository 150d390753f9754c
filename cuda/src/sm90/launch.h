// launch.h: what the Hopper kernels' host sides share: whether the device is a Hopper,
// whether the build's image of a kernel is its sm_90a code, and the launch with opt-in
// shared memory. `who` names the caller in error messages.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../backends.h"

namespace fcsa {
namespace sm90 {

// Why `device` cannot run the Hopper kernels, or nullptr when it can.
inline const char *device_problem(int device) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
        cudaGetLastError();
        return "cannot query the device";
    }
    return major == 9 && minor == 0 ? nullptr : "needs a compute capability 9.0 device (H100, H200)";
}

// Whether the loaded image of `kernel` is sm_90a code. Asked on a compute capability 9.0
// device only, whose loaded image is the sm_90a one when the build has it (a build
// without 90a holds empty kernels): callers keep the answer in a static.
template <typename Kernel> bool has_sm90a_image(Kernel kernel) {
#if defined(FCSA_SM90A_TARGET)
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return attributes.binaryVersion == 90;
#else
    (void)kernel;
    return false;
#endif
}

// kernel<<<ctas, threads, smem_bytes, stream>>>(params), with the shared memory opted in;
// ctas checked against the grid's limit (`grid` says what they count, for the message).
template <typename Kernel, typename Params>
fcsa_status launch(Kernel kernel, int64_t ctas, int threads, int smem_bytes, cudaStream_t stream, const Params &params,
                   const char *who, const char *grid) {
    if (ctas <= 0) return FCSA_STATUS_SUCCESS;
    if (ctas > int64_t(INT32_MAX))
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "%s: %s = %lld exceeds the grid limit", who, grid,
                         static_cast<long long>(ctas));
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess)
        return set_error(FCSA_STATUS_CUDA_ERROR, "%s: setting %d bytes of shared memory: %s", who, smem_bytes,
                         cudaGetErrorString(err));
    kernel<<<unsigned(ctas), threads, smem_bytes, stream>>>(params);
    err = cudaGetLastError();
    if (err != cudaSuccess)
        return set_error(FCSA_STATUS_CUDA_ERROR, "%s: kernel launch failed: %s", who, cudaGetErrorString(err));
    return FCSA_STATUS_SUCCESS;
}

} // namespace sm90
} // namespace fcsa
