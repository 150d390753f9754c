// forward.cuh: the portable CUDA forward (sm_80 and newer): parameters, tile shapes,
// and the entry points each instantiation file defines.
//
// One kernel template, forward_kernel<T, D, DV> (forward_kernel.cuh), covers every
// feature; T is float, __half or __nv_bfloat16, D a head-dim bucket (32, 64, 96, 128,
// 192, 256) that q's and k's head dim d <= D is zero-padded to, and DV <= D the bucket
// of v's head dim d_v. Each (T, D, DV) is instantiated in its own file so that builds
// run in parallel: forward_<dtype>_d<D>.cu for DV == D, and
// forward_<dtype>_d<D>_v<DV>.cu for the one unequal pair, (192, 128), which padding to
// (192, 192) would have cost a third of its P V products (forward_buckets below).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "../common/copy.cuh"
#include "../common/numeric.cuh"
#include "fcsa.h"
#include "varlen.cuh"

namespace fcsa {
namespace sm80 {

// Everything the kernel reads, filled from a Problem by forward.cu. Strides in elements.
struct ForwardParams {
    const void *q, *k, *v;
    void *out;
    float *lse;           // optional
    const uint8_t *mask;  // optional, (batch, key)
    const void *bias;     // optional, T or float32
    const float *scale_t; // optional, one float per head (stride scale_stride, 0 = shared)
    // Optional: 1 / max(||k_j||, eps) per key, [batch][kv head][k_inv_norm_stride] (the
    // key-norm pass, forward.cu); else the kernel computes the norms per key tile.
    const float *k_inv_norm;
    int64_t k_inv_norm_stride;
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3]; // batch, head, row
    int64_t lse_stride[3];                                         // batch, head, row
    int64_t mask_stride[2];                                        // batch, key
    int64_t bias_stride[4];                                        // batch, head, row, key
    int64_t scale_stride;
    int batch, heads, heads_per_kv, nq, nk, d, d_v, groups, num_m_tiles; // d: q's, k's; d_v: v's, out's
    float scale;
    bool causal, l2norm, logits_bounded, bias_is_f32;
    bool out_f32; // out in float32 for 16-bit q, k, v (what the backward's delta reads)
    bool vec_q, vec_k, vec_v, vec_out; // 16-byte aligned rows: vector copies allowed
    // Packed sequences (varlen.cuh): batch 1, each CTA's query tile and sequence from the
    // table; tiles == nullptr otherwise. (No mask, no bias, no key-norm pass then.)
    VarlenTiles varlen;
};

// Tile shapes per element type and (q/k, v) head-dim buckets. Every configuration fits
// the 99 KB of shared memory that sm_86/sm_89 give a block. A warp owns kMBlocks x 16
// query rows: two blocks for 16-bit inputs up to D = 128, so that each K/V fragment read
// from shared memory feeds two products (one would leave the tensor cores waiting on
// shared-memory bandwidth); with D <= 64 the warp also keeps its Q rows in registers.
// (192, 128) takes two blocks too: its O and S accumulators are (128, 128)'s, only its
// Q tile is wider (91 KB of shared memory in all).
// DV <= D: the epilogue stages O in the warp's own rows of the Q tile.
template <typename T, int D, int DV = D> struct ForwardConfig {
    static_assert(DV <= D && DV % 32 == 0, "v's bucket is at most q's (out is staged in Q's rows)");
    static constexpr bool k16Bit = common::ElementTraits<T>::kIs16Bit;
    static constexpr int kMBlocks = k16Bit && (D <= 128 || (D <= 192 && DV <= 128)) ? 2 : 1;
    static constexpr int kWarps = 4;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kRowsPerWarp = 16 * kMBlocks;
    static constexpr int kBlockM = kWarps * kRowsPerWarp;
    static_assert(kBlockM >= 64, "the packed sequences' workspace is sized for tiles of 64 rows or more");
    static constexpr int kBlockN = k16Bit ? (D <= 192 ? 64 : 32)
                                          : (D <= 64 ? 64 : D <= 128 ? 32 : 16);
    static constexpr bool kQInRegisters = k16Bit && D <= 64;

    // Without a running maximum p = 2^(x - offset), offset = bound - kExpShift, lies in
    // [2^(kExpShift - 2 bound), 2^kExpShift] (x, bound in base 2). The shift keeps
    // float16 probabilities in its normal range; kBoundedRange is the widest 2 * bound
    // for which that holds (else the kernel tracks a running maximum).
    static constexpr float kExpShift = std::is_same<T, __half>::value ? 15.f : 0.f;
    static constexpr float kBoundedRange = std::is_same<T, __half>::value ? 29.f : 100.f;

    // Per-tile visibility bits under a key mask, for the first kBitmapTiles tiles.
    static constexpr int kBitmapWords = 64;
    static constexpr int kBitmapTiles = kBitmapWords * 32;

    // K and V tiles alike. 16-bit tiles from d = 128 on are swizzled: their copies, once
    // per key tile, then cost the shared memory no extra wavefronts (+2-3% at d = 128 on
    // the H100, notes v5; at d = 64 it measured within 1% either way and stays padded).
    static constexpr bool kSwizzledKV = k16Bit && D >= 128;
    static constexpr bool kSwizzledV = k16Bit && DV >= 128; // (the same rule for V's width)
    // P V with the next 16 keys' exponentials interleaved (forward_kernel.cuh): +9% at
    // d = 64 on the H100; it lost 2-9% at d = 128 (whose registers are all taken: it
    // spilled) and 15% at d = 32.
    static constexpr bool kInterleaveExp = k16Bit && D == 64 && DV == 64;
    // Row sums of P on the tensor cores (P times a column of ones: 1/8 more P V products
    // at d = 64, 64 fewer float adds per tile and lane): +1-2% at d = 64 on the H100,
    // -1-2% at d = 128 (notes v8).
    static constexpr bool kSumsByMma = k16Bit && D == 64 && DV == 64;
    // K and V copies of whole tiles without tests (load_tile): +0.5-1% at d = 128, -1-2%
    // at d = 64 (notes v8). (The Q tile, once per CTA, takes load_tile's default.)
    static constexpr bool kWholeTileCopies = D >= 128;
    using QTile = common::PaddedTile<T, kBlockM, D>;
    using OTile = common::PaddedTile<T, kBlockM, DV>; // out staged in Q's rows: kStride <= Q's
    using KTile = std::conditional_t<kSwizzledKV, common::SwizzledTile<T, kBlockN, D>,
                                     common::PaddedTile<T, kBlockN, D>>;
    using VTile = std::conditional_t<kSwizzledV, common::SwizzledTile<T, kBlockN, DV>,
                                     common::PaddedTile<T, kBlockN, DV>>;
    static constexpr int kOffsetK = QTile::kBytes;
    static constexpr int kOffsetV = kOffsetK + KTile::kBytes;
    static constexpr int kOffsetKInv = kOffsetV + VTile::kBytes;
    static constexpr int kOffsetBitmaps = kOffsetKInv + 2 * kBlockN * 4; // 1/||k||, two buffers
    static constexpr int kSmemBytes = kOffsetBitmaps + 2 * kBitmapWords * 4;
    static_assert(kOffsetK % 128 == 0 && kOffsetV % 128 == 0, "swizzled tiles start on 128-byte lines");
    static_assert(kOffsetKInv % 16 == 0, "1/||k|| arrives by 16-byte cp.async");
};

// The fewest query rows of any configuration's tile (4 warps of one m16 block).
constexpr int kSmallestBlockM = 64;

// Launches the kernel for one (T, D, DV) on `stream`; defined in forward_<dtype>_d<D>.cu
// (DV == D) and forward_<dtype>_d<D>_v<DV>.cu.
template <typename T, int D, int DV> fcsa_status launch_forward(const ForwardParams &params, cudaStream_t stream);

// The head-dim bucket of d (d % 8 == 0, 8 <= d <= 256).
inline int forward_head_dim_bucket(int64_t d) {
    return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : d <= 192 ? 192 : 256;
}

// The instantiation that runs (d, d_v): the smallest of (B, B) for every bucket B and
// (192, 128) that covers both, the rest zero-padded.
struct ForwardBuckets {
    int d, d_v;
};
inline ForwardBuckets forward_buckets(int64_t d, int64_t d_v) {
    const int bd = forward_head_dim_bucket(d), bv = forward_head_dim_bucket(d_v);
    if (bd == 192 && bv <= 128) return {192, 128};
    const int both = bd > bv ? bd : bv;
    return {both, both};
}

// Dynamic shared memory of the forward kernel for (dtype, d, d_v); 0 for an unknown dtype.
size_t forward_smem_bytes(int32_t dtype, int64_t d, int64_t d_v);

} // namespace sm80
} // namespace fcsa
