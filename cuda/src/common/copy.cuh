// copy.cuh: moving tiles between global and shared memory.
//
// load_tile copies the valid rows x cols of a strided global matrix with cp.async
// (16 bytes per instruction, zero-filling what lies outside) when every row start is
// 16-byte aligned, and with plain element loads otherwise; either way the rest of the
// tile is zero, so padded rows and columns add nothing to a product.
#pragma once

#include <cstdint>

#include "layout.cuh"
#include "mma.cuh"
#include "numeric.cuh"

namespace fcsa {
namespace common {

// ---------------------------------------------------------------- cp.async
// 16 bytes global -> shared, bypassing L1; with valid == false nothing is read and the
// 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void *gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
                 "r"(src_bytes));
}
// 4 bytes global -> shared (through L1: .cg takes 16 only), zero-filled when !valid.
__device__ __forceinline__ void cp_async_4(uint32_t smem, const void *gmem, bool valid) {
    const int src_bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `kPending` committed groups of this thread are still in flight.
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---------------------------------------------------------------- 16-byte chunks
template <typename T> struct Chunk {
    static constexpr int N = 16 / int(sizeof(T));
};

template <typename T>
__device__ __forceinline__ void chunk_to_float(const uint4 &v, float (&f)[Chunk<T>::N]) {
    if constexpr (ElementTraits<T>::kIs16Bit) {
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 p = unpack_float2<T>(w[i]);
            f[2 * i] = p.x;
            f[2 * i + 1] = p.y;
        }
    } else {
        f[0] = __uint_as_float(v.x);
        f[1] = __uint_as_float(v.y);
        f[2] = __uint_as_float(v.z);
        f[3] = __uint_as_float(v.w);
    }
}

template <typename T>
__device__ __forceinline__ uint4 float_to_chunk(const float (&f)[Chunk<T>::N]) {
    uint4 v;
    if constexpr (ElementTraits<T>::kIs16Bit) {
        v.x = pack_float2<T>(f[0], f[1]);
        v.y = pack_float2<T>(f[2], f[3]);
        v.z = pack_float2<T>(f[4], f[5]);
        v.w = pack_float2<T>(f[6], f[7]);
    } else {
        v.x = __float_as_uint(f[0]);
        v.y = __float_as_uint(f[1]);
        v.z = __float_as_uint(f[2]);
        v.w = __float_as_uint(f[3]);
    }
    return v;
}

// ---------------------------------------------------------------- tiles
// Global rows [0, rows) x cols [0, cols) of `src` (row stride in elements) -> the tile
// (layout L); the rest of the tile becomes zero. `vectorized` requires src and row_stride to
// be 16-byte aligned; then the copies are asynchronous (commit and wait as usual),
// otherwise they complete before the function returns. Called by kThreads threads.
// kWholeTilePath: whole tiles take a copy loop without tests (a kernel whose schedule
// it upsets turns it off).
template <typename T, int kRows, int kCols, int kThreads, class L = PaddedTile<T, kRows, kCols>,
          bool kWholeTilePath = true>
__device__ __forceinline__ void load_tile(T *tile, const T *src, int64_t row_stride, int rows,
                                          int cols, bool vectorized, int tid) {
    constexpr int kChunks = kRows * L::kChunksPerRow;
    constexpr int kIters = (kChunks + kThreads - 1) / kThreads; // copies per thread, at compile time
    constexpr int kRowStep = kThreads / L::kChunksPerRow;
    if (vectorized && kThreads % L::kChunksPerRow == 0 && kRowStep % L::kRowPeriod == 0) {
        // Each thread keeps one column chunk and steps down the rows, where the layout
        // repeats: one pointer add per copy (these loads sit inside the kernels' main loops).
        const int r0 = tid / L::kChunksPerRow, c = (tid % L::kChunksPerRow) * L::kChunk;
        const bool column_ok = c < cols;
        const T *from = src + r0 * row_stride + c;
        const int64_t step = kRowStep * row_stride;
        const uint32_t to = smem_address(tile + L::chunk_offset(r0, c)); // 32 bits: one register
        if (kWholeTilePath && kChunks % kThreads == 0 && rows >= kRows && cols >= kCols) {
            // A whole tile (the common case): no tests, one add and one copy per chunk.
#pragma unroll
            for (int it = 0; it < kIters; ++it, from += step)
                cp_async_16(to + it * kRowStep * L::kStride * int(sizeof(T)), from, true);
            return;
        }
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int r = r0 + it * kRowStep;
            if (kChunks % kThreads == 0 || r < kRows) {
                const bool valid = column_ok && r < rows;
                cp_async_16(to + it * kRowStep * L::kStride * int(sizeof(T)), valid ? from : src, valid);
            }
            from += step;
        }
    } else if (vectorized) {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int i = tid + it * kThreads;
            if (kChunks % kThreads == 0 || i < kChunks) {
                const int r = i / L::kChunksPerRow;
                const int c = (i % L::kChunksPerRow) * L::kChunk;
                const bool valid = r < rows && c < cols;
                cp_async_16(smem_address(tile + L::chunk_offset(r, c)), valid ? src + r * row_stride + c : src, valid);
            }
        }
    } else {
        for (int i = tid; i < kRows * kCols; i += kThreads) {
            const int r = i / kCols, c = i % kCols;
            tile[L::offset(r, c)] = r < rows && c < cols ? src[r * row_stride + c] : from_float<T>(0.f);
        }
    }
}

// The padded tile's rows [0, rows) x cols [0, cols) -> global `dst`. `vectorized` as in
// load_tile. Called by kThreads threads (a warp storing its own rows passes lane as tid).
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void store_tile(T *dst, int64_t row_stride, const T *tile, int rows,
                                           int cols, bool vectorized, int tid) {
    using L = PaddedTile<T, kRows, kCols>;
    if (vectorized) {
#pragma unroll
        for (int i = tid; i < kRows * L::kChunksPerRow; i += kThreads) {
            const int r = i / L::kChunksPerRow;
            const int c = (i % L::kChunksPerRow) * L::kChunk;
            if (r < rows && c < cols)
                *reinterpret_cast<uint4 *>(dst + r * row_stride + c) =
                    *reinterpret_cast<const uint4 *>(tile + r * L::kStride + c);
        }
    } else {
        for (int i = tid; i < kRows * kCols; i += kThreads) {
            const int r = i / kCols, c = i % kCols;
            if (r < rows && c < cols) dst[r * row_stride + c] = tile[r * L::kStride + c];
        }
    }
}

} // namespace common
} // namespace fcsa
