// backward_kernels.cuh: the two tile kernels of the sm80 backward, templated on the
// element type and a head-dim bucket; backward_d*.cu instantiate them, backward.cu runs
// them (see backward_params.cuh for the order of launches).
//
// main_kernel: one CTA per (key tile, kv head, batch) [, column half of the head dim].
//   Each warp owns 16 * KT keys and keeps their dK^, dV rows in float registers for
//   the whole CTA. For every query head sharing the kv head and every query tile
//   (kStages-deep cp.async pipeline) it computes, in the transposed orientation,
//       S^T = K^ Q^T,  P^T = exp(scale S^T + bias - lse),  dP^T = V dO^T,
//       dS^T = P^T (dP^T - delta),  dV += P^T dO,  dK^ += scale dS^T Q^,
//   so that P^T and dS^T are accumulators in registers and serve directly as the A
//   operands of the next products. dQ^ += scale dS K^ goes through shared memory and
//   float atomics (skipped when deterministic: dq_kernel owns dQ^ then). With l2norm,
//   K^ is formed in shared memory once and each query tile as it lands, one
//   iteration ahead of its use.
// dq_kernel: one CTA per (query tile, head, batch); each warp owns 16 query rows,
//   streams the key tiles (normalized in place as they land) and keeps dQ^ in
//   registers: no atomics, a fixed order.
//
// Packed sequences (Params::varlen_keys / varlen_queries): each CTA takes its tile and
// sequence from a table (varlen.cuh) and works in the tensors' own row coordinates on
// that sequence's extent (Extent below); their own instantiations (kVarlen), so that the
// others read every length from the parameters as before.
//
// Both are checked by cuda/tests/check_backward.cu against a float64 reference.
//
// At d = 64 and 128 with 16-bit operands and no bias or dscale, GPUs with the shared
// memory for it run the shared-scores kernel (backward_shared_scores.cuh) in
// main_kernel's place.
//
// Measured (H100 SXM, 2026-11-24, bf16, batch = 16384 / n, heads = 2048 / d, kernel
// alone, the plain variant, v4): d = 64 at n = 2k / 4k / 8k / 16k 143 / 166 / 183 / 189
// TFLOP/s, d = 128 157 / 176 / 188 / 195 (the shared-scores kernel, which now runs
// there on the H100: backward_shared_scores.cuh).
// The limits seen: 255 registers with spills (dK^, dV take 128 of them at d = 128;
// anything live across the loop body costs, benchmarks/NOTES.md), instructions outside
// the products (with 32-row tiles at d = 128, ~1,050 per warp and tile for 160 mma: the
// tiles' loads, dQ's atomics and their addresses), shared-memory reads (every warp reads
// the whole Q and dO tiles twice, ~0.6 ldmatrix.x4 per mma) and one CTA of 8 warps per SM.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "../common/copy.cuh"
#include "../common/l2norm.cuh"
#include "../common/mma.cuh"
#include "../common/nonfinite.cuh"
#include "../common/numeric.cuh"
#include "backward_device.cuh"
#include "backward_gemm.cuh"
#include "backward_params.cuh"

namespace fcsa {
namespace sm80_bwd {

// ---------------------------------------------------------------- tile shapes

template <typename T, int kHeadDim, int kWarps, int kKeyBlocksPerWarp, int kQueryRows, int kSplits,
          int kStages_>
struct MainShape {
    static constexpr int D = kHeadDim;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int KT = kKeyBlocksPerWarp;         // 16-key blocks per warp
    static constexpr int kKeys = kWarps * KT * 16;        // keys per CTA
    static constexpr int BR = kQueryRows;                 // query rows per tile
    static constexpr int kSplitCount = kSplits;
    static constexpr int kStages = kStages_;              // query tiles in flight (cp.async)
    static constexpr int DC = kHeadDim / kSplits;         // dK / dV / dQ columns per CTA
    using KTile = common::PaddedTile<T, kKeys, D>;
    using QTile = common::PaddedTile<T, BR, D>;
    using STile = common::PaddedTile<T, kKeys, BR>;       // scale * dS^T, [key][query]
    // dQ^ = dS K^ splits the BR x DC block over the warps.
    static constexpr int kRowBlocks = BR / 16;
    static constexpr int kColBlocks = kWarps / kRowBlocks;
    static constexpr int kColsPerWarp = DC / kColBlocks;
    static constexpr int kDqBlocks = kColsPerWarp / 8;
    // Shared memory, in bytes.
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kOffK + KTile::kBytes;
    static constexpr int kOffQ = kOffV + KTile::kBytes;   // kStages buffers
    static constexpr int kOffDo = kOffQ + kStages * QTile::kBytes;
    static constexpr int kOffS = kOffDo + kStages * QTile::kBytes;
    static constexpr int kOffLse = kOffS + STile::kBytes; // [kStages][BR] float
    static constexpr int kOffDelta = kOffLse + kStages * BR * 4;
    static constexpr int kOffReduce = kOffDelta + kStages * BR * 4;
    static constexpr int kSmemBytes = kOffReduce + (kWarps > 1 ? kWarps * 4 : 0); // see block_sum
    // The epilogue stages dK^ rows (float) over the K, V, Q and dO tiles.
    static constexpr int kStageStride = DC + 4;

