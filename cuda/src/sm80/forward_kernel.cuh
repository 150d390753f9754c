// forward_kernel.cuh: the portable CUDA forward kernel, FlashAttention-2 style.
//
// One CTA (4 warps) per (query tile, head, batch), flattened into grid.x: query tiles
// fastest, in reverse so that causal's long tiles start first, and neighbouring CTAs
// share K/V in L2 (packed sequences: one CTA per entry of the tile table, varlen.cuh,
// and head). Each warp owns 16 or 32 query rows (ForwardConfig). Per CTA:
//   prologue  Q tile -> shared (cp.async), l2-normalized in place per group (float32
//             norms); with 16-bit inputs and D <= 64 each warp then keeps its Q rows in
//             registers. Under a key mask, one pass over the mask marks which key tiles
//             have any / only visible keys.
//   loop      over the visible key tiles (causal stops at the diagonal; masked-out
//             tiles are skipped): K and V stream through one shared buffer each
//             (swizzled for 16-bit d >= 128, layout.cuh), the next K tile loading
//             while P·V runs and V loading while S = Q K^T runs.
//             K rows are normalized as the tile arrives: for groups == 1 a factor
//             scale * log2(e) / ||k_j|| per column of S, with 1 / ||k_j|| copied in
//             from the key-norm pass (forward.cu) or computed here (16-bit: from the
//             diagonal of K K^T on the tensor cores); else in place per group. The
//             plain kernel (below) scales q^ by scale * log2(e) in the prologue instead.
//   softmax   base 2. With l2norm and no bias every logit is bounded by |scale|*groups,
//             so p = 2^(x - bound) needs no running maximum, no reductions and no
//             rescaling of O: on tiles without masking that is one FMA and one ex2 per
//             score. Otherwise (bias, no l2norm, masked tiles, or a bound too wide for
//             the probabilities' format) a general path adds bias and -inf masks and,
//             when the logits are not bounded, tracks the row maximum (online softmax).
//             P stays in registers, packed as the A operand of P·V as soon as it exists;
//             at d = 64 the plain kernel sums its rows on the tensor cores (P times a
//             column of ones) instead of with float adds.
//   epilogue  O / rowsum -> shared -> global (16-byte stores), lse = ln(sum) + max.
//             Causal: a warp whose rows hold an accumulator that is not finite (a NaN
//             or inf value of a key past some rows' reach met their p = 0 in P V)
//             computes those rows again afterwards (common/nonfinite_rows.cuh).
// Products: mma.m16n8k16 for f16/bf16 (ldmatrix, .trans for V); float32 through
// 3xTF32 (mma.m16n8k8 on split operands), which keeps float32 accuracy.
// Checked against a float64 reference, and timed, by cuda/tests/check_forward.cu.
#pragma once

#include <cmath>

#include "../common/copy.cuh"
#include "../common/l2norm.cuh"
#include "../common/forward_tile.cuh"
#include "../common/mma.cuh"
#include "../common/nonfinite_rows.cuh"
#include "../common/numeric.cuh"
#include "../backends.h"
#include "forward.cuh"

