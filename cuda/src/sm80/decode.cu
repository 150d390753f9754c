// decode.cu: the CUDA entry points of KV-cache attention (kvcache.h): what the decode
// path supports, its workspace, and the dtype dispatch. The kernels are in
// decode_kernel.cuh, their launches in decode_launch.cuh.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../backends.h"
#include "../kvcache.h"
#include "decode.cuh"

namespace fcsa {
namespace {

using sm80::decode::Plan;

constexpr int64_t kMaxInt = (int64_t(1) << 31) - 1;

fcsa_status plan_call(const KvCacheProblem &kv, Plan *plan) {
    switch (kv.attention.dtype) {
    case FCSA_DTYPE_FLOAT32: return sm80::decode::make_plan<float>(kv, plan);
    case FCSA_DTYPE_FLOAT16: return sm80::decode::make_plan<__half>(kv, plan);
    default: return sm80::decode::make_plan<__nv_bfloat16>(kv, plan);
    }
}

// cp.async moves 16 bytes at a time: the caches' rows must start on 16-byte boundaries.
bool rows_aligned(const View &cache) {
    const int64_t size = cache.dtype == FCSA_DTYPE_FLOAT32 ? 4 : 2;
    if (cache.shape[0] * cache.shape[1] * cache.shape[2] * cache.shape[3] == 0) return true; // never read
    return cache.rows_16byte_aligned(size);
}

} // namespace

fcsa_status sm80_kvcache_supports(const KvCacheProblem &kv) {
    const Problem &p = kv.attention;
    int major = 0;
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, int(p.device_index));
    if (err != cudaSuccess) {
        cudaGetLastError();
        return set_error(FCSA_STATUS_CUDA_ERROR, "cuda-sm80 kvcache: cannot query CUDA device %d: %s",
                         int(p.device_index), cudaGetErrorString(err));
    }
    if (major < 8)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 kvcache: CUDA device %d has compute capability %d.x; 8.0 or newer is required",
                         int(p.device_index), major);
    if (p.d < 8 || p.d > 256 || p.d % 8 != 0)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 kvcache: head dim %lld is not supported on the GPU (a multiple of 8 from 8 to "
                         "256 is required)",
                         (long long)p.d);
    if (p.d_v != p.d)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 kvcache: v_cache's head dim %lld differs from q's %lld (not supported on the GPU)",
                         (long long)p.d_v, (long long)p.d);
    // 32-bit indices in the kernels: key positions, grid sizes, packed rows.
    if (kv.capacity > kMaxInt || kv.num_blocks > kMaxInt || p.b * p.h * p.nq > kMaxInt ||
        p.b * p.hk * kv.nq_new > kMaxInt || p.b * p.h * p.nq > kMaxInt)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 kvcache: the cache's capacity (%lld keys), its blocks (%lld) or b * h * nq (%lld) "
                         "exceed 2^31 - 1",
                         (long long)kv.capacity, (long long)kv.num_blocks, (long long)(p.b * p.h * p.nq));
    if (!rows_aligned(kv.k_cache) || !rows_aligned(kv.v_cache))
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 kvcache: k_cache and v_cache need 16-byte aligned data and strides (in bytes) "
                         "that are multiples of 16");
    Plan plan;
    return plan_call(kv, &plan);
}

size_t sm80_kvcache_workspace(const KvCacheProblem &kv) {
    Plan plan;
    // sm80_kvcache_supports has made the same plan successfully.
    return plan_call(kv, &plan) == FCSA_STATUS_SUCCESS ? plan.workspace : 0;
}

fcsa_status sm80_kvcache_forward(const KvCacheProblem &kv, void *workspace, void *stream) {
    Plan plan;
    const fcsa_status status = plan_call(kv, &plan);
    if (status != FCSA_STATUS_SUCCESS) return status;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (kv.attention.dtype) {
    case FCSA_DTYPE_FLOAT32: return sm80::decode::launch<float>(kv, plan, workspace, s);
    case FCSA_DTYPE_FLOAT16: return sm80::decode::launch<__half>(kv, plan, workspace, s);
    default: return sm80::decode::launch<__nv_bfloat16>(kv, plan, workspace, s);
    }
}

} // namespace fcsa