    static_assert(kWarps % kRowBlocks == 0 && DC % kColBlocks == 0, "dQ partition");
    static_assert(kColsPerWarp % 16 == 0 || !common::ElementTraits<T>::kIs16Bit, "dQ partition");
    static_assert(kColsPerWarp % 8 == 0 && DC % 16 == 0 && BR % 16 == 0, "tile shapes");
    static_assert(kKeys * kStageStride * 4 <= kOffS, "dK staging fits");
};

template <typename T, int kHeadDim, int kWarps, int kKeys> struct DqShape {
    static constexpr int D = kHeadDim;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int BR = kWarps * 16; // query rows per CTA
    static constexpr int BC = kKeys;       // keys per tile
    using QTile = common::PaddedTile<T, BR, D>;
    using KTile = common::PaddedTile<T, BC, D>;
    static constexpr int kOffQ = 0;
    static constexpr int kOffDo = kOffQ + QTile::kBytes;
    static constexpr int kOffK = kOffDo + QTile::kBytes; // 2 stages
    static constexpr int kOffV = kOffK + 2 * KTile::kBytes;
    static constexpr int kOffLse = kOffV + 2 * KTile::kBytes;
    static constexpr int kOffDelta = kOffLse + BR * 4;
    static constexpr int kOffKeyOk = kOffDelta + BR * 4; // [2][BC] bytes
    static constexpr int kSmemBytes = kOffKeyOk + 2 * BC;
    static_assert(BC % 16 == 0, "tile shapes");
};

// Per (dtype, head-dim bucket, size class): the shapes used. The full shapes stay under
// the 163 KB an sm_80 / sm_90 block may use; the compact ones under the 99 KB of sm_86,
// sm_89 and sm_120 (where the full shape already fits, they are the same types, so
// nothing is compiled twice). Registers hold dK^ and dV of 16 * KT keys x DC columns.
template <typename T, int D, bool kCompact, bool kIs16 = common::ElementTraits<T>::kIs16Bit> struct Shapes;

template <typename T, int D, bool kCompact> struct Shapes<T, D, kCompact, true> {
    static_assert(D == 32 || D == 64 || D == 96 || D == 128 || D == 256, "16-bit head-dim buckets");
    // Full: 128 keys per CTA and 64 query rows per tile (32 at D = 256, which splits
    // dK / dV / dQ columns over two CTAs of 64 keys). Two pipeline stages, three at D = 32
    // and 96. Measured on the H100 (benchmarks/NOTES.md): two stages are 4-7% faster than
    // three at D = 128 and 2-3% at D = 64 (since the kernel without the general paths);
    // 64 rows at D = 128 3-7% faster than 32.
    using FullMain = MainShape<T, D, D == 256 ? 4 : 8, 1, (D > 128) ? 32 : 64, D == 256 ? 2 : 1,
                               (D == 32 || D == 96) ? 3 : 2>;
    using FullDq = DqShape<T, D, 4, D == 256 ? 32 : 64>;
    // Compact: 64 keys per CTA (32 at D = 256) and a 2-stage pipeline.
    using CompactMain = MainShape<T, D, D == 256 ? 2 : 4, 1, D == 256 ? 16 : (D == 128 ? 32 : 64), D == 256 ? 2 : 1, 2>;
    using CompactDq = DqShape<T, D, D == 256 ? 2 : 4, D == 256 ? 16 : 32>;
    using Main = std::conditional_t<kCompact && D >= 64, CompactMain, FullMain>;
    using Dq = std::conditional_t<kCompact && D >= 128, CompactDq, FullDq>;
};

template <typename T, int D, bool kCompact> struct Shapes<T, D, kCompact, false> {
    static_assert(D == 32 || D == 64 || D == 128 || D == 256, "float32 head-dim buckets");
    using FullMain = MainShape<T, D, D == 256 ? 2 : 4, 1, D == 256 ? 16 : 32, D == 256 ? 2 : 1, 2>;
    using FullDq = DqShape<T, D, D == 256 ? 2 : 4, D == 256 ? 16 : 32>;
    // Compact (D >= 128): 32 keys and 16 query rows per CTA at D = 128, 16 and 16 at D = 256.
    using CompactMain = MainShape<T, D, D == 256 ? 1 : 2, 1, 16, D == 256 ? 2 : 1, 2>;
    using CompactDq = DqShape<T, D, D == 256 ? 1 : 2, 16>;
    using Main = std::conditional_t<kCompact && D >= 128, CompactMain, FullMain>;
    using Dq = std::conditional_t<kCompact && D >= 128, CompactDq, FullDq>;
};

// ---------------------------------------------------------------- score helpers

__device__ __forceinline__ bool key_unmasked(const Params &p, int64_t batch, int64_t key) {
    return key < p.nk && (p.mask == nullptr || p.mask[batch * p.mask_stride_b + key * p.mask_stride_key] != 0);
}

__device__ __forceinline__ float head_scale(const Params &p, int64_t head) {
    return p.scale_t != nullptr ? p.scale_t[head * p.scale_stride] : p.scale;
}

// The query rows and keys an item works on, in the tensors' row coordinates: the whole
// problem, or with kVarlen one packed sequence, rows [q0, q1) and keys [k0, k1) (the
// lse, delta and dQ^ arrays keep their [b][h][nq] layout: a row's index is its own).
// row(i) and key(j) turn an index counted from the extent's start into the tensors', and
// relative_row / relative_key back. Under causal, row i sees key j when j <= i +
// causal_offset: for a packed sequence k1 - q1, its end alignment in these coordinates.
template <bool kVarlen> struct Extent;

// The whole problem: each accessor is what the kernels read before packed sequences, so
// that they compile as they did (an empty struct).
template <> struct Extent<false> {
    __device__ __forceinline__ int64_t row(int64_t i) const { return i; }
    __device__ __forceinline__ int64_t key(int64_t j) const { return j; }
    __device__ __forceinline__ int64_t relative_row(int64_t i) const { return i; }
    __device__ __forceinline__ int64_t relative_key(int64_t j) const { return j; }
    __device__ __forceinline__ int64_t q_count(const Params &p) const { return p.nq; }
    __device__ __forceinline__ int64_t k_count(const Params &p) const { return p.nk; }
    __device__ __forceinline__ int64_t q_end(const Params &p) const { return p.nq; }
    __device__ __forceinline__ int64_t k_end(const Params &p) const { return p.nk; }
    __device__ __forceinline__ int64_t causal_offset(const Params &p) const { return p.causal_offset; }
};

// One packed sequence.
template <> struct Extent<true> {
    int64_t q0, q1, k0, k1;
    __device__ __forceinline__ int64_t row(int64_t i) const { return q0 + i; }
    __device__ __forceinline__ int64_t key(int64_t j) const { return k0 + j; }
    __device__ __forceinline__ int64_t relative_row(int64_t i) const { return i - q0; }
    __device__ __forceinline__ int64_t relative_key(int64_t j) const { return j - k0; }
    __device__ __forceinline__ int64_t q_count(const Params &) const { return q1 - q0; }
    __device__ __forceinline__ int64_t k_count(const Params &) const { return k1 - k0; }
    __device__ __forceinline__ int64_t q_end(const Params &) const { return q1; }
    __device__ __forceinline__ int64_t k_end(const Params &) const { return k1; }
    __device__ __forceinline__ int64_t causal_offset(const Params &) const { return k1 - q1; }
};

// Entry `entry` of a table of packed sequences' tiles: the extent of its sequence, and
// the tile's index within it.
__device__ __forceinline__ Extent<true> packed_extent(const sm80::VarlenTiles &table, int64_t entry, int64_t *tile) {
    const int2 t = table.tiles[entry];
    const int4 sq = table.sequences[t.x];
    *tile = t.y;
    return Extent<true>{sq.x, int64_t(sq.x) + sq.y, sq.z, int64_t(sq.z) + sq.w};
}

// bias[b, h, i, j], 0 without a bias.
template <typename T>
__device__ __forceinline__ float bias_at(const Params &p, int64_t bh_offset, int64_t i, int64_t j) {
    if (p.bias == nullptr) return 0.f;
    return load_as_float<T>(p.bias, bh_offset + i * p.bias_stride[2] + j * p.bias_stride[3], p.bias_f32);
}

__device__ __forceinline__ int clamp_to_int(int64_t x) {
    return static_cast<int>(x < -(int64_t(1) << 30) ? -(int64_t(1) << 30) : (x > (int64_t(1) << 30) ? int64_t(1) << 30 : x));
}

// P = exp(s - lse) for a visible score (0 otherwise) and dS = P (dP - delta). The
// exponent is formed in natural units with one rounding (fma), then scaled to base 2:
// large logits lose no float32 accuracy to rounded products with log2(e). A hidden
// key's dS is 0 by selection: its dP may be NaN (a NaN in v that no row sees).
__device__ __forceinline__ void probability_and_grad(float &score_to_p, float &dp_to_ds, bool visible,
                                                     float scale, float bias, float lse, float delta) {
    const float prob =
        visible ? common::exp2_approx(fmaf(score_to_p, scale, bias - lse) * common::kLog2e) : 0.f;
    dp_to_ds = visible ? prob * (dp_to_ds - delta) : 0.f;
    score_to_p = prob;
}

__device__ __forceinline__ void dbias_add(const Params &p, int64_t index, float v) {
    if (p.dbias_mode == kDbiasAtomic)
        atomicAdd(p.dbias_acc + index, v);
    else
        p.dbias_acc[index] += v; // owned by this thread in a fixed order
}

// Two adjacent float32 dQ^ entries (index even).
__device__ __forceinline__ void atomic_add2(float *address, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(address), make_float2(a, b));
#else
    atomicAdd(address, a);
    atomicAdd(address + 1, b);
#endif
}

// dS of a main-kernel tile (accumulator rows = keys, columns = queries) into dbias:
// stored as is (full-shape bias) or summed over the broadcast dimensions first.
template <typename T, class S>
__device__ __forceinline__ void main_tile_dbias(const Params &p, const FragC (&ds)[S::KT][S::BR / 8],
                                                int64_t batch, int64_t head, int64_t i0, int64_t key0,
                                                int lane) {
    const int g = lane >> 2, t = lane & 3;
    if (p.dbias_mode == kDbiasDirect) {
        const int64_t base = batch * p.dbias_stride[0] + head * p.dbias_stride[1];
#pragma unroll
        for (int kt = 0; kt < S::KT; ++kt)
#pragma unroll
            for (int n = 0; n < S::BR / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int64_t j = key0 + 16 * kt + g + 8 * (e >> 1), i = i0 + 8 * n + 2 * t + (e & 1);
                    if (i < p.nq && j < p.nk)
                        store_from_float<T>(p.dbias, base + i * p.dbias_stride[2] + j * p.dbias_stride[3],
                                            ds[kt][n].x[e], p.dbias_f32);
                }
        return;
    }
    const int64_t *st = p.dbias_acc_stride;
    const int64_t base = batch * st[0] + head * st[1];
    if (!p.dbias_sum_rows) {
#pragma unroll
        for (int kt = 0; kt < S::KT; ++kt)
#pragma unroll
            for (int n = 0; n < S::BR / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int64_t j = key0 + 16 * kt + g + 8 * (e >> 1), i = i0 + 8 * n + 2 * t + (e & 1);
                    if (i < p.nq && j < p.nk) dbias_add(p, base + i * st[2] + j * st[3], ds[kt][n].x[e]);
                }
    } else {
        // Each key row: the thread's columns, then the 4 lanes of the row.
#pragma unroll
        for (int kt = 0; kt < S::KT; ++kt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < S::BR / 8; ++n) sum += ds[kt][n].x[2 * half] + ds[kt][n].x[2 * half + 1];
                sum = common::quad_sum(sum);
                const int64_t j = key0 + 16 * kt + g + 8 * half;
                if (t == 0 && j < p.nk) dbias_add(p, base + j * st[3], sum);
            }
    }
}

