// l2norm.cuh: l2 normalization of the rows of a shared tile, per group of columns.
//
// For each row r and group g (columns [g*d/groups, (g+1)*d/groups)) it computes, in
// float32, inv = 1 / max(||x[r, group g]||, 1e-12), then either scales that part of the
// row in place or (groups == 1 typically) writes inv to inv_norms[r * groups + g]. A
// few adjacent lanes share one (row, group) and combine their sums with shuffles, so
// the whole block works on the tile at once; groups whose size is a multiple of the
// 16-byte chunk are read a chunk at a time, others element by element.
// row_inverse_norms is the fast case of the same (one group per row, only the factors):
// fixed thread-to-chunk assignment, no runtime loops, for the per-tile K norms.
// Called by all kThreads threads of the block (a barrier before and after is the
// caller's business).
#pragma once

#include <cstdint>

#include "copy.cuh"
#include "numeric.cuh"

namespace fcsa {
namespace common {

constexpr float kNormEpsilon = 1e-12f;

template <typename T, int kStride, int kThreads>
__device__ __forceinline__ void l2norm_rows(T *tile, int rows, int d, int groups, float *inv_norms,
                                            bool scale_in_place, int tid) {
    constexpr int kChunk = Chunk<T>::N;
    const int group_size = d / groups;
    const bool chunked = group_size % kChunk == 0;
    const int units = chunked ? group_size / kChunk : group_size; // reads per (row, group)
    const int pairs = rows * groups;
    int lanes = 1; // lanes per (row, group): a power of two up to 32
    while (lanes < 32 && lanes < units && 2 * lanes * pairs <= kThreads) lanes *= 2;
    const int pairs_per_pass = kThreads / lanes;
    const int sub = tid % lanes;

    // Every thread runs the same number of passes, so the shuffles see full warps.
    for (int base = 0; base < pairs; base += pairs_per_pass) {
        const int pair = base + tid / lanes;
        const bool active = pair < pairs;
        T *x = tile + (active ? (pair / groups) * kStride + (pair % groups) * group_size : 0);
        float sum_sq = 0.f;
        if (active) {
            if (chunked) {
                for (int u = sub; u < units; u += lanes) {
                    float f[kChunk];
                    chunk_to_float<T>(*reinterpret_cast<const uint4 *>(x + u * kChunk), f);
#pragma unroll
                    for (int e = 0; e < kChunk; ++e) sum_sq = fmaf(f[e], f[e], sum_sq);
                }
            } else {
                for (int u = sub; u < units; u += lanes) {
                    const float v = to_float(x[u]);
                    sum_sq = fmaf(v, v, sum_sq);
                }
            }
        }
        for (int offset = lanes / 2; offset > 0; offset /= 2)
            sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
        // 1 / max(||x||, eps); rsqrt(0) = inf, which the min turns into 1 / eps.
        const float inv = fminf(rsqrt_approx(sum_sq), 1.f / kNormEpsilon);
        if (!active) continue;
        if (inv_norms != nullptr && sub == 0) inv_norms[pair] = inv;
        if (scale_in_place) {
            if (chunked) {
                for (int u = sub; u < units; u += lanes) {
                    uint4 *p = reinterpret_cast<uint4 *>(x + u * kChunk);
                    float f[kChunk];
                    chunk_to_float<T>(*p, f);
#pragma unroll
                    for (int e = 0; e < kChunk; ++e) f[e] *= inv;
                    *p = float_to_chunk<T>(f);
                }
            } else {
                for (int u = sub; u < units; u += lanes) x[u] = from_float<T>(to_float(x[u]) * inv);
            }
        }
    }
}

// inv[r] = multiplier / max(||row r||, 1e-12) over the first d columns of every row of a
// padded kRows x kCols tile (rows past the valid ones hold zeros). Adjacent lanes share
// a row and read interleaved chunks, so a warp's reads spread over the banks; each
// element position keeps its own partial sum, so the FMAs form short independent chains.
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void row_inverse_norms(const T *tile, int d, float *inv, float multiplier,
                                                  int tid) {
    using L = PaddedTile<T, kRows, kCols>;
    constexpr int kLanesPerRow = kThreads / kRows < 1 ? 1 : (kThreads / kRows > 32 ? 32 : kThreads / kRows);
    constexpr int kRowsPerPass = kThreads / kLanesPerRow;
    constexpr int kChunksPerLane = (L::kChunksPerRow + kLanesPerRow - 1) / kLanesPerRow;
    static_assert((kLanesPerRow & (kLanesPerRow - 1)) == 0, "lanes per row must be a power of two");
    const int sub = tid % kLanesPerRow;
#pragma unroll
    for (int row = tid / kLanesPerRow; row < kRows; row += kRowsPerPass) {
        float partial[L::kChunk];
#pragma unroll
        for (int e = 0; e < L::kChunk; ++e) partial[e] = 0.f;
#pragma unroll
        for (int i = 0; i < kChunksPerLane; ++i) {
            const int chunk = sub + i * kLanesPerRow;
            if (chunk < L::kChunksPerRow && chunk * L::kChunk < d) {
                float f[L::kChunk];
                chunk_to_float<T>(*reinterpret_cast<const uint4 *>(tile + row * L::kStride + chunk * L::kChunk), f);
#pragma unroll
                for (int e = 0; e < L::kChunk; ++e) partial[e] = fmaf(f[e], f[e], partial[e]);
            }
        }
#pragma unroll
        for (int width = L::kChunk / 2; width > 0; width /= 2)
#pragma unroll
            for (int e = 0; e < width; ++e) partial[e] += partial[e + width];
        float sum_sq = partial[0];
#pragma unroll
        for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2)
            sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
        if (sub == 0) inv[row] = multiplier * fminf(rsqrt_approx(sum_sq), 1.f / kNormEpsilon);
    }
}

} // namespace common
} // namespace fcsa
