// launch.h: what the Hopper kernels' host sides share: the key tile and the key-norm
// rows padded to it, whether the device is a Hopper and a problem their common case,
// whether the build's image of a kernel is its sm_90a code, and the launch with opt-in
// shared memory. `who` names the caller in error messages.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../backends.h"
#include "../sm80/varlen.cuh"

namespace fcsa {
namespace sm90 {

// Keys per CTA tile of both kernels. 1 / ||k_j|| rows (the key-norm pass, which writes 0
// past nk) are padded to whole tiles, so that a kernel copies a tile's worth at once.
constexpr int kKeyTile = 128;
inline int64_t key_norm_stride(const Problem &p) { return (p.nk + kKeyTile - 1) / kKeyTile * kKeyTile; }
// The key-norm pass's floats in a kernel's workspace, [batch][kv head][key_norm_stride].
inline int64_t key_norm_floats(const Problem &p) { return p.b * p.hk * key_norm_stride(p); }

// Sequence lengths the kernels' int32 tile arithmetic holds.
constexpr int64_t kMaxSequence = (int64_t(1) << 31) - 1024;

// Why packed sequences' tile table (tiles of `block` query rows, or keys with by_keys)
// would overflow the kernels' int32 entries and grid of one CTA per entry and each of
// `heads`, or nullptr when it fits (or `p` has no packed sequences).
inline const char *packed_tiles_problem(const Problem &p, int block, bool by_keys, int64_t heads) {
    if (!p.varlen()) return nullptr;
    const int64_t tiles = sm80::varlen_max_tiles(p, block, by_keys);
    if (p.sequences >= INT32_MAX || tiles * heads > INT32_MAX)
        return by_keys ? "packed sequences: more key tiles times kv heads than 2^31 - 1"
                       : "packed sequences: more query tiles times heads than 2^31 - 1";
    return nullptr;
}

// Why the kernels' common case does not cover `p` (l2norm with one group, no bias or
// scale tensor, a key mask or packed sequences only where the kernel takes them, at
// least one key, lengths and grids in range), or nullptr when it does.
inline const char *common_case_problem(const Problem &p, bool takes_key_mask, bool takes_packed = false) {
    if (!p.l2norm || p.groups != 1 || p.bias.present() || p.scale_t.present())
        return "covers l2norm_qk with one group, no bias and a scale given as a number";
    if (p.mask.present() && !takes_key_mask) return "has no key mask; the portable path runs it";
    if (p.varlen() && !takes_packed) return "has no packed sequences (cu_seqlens); the portable path runs them";
    if (p.nk < 1) return "needs at least one key";
    if (p.nq > kMaxSequence || p.nk > kMaxSequence) return "needs sequence lengths below 2^31 - 1024";
    if (p.b * p.h > INT32_MAX || p.b * p.hk * (key_norm_stride(p) / 64) > INT32_MAX)
        return "batch * heads (or batch * kv heads * key tiles) exceeds 2^31 - 1";
    return nullptr;
}

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