// Per query row, a warp's sums over its keys of dS and of P cos, for the tile rows r0
// and r0 + 1 (r0 = 8n + 2t): the four values summed over the 8 lanes that share them
// (those of one t) by halving, so that each of the lanes g = 0, 2, 4, 6 ends with one
// (4 shuffles, not 12), and added into Params::dscale_rows at `row` (r0's index in
// [b][h][nq]) where r0 + c < rows.
__device__ __forceinline__ void add_dscale_rows(const Params &p, int64_t row, int r0, int rows,
                                                const float (&ds_sum)[2], const float (&p_cos_sum)[2], int lane) {
    // Lane bit 4 picks the pair (dS or P cos), bit 3 the row of the pair.
    const bool upper = lane & 16, odd = lane & 8;
    float pair[2] = {upper ? p_cos_sum[0] : ds_sum[0], upper ? p_cos_sum[1] : ds_sum[1]};
    const float give0 = upper ? ds_sum[0] : p_cos_sum[0], give1 = upper ? ds_sum[1] : p_cos_sum[1];
    pair[0] += __shfl_xor_sync(0xffffffffu, give0, 16);
    pair[1] += __shfl_xor_sync(0xffffffffu, give1, 16);
    float value = odd ? pair[1] : pair[0];
    value += __shfl_xor_sync(0xffffffffu, odd ? pair[0] : pair[1], 8);
    value += __shfl_xor_sync(0xffffffffu, value, 4);
    const int c = odd ? 1 : 0;
    if ((lane & 4) == 0 && r0 + c < rows) atomicAdd(p.dscale_rows + 2 * (row + c) + (upper ? 1 : 0), value);
}

// Writes zeros to dbias rows [row_begin, row_end) x keys [key0, key0 + keys) of one
// head (full-shape bias: tiles the kernel skips still get their gradient, 0).
template <typename T>
__device__ __forceinline__ void zero_dbias_block(const Params &p, int64_t batch, int64_t head, int64_t row_begin,
                                                 int64_t row_end, int64_t key0, int keys, int tid, int threads) {
    const int64_t base = batch * p.dbias_stride[0] + head * p.dbias_stride[1];
    const int64_t count = (row_end - row_begin) * keys;
    for (int64_t e = tid; e < count; e += threads) {
        const int64_t i = row_begin + e / keys, j = key0 + e % keys;
        store_from_float<T>(p.dbias, base + i * p.dbias_stride[2] + j * p.dbias_stride[3], 0.f, p.dbias_f32);
    }
}

// A block-wide sum in a fixed order (warp trees, then warp 0's partials in order). A
// one-warp block needs no shared memory (its shapes reserve none).
template <int kWarps>
__device__ __forceinline__ float block_sum(float v, float *reduce, int tid) {
    v = warp_sum(v);
    if constexpr (kWarps == 1) return v;
    if ((tid & 31) == 0) reduce[tid >> 5] = v;
    __syncthreads();
    float total = 0.f;
    if (tid == 0)
        for (int w = 0; w < kWarps; ++w) total += reduce[w];
    __syncthreads();
    return total; // valid in thread 0
}

// ---------------------------------------------------------------- query tiles

// The first query tile (counted from the extent's first row) with a row that sees key
// j0 (causal: rows below j0 - offset see none of the CTA's keys); query_tiles when there
// is none.
template <int BR, bool kVarlen>
__device__ __forceinline__ int64_t first_query_tile(const Params &p, const Extent<kVarlen> &e, int64_t j0,
                                                    int64_t query_tiles) {
    int64_t first_row = p.causal ? e.relative_row(j0 - e.causal_offset(p)) : 0;
    if (first_row < 0) first_row = 0;
    return first_row < e.q_count(p) ? first_row / BR : query_tiles;
}

// Starts the copies of a CTA's K and V tiles (the caller commits them).
template <typename T, int kKeys, int D, int kThreads>
__device__ __forceinline__ void issue_key_tiles(const Params &p, T *k, T *v, int64_t batch, int64_t kv, int64_t j0,
                                                int keys, int tid) {
    common::load_tile<T, kKeys, D, kThreads>(k, p.k.row<T>(batch, kv, j0), p.k.stride_row, keys, p.d,
                                             p.k.aligned16, tid);
    common::load_tile<T, kKeys, D, kThreads>(v, p.v.row<T>(batch, kv, j0), p.v.stride_row, keys, p.d_v,
                                             p.v.aligned16, tid);
}

// The shared memory every tile kernel has: K and V tiles, q and dO tiles, their lse
// and delta (the main kernels' query tiles in pipeline stages, one after the other), at
// the offsets of shape S.
template <typename T> struct KeyQuerySmem {
    T *k, *v, *q, *dout;
    float *lse, *delta;
    float *q_inv_norm = nullptr; // [kStages][BR] where the kernel takes Params::q_inv_norm
};
template <typename T, class S>
__device__ __forceinline__ void carve_key_query(KeyQuerySmem<T> &s, unsigned char *base) {
    s.k = reinterpret_cast<T *>(base + S::kOffK);
    s.v = reinterpret_cast<T *>(base + S::kOffV);
    s.q = reinterpret_cast<T *>(base + S::kOffQ);
    s.dout = reinterpret_cast<T *>(base + S::kOffDo);
    s.lse = reinterpret_cast<float *>(base + S::kOffLse);
    s.delta = reinterpret_cast<float *>(base + S::kOffDelta);
}


// Starts the copies of query tile `qt` of (batch, head) into pipeline stage `stage` of a
// main kernel (shape S, shared memory s): the q and dO rows and their lse and delta (and
// 1 / ||q|| where Params::q_inv_norm is set), all with cp.async (rows past nq: zeros,
// which the kernels mask as invisible).
template <typename T, class S, bool kVarlen>
__device__ __forceinline__ void issue_query_stage(const Params &p, const Extent<kVarlen> &e,
                                                  const KeyQuerySmem<T> &s, int64_t batch, int64_t head, int64_t qt,
                                                  int stage, int tid) {
    constexpr int BR = S::BR;
    const int64_t i0 = e.row(qt * BR);
    const int rows = static_cast<int>(e.q_end(p) - i0 < BR ? e.q_end(p) - i0 : BR);
    common::load_tile<T, BR, S::D, S::kThreads>(s.q + stage * S::QTile::kElements, p.q.row<T>(batch, head, i0),
                                                p.q.stride_row, rows, p.d, p.q.aligned16, tid);
    common::load_tile<T, BR, S::D, S::kThreads>(s.dout + stage * S::QTile::kElements,
                                                p.dout.row<T>(batch, head, i0), p.dout.stride_row, rows, p.d_v,
                                                p.dout.aligned16, tid);
    const int64_t row_base = (batch * p.h + head) * p.nq + i0;
    const int arrays = p.q_inv_norm != nullptr ? 3 : 2;
    for (int r = tid; r < arrays * BR; r += S::kThreads) {
        const int row = r % BR, array = r / BR;
        const float *src_array = array == 0 ? p.lse : array == 1 ? p.delta : p.q_inv_norm;
        const float *src = src_array + row_base + (row < rows ? row : 0);
        float *dst = (array == 0 ? s.lse : array == 1 ? s.delta : s.q_inv_norm) + stage * BR + row;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(common::smem_address(dst)), "l"(src),
                     "r"(row < rows ? 4 : 0));
    }
}

