// backward_shared_scores.cuh: the sm80 backward's main kernel for its common case
// (16-bit, head dims 64 and 128, no bias, dbias or dscale; key masks allowed) on GPUs
// with the shared memory for it (plan_workspace in backward.cu chooses). It computes
// what MainKernel<T, S, false> computes, for the same 128-key tiles, with a different
// division of the work:
//
//   MainKernel          every warp owns 16 keys through all five products: S^T and
//                       dP^T need the whole query tile per warp, and P^T, dS^T stay
//                       in registers as the A operands of dV and dK.
//   SharedScoresKernel  every product is split over the 8 warps in two dimensions
//                       (S, dP: 2 x 4 blocks of query rows x keys; dV, dK: 4 x 2 of
//                       keys x columns; dQ: 2 x 4 of rows x columns), and P and
//                       scale * dS go through shared memory between them.
//
// Each warp's products then reuse every fragment they load over twice the rows or
// columns (fewer shared-memory reads per mma), dK and dV take the same registers as
// before, and S and dP need no registers beyond the products' own blocks. The numerics
// are those of MainKernel (P and scale * dS rounded to T once, float32 accumulators),
// except that for bf16 with one l2norm group q's norm is folded into the scores
// (Params::q_inv_norm): q^ is never rounded to bf16. Checked against float64 by
// cuda/tests/check_backward.cu. Packed sequences (kVarlen): one CTA per entry of
// Params::varlen_keys, on its sequence's extent, as MainKernel does.
//
// Measured (H100 SXM, 2026-11-24, bf16, batch = 16384 / n, heads = 2048 / d, the
// whole backward with its passes): d = 128 231 / 251 / 262 / 266 TFLOP/s at n = 2k /
// 4k / 8k / 16k; d = 64 with 128 query rows per tile 207 / 225 / 235 / 239, 2-6% above
// 64 rows (benchmarks/NOTES.md, v8). Of a warp's instructions per query tile (ncu,
// n = 4k) ~47% are the products and their fragment loads, 18% P and dS, 17% issuing
// the next tile's copies; 255 registers, 70-75% of cycles with no eligible warp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "backward_kernels.cuh"

