// l2norm.cuh: l2 normalization of the rows of a shared tile, per group of columns.
//
// For each row r and group g (columns [g*d/groups, (g+1)*d/groups)) it computes, in
// float32, inv = 1 / max(||x[r, group g]||, 1e-12), then either scales that part of the
// row in place or (groups == 1 typically) writes inv to inv_norms[r * groups + g]. A
// few adjacent lanes share one (row, group) and combine their sums with shuffles, so
// the whole block works on the tile at once; groups whose size is a multiple of the
// 16-byte chunk are read a chunk at a time, others element by element.
// row_inverse_norms and normalize_rows are the fast case of the same (one group per
// row): a fixed thread-to-chunk assignment (RowNorms), no runtime loops, for the tiles
// normalized inside the kernels' main loops.
// Called by all kThreads threads of the block (a barrier before and after is the
// caller's business).
#pragma once

#include <cstdint>

#include "copy.cuh"
#include "numeric.cuh"
#include "row_lanes.cuh"

namespace fcsa {
namespace common {

constexpr float kNormEpsilon = 1e-12f;

// 1 / max(sqrt(sum_sq), eps). float32 inputs get the correctly rounded square root and
// division: the logits scale any relative error of the norms by up to scale * groups,
// and the approximate reciprocal square root alone (2^-22.9) would then cost float32
// its 1e-5 accuracy. 16-bit inputs round far more coarsely: the fast rsqrt. rsqrt(0) =
// inf, which the min turns into 1 / eps.
template <typename T> __device__ __forceinline__ float inverse_norm(float sum_sq) {
    if constexpr (ElementTraits<T>::kIs16Bit) return fminf(rsqrt_approx(sum_sq), 1.f / kNormEpsilon);
    else return 1.f / fmaxf(sqrtf(sum_sq), kNormEpsilon);
}

// Norms without overflow. A float32 sum of squares overflows for rows with entries from
// ~1.8e19 on, which bf16 and float32 hold (ElementTraits::kSquaresOverflow): the l2norm
// would then make x^ = 0. Such a row's norm is taken again, from memory, with the row
// scaled by 2^-e, 2^e above its largest magnitude (an exact scaling: nothing overflows,
// nothing that matters underflows): columns [col0, col0 + cols) of row `row` of a tile
// in layout L (ContiguousRow: a row pointer), by one lane alone (no shuffles).
template <typename T, class L>
__device__ __forceinline__ float rescaled_sum_of_squares(const T *tile, int row, int col0, int cols, int &e) {
    float top = 0.f;
    for (int c = 0; c < cols; ++c) top = fmaxf(top, fabsf(to_float(tile[L::offset(row, col0 + c)])));
    frexpf(top, &e); // largest < 2^e
    float sum = 0.f;
    for (int c = 0; c < cols; ++c) {
        const float y = ldexpf(to_float(tile[L::offset(row, col0 + c)]), -e);
        sum = fmaf(y, y, sum);
    }
    return sum; // the norm is 2^e sqrt(sum), which may itself exceed float32's range
}

// Whether a row's sum of squares overflowed (never for float16).
template <typename T> __device__ __forceinline__ bool norm_overflowed(float sum_sq) {
    if constexpr (!ElementTraits<T>::kSquaresOverflow) return false;
    else return isinf(sum_sq);
}

// Out of line (the callers' registers stay with their common path), for a row whose
// float32 sum of squares overflowed (its norm is above 1e19: far from the 1e-12 clamp).
// 1 / ||row||, as 2^-e / sqrt(sum): it may be subnormal, the norm need not be finite.
template <typename T, class L>
__device__ __noinline__ float rescaled_inverse_norm(const T *tile, int row, int col0, int cols) {
    int e;
    const float sum = rescaled_sum_of_squares<T, L>(tile, row, col0, cols, e);
    return ldexpf(1.f / sqrtf(sum), -e);
}
// The row times multiplier / ||row||, in place: (2^-e x) (multiplier / sqrt(sum)).
template <typename T, class L>
__device__ __noinline__ void rescale_row(T *tile, int row, int col0, int cols, float multiplier) {
    int e;
    const float factor = multiplier / sqrtf(rescaled_sum_of_squares<T, L>(tile, row, col0, cols, e));
    for (int c = 0; c < cols; ++c) {
        T &x = tile[L::offset(row, col0 + c)];
        x = from_float<T>(ldexpf(to_float(x), -e) * factor);
    }
}

// inverse_norm<Precision>(sum_sq), rescaled where sum_sq overflowed (the passes around
// the kernels). Inside the kernels a normalization leaves a row whose sum overflowed as
// it was and notes it in a per-lane bit mask; after the tile one warp vote decides whether
// any such row needs the fix (fix_overflowed).
template <typename T, typename Precision = T, class L = ContiguousRow>
__device__ __forceinline__ float safe_inverse_norm(float sum_sq, const T *tile, int row, int col0, int cols) {
    return norm_overflowed<T>(sum_sq) ? rescaled_inverse_norm<T, L>(tile, row, col0, cols)
                                      : inverse_norm<Precision>(sum_sq);
}

// Runs fix(k) for each bit k of `overflowed` when any lane of the warp has one (every
// lane of the warp calls it); the warp's shared-memory accesses are ordered around it.
template <typename T, class Fix> __device__ __forceinline__ void fix_overflowed(uint32_t overflowed, Fix fix) {
    if constexpr (ElementTraits<T>::kSquaresOverflow) {
        if (__any_sync(0xffffffffu, overflowed != 0u)) {
            __syncwarp();
#pragma unroll 1
            for (int k = 0; k < 32; ++k)
                if ((overflowed >> k) & 1u) fix(k);
            __syncwarp();
        }
    }
}

template <class Layout, int kThreads, typename T>
__device__ __forceinline__ void l2norm_rows(T *tile, int rows, int d, int groups, float *inv_norms,
                                            bool scale_in_place, int tid, float multiplier = 1.f) {
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
        const int row = active ? pair / groups : 0, col0 = (pair % groups) * group_size;
        // Chunk u (chunked) or element u of the (row, group).
        auto chunk = [&](int u) {
            return reinterpret_cast<uint4 *>(tile + Layout::chunk_offset(row, col0 + u * kChunk));
        };
        auto element = [&](int u) { return tile + Layout::offset(row, col0 + u); };
        float sum_sq = 0.f;
        if (active) {
            if (chunked) {
                // One partial sum per chunk position: chains kChunk times shorter, which
                // float32 needs when one lane sums a whole group (few lanes per row).
                float partial[kChunk] = {};
                for (int u = sub; u < units; u += lanes) {
                    float f[kChunk];
                    chunk_to_float<T>(*chunk(u), f);
#pragma unroll
                    for (int e = 0; e < kChunk; ++e) partial[e] = fmaf(f[e], f[e], partial[e]);
                }
#pragma unroll
                for (int width = kChunk / 2; width > 0; width /= 2)
#pragma unroll
                    for (int e = 0; e < width; ++e) partial[e] += partial[e + width];
                sum_sq = partial[0];
            } else {
                for (int u = sub; u < units; u += lanes) {
                    const float v = to_float(*element(u));
                    sum_sq = fmaf(v, v, sum_sq);
                }
            }
        }
        sum_sq = lanes_sum(sum_sq, lanes);
        const float inv = inverse_norm<T>(sum_sq);
        if (!active) continue;
        if (norm_overflowed<T>(sum_sq)) { // (uniform over the pair's lanes: none writes it)
            if (sub == 0) { // (the inverse norm first: rescale_row overwrites the row)
                if (inv_norms != nullptr) inv_norms[pair] = rescaled_inverse_norm<T, Layout>(tile, row, col0, group_size);
                if (scale_in_place) rescale_row<T, Layout>(tile, row, col0, group_size, multiplier);
            }
            continue;
        }
        if (inv_norms != nullptr && sub == 0) inv_norms[pair] = inv;
        if (scale_in_place) {
            const float factor = inv * multiplier;
            if (chunked) {
                for (int u = sub; u < units; u += lanes) {
                    uint4 *p = chunk(u);
                    float f[kChunk];
                    chunk_to_float<T>(*p, f);
#pragma unroll
                    for (int e = 0; e < kChunk; ++e) f[e] *= factor;
                    *p = float_to_chunk<T>(f);
                }
            } else {
                for (int u = sub; u < units; u += lanes) *element(u) = from_float<T>(to_float(*element(u)) * factor);
            }
        }
    }
}

// The fixed-shape row norms of a padded kRows x kCols tile (rows past the valid ones hold
// zeros): for every row, finish(row, sub, inv) with inv = 1 / max(||row||, 1e-12) over
// the first d columns, called by each of the kLanesPerRow adjacent lanes that share the
// row (sub = 0 .. kLanesPerRow - 1). Those lanes read interleaved chunks, so a warp's
// reads spread over the banks, and each element position keeps its own partial sum, so
// the FMAs form short independent chains. No runtime loops or divisions: the compiler
// can schedule it among the matrix products around it.
template <typename T, int kRows, int kCols, int kThreads> struct RowNorms {
    using L = PaddedTile<T, kRows, kCols>;
    static constexpr int kLanesPerRow = kThreads / kRows < 1 ? 1 : (kThreads / kRows > 32 ? 32 : kThreads / kRows);
    static constexpr int kRowsPerPass = kThreads / kLanesPerRow;
    static constexpr int kChunksPerLane = (L::kChunksPerRow + kLanesPerRow - 1) / kLanesPerRow;
    static_assert((kLanesPerRow & (kLanesPerRow - 1)) == 0, "lanes per row must be a power of two");

    // Whether chunk i of lane `sub` holds columns below d.
    __device__ __forceinline__ static bool chunk_used(int sub, int i, int d) {
        const int chunk = sub + i * kLanesPerRow;
        return chunk < L::kChunksPerRow && chunk * L::kChunk < d;
    }
    __device__ __forceinline__ static int chunk_offset(int row, int sub, int i) {
        return row * L::kStride + (sub + i * kLanesPerRow) * L::kChunk;
    }

    static_assert(kRows % kRowsPerPass == 0, "every lane runs the same rows loop (shuffles)");

    static constexpr int kPasses = kRows / kRowsPerPass; // rows per lane
    static_assert(kPasses <= 32, "one bit per row of a lane (fix_overflowed)");

    // 1 / max(||row||, eps) from a lane's per-position partial sums of squares: the
    // positions summed as a tree, then the row's lanes combined by shuffles. -1 where
    // the sum overflowed (the row then waits for fix_overflowed).
    __device__ __forceinline__ static float row_inverse_norm(float (&partial)[L::kChunk]) {
#pragma unroll
        for (int width = L::kChunk / 2; width > 0; width /= 2)
#pragma unroll
            for (int e = 0; e < width; ++e) partial[e] += partial[e + width];
        const float sum_sq = lanes_sum(partial[0], kLanesPerRow);
        return norm_overflowed<T>(sum_sq) ? -1.f : inverse_norm<T>(sum_sq);
    }
    // The row of pass k of this lane.
    __device__ __forceinline__ static int pass_row(int tid, int k) { return tid / kLanesPerRow + k * kRowsPerPass; }
    // The rows of `overflowed` (left as they were) scaled by multiplier / their norm.
    __device__ __forceinline__ static void rescale_overflowed(T *tile, int d, int tid, float multiplier,
                                                              uint32_t overflowed) {
        fix_overflowed<T>(overflowed, [&](int k) { rescale_row<T, L>(tile, pass_row(tid, k), 0, d, multiplier); });
    }

    // finish(row, sub, inv) for every row, inv = -1 where the row's sum overflowed; returns
    // those rows' bits (pass k: bit k) in the row's first lane.
    template <class Finish>
    __device__ __forceinline__ static uint32_t run(const T *tile, int d, int tid, Finish finish) {
        const int sub = tid % kLanesPerRow;
        uint32_t overflowed = 0u;
#pragma unroll
        for (int k = 0; k < kPasses; ++k) {
            const int row = pass_row(tid, k);
            float partial[L::kChunk];
#pragma unroll
            for (int e = 0; e < L::kChunk; ++e) partial[e] = 0.f;
#pragma unroll
            for (int i = 0; i < kChunksPerLane; ++i) {
                if (chunk_used(sub, i, d)) {
                    float f[L::kChunk];
                    chunk_to_float<T>(*reinterpret_cast<const uint4 *>(tile + chunk_offset(row, sub, i)), f);
#pragma unroll
                    for (int e = 0; e < L::kChunk; ++e) partial[e] = fmaf(f[e], f[e], partial[e]);
                }
            }
            const float inv = row_inverse_norm(partial);
            if (inv < 0.f && sub == 0) overflowed |= 1u << k;
            finish(row, sub, inv);
        }
        return overflowed;
    }
};

// inv[r] = 1 / max(||row r||, 1e-12) for every row r of the tile (RowNorms).
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void row_inverse_norms(const T *tile, int d, float *inv, int tid) {
    using N = RowNorms<T, kRows, kCols, kThreads>;
    const uint32_t overflowed = N::run(tile, d, tid, [&](int row, int sub, float row_inv) {
        if (sub == 0) inv[row] = row_inv;
    });
    fix_overflowed<T>(overflowed, [&](int k) {
        const int row = N::pass_row(tid, k);
        inv[row] = rescaled_inverse_norm<T, typename N::L>(tile, row, 0, d);
    });
}

// row_inverse_norms for a 16-bit tile on the tensor cores: each warp takes 16-row blocks
// and forms the block's Gram matrix X X^T, whose diagonal holds the rows' sums of
// squares (the products of 16-bit values are exact, the sums are float32). A few
// ldmatrix + mma per block replace a pass over the tile on the FMA pipe, which the
// forward pays once per key tile and CTA.
// The A operand of rows r0..r0+15 holds both B operands of X^T: registers 0 and 2 for
// rows r0..r0+7, 1 and 3 for r0+8..r0+15.
template <typename T, int kRows, int kCols, int kWarps, class L = PaddedTile<T, kRows, kCols>>
__device__ __forceinline__ void row_inverse_norms_mma(const T *tile, float *inv, int warp, int lane) {
    static_assert(ElementTraits<T>::kIs16Bit && kRows % 16 == 0 && kCols % 16 == 0, "16-bit 16 x 16 blocks");
    constexpr int kBlocks = kRows / 16;
    static_assert(2 * ((kBlocks + kWarps - 1) / kWarps) <= 32, "one bit per row (fix_overflowed)");
    const int g = lane >> 2, t = lane & 3;
    uint32_t overflowed = 0u; // rows whose sums overflowed: block i's low (bit 2i) and high
#pragma unroll
    for (int i = 0; i < (kBlocks + kWarps - 1) / kWarps; ++i) {
        const int block = warp + i * kWarps;
        if (kBlocks % kWarps != 0 && block >= kBlocks) break;
        // X X^T, columns = rows 0..7 (low) resp. 8..15 (high) of the block; even and odd
        // k steps in separate accumulators, so the dependent mma chains are half as long.
        FragC low[2], high[2];
#pragma unroll
        for (int parity = 0; parity < 2; ++parity) {
            clear(low[parity]);
            clear(high[parity]);
        }
#pragma unroll
        for (int kk = 0; kk < kCols / 16; ++kk) {
            FragA16 a;
            load_a16(a, tile, L{}, 16 * block, 16 * kk, lane);
            const FragB16 b_low = {{a.x[0], a.x[2]}}, b_high = {{a.x[1], a.x[3]}};
            mma_m16n8k16<T>(low[kk % 2], a, b_low);
            mma_m16n8k16<T>(high[kk % 2], a, b_high);
        }
        // Diagonal entries: row g of `low` at column g, row 8 + g of `high` at column g;
        // column 2t + e of an accumulator is element e (row g) or 2 + e (row g + 8).
        const bool diagonal = t == (g >> 1);
        const bool odd = g & 1;
        const float low_sum = odd ? low[0].x[1] + low[1].x[1] : low[0].x[0] + low[1].x[0];
        const float high_sum = odd ? high[0].x[3] + high[1].x[3] : high[0].x[2] + high[1].x[2];
        if (diagonal) {
            inv[16 * block + g] = inverse_norm<T>(low_sum);
            inv[16 * block + 8 + g] = inverse_norm<T>(high_sum);
            if (norm_overflowed<T>(low_sum)) overflowed |= 1u << (2 * i);
            if (norm_overflowed<T>(high_sum)) overflowed |= 1u << (2 * i + 1);
        }
    }
    fix_overflowed<T>(overflowed, [&](int k) {
        const int row = 16 * (warp + k / 2 * kWarps) + g + 8 * (k % 2);
        inv[row] = rescaled_inverse_norm<T, L>(tile, row, 0, kCols);
    });
}

// Every row of the tile divided by max(||row||, 1e-12) in place (one group per row):
// the fixed-shape counterpart of l2norm_rows, for tiles normalized inside a main loop.
// For 16-bit tiles with d == kCols (the common case) each lane keeps its chunks as
// floats between the sum and the scaling, with no tests: the same arithmetic as the
// general path below (+6% for the d = 128 backward on the H100; float32 tiles, twice
// the registers per chunk, lost 3% with it and keep the general path).
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void normalize_rows(T *tile, int d, int tid, float multiplier = 1.f) {
    using N = RowNorms<T, kRows, kCols, kThreads>;
    if (ElementTraits<T>::kIs16Bit && d == kCols && N::L::kChunksPerRow % N::kLanesPerRow == 0) {
        constexpr int kChunk = N::L::kChunk;
        const int sub = tid % N::kLanesPerRow;
        uint32_t overflowed = 0u;
#pragma unroll
        for (int k = 0; k < N::kPasses; ++k) {
            const int row = N::pass_row(tid, k);
            float f[N::kChunksPerLane][kChunk], partial[kChunk];
#pragma unroll
            for (int e = 0; e < kChunk; ++e) partial[e] = 0.f;
#pragma unroll
            for (int i = 0; i < N::kChunksPerLane; ++i) {
                chunk_to_float<T>(*reinterpret_cast<const uint4 *>(tile + N::chunk_offset(row, sub, i)), f[i]);
#pragma unroll
                for (int e = 0; e < kChunk; ++e) partial[e] = fmaf(f[i][e], f[i][e], partial[e]);
            }
            const float inv = N::row_inverse_norm(partial);
            if (inv < 0.f && sub == 0) overflowed |= 1u << k;
            const float row_inv = inv < 0.f ? 1.f : inv * multiplier; // an overflowed row stays as it was
#pragma unroll
            for (int i = 0; i < N::kChunksPerLane; ++i) {
#pragma unroll
                for (int e = 0; e < kChunk; ++e) f[i][e] *= row_inv;
                *reinterpret_cast<uint4 *>(tile + N::chunk_offset(row, sub, i)) = float_to_chunk<T>(f[i]);
            }
        }
        N::rescale_overflowed(tile, d, tid, multiplier, overflowed);
        return;
    }
    const uint32_t overflowed = N::run(tile, d, tid, [&](int row, int sub, float inv) {
        const float row_inv = inv < 0.f ? 1.f : inv * multiplier; // an overflowed row stays as it was
#pragma unroll
        for (int i = 0; i < N::kChunksPerLane; ++i) {
            if (N::chunk_used(sub, i, d)) {
                uint4 *chunk = reinterpret_cast<uint4 *>(tile + N::chunk_offset(row, sub, i));
                float f[N::L::kChunk];
                chunk_to_float<T>(*chunk, f);
#pragma unroll
                for (int e = 0; e < N::L::kChunk; ++e) f[e] *= row_inv;
                *chunk = float_to_chunk<T>(f);
            }
        }
    });
    N::rescale_overflowed(tile, d, tid, multiplier, overflowed);
}

// The first `rows` rows of a padded kRows x kCols tile l2-normalized in place per group
// of columns (and times `multiplier`): normalize_rows for one group, l2norm_rows for
// several.
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void normalize_tile(T *tile, int rows, int d, int groups, int tid, float multiplier = 1.f) {
    if (groups == 1)
        normalize_rows<T, kRows, kCols, kThreads>(tile, d, tid, multiplier);
    else
        l2norm_rows<PaddedTile<T, kRows, kCols>, kThreads>(tile, rows, d, groups, nullptr, true, tid, multiplier);
}

} // namespace common
} // namespace fcsa
