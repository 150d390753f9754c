// tma.cuh: tile copies by the tensor memory accelerator (TMA, sm_90).
//
// A tensor map (built on the host, tma_host.h) describes a 4-D tensor (head dim, rows,
// heads, batch) and the box one copy moves: 64 elements of the head dim (128 bytes, the
// 128-byte swizzle's span) by a tile's rows. One thread issues a copy; it completes on
// an mbarrier with the bytes it wrote, zeros filling whatever lies outside the tensor
// (rows past the sequence, columns past d), so no kernel ever tests a bound for a load.
#pragma once

#include <cstdint>

#include <cuda.h>

#include "barrier.cuh"

namespace fcsa {
namespace common {
namespace sm90 {

// Box (c0, c1, c2, c3) of `map` -> shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_4d(void *dst, const CUtensorMap *map, uint64_t *bar, int c0, int c1,
                                            int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes "
                 "[%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(shared_address(dst)),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}

// kRows x kCols of `map` from (row0, head, batch) into dst, laid out as SwizzledTile128
// (wgmma.cuh) lays a tile of kTileRows rows (dst: the first row's place in it, a multiple
// of 8 rows from its start): one copy per 64-column block.
template <int kRows, int kCols, int kTileRows = kRows, typename T>
__device__ __forceinline__ void tma_load_tile(T *dst, const CUtensorMap *map, uint64_t *bar, int row0, int head,
                                              int batch) {
#pragma unroll
    for (int cb = 0; cb < kCols / 64; ++cb)
        tma_load_4d(dst + cb * kTileRows * 64, map, bar, cb * 64, row0, head, batch);
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared, on `bar`.
__device__ __forceinline__ void bulk_load(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     shared_address(dst)),
                 "l"(src), "r"(bytes), "r"(shared_address(bar))
                 : "memory");
}

// Fetches the tensor map's descriptor ahead of its first use.
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap *map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

} // namespace sm90
} // namespace common
} // namespace fcsa