// l2-normalizes query tile `qt` in stage `stage` in place (its copies landed for every
// thread; the caller's next barrier publishes the result).
template <typename T, class S, bool kVarlen>
__device__ __forceinline__ void normalize_query_stage(const Params &p, const Extent<kVarlen> &e,
                                                      const KeyQuerySmem<T> &s, int64_t qt, int stage, int tid) {
    const int rows = static_cast<int>(e.q_count(p) - qt * S::BR < S::BR ? e.q_count(p) - qt * S::BR : S::BR);
    common::normalize_tile<T, S::BR, S::D, S::kThreads>(s.q + stage * S::QTile::kElements, rows, p.d, p.groups,
                                                        tid);
}

// A K tile's rows [0, keys) made finite in place (start_query_tiles says why): NaN and
// inf set to 0 in K^, saturated in a raw k. All threads; the caller's barrier publishes.
template <typename T, class KTile, int kThreads>
__device__ __forceinline__ void make_keys_finite(const Params &p, T *k_tile, int keys, int tid) {
    if (p.l2norm) common::zero_nonfinite_rows<T, KTile, kThreads>(k_tile, 0, keys, tid);
    else common::zero_nonfinite_rows<T, KTile, kThreads, true>(k_tile, 0, keys, tid);
}

// Per head, before a kernel's query-tile loop: kStages - 1 query tiles in flight (one
// commit group per tile), K^ made ready once (below), and with l2norm the first query
// tile normalized unless q's norm is folded (the loop's first barrier publishes both).
// K^ ready (with l2norm): l2-normalized in place, and every entry that is not finite (a
// NaN or inf in k makes k^ NaN) set to 0. A row that sees such a key has a NaN lse from
// the forward, so its P and dS are NaN whatever S is; a row that does not has dS = 0 by
// selection, and dQ^ = dS K^ must not meet 0 * NaN. Raw k (without l2norm): NaN set to
// 0 and infinities to the largest finite values (common::word_saturated says why not
// zeros). The caller starts k_ready = false.
template <typename T, class S, bool kVarlen>
__device__ __forceinline__ void start_query_tiles(const Params &p, const Extent<kVarlen> &e,
                                                  const KeyQuerySmem<T> &s, int keys, bool &k_ready,
                                                  int64_t batch, int64_t head, int64_t qt_begin, int64_t query_tiles,
                                                  int tid) {
    __syncthreads(); // the previous head's last tiles are no longer read
#pragma unroll
    for (int ahead = 0; ahead < S::kStages - 1; ++ahead) {
        if (qt_begin + ahead < query_tiles)
            issue_query_stage<T, S>(p, e, s, batch, head, qt_begin + ahead, ahead, tid);
        common::cp_async_commit();
    }
    const bool normalize_q = p.l2norm && p.q_inv_norm == nullptr;
    if ((normalize_q || !k_ready) && qt_begin < query_tiles) {
        common::cp_async_wait<S::kStages - 2>(); // K, V (first head) and the first query tile
        __syncthreads();
        if (!k_ready && p.l2norm) {
            common::normalize_tile<T, S::kKeys, S::D, S::kThreads>(s.k, keys, p.d, p.groups, tid);
            __syncthreads();
            common::zero_nonfinite_rows<T, typename S::KTile, S::kThreads>(s.k, 0, keys, tid);
        } else if (!k_ready) {
            common::zero_nonfinite_rows<T, typename S::KTile, S::kThreads, true>(s.k, 0, keys, tid);
        }
        k_ready = true;
        if (normalize_q) normalize_query_stage<T, S>(p, e, s, qt_begin, 0, tid);
    }
}

// dK and dV of keys [j0, j0 + keys), columns [col0, col0 + DC), set to zero: a key tile
// whose every key is hidden passes no gradient to them. (dK has d columns, dV d_v.)
template <typename T, int DC, int kThreads>
__device__ __forceinline__ void write_zero_grads(const Params &p, int64_t batch, int64_t kv, int64_t j0, int keys,
                                                 int col0, int tid) {
    const int width = p.d > p.d_v ? p.d : p.d_v; // one pass over the wider's columns
    const int cols = width - col0 < DC ? width - col0 : DC;
    if (cols <= 0) return;
    for (int e = tid; e < keys * cols; e += kThreads) {
        const int r = e / cols, c = col0 + e % cols;
        if (c < p.d_v) p.dv.row<T>(batch, kv, j0 + r)[c] = common::from_float<T>(0.f);
        if (c >= p.d) continue;
        if (p.dk_acc != nullptr)
            p.dk_acc[((batch * p.hk + kv) * p.nk + j0 + r) * p.d + c] = 0.f;
        else
            p.dk.row<T>(batch, kv, j0 + r)[c] = common::from_float<T>(0.f);
    }
}

// dK of keys [j0, j0 + keys) through the l2norm backward, from dK^ staged in shared
// memory as float rows (row stride kStageStride, kKeys rows). With one group, whole
// columns (d = D) and 16-byte aligned rows, each row goes to up to 16 lanes holding
// 16-byte chunks, and the k rows of several passes are requested before any is used;
// otherwise a warp per row, one row at a time (its loads' latency exposed per row: 15%
// of the shared-scores kernel's stalls at n = 1024 before, ncu). Called by kThreads
// threads after the barrier that publishes the staged rows.
template <typename T, int D, int kKeys, int kThreads, int kStageStride>
__device__ __forceinline__ void finish_dk_rows(const Params &p, const float *stage, int64_t batch, int64_t kv,
                                               int64_t j0, int keys, int tid) {
    constexpr int E = common::Chunk<T>::N, kChunks = D / E;
    constexpr int kWidth = kChunks < 16 ? kChunks : 16, kPer = kChunks / kWidth;
    // (Head dims whose chunks do not spread over 2^k lanes, 96 in 16 bits, take the loop.)
    constexpr bool kSpreads = kChunks % kWidth == 0 && (kWidth & (kWidth - 1)) == 0;
    if (kSpreads && p.groups == 1 && p.d == D && p.k.aligned16 && p.dk.aligned16) {
        constexpr int kRowsPerPass = kThreads / kWidth;
        constexpr int kPasses = (kKeys + kRowsPerPass - 1) / kRowsPerPass;
        constexpr int kBatch = 64 / (2 * kPer * E) > 0 ? 64 / (2 * kPer * E) : 1; // passes in flight
        const int sub = tid % kWidth;
#pragma unroll
        for (int pass0 = 0; pass0 < kPasses; pass0 += kBatch) {
            float x[kBatch][kPer][E], dy[kBatch][kPer][E];
#pragma unroll
            for (int b = 0; b < kBatch; ++b) {
                const int r = tid / kWidth + (pass0 + b) * kRowsPerPass;
#pragma unroll
                for (int m = 0; m < kPer; ++m) {
                    const int c = (sub + kWidth * m) * E;
                    if (r < keys) {
                        common::chunk_to_float<T>(*reinterpret_cast<const uint4 *>(p.k.row<T>(batch, kv, j0 + r) + c),
                                                  x[b][m]);
                        load_floats(stage + r * kStageStride + c, dy[b][m]);
                    } else {
#pragma unroll
                        for (int e = 0; e < E; ++e) x[b][m][e] = dy[b][m][e] = 0.f;
                    }
                }
            }
#pragma unroll
            for (int b = 0; b < kBatch; ++b) {
                const int r = tid / kWidth + (pass0 + b) * kRowsPerPass;
                l2norm_backward_lanes<T, kPer, E>(x[b], dy[b], kWidth, false, p.k.row<T>(batch, kv, j0 + r),
                                                  r < keys ? p.d : 0);
                if (r < keys) {
                    T *out = p.dk.row<T>(batch, kv, j0 + r);
#pragma unroll
                    for (int m = 0; m < kPer; ++m)
                        *reinterpret_cast<uint4 *>(out + (sub + kWidth * m) * E) = common::float_to_chunk<T>(dy[b][m]);
                }
            }
        }
        return;
    }
    for (int r = tid / 32; r < keys; r += kThreads / 32)
        l2norm_backward_row<T, D>(p.k.row<T>(batch, kv, j0 + r), stage + r * kStageStride,
                                  p.dk.row<T>(batch, kv, j0 + r), p.d, p.groups, true, false, tid % 32);
}