namespace fcsa {
namespace sm80 {

// The calling warp's rows of its CTA's tile as common::recompute_nonfinite_rows reads
// them (see there), found from the parameters, blockIdx and threadIdx as the kernel finds
// them.
template <typename T, int D, int DV, bool kVarlen>
struct ForwardRows : common::TileRows<T, ForwardParams, kVarlen> {
    using Base = common::TileRows<T, ForwardParams, kVarlen>;
    using C = ForwardConfig<T, D, DV>;
    static constexpr int kValueColumns = DV;
    using Base::bi, Base::hq, Base::p;
    __device__ explicit ForwardRows(const ForwardParams &params)
        : Base(params, common::CtaTile<kVarlen>(params, blockIdx.x), C::kBlockM, int(threadIdx.x / 32) * C::kRowsPerWarp) {}
    __device__ bool key_visible(int j) const {
        return p.mask == nullptr || p.mask[bi * p.mask_stride[0] + int64_t(j) * p.mask_stride[1]] != 0;
    }
    __device__ double bias(int i, int j) const {
        if (p.bias == nullptr) return 0.0;
        const int64_t at = bi * p.bias_stride[0] + hq * p.bias_stride[1] + int64_t(i) * p.bias_stride[2] +
                           int64_t(j) * p.bias_stride[3];
        return p.bias_is_f32 ? static_cast<const float *>(p.bias)[at]
                             : common::to_float(static_cast<const T *>(p.bias)[at]);
    }
    __device__ double scale() const { return p.scale_t != nullptr ? p.scale_t[hq * p.scale_stride] : p.scale; }
    __device__ int d() const { return p.d; }
    __device__ int d_v() const { return p.d_v; }
    __device__ int groups() const { return p.groups; }
    __device__ bool l2norm() const { return p.l2norm; }
    // out in float32 for 16-bit inputs where the kernel writes it so (out_f32), else in T
    __device__ void out(int i, int col, double x) const {
        if (common::ElementTraits<T>::kIs16Bit && !p.out_f32)
            static_cast<T *>(p.out)[this->out_index(i, col)] = common::from_float<T>(float(x));
        else
            static_cast<float *>(p.out)[this->out_index(i, col)] = float(x);
    }
};

// Zeros the rows of a V tile (keys j0 ..) whose keys the mask hides: P is 0 there, and
// 0 * (a NaN or inf in v) must not reach O. Runs on partly masked tiles only. (Out of
// line, its call in the main loop had the general d = 128 kernel spill 3x as much.)
template <typename T, int DV, int kThreads, class VTile>
__device__ __forceinline__ void zero_masked_value_rows(T *sV, const ForwardParams &p, int bi, int j0, int keys_here,
                                                    int tid) {
    constexpr int kChunk = VTile::kChunk, kChunksPerRow = DV / kChunk;
    for (int c = tid; c < keys_here * kChunksPerRow; c += kThreads) {
        const int r = c / kChunksPerRow;
        if (p.mask[bi * p.mask_stride[0] + int64_t(j0 + r) * p.mask_stride[1]] == 0)
            *reinterpret_cast<uint4 *>(sV + VTile::chunk_offset(r, (c % kChunksPerRow) * kChunk)) =
                make_uint4(0u, 0u, 0u, 0u);
    }
}

// kGeneral = false compiles the common case alone (bounded logits, no bias, no key mask:
// see plain_forward below); its registers then go to the products, not to the state of
// paths it never takes. D: q's and k's head-dim bucket, DV: v's (and out's).
// kVarlen: packed sequences (ForwardParams::varlen), each CTA's from the table; its own
// instantiations, so that the others keep reading lengths from the parameters.
template <typename T, int D, int DV, bool kGeneral, bool kVarlen>
__global__ void __launch_bounds__(ForwardConfig<T, D, DV>::kThreads)
    forward_kernel(const __grid_constant__ ForwardParams p) {
    using namespace common;
    using C = ForwardConfig<T, D, DV>;
    constexpr int BM = C::kBlockM, BN = C::kBlockN, kThreads = C::kThreads;
    constexpr int kM = C::kMBlocks;  // m16 blocks per warp
    constexpr int kSBlocks = BN / 8; // n8 blocks of S per warp
    constexpr int kOBlocks = DV / 8; // n8 blocks of O per warp
    using KTile = typename C::KTile;
    using VTile = typename C::VTile;
    constexpr int QS = C::QTile::kStride, KS = KTile::kStride, VS = VTile::kStride;
    constexpr int OS = C::OTile::kStride; // out's staging rows (in the Q tile)
    constexpr float kInf = INFINITY;

    extern __shared__ __align__(128) unsigned char smem[];
    T *sQ = reinterpret_cast<T *>(smem);
    T *sK = reinterpret_cast<T *>(smem + C::kOffsetK);
    T *sV = reinterpret_cast<T *>(smem + C::kOffsetV);
    float *sKInv = reinterpret_cast<float *>(smem + C::kOffsetKInv);
    uint32_t *sAnyVisible = reinterpret_cast<uint32_t *>(smem + C::kOffsetBitmaps);
    uint32_t *sPartlyVisible = sAnyVisible + C::kBitmapWords;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t4 = lane & 3; // fragment row group and column pair

    // ---- which tile (CtaTile)
    if constexpr (kVarlen)
        if (blockIdx.x / uint32_t(p.heads) >= uint32_t(*p.varlen.count)) return; // a spare CTA of the launch's bound
    const common::CtaTile<kVarlen> at(p, blockIdx.x);
    const int4 sequence = at.sequence;
    const int m_tile = at.m_tile, hq = at.hq, bi = at.bi;
    // The sequence's lengths (read from the parameters at each use in the other kernels:
    // copies held in registers cost f32 d = 64 three more), and its first query row and
    // key in the packed tensors.
    auto nq = [&] { return kVarlen ? sequence.y : p.nq; };
    auto nk = [&] { return kVarlen ? sequence.w : p.nk; };
    const int q_begin = kVarlen ? sequence.x : 0, k_begin = kVarlen ? sequence.z : 0;
    const int kvh = hq / p.heads_per_kv;
    const int m0 = m_tile * BM;
    const int rows_here = min(BM, nq() - m0);
    const int d = p.d;

    const T *q = static_cast<const T *>(p.q) + bi * p.q_stride[0] + hq * p.q_stride[1] +
                 int64_t(q_begin + m0) * p.q_stride[2];
    // K/V rows from key j on, recomputed where needed: registers are this kernel's
    // scarcest resource, a few integer operations per tile are not.
    auto key_rows = [&](const void *base, const int64_t *stride, int j) {
        return static_cast<const T *>(base) + bi * stride[0] + kvh * stride[1] + int64_t(k_begin + j) * stride[2];
    };

    // ---- logit scale (base 2) and the softmax mode
    const float scale = p.scale_t != nullptr ? p.scale_t[hq * p.scale_stride] : p.scale;
    const float scale_log2 = scale * kLog2e;
    const float bound_log2 = fabsf(scale) * float(p.groups) * kLog2e;
    const bool track_max = kGeneral && !(p.logits_bounded && 2.f * bound_log2 <= C::kBoundedRange);
    const float fixed_offset = bound_log2 - C::kExpShift;

    // ---- key tiles: [0, tile_end), causal stops after the last row's diagonal
    const int causal_offset = nk() - nq(); // row i sees keys j <= i + causal_offset
    int tile_end = (nk() + BN - 1) / BN;
    if (p.causal) {
        const int last_key = m0 + rows_here - 1 + causal_offset;
        tile_end = last_key < 0 ? 0 : min(tile_end, last_key / BN + 1);
    }

    // ---- prologue: Q tile, mask summary, first K tile
    load_tile<T, BM, D, kThreads>(sQ, q, p.q_stride[2], rows_here, d, p.vec_q, tid);
    cp_async_commit();

    const bool has_mask = kGeneral && p.mask != nullptr;
    auto key_visible = [&](int j) { return p.mask[bi * p.mask_stride[0] + int64_t(j) * p.mask_stride[1]] != 0; };
    if (has_mask) {
        for (int i = tid; i < 2 * C::kBitmapWords; i += kThreads) sAnyVisible[i] = 0;
        __syncthreads();
        const int tile_limit = min(tile_end, C::kBitmapTiles);
        const int scan_keys = min(nk(), tile_limit * BN);
        for (int base = warp * 32; base < scan_keys; base += kThreads) {
            const int j = base + lane;
            const bool inside = j < nk();
            const bool visible = inside && key_visible(j);
            const uint32_t any = __ballot_sync(0xffffffffu, visible);
            const uint32_t fine = __ballot_sync(0xffffffffu, visible || !inside);
            if (lane == 0) {
                constexpr int kSpan = BN < 32 ? BN : 32; // keys of one tile in this chunk
#pragma unroll
                for (int s = 0; s < 32 / kSpan; ++s) {
                    const uint32_t bits = (kSpan == 32 ? 0xffffffffu : (1u << kSpan) - 1u) << (s * kSpan);
                    const int tile = (base + s * kSpan) / BN;
                    if (tile >= tile_limit) break;
                    if (any & bits) atomicOr(&sAnyVisible[tile >> 5], 1u << (tile & 31));
                    if ((fine & bits) != bits) atomicOr(&sPartlyVisible[tile >> 5], 1u << (tile & 31));
                }
            }
        }
        __syncthreads();
    }
    auto tile_visible = [&](int tile) {
        return !has_mask || tile >= C::kBitmapTiles || ((sAnyVisible[tile >> 5] >> (tile & 31)) & 1u);
    };
    auto tile_partly_masked = [&](int tile) {
        return has_mask &&
               (tile >= C::kBitmapTiles || ((sPartlyVisible[tile >> 5] >> (tile & 31)) & 1u));
    };
    auto next_tile = [&](int tile) {
        while (tile < tile_end && !tile_visible(tile)) ++tile;
        return tile;
    };

    // K tile `t` and, from the key-norm pass (set only with l2norm and one group), its
    // 1 / ||k_j|| (rows padded to a multiple of 64 keys: whole 16-byte pieces), as one
    // cp.async group.
    const float *key_inv_norms =
        p.k_inv_norm != nullptr
            ? p.k_inv_norm + (int64_t(bi) * (p.heads / p.heads_per_kv) + kvh) * p.k_inv_norm_stride
            : nullptr;
    // 1 / ||k_j|| of the tile in flight lives in sKInv[stage]: two buffers, because the
    // next tile's copy starts while a slower warp may still read this one's.
    auto load_key_tile = [&](int t, int stage) {
        load_tile<T, BN, D, kThreads, KTile, C::kWholeTileCopies>(
            sK, key_rows(p.k, p.k_stride, t * BN), p.k_stride[2], min(BN, nk() - t * BN), d, p.vec_k, tid);
        if constexpr (kVarlen) {
            // A sequence's keys start anywhere in the row of norms: 4-byte copies, none past
            // the packed keys (the last sequence's last tile may reach beyond the row).
            const int key = k_begin + t * BN + tid;
            if (key_inv_norms != nullptr && tid < BN)
                cp_async_4(smem_address(sKInv + stage * BN + tid), key_inv_norms + (key < p.nk ? key : 0), key < p.nk);
        } else if (key_inv_norms != nullptr && tid < BN / 4) {
            cp_async_16(smem_address(sKInv + stage * BN + 4 * tid), key_inv_norms + t * BN + 4 * tid, true);
        }
    };
    int tile = next_tile(0), stage = 0;
    if (tile < tile_end) load_key_tile(tile, stage);
    cp_async_commit();
    cp_async_wait<1>(); // Q has landed (K may still be in flight)
    __syncthreads();
    // The plain kernel folds scale * log2(e) into q^, which leaves 1 / ||k_j|| as the
    // logits' only factor: it runs only with l2norm (plain_forward: bounded logits), so
    // the normalization below always applies the multiplier there.
    const float q_multiplier = kGeneral ? 1.f : scale_log2;
    const float factor_scale = kGeneral ? scale_log2 : 1.f;
    const bool per_column = p.l2norm && p.groups == 1; // 1/||k_j|| as a factor on S
    if (!per_column) // factors of 1 in both buffers, never overwritten
        for (int i = tid; i < 2 * BN; i += kThreads) sKInv[i] = 1.f;
    if (p.l2norm) {
        normalize_tile<T, BM, D, kThreads>(sQ, rows_here, d, p.groups, tid, q_multiplier);
        __syncthreads();
    }
    const int warp_row0 = warp * C::kRowsPerWarp;
    FragA16 q_frag[C::kQInRegisters ? kM : 1][C::kQInRegisters ? D / 16 : 1];
    if constexpr (C::kQInRegisters) {
#pragma unroll
        for (int mb = 0; mb < kM; ++mb)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                load_a16(q_frag[mb][kk], sQ, QS, warp_row0 + 16 * mb, kk * 16, lane);
    }

    // ---- accumulators and softmax state. A lane holds kRows = 2 * kM rows of the
    // warp's: row h lies in m16 block h / 2, at fragment row g + 8 * (h % 2).
    constexpr int kRows = 2 * kM;
    FragC o[kM][kOBlocks];
#pragma unroll
    for (int mb = 0; mb < kM; ++mb)
#pragma unroll
        for (int i = 0; i < kOBlocks; ++i) clear(o[mb][i]);
    // Row sums: with kSumsByMma, P times a column of ones on the tensor cores (an extra
    // n8 block of O whose columns all hold the row's sum), else float adds per score.
    constexpr bool kSumsByMma = C::kSumsByMma && !kGeneral; // (the general kernel spilled with it)
    FragC o_sum[kM];
#pragma unroll
    for (int mb = 0; mb < kM; ++mb) clear(o_sum[mb]);
    FragB16 ones;
    ones.x[0] = ones.x[1] = 0u;
    if constexpr (C::k16Bit) ones.x[0] = ones.x[1] = pack_float2<T>(1.f, 1.f);
    float row_max[kRows], row_sum[kRows];
#pragma unroll
    for (int h = 0; h < kRows; ++h) {
        row_max[h] = track_max ? -kInf : fixed_offset;
        row_sum[h] = 0.f;
    }
    auto row_index = [&](int h) { return m0 + warp_row0 + 16 * (h / 2) + g + 8 * (h % 2); };
    const bool has_bias = kGeneral && p.bias != nullptr;

    while (tile < tile_end) {
        const int j0 = tile * BN;
        const int keys_here = min(BN, nk() - j0);

        cp_async_wait<0>();
        __syncthreads(); // K tile ready; every warp is done with the previous V tile
        // V rows of keys past the last row's causal reach stay zero (load_tile fills what
        // it does not copy): P is 0 there, and 0 * (a NaN or inf in v) must not reach O.
        // Keys j0 .. j0 + reach are seen by some row of the CTA.
        const int reach = p.causal ? m0 + rows_here - 1 + causal_offset - j0 : BN;
        load_tile<T, BN, DV, kThreads, VTile, C::kWholeTileCopies>(sV, key_rows(p.v, p.v_stride, j0), p.v_stride[2],
                                                                    min(keys_here, reach + 1), p.d_v, p.vec_v, tid);
        cp_async_commit();
        if (p.l2norm) {
            if (p.groups == 1) {
                // (Per key tile they cost the kernel 5-9% at n = 16k, notes v7: for long
                // queries the key-norm pass computes them once.)
                if (key_inv_norms == nullptr) {
                    if constexpr (C::k16Bit)
                        row_inverse_norms_mma<T, BN, D, C::kWarps, KTile>(sK, sKInv + stage * BN, warp, lane);
                    else
                        row_inverse_norms<T, BN, D, kThreads>(sK, d, sKInv + stage * BN, tid);
                }
            } else {
                l2norm_rows<KTile, kThreads>(sK, keys_here, d, p.groups, nullptr, true, tid);
                __syncthreads();
            }
        }

        // S = Q K^T
        FragC s[kM][kSBlocks];
#pragma unroll
        for (int mb = 0; mb < kM; ++mb)
#pragma unroll
            for (int n = 0; n < kSBlocks; ++n) clear(s[mb][n]);
        if constexpr (C::k16Bit) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                FragA16 a[kM];
#pragma unroll
                for (int mb = 0; mb < kM; ++mb) {
                    if constexpr (C::kQInRegisters) a[mb] = q_frag[mb][kk];
                    else load_a16(a[mb], sQ, QS, warp_row0 + 16 * mb, kk * 16, lane);
                }
#pragma unroll
                for (int n = 0; n < kSBlocks; n += 2) {
                    FragB16 b[2];
                    load_b16_nk(b, sK, KTile{}, n * 8, kk * 16, lane);
#pragma unroll
                    for (int mb = 0; mb < kM; ++mb) {
                        mma_m16n8k16<T>(s[mb][n], a[mb], b[0]);
                        mma_m16n8k16<T>(s[mb][n + 1], a[mb], b[1]);
                    }
                }
            }
        } else {
#pragma unroll
            for (int kk = 0; kk < D / 8; ++kk) {
                FragATf32 a_big[kM], a_small[kM];
#pragma unroll
                for (int mb = 0; mb < kM; ++mb)
                    load_a_tf32(a_big[mb], a_small[mb], sQ, QS, warp_row0 + 16 * mb, kk * 8, lane);
#pragma unroll
                for (int n = 0; n < kSBlocks; ++n) {
                    FragBTf32 b_big, b_small;
                    load_b_tf32_nk(b_big, b_small, sK, KS, n * 8, kk * 8, lane);
#pragma unroll
                    for (int mb = 0; mb < kM; ++mb)
                        mma_m16n8k8_3xtf32(s[mb][n], a_big[mb], a_small[mb], b_big, b_small);
                }
            }
        }

