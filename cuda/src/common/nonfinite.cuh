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

// For a raw k (without l2norm): a 32-bit word with each NaN replaced by +0 and each
// infinity by the largest finite value of its sign (of its products, for float32). A
// key hidden from a row then meets its dS = 0 in dQ = dS K as a finite number; a key the row sees keeps, in practice,
// the logit the forward gave it: -inf there (P = 0 with a finite lse) stays a logit far
// below any other (P = 0 again), and a NaN or +inf there left the row's lse NaN, which
// makes its P NaN whatever the logit. (Zeros would turn the first into P > 0.) In
// float16 the largest is 65504, so "far below" needs scale |q_c| 65504 well above the
// row's other logits: a visible key with -inf and a q component near 0 at a small
// scale can get P > 0 where the forward had 0 (a hidden one never matters).
template <typename T> __device__ __forceinline__ uint32_t word_saturated(uint32_t w) {
    constexpr uint32_t m = ExponentBits<T>::kMask;
    if constexpr (sizeof(T) == 4) {
        // (the largest that tf32 holds too: the 3xTF32 products split it exactly, where
        // rounding FLT_MAX to tf32 would give inf again)
        if ((w & m) != m) return w;
        return (w & 0x007FFFFFu) != 0u ? 0u : (w & 0x80000000u) | 0x7F7FE000u;
    } else {
        // The largest finite value: every exponent bit but the lowest, every mantissa bit.
        constexpr uint32_t mantissa = (~m & 0x7FFFu), largest = (m - (m & (~m + 1u))) | mantissa;
        uint32_t out = 0u;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const uint32_t x = (w >> (16 * half)) & 0xFFFFu;
            const uint32_t y = (x & m) != m ? x : (x & mantissa) != 0u ? 0u : (x & 0x8000u) | largest;
            out |= y << (16 * half);
        }
        return out;
    }
}

// Rows [first, last) of a shared tile (layout Tile: PaddedTile, SwizzledTile) with every
// NaN and inf set to 0 (kSaturate: word_saturated's values instead, for raw keys); all
// kThreads threads (the caller's barrier publishes them).
template <typename T, class Tile, int kThreads, bool kSaturate = false>
__device__ __forceinline__ void zero_nonfinite_rows(T *tile, int first, int last, int tid) {
    constexpr int kPerRow = Tile::kChunksPerRow;
    auto word = [](uint32_t w) { return kSaturate ? word_saturated<T>(w) : word_without_nonfinite<T>(w); };
    for (int c = first * kPerRow + tid; c < last * kPerRow; c += kThreads) {
        uint4 *at = reinterpret_cast<uint4 *>(tile + Tile::chunk_offset(c / kPerRow, (c % kPerRow) * Tile::kChunk));
        const uint4 v = *at;
        const uint4 z = make_uint4(word(v.x), word(v.y), word(v.z), word(v.w));
        if (z.x != v.x || z.y != v.y || z.z != v.z || z.w != v.w) *at = z;
    }
}

} // namespace common
} // namespace fcsa