namespace fcsa {
namespace sm80_bwd {

template <typename T, int kHeadDim, int kQueryRows> struct SharedScoresShape {
    static_assert(common::ElementTraits<T>::kIs16Bit, "16-bit operands only");
    static constexpr int D = kHeadDim;
    static constexpr int kWarps = 8;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kKeys = 128;      // keys per CTA
    static constexpr int BR = kQueryRows;  // query rows per tile
    static constexpr int kStages = 2;      // query tiles in flight (cp.async; three gained nothing)
    using KTile = common::PaddedTile<T, kKeys, D>;
    using QTile = common::PaddedTile<T, BR, D>;
    using PTile = common::PaddedTile<T, BR, kKeys>; // P and scale * dS, [query][key]
    // Each warp's block of every product (the warp grids above).
    static constexpr int kScoreRows = BR / 2, kScoreKeys = kKeys / 4;
    static constexpr int kGradKeys = kKeys / 4, kGradCols = D / 2;
    static constexpr int kDqRows = BR / 2, kDqCols = D / 4;
    // Shared memory, in bytes.
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kOffK + KTile::kBytes;
    static constexpr int kOffQ = kOffV + KTile::kBytes;  // kStages buffers
    static constexpr int kOffDo = kOffQ + kStages * QTile::kBytes;
    static constexpr int kOffP = kOffDo + kStages * QTile::kBytes;
    static constexpr int kOffDs = kOffP + PTile::kBytes;
    static constexpr int kOffLse = kOffDs + PTile::kBytes; // [kStages][BR] float
    static constexpr int kOffDelta = kOffLse + kStages * BR * 4;
    static constexpr int kOffInvNorm = kOffDelta + kStages * BR * 4; // 1 / ||q||, when folded
    static constexpr int kSmemBytes = kOffInvNorm + kStages * BR * 4;
    // The epilogue stages dK^ rows (float) over the K and V tiles.
    static constexpr int kStageStride = D + 4;

    static_assert(kScoreRows % 16 == 0 && kGradCols % 16 == 0 && kDqRows % 16 == 0 && kDqCols % 16 == 0,
                  "warp blocks of whole fragments");
    static_assert(kKeys * kStageStride * 4 <= kOffQ, "dK staging fits");
};

// kMasked: with a key mask (a variant of its own: the unmasked kernel keeps the
// registers the mask's bits would take). kVarlen: packed sequences (never masked).
template <typename T, class S, bool kMasked, bool kVarlen> struct SharedScoresKernel {
    static_assert(!(kMasked && kVarlen), "packed sequences have no key mask");
    using G = WarpGemm<T>;
    static constexpr int BR = S::BR, D = S::D;
    // Fragments per warp: S and dP, dK and dV, dQ.
    static constexpr int SM = S::kScoreRows / 16, SN = S::kScoreKeys / 8;
    static constexpr int GM = S::kGradKeys / 16, GN = S::kGradCols / 8;
    static constexpr int QM = S::kDqRows / 16, QN = S::kDqCols / 8;

    struct Smem : KeyQuerySmem<T> {
        T *p, *ds;
    };

    __device__ __forceinline__ static Smem carve(unsigned char *base) {
        Smem s;
        carve_key_query<T, S>(s, base);
        s.q_inv_norm = reinterpret_cast<float *>(base + S::kOffInvNorm);
        s.p = reinterpret_cast<T *>(base + S::kOffP);
        s.ds = reinterpret_cast<T *>(base + S::kOffDs);
        return s;
    }

    // One CTA per (key tile, kv head, batch): the grid of launch_shared_scores (packed
    // sequences: per entry of the key-tile table, and kv head).
    __device__ __forceinline__ static void run(const Params &p, unsigned char *smem_base) {
        const Smem s = carve(smem_base);
        if constexpr (kVarlen) {
            if (blockIdx.x >= *p.varlen_keys.count) return; // a spare CTA of the launch's bound
            int64_t key_tile = 0;
            const Extent<true> e = packed_extent(p.varlen_keys, blockIdx.x, &key_tile);
            for (int64_t kv = blockIdx.y; kv < p.hk; kv += gridDim.y) key_tile_item(p, e, s, 0, kv, key_tile);
        } else {
            const int64_t key_tiles = (p.nk + S::kKeys - 1) / S::kKeys;
            for (int64_t item = blockIdx.y; item < p.b * p.hk; item += gridDim.y)
                key_tile_item(p, Extent<false>{}, s, item % p.b, item / p.b, blockIdx.x % key_tiles);
        }
    }

    __device__ __forceinline__ static void key_tile_item(const Params &p, const Extent<kVarlen> &e, const Smem &s,
                                                         int64_t batch, int64_t kv, int64_t key_tile) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
        const int64_t j0 = e.key(key_tile * S::kKeys);
        const int keys = static_cast<int>(e.k_end(p) - j0 < S::kKeys ? e.k_end(p) - j0 : S::kKeys);
        const int64_t query_tiles = (e.q_count(p) + BR - 1) / BR;
        const int64_t head0 = kv * p.heads_per_kv;
        // This warp's blocks (rows / keys / columns where each starts).
        const int score_row0 = (warp / 4) * S::kScoreRows, score_key0 = (warp % 4) * S::kScoreKeys;
        const int grad_key0 = (warp % 4) * S::kGradKeys, grad_col0 = (warp / 4) * S::kGradCols;
        const int dq_row0 = (warp % 2) * S::kDqRows, dq_col0 = (warp / 2) * S::kDqCols;

        // With a key mask: the visible keys (below nk, unmasked) of this thread's score
        // columns, key 8n + 2t + c of its block as bit 2n + c.
        uint32_t key_bits = 0;
        bool warp_keys_visible = keys == S::kKeys;
        if constexpr (kMasked) {
#pragma unroll
            for (int n = 0; n < SN; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c)
                    if (key_unmasked(p, batch, j0 + score_key0 + 8 * n + 2 * t + c)) key_bits |= 1u << (2 * n + c);
            warp_keys_visible = __all_sync(0xffffffffu, key_bits == (1u << (2 * SN)) - 1);
            // (A barrier too: the previous item's epilogue is done with shared memory.)
            if (!__syncthreads_or(key_bits != 0)) {
                write_zero_grads<T, D, S::kThreads>(p, batch, kv, j0, keys, 0, tid); // every key hidden
                return;
            }
        } else {
            __syncthreads(); // the previous item's epilogue is done with shared memory
        }
        issue_key_tiles<T, S::kKeys, D, S::kThreads>(p, s.k, s.v, batch, kv, j0, keys, tid);
        common::cp_async_commit();
        FragC dk[GM][GN], dv[GM][GN];
        clear_all(dk, dv);

        // Causal: the query tiles before qt_begin see none of these keys, for every head.
        const int64_t qt_begin = first_query_tile<BR>(p, e, j0, query_tiles);
        bool k_ready = false; // K^ is made ready in place once, with the first query tile
        // q's norm folded (Params::q_inv_norm): the query tiles stay raw, S and scale dS
        // are divided by ||q|| per row. Else they are normalized in place as they land.
        const bool fold_q_norm = p.q_inv_norm != nullptr;
        for (int64_t head = head0; qt_begin < query_tiles && head < head0 + p.heads_per_kv; ++head) {
            const float scale = head_scale(p, head);
            start_query_tiles<T, S>(p, e, s, keys, k_ready, batch, head, qt_begin, query_tiles, tid);

            int stage = 0; // of tile qt; tile qt + 1 goes to the other one
            for (int64_t qt = qt_begin; qt < query_tiles; ++qt, stage ^= 1) {
                common::cp_async_wait<0>(); // tile qt landed (and was normalized) ...
                __syncthreads();             // ... for every thread; P, dS and tile qt - 1 are no longer read
                if (qt + 1 < query_tiles) issue_query_stage<T, S>(p, e, s, batch, head, qt + 1, stage ^ 1, tid);
                common::cp_async_commit();

                const T *q_s = s.q + stage * S::QTile::kElements;
                const T *do_s = s.dout + stage * S::QTile::kElements;
                const float *lse_s = s.lse + stage * BR;
                const float *delta_s = s.delta + stage * BR;
                const float *inv_norm_s = s.q_inv_norm + stage * BR;
                const int64_t i0 = e.row(qt * BR);

                // S = Q^ K^T (Q raw when q's norm is folded) and dP = dO V^T, this warp's block.
                FragC sc[SM][SN], dp[SM][SN];
                clear_all(sc, dp);
                G::template rows_nk<SM, SN, D>(sc, q_s, S::QTile::kStride, score_row0, s.k, S::KTile::kStride,
                                               score_key0, lane);
                G::template rows_nk<SM, SN, D>(dp, do_s, S::QTile::kStride, score_row0, s.v, S::KTile::kStride,
                                               score_key0, lane);

                // P and scale * dS into shared memory, in tile-local 32-bit coordinates: key
                // jl sees row r when the key is visible (its bit), r < rows and jl - r <=
                // diagonal. The common tile, every score of the warp visible, runs without
                // the test.
                const int rows = static_cast<int>(e.q_end(p) - i0 < BR ? e.q_end(p) - i0 : BR);
                const int diagonal = clamp_to_int(p.causal ? i0 + e.causal_offset(p) - j0 : int64_t(1) << 30);
                // P = 2^(s scale log2(e) - lse log2(e)) and scale dS = P (dP scale - delta
                // scale): log2(e) and scale folded per row, one FFMA each. The float32
                // rounding this adds (~2^-24 of the exponent) is far below P's rounding to T.
                // With q's norm folded, s is <q, k^> and every row's factors carry 1 / ||q||:
                // scale dS / ||q|| is what dK^ (raw q) and dQ^ (the finishing pass divides
                // no more) need.
                const float scale_log2 = scale * common::kLog2e;
                auto scores_to_shared = [&](auto visible) {
#pragma unroll
                    for (int m = 0; m < SM; ++m)
#pragma unroll
                        for (int half = 0; half < 2; ++half) {
                            const int r = score_row0 + 16 * m + g + 8 * half;
                            const float inv_norm = fold_q_norm ? inv_norm_s[r] : 1.f;
                            const float row_scale_log2 = scale_log2 * inv_norm, row_scale = scale * inv_norm;
                            const float lse_log2 = lse_s[r] * common::kLog2e, delta_scaled = delta_s[r] * row_scale;
#pragma unroll
                            for (int n = 0; n < SN; ++n) {
                                const int jl = score_key0 + 8 * n + 2 * t;
                                float prob[2], grad[2];
#pragma unroll
                                for (int c = 0; c < 2; ++c) {
                                    const int e = 2 * half + c;
                                    // A hidden key's dS is 0 by selection: its dP may be NaN.
                                    const bool seen = visible(r, jl + c, 2 * n + c);
                                    prob[c] = seen ? common::exp2_approx(fmaf(sc[m][n].x[e], row_scale_log2, -lse_log2))
                                                   : 0.f;
                                    grad[c] = seen ? prob[c] * fmaf(dp[m][n].x[e], row_scale, -delta_scaled) : 0.f;
                                }
                                const int at = r * S::PTile::kStride + jl;
                                *reinterpret_cast<uint32_t *>(s.p + at) = common::pack_float2<T>(prob[0], prob[1]);
                                *reinterpret_cast<uint32_t *>(s.ds + at) = common::pack_float2<T>(grad[0], grad[1]);
                            }
                        }
                };
                if (rows == BR && warp_keys_visible && score_key0 + S::kScoreKeys - 1 - score_row0 <= diagonal)
                    scores_to_shared([](int, int, int) { return true; });
                else
                    scores_to_shared([&](int r, int j, int bit) {
                        const bool key_visible = kMasked ? ((key_bits >> bit) & 1u) != 0 : j < keys;
                        return key_visible && r < rows && j - r <= diagonal;
                    });

                // Tile qt + 1 is normalized once it has landed for every thread, after the
                // barrier that publishes P and dS.
                const bool normalize_next = p.l2norm && !fold_q_norm && qt + 1 < query_tiles;
                if (normalize_next) common::cp_async_wait<0>();
                __syncthreads();
                if (normalize_next) normalize_query_stage<T, S>(p, e, s, qt + 1, stage ^ 1, tid);

                // dV += P^T dO and dK^ += (scale dS)^T Q^ (folded: (scale dS / ||q||)^T Q).
                G::template cols_kn<GM, GN, BR>(dv, s.p, S::PTile::kStride, grad_key0, do_s, S::QTile::kStride,
                                                grad_col0, lane);
                G::template cols_kn<GM, GN, BR>(dk, s.ds, S::PTile::kStride, grad_key0, q_s, S::QTile::kStride,
                                                grad_col0, lane);

                if (!p.deterministic) {
                    // dQ^ += (scale dS) K^, into the float32 accumulator by atomics.
                    FragC dq[QM][QN];
                    clear_all(dq);
                    G::template rows_kn<QM, QN, S::kKeys>(dq, s.ds, S::PTile::kStride, dq_row0, s.k,
                                                          S::KTile::kStride, dq_col0, lane);
                    // One 64-bit address per tile, 32-bit offsets from it; no tests in a full tile.
                    float *dq_tile = p.dq_acc + ((batch * p.h + head) * p.nq + i0) * p.d;
                    const int lane_offset = (dq_row0 + g) * p.d + dq_col0 + 2 * t;
                    auto add_dq = [&](auto in_bounds) {
#pragma unroll
                        for (int m = 0; m < QM; ++m)
#pragma unroll
                            for (int half = 0; half < 2; ++half)
#pragma unroll
                                for (int n = 0; n < QN; ++n) {
                                    const int r = 16 * m + 8 * half, c = 8 * n;
                                    if (in_bounds(dq_row0 + g + r, dq_col0 + 2 * t + c))
                                        atomic_add2(dq_tile + lane_offset + r * p.d + c, dq[m][n].x[2 * half],
                                                    dq[m][n].x[2 * half + 1]);
                                }
                    };
                    if (rows == BR && p.d == D)
                        add_dq([](int, int) { return true; });
                    else
                        add_dq([&](int r, int c) { return r < rows && c < p.d; });
                }
            }
        }
        common::cp_async_wait<0>();
        epilogue(p, s, dk, dv, batch, kv, j0, keys, grad_key0, grad_col0, lane, warp);
    }

