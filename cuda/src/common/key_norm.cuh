// key_norm.cuh: the key-norm pass: 1 / max(||k_j||, eps) for every key, one float each.
//
// With one l2norm group, k enters the forward as a factor 1 / ||k_j|| per column of S.
// Every query tile would compute those norms again for each key tile it reads; one pass
// over k computes them once instead (30 us for the benchmark shapes' 67 MB of k on the
// H100), into the caller's workspace: [batch][kv head][padded_nk], the keys past nk
// holding 0, so that kernels copy whole key tiles' worth. No normalized copy of k is
// ever written. Rows whose squares overflow float32 take the rescaled path (l2norm.cuh).
//
// Under a key mask (a caller that asks for it) a hidden key's entry is kHiddenKey, which
// no norm can be, key_counts[2 batch] becomes one past the batch's last visible key and
// key_counts[2 batch + 1] its number of visible keys: a kernel tests a column's sign to
// drop it, whatever k and v hold there, stops at the reach (a right-padded batch reads
// none of its padding), and where the two counts are equal has no hidden key to handle.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../backends.h"
#include "l2norm.cuh"
#include "row_lanes.cuh"

namespace fcsa {
namespace common {

constexpr int kKeyNormThreads = 256;
constexpr float kHiddenKey = -1.f;

// The key mask as the pass reads it: mask[batch * stride_b + key * stride_k] != 0 where
// visible; key_counts (zeroed before the pass) receives each batch's reach and number of
// visible keys.
struct KeyMaskPass {
    const uint8_t *mask = nullptr;
    int64_t stride_b = 0, stride_k = 0;
    int *key_counts = nullptr;
};
constexpr int kKeyNormPasses = 4; // rows per lane group

// Each lane group (RowLanes' widths) takes kKeyNormPasses rows of a (batch, kv head),
// and loads all of their chunks before it sums any: 4 to 8 loads in flight per thread.
// A block's rows are consecutive keys of one (batch, kv head), with no 64-bit division
// per row (the first version, a row at a time through for_lane_rows, ran at 1.2 TB/s).
template <typename T>
__global__ void __launch_bounds__(kKeyNormThreads)
    key_norm_kernel(const T *k, int64_t stride_b, int64_t stride_h, int64_t stride_row, int kv_heads, int nk,
                    int padded_nk, int key_blocks, int d, float *inv_norm, KeyMaskPass mask) {
    constexpr int E = Chunk<T>::N, kPer = chunks_per_lane<T>();
    const int chunks = d / E, width = row_lane_width(chunks), sub = threadIdx.x % width;
    const int rows_per_pass = kKeyNormThreads / width;
    const int slab = blockIdx.x / key_blocks;
    const int first_key = (blockIdx.x % key_blocks) * rows_per_pass * kKeyNormPasses + threadIdx.x / width;
    const T *keys = k + (slab / kv_heads) * stride_b + (slab % kv_heads) * stride_h;
    uint4 raw[kKeyNormPasses][kPer]; // 16-byte chunks as loaded: 4 registers each
#pragma unroll
    for (int pass = 0; pass < kKeyNormPasses; ++pass) {
        const int j = first_key + pass * rows_per_pass;
#pragma unroll
        for (int m = 0; m < kPer; ++m) {
            const int c = sub + width * m;
            raw[pass][m] = j < nk && c < chunks ? *reinterpret_cast<const uint4 *>(keys + j * stride_row + c * E)
                                                : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    const int batch = slab / kv_heads;
    auto hidden = [&](int j) {
        return mask.mask != nullptr && j < nk && mask.mask[batch * mask.stride_b + int64_t(j) * mask.stride_k] == 0;
    };
    uint32_t overflowed = 0u;
    int reach = 0, visible = 0; // one past this thread's last visible key; its visible keys
#pragma unroll
    for (int pass = 0; pass < kKeyNormPasses; ++pass) {
        float sum_sq = 0.f;
#pragma unroll
        for (int m = 0; m < kPer; ++m) {
            float f[E];
            chunk_to_float<T>(raw[pass][m], f);
#pragma unroll
            for (int e = 0; e < E; ++e) sum_sq = fmaf(f[e], f[e], sum_sq);
        }
        sum_sq = lanes_sum(sum_sq, width);
        const int j = first_key + pass * rows_per_pass;
        const bool hidden_key = hidden(j);
        if (hidden_key) {
            if (j < padded_nk && sub == 0) inv_norm[int64_t(slab) * padded_nk + j] = kHiddenKey;
        } else if (norm_overflowed<T>(sum_sq)) {
            overflowed |= 1u << pass; // (rows past nk are zeros)
        } else if (j < padded_nk && sub == 0) {
            inv_norm[int64_t(slab) * padded_nk + j] = j < nk ? inverse_norm<T>(sum_sq) : 0.f; // zeros: padding
        }
        if (j < nk && !hidden_key && sub == 0) {
            reach = j + 1;
            ++visible;
        }
    }
    // Two atomics per warp, from the first kv head's blocks only (the mask is per batch).
    if (mask.key_counts != nullptr && slab % kv_heads == 0) {
        reach = __reduce_max_sync(0xffffffffu, unsigned(reach));
        visible = __reduce_add_sync(0xffffffffu, unsigned(visible));
        if (threadIdx.x % 32 == 0 && reach > 0) {
            atomicMax(mask.key_counts + 2 * batch, reach);
            atomicAdd(mask.key_counts + 2 * batch + 1, visible);
        }
    }
    // Keys whose sums of squares overflowed, after the loads' registers are free (l2norm.cuh).
#pragma unroll 1
    for (int pass = 0; pass < kKeyNormPasses; ++pass) {
        const int j = first_key + pass * rows_per_pass;
        if (((overflowed >> pass) & 1u) && sub == 0)
            inv_norm[int64_t(slab) * padded_nk + j] =
                rescaled_inverse_norm<T, ContiguousRow>(keys + int64_t(j) * stride_row, 0, 0, d);
    }
}

// Blocks of the pass per (batch, kv head) for rows of padded_nk floats.
template <typename T> int64_t key_norm_blocks_per_row(int64_t d, int64_t padded_nk) {
    const int64_t keys_per_block = kKeyNormPasses * kKeyNormThreads / row_lane_width(int(d) / Chunk<T>::N);
    return (padded_nk + keys_per_block - 1) / keys_per_block;
}

// Runs the pass over p.k into inv_norm (p.b * p.hk * padded_nk floats; padded_nk a
// multiple of 64 at least nk). `who` names the caller in errors.
// With key_counts (2 p.b ints), p.mask is applied and each batch's reach and number of
// visible keys written there.
template <typename T>
fcsa_status run_key_norm_pass(const Problem &p, float *inv_norm, int64_t padded_nk, cudaStream_t stream,
                              const char *who, int *key_counts = nullptr) {
    const int64_t key_blocks = key_norm_blocks_per_row<T>(p.d, padded_nk);
    KeyMaskPass mask;
    if (key_counts != nullptr) {
        mask.mask = static_cast<const uint8_t *>(p.mask.data);
        mask.stride_b = p.mask.stride[0];
        mask.stride_k = p.mask.stride[3];
        mask.key_counts = key_counts;
        const cudaError_t err = cudaMemsetAsync(key_counts, 0, size_t(2 * p.b) * sizeof(int), stream);
        if (err != cudaSuccess)
            return set_error(FCSA_STATUS_CUDA_ERROR, "%s: clearing the key counts failed: %s", who,
                             cudaGetErrorString(err));
    }
    key_norm_kernel<T><<<unsigned(p.b * p.hk * key_blocks), kKeyNormThreads, 0, stream>>>(
        static_cast<const T *>(p.k.data), p.k.stride[0], p.k.stride[1], p.k.stride[2], int(p.hk), int(p.nk),
        int(padded_nk), int(key_blocks), int(p.d), inv_norm, mask);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return set_error(FCSA_STATUS_CUDA_ERROR, "%s: key-norm pass launch failed: %s", who, cudaGetErrorString(err));
    return FCSA_STATUS_SUCCESS;
}

} // namespace common
} // namespace fcsa