        cp_async_wait<0>();
        __syncthreads(); // V tile ready; K buffer free; the 1/||k|| factors visible
        if (kGeneral && tile_partly_masked(tile)) { // masked keys' V rows zeroed likewise
            zero_masked_value_rows<T, DV, kThreads, VTile>(sV, p, bi, j0, keys_here, tid);
            __syncthreads();
        }
        // Logit factors per n8 block of S: 1 / ||k_j|| per column for groups == 1 (else
        // 1), times scale * log2(e) unless q^ carries it, into registers before the
        // exponentials. (Read before this barrier instead, they cost d = 128 6%, notes v7.)
        float2 factors[kSBlocks];
#pragma unroll
        for (int n = 0; n < kSBlocks; ++n) {
            const float2 inv_norm = *reinterpret_cast<const float2 *>(sKInv + stage * BN + 8 * n + 2 * t4);
            factors[n] = make_float2(inv_norm.x * factor_scale, inv_norm.y * factor_scale);
        }
        const int next = next_tile(tile + 1);
        if (next < tile_end) load_key_tile(next, stage ^ 1);
        cp_async_commit();

        // Logits in base 2: s * f with f from the factors above (q^ already carries
        // scale * log2(e) in the plain kernel), + bias * log2(e). With 16-bit inputs the
        // probabilities are packed into P's mma fragments as soon as they exist, which
        // frees the float scores early (register pressure decides this kernel's speed).
        FragA16 p_frag[C::k16Bit ? kM : 1][C::k16Bit ? BN / 16 : 1];
        auto pack_probabilities = [&](int kk) {
            if constexpr (C::k16Bit) {
#pragma unroll
                for (int mb = 0; mb < kM; ++mb) accumulators_to_a16<T>(p_frag[mb][kk], s[mb][2 * kk], s[mb][2 * kk + 1]);
            }
        };
        const bool element_mask = keys_here < BN || tile_partly_masked(tile) ||
                                  (p.causal && j0 + BN - 1 > m0 + warp_row0 + causal_offset);
        // The common case, a plain tile: bounded logits, every key visible; one FMA and
        // one ex2 per score.
        const bool plain_tile = !track_max && !has_bias && !element_mask;
        // p = 2^(s * f - offset) for fragment row r of n8 block n, m16 block mb.
        auto exponentiate = [&](int n, int mb, int r, float2 f) {
            float *x = s[mb][n].x + 2 * r;
            x[0] = exp2_approx(fmaf(x[0], f.x, -fixed_offset));
            x[1] = exp2_approx(fmaf(x[1], f.y, -fixed_offset));
            if constexpr (!kSumsByMma) row_sum[2 * mb + r] += x[0] + x[1];
        };
        if (plain_tile) {
            // With kInterleaveExp the first 16 columns here, the others interleaved with
            // the products P V below, so that the exponentials (the MUFU pipe) overlap the
            // tensor cores. (Written as a loop over 16-column blocks for both, the d = 128
            // kernel, which does not interleave, had its ex2 scheduled in a clump: -4%.)
#pragma unroll
            for (int n = 0; n < (C::kInterleaveExp ? 2 : kSBlocks); ++n) {
                const float2 f = factors[n];
#pragma unroll
                for (int mb = 0; mb < kM; ++mb)
#pragma unroll
                    for (int r = 0; r < 2; ++r) exponentiate(n, mb, r, f);
                if (n % 2 == 1) pack_probabilities(n / 2);
            }
        } else {
            // The general path: bias, -inf for hidden keys, a running maximum if needed.
#pragma unroll
            for (int n = 0; n < kSBlocks; ++n) {
                const float2 f = factors[n];
#pragma unroll
                for (int mb = 0; mb < kM; ++mb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mb][n].x[e] *= (e & 1) ? f.y : f.x;
            }
            if (has_bias) {
                const T *bias_t =
                    static_cast<const T *>(p.bias) + bi * p.bias_stride[0] + hq * p.bias_stride[1];
                const float *bias_f =
                    static_cast<const float *>(p.bias) + bi * p.bias_stride[0] + hq * p.bias_stride[1];
#pragma unroll
                for (int h = 0; h < kRows; ++h) {
                    const int i = row_index(h);
                    if (i >= nq()) continue;
                    const int64_t row_offset = int64_t(i) * p.bias_stride[2];
#pragma unroll
                    for (int n = 0; n < kSBlocks; ++n)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int j = j0 + 8 * n + 2 * t4 + c;
                            if (j >= nk()) continue;
                            const int64_t offset = row_offset + int64_t(j) * p.bias_stride[3];
                            const float b = p.bias_is_f32 ? bias_f[offset] : to_float(bias_t[offset]);
                            s[h / 2][n].x[2 * (h % 2) + c] += b * kLog2e;
                        }
                }
            }