    // dV and dK (through the l2norm backward, whole rows staged in shared memory) of the
    // CTA's keys.
    __device__ __forceinline__ static void epilogue(const Params &p, const Smem &s, const FragC (&dk)[GM][GN],
                                                    const FragC (&dv)[GM][GN], int64_t batch, int64_t kv, int64_t j0,
                                                    int keys, int grad_key0, int grad_col0, int lane, int warp) {
        const int g = lane >> 2, t = lane & 3;
        // f(key row r, column c, the two values at c and c + 1) for this warp's block.
        auto for_each_pair = [&](const FragC(&acc)[GM][GN], auto f) {
#pragma unroll
            for (int m = 0; m < GM; ++m)
#pragma unroll
                for (int half = 0; half < 2; ++half)
#pragma unroll
                    for (int n = 0; n < GN; ++n)
                        f(grad_key0 + 16 * m + g + 8 * half, grad_col0 + 8 * n + 2 * t, acc[m][n].x[2 * half],
                          acc[m][n].x[2 * half + 1]);
        };
        // (cols: dV's d_v or dK's d.)
        auto store_rows = [&](const OutRows &out, int cols, float a, float b, int r, int c) {
            if (r < keys && c < cols) {
                T *row = out.row<T>(batch, kv, j0 + r);
                if (out.aligned16) {
                    *reinterpret_cast<uint32_t *>(row + c) = common::pack_float2<T>(a, b);
                } else {
                    row[c] = common::from_float<T>(a);
                    row[c + 1] = common::from_float<T>(b);
                }
            }
        };
        for_each_pair(dv, [&](int r, int c, float a, float b) { store_rows(p.dv, p.d_v, a, b, r, c); });
        if (!p.l2norm) {
            for_each_pair(dk, [&](int r, int c, float a, float b) { store_rows(p.dk, p.d, a, b, r, c); });
            return;
        }
        __syncthreads(); // every warp is done with the K and V tiles
        float *stage = reinterpret_cast<float *>(s.k);
        for_each_pair(dk, [&](int r, int c, float a, float b) {
            *reinterpret_cast<float2 *>(stage + r * S::kStageStride + c) = make_float2(a, b);
        });
        __syncthreads();
        finish_dk_rows<T, D, S::kKeys, S::kThreads, S::kStageStride>(p, stage, batch, kv, j0, keys, warp * 32 + lane);
    }
};

template <typename T, class S, bool kMasked, bool kVarlen>
__global__ void __launch_bounds__(S::kThreads, 1) shared_scores_kernel(const Params p) {
    extern __shared__ __align__(16) unsigned char smem[];
    SharedScoresKernel<T, S, kMasked, kVarlen>::run(p, smem);
}

} // namespace sm80_bwd
} // namespace fcsa
