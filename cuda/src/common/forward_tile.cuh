// forward_tile.cuh: which query tile a forward CTA computes, in both backends' kernels
// and in the recomputation of their non-finite rows (nonfinite_rows.cuh).
#pragma once

#include <cstdint>

namespace fcsa {
namespace common {

// CTA `cta`'s query tile, head and batch: query tiles fastest, in reverse so that
// causal's long tiles start first, then heads, then batch. Packed sequences (kPacked):
// the CTA's entry of the table, fastest-varying by head (the heads of a tile share its
// K/V in L2), gives its query tile and sequence (first query row, rows, first key,
// keys); a CTA past the table's entries returns before it asks. P: the backend's
// parameters (heads, num_m_tiles, varlen's tiles and sequences).
template <bool kPacked> struct CtaTile {
    int4 sequence;
    int m_tile, hq, bi;
    template <class P> __device__ __forceinline__ CtaTile(const P &p, uint32_t cta) {
        // (32-bit division: a 64-bit one is a slow subroutine; the grid is < 2^31 CTAs.)
        const int2 packed_tile = kPacked ? p.varlen.tiles[cta / uint32_t(p.heads)] : int2{};
        sequence = kPacked ? p.varlen.sequences[packed_tile.x] : int4{};
        m_tile = kPacked ? packed_tile.y : p.num_m_tiles - 1 - int(cta % uint32_t(p.num_m_tiles));
        const uint32_t batch_head = cta / uint32_t(p.num_m_tiles);
        hq = kPacked ? int(cta % uint32_t(p.heads)) : int(batch_head % uint32_t(p.heads));
        bi = kPacked ? 0 : int(batch_head / uint32_t(p.heads));
    }
};

} // namespace common
} // namespace fcsa