            // Hidden keys -> -inf.
            if (element_mask) {
#pragma unroll
                for (int n = 0; n < kSBlocks; ++n)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int j = j0 + 8 * n + 2 * t4 + c;
                        bool key_ok = j < nk();
                        if (key_ok && has_mask) key_ok = key_visible(j);
#pragma unroll
                        for (int h = 0; h < kRows; ++h) {
                            const bool ok = key_ok && (!p.causal || j <= row_index(h) + causal_offset);
                            if (!ok) s[h / 2][n].x[2 * (h % 2) + c] = -kInf;
                        }
                    }
            }

            // Softmax numerators; a running maximum only when the logits are not bounded.
            float offset[kRows];
#pragma unroll
            for (int h = 0; h < kRows; ++h) offset[h] = row_max[h];
            if (track_max) {
#pragma unroll
                for (int h = 0; h < kRows; ++h) {
                    const int mb = h / 2, e0 = 2 * (h % 2);
                    float tile_max = -kInf;
#pragma unroll
                    for (int n = 0; n < kSBlocks; ++n)
                        tile_max = fmaxf(tile_max, fmaxf(s[mb][n].x[e0], s[mb][n].x[e0 + 1]));
                    const float new_max = fmaxf(row_max[h], quad_max(tile_max));
                    offset[h] = new_max == -kInf ? 0.f : new_max; // no visible key yet: p = 0
                    const float rescale = exp2_approx(row_max[h] - offset[h]);
                    row_max[h] = new_max;
                    row_sum[h] *= rescale; // (kSumsByMma is off here: no running maximum in the plain kernel)
#pragma unroll
                    for (int i = 0; i < kOBlocks; ++i) {
                        o[mb][i].x[e0] *= rescale;
                        o[mb][i].x[e0 + 1] *= rescale;
                    }
                }
            }
#pragma unroll
            for (int n = 0; n < kSBlocks; ++n) {
#pragma unroll
                for (int mb = 0; mb < kM; ++mb)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        float *x = s[mb][n].x + 2 * r;
                        x[0] = exp2_approx(x[0] - offset[2 * mb + r]);
                        x[1] = exp2_approx(x[1] - offset[2 * mb + r]);
                        if constexpr (!kSumsByMma) row_sum[2 * mb + r] += x[0] + x[1];
                    }
                if (n % 2 == 1) pack_probabilities(n / 2);
            }
        }

        // O += P V, P straight from the accumulators. With kInterleaveExp, on plain tiles,
        // the exponentials of block kk + 1 are spread over block kk's products, in one
        // basic block, so that the scheduler can interleave the two (in sequence, a warp's
        // ex2 phase leaves the tensor cores idle unless the SM's other warp fills them).
        if constexpr (C::k16Bit) {
            auto multiply_pv = [&](auto interleave) {
                constexpr bool kInterleave = decltype(interleave)::value;
                constexpr int kSteps = kOBlocks / 2; // pairs of O's n8 blocks
                // The exponentials of 16 columns: 4 kM row pairs, spread over the steps.
                constexpr int kPairs = 4 * kM;
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    const bool next = kInterleave && kk + 1 < BN / 16;
                    float2 f[2];
                    if (next) f[0] = factors[2 * kk + 2], f[1] = factors[2 * kk + 3];
#pragma unroll
                    for (int step = 0; step < kSteps; ++step) {
                        const int i = 2 * step;
                        FragB16 b[2];
                        load_b16_kn(b, sV, VTile{}, kk * 16, i * 8, lane);
#pragma unroll
                        for (int mb = 0; mb < kM; ++mb) {
                            mma_m16n8k16<T>(o[mb][i], p_frag[mb][kk], b[0]);
                            mma_m16n8k16<T>(o[mb][i + 1], p_frag[mb][kk], b[1]);
                        }
                        if (next) {
#pragma unroll
                            for (int pair = step * kPairs / kSteps; pair < (step + 1) * kPairs / kSteps; ++pair) {
                                const int half = pair / (2 * kM); // which n8 block of the 16 columns
                                exponentiate(2 * kk + 2 + half, (pair / 2) % kM, pair % 2, f[half]);
                            }
                        }
                    }
                    if constexpr (kSumsByMma) {
#pragma unroll
                        for (int mb = 0; mb < kM; ++mb) mma_m16n8k16<T>(o_sum[mb], p_frag[mb][kk], ones);
                    }
                    if (next) pack_probabilities(kk + 1);
                }
            };
            // (Without kInterleaveExp one copy of the loop: two cost d = 128 spills.)
            if (C::kInterleaveExp && plain_tile) multiply_pv(std::true_type{});
            else multiply_pv(std::false_type{});
        } else {
#pragma unroll
            for (int kk = 0; kk < kSBlocks; ++kk) {
                FragATf32 a_big[kM], a_small[kM];
#pragma unroll
                for (int mb = 0; mb < kM; ++mb) accumulator_to_a_tf32(a_big[mb], a_small[mb], s[mb][kk]);
#pragma unroll
                for (int i = 0; i < kOBlocks; ++i) {
                    FragBTf32 b_big, b_small;
                    load_b_tf32_kn_permuted(b_big, b_small, sV, VS, kk * 8, i * 8, lane);
#pragma unroll
                    for (int mb = 0; mb < kM; ++mb)
                        mma_m16n8k8_3xtf32(o[mb][i], a_big[mb], a_small[mb], b_big, b_small);
                }
            }
        }
        tile = next;
        stage ^= 1;
    }

    // ---- causal: the warp's rows whose accumulators are not finite. Keys past a row's
    // reach but within the tile's last row's met that row's p = 0 in P V, and 0 * (a NaN
    // or inf in v) is NaN. Such rows (rare) are computed again once out is stored
    // (common::recompute_nonfinite_rows). Looked at here, on registers live anyway: any
    // code inside the loop doubled the general kernel's spills (benchmarks/NOTES.md, v1).
    static_assert(8 * kRows <= 32, "a warp's rows fit in one word of bits");
    uint32_t nonfinite_rows = 0u; // bit 8 h + g: the lane group's row h (row_index)
    if (p.causal) {
#pragma unroll
        for (int h = 0; h < kRows; ++h) {
            // NaN or inf where any term is (or, harmlessly, where the sum overflows)
            float total = 0.f;
#pragma unroll
            for (int i = 0; i < kOBlocks; ++i) total += o[h / 2][i].x[2 * (h % 2)] + o[h / 2][i].x[2 * (h % 2) + 1];
            nonfinite_rows |= quad_rows(__ballot_sync(0xffffffffu, !isfinite(total))) << (8 * h);
        }
    }

    // ---- epilogue: normalize, lse, stage the warp's rows in its part of sQ, store
    float inv_sum[kRows];
