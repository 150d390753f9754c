// nonfinite.cuh: NaN and infinities that a key hidden from a row must not bring into it.
//
// A key the mask or causality hides from a row contributes nothing to it (SPEC), whatever
// k and v hold. Inside a matrix product a hidden key still meets the row's zero weight,
// and 0 * NaN or 0 * inf is NaN: the backward zeros such entries of its K^ tiles, found
// by their bits.
#pragma once

#include <cstdint>

#include "numeric.cuh"

namespace fcsa {
namespace common {

// The exponent field of one element, all ones for NaN and infinities.
template <typename T> struct ExponentBits;
template <> struct ExponentBits<float> {
    static constexpr uint32_t kMask = 0x7F800000u;
};
template <> struct ExponentBits<__half> {
    static constexpr uint32_t kMask = 0x7C00u;
};
template <> struct ExponentBits<__nv_bfloat16> {
    static constexpr uint32_t kMask = 0x7F80u;
};

// A 32-bit word of a tile (one float or two 16-bit elements) with each NaN or inf
// element replaced by +0.
template <typename T> __device__ __forceinline__ uint32_t word_without_nonfinite(uint32_t w) {
    constexpr uint32_t m = ExponentBits<T>::kMask;
    if constexpr (sizeof(T) == 4) return (w & m) == m ? 0u : w;
    else {
        const uint32_t lo = (w & m) == m ? 0u : w & 0xFFFFu;
        const uint32_t hi = (w & (m << 16)) == (m << 16) ? 0u : w & 0xFFFF0000u;
        return lo | hi;
    }
}

// Rows [first, last) of a shared tile (layout Tile: PaddedTile, SwizzledTile) with every
// NaN and inf set to 0; all kThreads threads (the caller's barrier publishes them).
template <typename T, class Tile, int kThreads>
__device__ __forceinline__ void zero_nonfinite_rows(T *tile, int first, int last, int tid) {
    constexpr int kPerRow = Tile::kChunksPerRow;
    for (int c = first * kPerRow + tid; c < last * kPerRow; c += kThreads) {
        uint4 *at = reinterpret_cast<uint4 *>(tile + Tile::chunk_offset(c / kPerRow, (c % kPerRow) * Tile::kChunk));
        const uint4 v = *at;
        const uint4 z = make_uint4(word_without_nonfinite<T>(v.x), word_without_nonfinite<T>(v.y),
                                   word_without_nonfinite<T>(v.z), word_without_nonfinite<T>(v.w));
        if (z.x != v.x || z.y != v.y || z.z != v.z || z.w != v.w) *at = z;
    }
}

} // namespace common
} // namespace fcsa