template <int M, int N> __device__ __forceinline__ void clear_all(FragC (&a)[M][N]) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int n = 0; n < N; ++n) common::clear(a[m][n]);
}
template <int M, int N> __device__ __forceinline__ void clear_all(FragC (&a)[M][N], FragC (&b)[M][N]) {
    clear_all(a);
    clear_all(b);
}

// ---------------------------------------------------------------- main kernel

// kGeneral = false: the main kernel without key masks, bias, dbias and dscale (chosen by
// launch_main_shape), so that the registers of those paths go to the loop. kVarlen:
// packed sequences, one CTA per entry of Params::varlen_keys (and column split).
template <typename T, class S, bool kGeneral, bool kVarlen> struct MainKernel {
    using G = WarpGemm<T>;
    static constexpr int KT = S::KT, BR = S::BR, DC = S::DC, NQ8 = S::BR / 8, NC8 = S::DC / 8;

    struct Smem : KeyQuerySmem<T> {
        T *ds;
        float *reduce;
    };

    __device__ __forceinline__ static Smem carve(unsigned char *base) {
        Smem s;
        carve_key_query<T, S>(s, base);
        s.ds = reinterpret_cast<T *>(base + S::kOffS);
        s.reduce = reinterpret_cast<float *>(base + S::kOffReduce);
        return s;
    }

    __device__ __forceinline__ static void run(const Params &p, unsigned char *smem_base) {
        const Smem s = carve(smem_base);
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        if constexpr (kVarlen) {
            // Batch 1, no dbias: one kv head per item. dscale's partials are indexed by
            // entry (those of spare CTAs were zeroed by the host).
            const int64_t entries = p.varlen_keys.max_tiles;
            const int64_t entry = blockIdx.x % entries;
            const int split = static_cast<int>(blockIdx.x / entries);
            if (entry >= *p.varlen_keys.count) return; // a spare CTA of the launch's bound
            int64_t key_tile = 0;
            const Extent<true> e = packed_extent(p.varlen_keys, entry, &key_tile);
            for (int64_t kv = blockIdx.y; kv < p.hk; kv += gridDim.y)
                key_tile_item(p, e, s, 0, kv, key_tile, entry, entries, split, tid, lane, warp);
        } else {
            const Extent<false> e{};
            const int64_t key_tiles = (p.nk + S::kKeys - 1) / S::kKeys;
            const int64_t key_tile = blockIdx.x % key_tiles;
            const int split = static_cast<int>(blockIdx.x / key_tiles);
            const int64_t batch_groups = (p.b + p.main_batches_per_cta - 1) / p.main_batches_per_cta;
            const int64_t head_groups = p.hk / p.main_kv_heads_per_cta;
            for (int64_t item = blockIdx.y; item < batch_groups * head_groups; item += gridDim.y) {
                const int64_t b_begin = (item % batch_groups) * p.main_batches_per_cta;
                const int64_t g_begin = (item / batch_groups) * p.main_kv_heads_per_cta;
                const int64_t b_end = b_begin + p.main_batches_per_cta < p.b ? b_begin + p.main_batches_per_cta : p.b;
                for (int64_t batch = b_begin; batch < b_end; ++batch)
                    for (int64_t kv = g_begin; kv < g_begin + p.main_kv_heads_per_cta; ++kv)
                        key_tile_item(p, e, s, batch, kv, key_tile, key_tile, key_tiles, split, tid, lane, warp);
            }
        }
    }

    // Key tile `key_tile` of the extent; its dscale partials at slot `partial` of
    // `partials` per head.
    __device__ __forceinline__ static void key_tile_item(const Params &p, const Extent<kVarlen> &e, const Smem &s,
                                                         int64_t batch, int64_t kv, int64_t key_tile, int64_t partial,
                                                         int64_t partials, int split, int tid, int lane, int warp) {
        const int g = lane >> 2, t = lane & 3;
        const int64_t j0 = e.key(key_tile * S::kKeys);
        const int keys = static_cast<int>(e.k_end(p) - j0 < S::kKeys ? e.k_end(p) - j0 : S::kKeys);
        const int col0 = split * DC;
        const bool lead = split == 0; // the column split that writes dbias and dscale
        const int warp_key0 = warp * KT * 16;
        const int64_t query_tiles = (e.q_count(p) + BR - 1) / BR;
        const int64_t head0 = kv * p.heads_per_kv;

        __syncthreads(); // the previous item's epilogue is done with shared memory

        bool key_ok[KT][2];
        bool any_key = false, any_hidden_key = false;
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int64_t key = j0 + warp_key0 + 16 * kt + g + 8 * half;
                if constexpr (kVarlen) key_ok[kt][half] = key < e.k_end(p); // (no key mask)
                else key_ok[kt][half] = kGeneral ? key_unmasked(p, batch, key) : key < p.nk;
                any_key |= key_ok[kt][half];
                any_hidden_key |= !key_ok[kt][half];
            }
        const bool warp_keys_ok = __all_sync(0xffffffffu, !any_hidden_key); // every key of this warp visible
        if (!__syncthreads_or(any_key)) {
            // Every key of the tile is hidden: no gradient flows through them.
            write_zero_grads<T, DC, S::kThreads>(p, batch, kv, j0, keys, col0, tid);
            for (int64_t head = head0; head < head0 + p.heads_per_kv; ++head) {
                if (kGeneral && lead && p.dscale_partial != nullptr && tid == 0)
                    p.dscale_partial[(batch * p.h + head) * partials + partial] = 0.f;
                if (kGeneral && lead && p.dbias_mode == kDbiasDirect)
                    zero_dbias_block<T>(p, batch, head, 0, p.nq, j0, keys, tid, S::kThreads);
            }
            return;
        }

        issue_key_tiles<T, S::kKeys, S::D, S::kThreads>(p, s.k, s.v, batch, kv, j0, keys, tid);
        FragC dk[KT][NC8], dv[KT][NC8];
        clear_all(dk, dv);

        const int64_t qt_begin = first_query_tile<BR>(p, e, j0, query_tiles);
        bool k_ready = false; // K^ is made ready in place once, with the first query tile
        for (int64_t head = head0; head < head0 + p.heads_per_kv; ++head) {
            const float scale = head_scale(p, head);
            if (kGeneral && lead && p.dbias_mode == kDbiasDirect) {
                const int64_t skipped = qt_begin * BR < p.nq ? qt_begin * BR : p.nq;
                zero_dbias_block<T>(p, batch, head, 0, skipped, j0, keys, tid, S::kThreads);
            }
            const int64_t bias_bh = batch * p.bias_stride[0] + head * p.bias_stride[1];
            float dscale_sum = 0.f;

            // l2norm: q and k are normalized in shared memory as their tiles land, each
            // query tile one iteration ahead of its use (the loop's barrier publishes it).
            start_query_tiles<T, S>(p, e, s, keys, k_ready, batch, head, qt_begin, query_tiles, tid);

            for (int64_t qt = qt_begin; qt < query_tiles; ++qt) {
                const int stage = static_cast<int>((qt - qt_begin) % S::kStages);
                // Tile qt landed (and, with three or more stages, tile qt + 1: it is
                // normalized during this iteration).
                common::cp_async_wait<(S::kStages >= 3 ? S::kStages - 3 : 0)>();
                __syncthreads(); // ... for every thread; tile qt - 1 is no longer read
                const int64_t next = qt + S::kStages - 1;
                if (next < query_tiles)
                    issue_query_stage<T, S>(p, e, s, batch, head, next,
                                            static_cast<int>((next - qt_begin) % S::kStages), tid);
                common::cp_async_commit();

                const T *q_s = s.q + stage * S::QTile::kElements;
                const T *do_s = s.dout + stage * S::QTile::kElements;
                const float *lse_s = s.lse + stage * BR;
                const float *delta_s = s.delta + stage * BR;
                const int64_t i0 = e.row(qt * BR);

                // S^T = K^ Q^T and dP^T = V dO^T for this warp's keys.
                FragC sc[KT][NQ8], dp[KT][NQ8];
                clear_all(sc, dp);
                G::template rows_nk<KT, NQ8, S::D>(sc, s.k, S::KTile::kStride, warp_key0, q_s, S::QTile::kStride,
                                                   0, lane);
                G::template rows_nk<KT, NQ8, S::D>(dp, s.v, S::KTile::kStride, warp_key0, do_s,
                                                   S::QTile::kStride, 0, lane);
                // Tile qt + 1 is normalized here, while the products above drain.
                if (S::kStages >= 3 && p.l2norm && qt + 1 < query_tiles)
                    normalize_query_stage<T, S>(p, e, s, qt + 1, static_cast<int>((qt + 1 - qt_begin) % S::kStages),
                                                tid);

                // P^T and dS^T, element by element (accumulator rows = keys), in tile-local
                // 32-bit coordinates: key jl sees row r when r < rows and jl - r <= diagonal.
                const int rows = static_cast<int>(e.q_end(p) - i0 < BR ? e.q_end(p) - i0 : BR);
                const int diagonal = clamp_to_int(p.causal ? i0 + e.causal_offset(p) - j0 : int64_t(1) << 30);
                const bool has_bias = kGeneral && p.bias != nullptr;
                const bool has_dscale = kGeneral && p.dscale_partial != nullptr;
                // f(score, its dP, tile row r, tile key jl, which of the key's halves) for
                // every score of this warp.
                auto for_each_score = [&](auto f) {
#pragma unroll
                    for (int kt = 0; kt < KT; ++kt)
#pragma unroll
                        for (int n = 0; n < NQ8; ++n)
#pragma unroll
                            for (int e = 0; e < 4; ++e)
                                f(sc[kt][n].x[e], dp[kt][n].x[e], 8 * n + 2 * t + (e & 1),
                                  warp_key0 + 16 * kt + g + 8 * (e >> 1), key_ok[kt][e >> 1]);
                };
                // The common tile: every score visible, no bias, no dscale. Same arithmetic
                // as the general loop below, without its per-element tests.
                const bool plain_tile = !has_bias && !has_dscale && warp_keys_ok && rows == BR &&
                                        warp_key0 + 16 * KT - 1 <= diagonal;
                if (plain_tile) {
                    for_each_score([&](float &score, float &grad, int r, int, bool) {
                        probability_and_grad(score, grad, true, scale, 0.f, lse_s[r], delta_s[r]);
                    });
                } else {
                    // Row by row (n outer), so that with dscale each row's sums of dS and
                    // P cos over this warp's keys are added up once (Params::dscale_rows;
                    // the dq kernel forms them when deterministic). with_dscale: a variant of
                    // its own (chosen once per tile).
                    const bool dscale_rows = has_dscale && lead && !p.deterministic;
                    auto general_tile = [&](auto with_dscale) {
#pragma unroll
                        for (int n = 0; n < NQ8; ++n) {
                            float ds_sum[2] = {0.f, 0.f}, p_cos_sum[2] = {0.f, 0.f};
#pragma unroll
                            for (int kt = 0; kt < KT; ++kt)
#pragma unroll
                                for (int e = 0; e < 4; ++e) {
                                    const int r = 8 * n + 2 * t + (e & 1), jl = warp_key0 + 16 * kt + g + 8 * (e >> 1);
                                    float &score = sc[kt][n].x[e], &grad = dp[kt][n].x[e];
                                    const bool visible = key_ok[kt][e >> 1] && r < rows && jl - r <= diagonal;
                                    // (0 where hidden: a raw key's saturated k can make its
                                    // product inf, and 0 * inf would reach dscale)
                                    const float cosine = visible ? score : 0.f;
                                    const float bias =
                                        has_bias && visible ? bias_at<T>(p, bias_bh, i0 + r, j0 + jl) : 0.f;
                                    probability_and_grad(score, grad, visible, scale, bias, lse_s[r], delta_s[r]);
                                    if constexpr (decltype(with_dscale)::value) {
                                        dscale_sum = fmaf(grad, cosine, dscale_sum);
                                        ds_sum[e & 1] += grad;
                                        p_cos_sum[e & 1] = fmaf(score, cosine, p_cos_sum[e & 1]);
                                    }
                                }
                            if (decltype(with_dscale)::value && dscale_rows)
                                add_dscale_rows(p, (batch * p.h + head) * p.nq + i0 + 8 * n + 2 * t, 8 * n + 2 * t,
                                                rows, ds_sum, p_cos_sum, lane);
                        }
                    };
                    if (has_dscale) general_tile(std::true_type{});
                    else general_tile(std::false_type{});
                }
                if (kGeneral && lead && p.dbias_mode != kDbiasNone)
                    main_tile_dbias<T, S>(p, dp, batch, head, i0, j0 + warp_key0, lane);

                // dV += P^T dO and dK^ += scale dS^T Q^, A operands straight from registers.
                typename G::Operand op[KT][BR / 16];
#pragma unroll
                for (int kt = 0; kt < KT; ++kt)
#pragma unroll
                    for (int kq = 0; kq < BR / 16; ++kq)
                        G::to_operand(op[kt][kq], sc[kt][2 * kq], sc[kt][2 * kq + 1], 1.f);
                G::template acc_kn<KT, BR / 16, NC8>(dv, op, do_s, S::QTile::kStride, col0, lane);
#pragma unroll
                for (int kt = 0; kt < KT; ++kt)
#pragma unroll
                    for (int kq = 0; kq < BR / 16; ++kq)
                        G::to_operand(op[kt][kq], dp[kt][2 * kq], dp[kt][2 * kq + 1], scale);
                G::template acc_kn<KT, BR / 16, NC8>(dk, op, q_s, S::QTile::kStride, col0, lane);

                // Two stages: tile qt + 1 was issued this iteration; it is normalized once it
                // has landed for every thread, after dS's barrier (or a barrier of its own).
                const bool normalize_next = S::kStages == 2 && p.l2norm && qt + 1 < query_tiles;
                const int next_stage = static_cast<int>((qt + 1 - qt_begin) % S::kStages);
                if (!p.deterministic) {
                    // dQ^ += scale dS K^: dS^T to shared memory, then each warp one block.
                    store_scaled_scores(s.ds, dp, warp_key0, scale, lane);
                    if (normalize_next) common::cp_async_wait<0>();
                    __syncthreads();
                    if (normalize_next) normalize_query_stage<T, S>(p, e, s, qt + 1, next_stage, tid);
                    const int wr = warp % S::kRowBlocks, wc = warp / S::kRowBlocks;
                    const int dq_col0 = col0 + wc * S::kColsPerWarp;
                    FragC dq[S::kDqBlocks];
#pragma unroll
                    for (int n = 0; n < S::kDqBlocks; ++n) common::clear(dq[n]);
                    G::template tileT_kn<S::kDqBlocks, S::kKeys>(dq, s.ds, S::STile::kStride, 16 * wr, s.k,
                                                                 S::KTile::kStride, dq_col0, lane);
                    float *dq_rows = p.dq_acc + ((batch * p.h + head) * p.nq + i0 + 16 * wr) * p.d;
#pragma unroll
                    for (int n = 0; n < S::kDqBlocks; ++n) {
                        const int c = dq_col0 + 8 * n + 2 * t;
#pragma unroll
                        for (int half = 0; half < 2; ++half) {
                            const int r = g + 8 * half;
                            if (i0 + 16 * wr + r < e.q_end(p) && c < p.d)
                                atomic_add2(dq_rows + int64_t(r) * p.d + c, dq[n].x[2 * half],
                                            dq[n].x[2 * half + 1]);
                        }
                    }
                }
                if (p.deterministic && normalize_next) {
                    common::cp_async_wait<0>();
                    __syncthreads();
                    normalize_query_stage<T, S>(p, e, s, qt + 1, next_stage, tid);
                }
            }

            if (kGeneral && lead && p.dscale_partial != nullptr) {
                const float total = block_sum<S::kThreads / 32>(dscale_sum, s.reduce, tid);
                if (tid == 0) p.dscale_partial[(batch * p.h + head) * partials + partial] = total;
            }
        }
        common::cp_async_wait<0>();
        epilogue(p, s, dk, dv, batch, kv, j0, keys, col0, tid, lane, warp);
    }

    // scale * dS^T -> the [key][query] tile in T (or float for the float32 path).
    __device__ __forceinline__ static void store_scaled_scores(T *tile, const FragC (&ds)[KT][NQ8], int warp_key0, float scale,
                                               int lane) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int n = 0; n < NQ8; ++n)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    T *dst = tile + (warp_key0 + 16 * kt + g + 8 * half) * S::STile::kStride + 8 * n + 2 * t;
                    const float a = ds[kt][n].x[2 * half] * scale, b = ds[kt][n].x[2 * half + 1] * scale;
                    if constexpr (common::ElementTraits<T>::kIs16Bit)
                        *reinterpret_cast<uint32_t *>(dst) = common::pack_float2<T>(a, b);
                    else
                        *reinterpret_cast<float2 *>(dst) = make_float2(a, b);
                }
    }

    __device__ __forceinline__ static void epilogue(const Params &p, const Smem &s, const FragC (&dk)[KT][NC8],
                                    const FragC (&dv)[KT][NC8], int64_t batch, int64_t kv, int64_t j0, int keys,
                                    int col0, int tid, int lane, int warp) {
        const int g = lane >> 2, t = lane & 3;
        const int warp_key0 = warp * KT * 16;
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = warp_key0 + 16 * kt + g + 8 * half;
                if (r >= keys) continue;
                T *dv_row = p.dv.row<T>(batch, kv, j0 + r);
#pragma unroll
                for (int n = 0; n < NC8; ++n) {
                    const int c = col0 + 8 * n + 2 * t;
                    if (c < p.d_v) {
                        dv_row[c] = common::from_float<T>(dv[kt][n].x[2 * half]);
                        dv_row[c + 1] = common::from_float<T>(dv[kt][n].x[2 * half + 1]);
                    }
                }
            }

        if (p.l2norm && S::kSplitCount == 1) {
            // The l2norm backward needs whole rows: stage dK^ in shared memory.
            __syncthreads(); // every warp is done with the K tile
            float *stage = reinterpret_cast<float *>(s.k);
#pragma unroll
            for (int kt = 0; kt < KT; ++kt)
#pragma unroll
                for (int n = 0; n < NC8; ++n)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int r = warp_key0 + 16 * kt + g + 8 * half;
                        *reinterpret_cast<float2 *>(stage + r * S::kStageStride + 8 * n + 2 * t) =
                            make_float2(dk[kt][n].x[2 * half], dk[kt][n].x[2 * half + 1]);
                    }
            __syncthreads();
            finish_dk_rows<T, S::D, S::kKeys, S::kThreads, S::kStageStride>(p, stage, batch, kv, j0, keys,
                                                                             warp * 32 + lane);
            return;
        }
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = warp_key0 + 16 * kt + g + 8 * half;
                if (r >= keys) continue;