#pragma unroll
    for (int h = 0; h < kRows; ++h) {
        const float sum = kSumsByMma ? o_sum[h / 2].x[2 * (h % 2)] : quad_sum(row_sum[h]);
        inv_sum[h] = sum > 0.f ? reciprocal_approx(sum) : 0.f; // no visible key: out = 0
        const int i = row_index(h);
        if (p.lse != nullptr && t4 == 0 && i < nq())
            p.lse[bi * p.lse_stride[0] + hq * p.lse_stride[1] + int64_t(q_begin + i) * p.lse_stride[2]] =
                !(sum <= 0.f) ? (row_max[h] + log2_approx(sum)) * kLn2 : -kInf; // NaN sum: NaN
    }
    if (kGeneral && C::k16Bit && p.out_f32) {
        // A float32 out for 16-bit inputs (what the backward's delta is taken from when it
        // reduces dS): straight from the accumulators. Rare, so simple.
        float *out_f = static_cast<float *>(p.out) + bi * p.out_stride[0] + hq * p.out_stride[1];
#pragma unroll
        for (int h = 0; h < kRows; ++h) {
            const int i = row_index(h);
            if (i >= nq()) continue;
#pragma unroll
            for (int n = 0; n < kOBlocks; ++n) {
                const int col = n * 8 + 2 * t4;
                if (col >= p.d_v) continue;
                const int e0 = 2 * (h % 2);
                float *dst = out_f + int64_t(q_begin + i) * p.out_stride[2] + col;
                dst[0] = o[h / 2][n].x[e0] * inv_sum[h];
                dst[1] = o[h / 2][n].x[e0 + 1] * inv_sum[h];
            }
        }
    } else {
        T *out = static_cast<T *>(p.out) + bi * p.out_stride[0] + hq * p.out_stride[1] +
                 int64_t(q_begin + m0 + warp_row0) * p.out_stride[2];
        // Only this warp ever read these rows of sQ; rows of out (stride OS <= QS) fit in them.
        T *staging = sQ + warp_row0 * QS;
#pragma unroll
        for (int h = 0; h < kRows; ++h)
#pragma unroll
            for (int i = 0; i < kOBlocks; ++i) {
                const int e0 = 2 * (h % 2);
                T *dst = staging + (16 * (h / 2) + g + 8 * (h % 2)) * OS + i * 8 + 2 * t4;
                const float lo = o[h / 2][i].x[e0] * inv_sum[h], hi = o[h / 2][i].x[e0 + 1] * inv_sum[h];
                if constexpr (C::k16Bit) *reinterpret_cast<uint32_t *>(dst) = pack_float2<T>(lo, hi);
                else *reinterpret_cast<float2 *>(dst) = make_float2(lo, hi);
            }
        __syncwarp();
        store_tile<T, C::kRowsPerWarp, DV, 32>(out, p.out_stride[2], staging,
                                               rows_here - warp_row0, p.d_v, p.vec_out, lane);
    }
    // After the warp's stores of its rows (the same warp writes them again: __syncwarp).
    if (nonfinite_rows != 0u) {
        __syncwarp();
        recompute_nonfinite_rows<ForwardRows<T, D, DV, kVarlen>>(p, nonfinite_rows);
    }
}