#pragma unroll
                for (int n = 0; n < NC8; ++n) {
                    const int c = col0 + 8 * n + 2 * t;
                    if (c >= p.d) continue;
                    const float a = dk[kt][n].x[2 * half], b = dk[kt][n].x[2 * half + 1];
                    if (p.dk_acc != nullptr) {
                        // Split head dim with l2norm: the dk post-pass finishes the rows.
                        *reinterpret_cast<float2 *>(p.dk_acc + ((batch * p.hk + kv) * p.nk + j0 + r) * p.d + c) =
                            make_float2(a, b);
                    } else {
                        T *dk_row = p.dk.row<T>(batch, kv, j0 + r);
                        dk_row[c] = common::from_float<T>(a);
                        dk_row[c + 1] = common::from_float<T>(b);
                    }
                }
            }
    }
};

template <typename T, class S, bool kGeneral, bool kVarlen>
__global__ void __launch_bounds__(S::kThreads, 1) main_kernel(const Params p) {
    extern __shared__ __align__(16) unsigned char smem[];
    MainKernel<T, S, kGeneral, kVarlen>::run(p, smem);
}

// ---------------------------------------------------------------- dq kernel

// kVarlen: packed sequences, one CTA per entry of Params::varlen_queries.
template <typename T, class S, bool kVarlen> struct DqKernel {
    using G = WarpGemm<T>;
    static constexpr int BR = S::BR, BC = S::BC, D = S::D, NK8 = S::BC / 8, ND8 = S::D / 8;

    struct Smem : KeyQuerySmem<T> {
        uint8_t *key_ok;
    };

    __device__ __forceinline__ static Smem carve(unsigned char *base) {
        Smem s;
        carve_key_query<T, S>(s, base);
        s.key_ok = reinterpret_cast<uint8_t *>(base + S::kOffKeyOk);
        return s;
    }

    __device__ __forceinline__ static void issue_key_tile(const Params &p, const Extent<kVarlen> &e, const Smem &s,
                                                          int64_t batch, int64_t kv, int64_t kt, int stage, int tid) {
        const int64_t j0 = e.key(kt * BC);
        const int keys = static_cast<int>(e.k_end(p) - j0 < BC ? e.k_end(p) - j0 : BC);
        common::load_tile<T, BC, D, S::kThreads>(s.k + stage * S::KTile::kElements, p.k.row<T>(batch, kv, j0),
                                                 p.k.stride_row, keys, p.d, p.k.aligned16, tid);
        common::load_tile<T, BC, D, S::kThreads>(s.v + stage * S::KTile::kElements, p.v.row<T>(batch, kv, j0),
                                                 p.v.stride_row, keys, p.d_v, p.v.aligned16, tid);
        for (int c = tid; c < BC; c += S::kThreads) {
            if constexpr (kVarlen) s.key_ok[stage * BC + c] = j0 + c < e.k_end(p); // (no key mask)
            else s.key_ok[stage * BC + c] = key_unmasked(p, batch, j0 + c);
        }
    }

    __device__ __forceinline__ static void run(const Params &p, unsigned char *smem_base) {
        const Smem s = carve(smem_base);
        const int tid = threadIdx.x;
        if constexpr (kVarlen) {
            // Batch 1, no dbias: one query tile per CTA, the heads over grid.y.
            const int64_t entry = blockIdx.x;
            if (entry >= *p.varlen_queries.count) return; // a spare CTA of the launch's bound
            int64_t qt = 0;
            const Extent<true> e = packed_extent(p.varlen_queries, entry, &qt);
            for (int64_t head = blockIdx.y; head < p.h; head += gridDim.y) query_tile_item(p, e, s, 0, head, qt, tid);
        } else {
            const Extent<false> e{};
            // One query tile per CTA, the (batch, head) items over grid.y.
            const int64_t qt = blockIdx.x;
            for (int64_t item = blockIdx.y; item < p.b * p.h; item += gridDim.y)
                query_tile_item(p, e, s, item / p.h, item % p.h, qt, tid);
        }
    }

    // Query tile `qt` of the extent (its rows from e.q_begin() + qt * BR on).
    __device__ __forceinline__ static void query_tile_item(const Params &p, const Extent<kVarlen> &e, const Smem &s,
                                                           int64_t batch, int64_t head, int64_t qt, int tid) {
        const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
        const int64_t kv = head / p.heads_per_kv;
        const int64_t i0 = e.row(qt * BR);
        const int rows = static_cast<int>(e.q_end(p) - i0 < BR ? e.q_end(p) - i0 : BR);
        const int64_t key_tiles_all = (e.k_count(p) + BC - 1) / BC;
        int64_t key_tiles = key_tiles_all;
        if (p.causal) {
            // (The key of the last row's diagonal, counted from the extent's first key.)
            const int64_t last_key = e.relative_key(i0 + rows - 1 + e.causal_offset(p));
            key_tiles = last_key < 0 ? 0 : (last_key / BC + 1 < key_tiles_all ? last_key / BC + 1 : key_tiles_all);
        }
        const float scale = head_scale(p, head);
        const int64_t bias_bh = batch * p.bias_stride[0] + head * p.bias_stride[1];

        __syncthreads(); // the previous item is done with shared memory
        common::load_tile<T, BR, D, S::kThreads>(s.q, p.q.row<T>(batch, head, i0), p.q.stride_row, rows, p.d,
                                                 p.q.aligned16, tid);
        common::load_tile<T, BR, D, S::kThreads>(s.dout, p.dout.row<T>(batch, head, i0), p.dout.stride_row, rows,
                                                 p.d_v, p.dout.aligned16, tid);
        const int64_t row_base = (batch * p.h + head) * p.nq + i0;
        for (int r = tid; r < BR; r += S::kThreads) {
            s.lse[r] = r < rows ? p.lse[row_base + r] : __int_as_float(0x7f800000);
            s.delta[r] = r < rows ? p.delta[row_base + r] : 0.f;
        }
        if (key_tiles > 0) issue_key_tile(p, e, s, batch, kv, 0, 0, tid);
        common::cp_async_commit();

        FragC dq[1][ND8];
#pragma unroll
        for (int n = 0; n < ND8; ++n) common::clear(dq[0][n]);
        // With dscale, rows r0 and r0 + 8: sums over the keys of dS and of P cos
        // (Params::dscale_rows).
        const bool dscale_rows = p.dscale_rows != nullptr;
        float ds_sum[2] = {0.f, 0.f}, p_cos_sum[2] = {0.f, 0.f};
        const int r0 = warp * 16 + g;
        float lse_row[2], delta_row[2];

        for (int64_t kt = 0; kt < key_tiles; ++kt) {
            const int stage = static_cast<int>(kt & 1);
            common::cp_async_wait<0>();
            __syncthreads();
            if (kt == 0) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    lse_row[half] = s.lse[r0 + 8 * half];
                    delta_row[half] = s.delta[r0 + 8 * half];
                }
            }
            if (kt + 1 < key_tiles) issue_key_tile(p, e, s, batch, kv, kt + 1, stage ^ 1, tid);
            common::cp_async_commit();
            // With l2norm, Q (once) and this key tile normalized in place; then the tile's
            // entries that are not finite made finite (start_query_tiles says why).
            const int keys = static_cast<int>(e.k_count(p) - kt * BC < BC ? e.k_count(p) - kt * BC : BC);
            if (p.l2norm) {
                if (kt == 0) common::normalize_tile<T, BR, D, S::kThreads>(s.q, rows, p.d, p.groups, tid);
                common::normalize_tile<T, BC, D, S::kThreads>(s.k + stage * S::KTile::kElements, keys, p.d, p.groups,
                                                              tid);
                __syncthreads();
            }
            make_keys_finite<T, typename S::KTile, S::kThreads>(p, s.k + stage * S::KTile::kElements, keys, tid);
            __syncthreads();
            const T *k_s = s.k + stage * S::KTile::kElements;
            const T *v_s = s.v + stage * S::KTile::kElements;
            const uint8_t *ok_s = s.key_ok + stage * BC;
            const int64_t j0 = e.key(kt * BC);

            FragC sc[1][NK8], dp[1][NK8];
#pragma unroll
            for (int n = 0; n < NK8; ++n) {
                common::clear(sc[0][n]);
                common::clear(dp[0][n]);
            }
            G::template rows_nk<1, NK8, D>(sc, s.q, S::QTile::kStride, warp * 16, k_s, S::KTile::kStride, 0, lane);
            G::template rows_nk<1, NK8, D>(dp, s.dout, S::QTile::kStride, warp * 16, v_s, S::KTile::kStride, 0,
                                           lane);
            const int diagonal = clamp_to_int(p.causal ? i0 + e.causal_offset(p) - j0 : int64_t(1) << 30);
            const bool has_bias = p.bias != nullptr;
            // P and dS in place; with_rows: the sums for Params::dscale_rows (a variant of
            // its own, so that the common tile does not pay for them).
            auto form_ds = [&](auto with_rows) {
#pragma unroll
                for (int n = 0; n < NK8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int r = r0 + 8 * (e >> 1), c = 8 * n + 2 * t + (e & 1);
                        const bool visible = ok_s[c] != 0 && r < rows && c - r <= diagonal;
                        const float bias = has_bias && visible ? bias_at<T>(p, bias_bh, i0 + r, j0 + c) : 0.f;
                        const float cosine = visible ? sc[0][n].x[e] : 0.f; // (as the main kernel's)
                        probability_and_grad(sc[0][n].x[e], dp[0][n].x[e], visible, scale, bias,
                                             lse_row[e >> 1], delta_row[e >> 1]);
                        if constexpr (decltype(with_rows)::value) {
                            ds_sum[e >> 1] += dp[0][n].x[e];
                            p_cos_sum[e >> 1] = fmaf(sc[0][n].x[e], cosine, p_cos_sum[e >> 1]);
                        }
                    }
            };
            if (dscale_rows) form_ds(std::true_type{});
            else form_ds(std::false_type{});
            typename G::Operand op[1][BC / 16];
#pragma unroll
            for (int kq = 0; kq < BC / 16; ++kq) G::to_operand(op[0][kq], dp[0][2 * kq], dp[0][2 * kq + 1], scale);
            G::template acc_kn<1, BC / 16, ND8>(dq, op, k_s, S::KTile::kStride, 0, lane);
        }

        // This CTA owns its rows of dQ^: plain stores, every element of rows < nq.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = r0 + 8 * half;
            if (r >= rows) continue;
            float *dst = p.dq_acc + (row_base + r) * p.d;
#pragma unroll
            for (int n = 0; n < ND8; ++n) {
                const int c = 8 * n + 2 * t;
                if (c < p.d) *reinterpret_cast<float2 *>(dst + c) = make_float2(dq[0][n].x[2 * half], dq[0][n].x[2 * half + 1]);
            }
        }

        if (dscale_rows) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float ds_row = common::quad_sum(ds_sum[half]), p_cos_row = common::quad_sum(p_cos_sum[half]);
                const int r = r0 + 8 * half;
                if (t == 0 && r < rows)
                    *reinterpret_cast<float2 *>(p.dscale_rows + 2 * (row_base + r)) = make_float2(ds_row, p_cos_row);
            }
        }
    }
};

template <typename T, class S, bool kVarlen>
__global__ void __launch_bounds__(S::kThreads, 1) dq_kernel(const Params p) {
    extern __shared__ __align__(16) unsigned char smem[];
    DqKernel<T, S, kVarlen>::run(p, smem);
}

} // namespace sm80_bwd
} // namespace fcsa