// Whether the kernel without the general paths covers these parameters: no bias, no key
// mask, and logits bounded tightly enough for the fixed offset with the host's scale.
template <typename T, int D, int DV> bool plain_forward(const ForwardParams &p) {
    using C = ForwardConfig<T, D, DV>;
    const float bound_log2 = fabsf(p.scale) * float(p.groups) * common::kLog2e;
    return p.bias == nullptr && p.mask == nullptr && p.scale_t == nullptr && !p.out_f32 && p.logits_bounded &&
           2.f * bound_log2 <= C::kBoundedRange;
}

template <typename T, int D, int DV> fcsa_status launch_forward(const ForwardParams &params, cudaStream_t stream) {
    using C = ForwardConfig<T, D, DV>;
    const bool varlen = params.varlen.tiles != nullptr;
    // Packed sequences: the table's bound on their tiles, times the heads.
    const int64_t ctas = varlen ? params.varlen.max_tiles * params.heads
                                : int64_t(params.num_m_tiles) * params.heads * params.batch;
    if (ctas <= 0) return FCSA_STATUS_SUCCESS;
    if (ctas > int64_t(INT32_MAX))
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80 forward: batch * heads * ceil(nq / %d) = %lld exceeds the grid limit",
                         C::kBlockM, static_cast<long long>(ctas));
    const bool plain = plain_forward<T, D, DV>(params);
    auto kernel = varlen ? (plain ? forward_kernel<T, D, DV, false, true> : forward_kernel<T, D, DV, true, true>)
                         : (plain ? forward_kernel<T, D, DV, false, false> : forward_kernel<T, D, DV, true, false>);
    if (C::kSmemBytes > 48 * 1024) {
        const cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
        if (err != cudaSuccess)
            return set_error(FCSA_STATUS_CUDA_ERROR, "cuda-sm80 forward: setting %d bytes of shared memory: %s",
                             C::kSmemBytes, cudaGetErrorString(err));
    }
    kernel<<<unsigned(ctas), C::kThreads, C::kSmemBytes, stream>>>(params);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return set_error(FCSA_STATUS_CUDA_ERROR, "cuda-sm80 forward: kernel launch failed: %s",
                         cudaGetErrorString(err));
    return FCSA_STATUS_SUCCESS;
}

} // namespace sm80
} // namespace fcsa

// Instantiates launch_forward for one (T, D, DV); used once per forward_<dtype>_d<D>.cu
// (DV == D) and forward_<dtype>_d<D>_v<DV>.cu.
#define FCSA_INSTANTIATE_FORWARD_DV(T, D, DV)                                                           \
    template fcsa_status fcsa::sm80::launch_forward<T, D, DV>(const fcsa::sm80::ForwardParams &, cudaStream_t);
#define FCSA_INSTANTIATE_FORWARD(T, D) FCSA_INSTANTIATE_FORWARD_DV(T, D, D)
