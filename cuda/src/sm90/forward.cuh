// forward.cuh: the Hopper forward (sm_90a): parameters, tile shapes and the entry points
// each instantiation file defines.
//
// One kernel template, forward_kernel<T, D> (forward_kernel.cuh), for float16 and
// bfloat16 with the head dim zero-padded to a bucket D of 64 or 128 (TMA fills the
// columns past d with zeros). It covers the common case: l2-normalized q and k with one
// group, no bias, a scale given as a number, causal or not, a key mask or packed
// sequences or neither, grouped-query kv, any 16-byte-aligned strides. Everything else
// runs on the portable path (sm80/).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda.h>
#include <cuda_runtime.h>

#include "../common/sm90/wgmma.cuh"
#include "../sm80/varlen.cuh"
#include "fcsa.h"

namespace fcsa {
namespace sm90 {

struct ForwardParams {
    // q (d, nq, h, b), k and v (d, nk, hk, b): boxes of 64 columns by a tile's rows.
    CUtensorMap q_map, k_map, v_map;
    // q, k, v as plain pointers and strides (elements; batch, head, row): read only where
    // a causal tile's rows are computed again (common/nonfinite_rows.cuh)
    const void *q, *k, *v;
    int64_t q_stride[3], k_stride[3], v_stride[3];
    void *out;
    float *lse;               // optional
    const float *k_inv_norm;  // 1 / ||k_j||, [batch][kv head][k_inv_norm_stride] (the key-norm pass)
    const int *key_counts;    // under a key mask, per batch: one past its last visible key, its visible keys
    sm80::VarlenTiles varlen; // packed sequences: the tile table (b == 1 in the maps and strides)
    int64_t k_inv_norm_stride;
    int64_t out_stride[3];    // batch, head, row (elements)
    int64_t lse_stride[3];
    int batch, heads, heads_per_kv, nq, nk, d, num_m_tiles;
    float scale;
    bool causal, vec_out, ping_pong;
};

// A producer warpgroup (one thread issues every TMA copy; under a key mask a second
// warp zeros hidden keys' V rows) and kConsumers consumer warpgroups of 64 query rows
// each. K and V stream through kStages buffers each; 1 / ||k_j|| of a tile arrives with
// its K. At d = 64 a warpgroup's softmax takes about as long as its products, and with
// two consumers the kernel was latency-bound (ncu: the tensor pipe 49% busy, 0.54
// eligible warps per scheduler; moving exponentials off MUFU made it slower); a third
// consumer's products cover the others' softmax (+10-16% at 16k, benchmarks/NOTES.md).
template <typename T, int D> struct ForwardConfig {
    static_assert(D == 64 || D == 128, "head-dim buckets of the Hopper forward");
    static constexpr int kConsumers = D == 64 ? 3 : 2;
    static constexpr int kThreads = 128 * (1 + kConsumers);
    static constexpr int kBlockM = 64 * kConsumers;
    static constexpr int kBlockN = 128;
    static constexpr int kStages = D == 64 ? 4 : 2;
    // setmaxnreg budgets: 128 * 56 + 256 * 224 = 64512 of the 65536 registers with two
    // consumers, 128 * 32 + 384 * 160 = 65536 with three.
    static constexpr int kProducerRegisters = kConsumers == 3 ? 32 : 56;
    static constexpr int kConsumerRegisters = kConsumers == 3 ? 160 : 224;
    // Named barriers: 1 + c, consumer c's own; the turns of ping-pong from kTurnBarrier
    // (one per consumer); kZeroBarrier, every consumer's, after the last V tile's zeroing.
    static constexpr int kTurnBarrier = 1 + kConsumers;
    static constexpr int kZeroBarrier = kTurnBarrier + kConsumers;

    // p = 2^(x - offset), offset = bound - kExpShift, lies in [2^(kExpShift - 2 bound),
    // 2^kExpShift]: float16 probabilities stay normal for 2 bound <= kBoundedRange
    // (base 2), the same rule as the portable path's.
    static constexpr float kExpShift = std::is_same<T, __half>::value ? 15.f : 0.f;
    static constexpr float kBoundedRange = std::is_same<T, __half>::value ? 29.f : 100.f;

    using QTile = common::sm90::SwizzledTile128<T, kBlockM, D>;
    using KTile = common::sm90::SwizzledTile128<T, kBlockN, D>;
    static constexpr int kOffsetK = QTile::kBytes;
    static constexpr int kOffsetV = kOffsetK + kStages * KTile::kBytes;
    static constexpr int kOffsetKInv = kOffsetV + kStages * KTile::kBytes;
    static constexpr int kOffsetBarriers = kOffsetKInv + kStages * kBlockN * 4;
    // Q full; per stage K and V full and empty, and V ready (its hidden keys' rows zeroed)
    static constexpr int kBarriers = 1 + 5 * kStages;
    // Causal tiles: per consumer, per warp, the rows whose accumulators are not finite
    // (forward_kernel.cuh's epilogue), 16 bytes per consumer.
    static constexpr int kOffsetRecompute = (kOffsetBarriers + kBarriers * 8 + 15) / 16 * 16;
    // + 1024: the kernel aligns the dynamic shared memory's start to the swizzle's 1024 bytes.
    static constexpr int kSmemBytes = kOffsetRecompute + kConsumers * 16 + 1024;
    static_assert(kOffsetK % 1024 == 0 && kOffsetV % 1024 == 0, "swizzled tiles start on 1024-byte atoms");
};

// Launches the kernel for one (T, D); defined in forward_<dtype>_d<D>.cu (kKeyMask:
// under a key mask, in forward_<dtype>_d<D>_key_mask.cu; kPacked: packed sequences, in
// forward_<dtype>_d<D>_packed.cu).
template <typename T, int D, bool kKeyMask, bool kPacked>
fcsa_status launch_forward(const ForwardParams &params, cudaStream_t stream);
// Whether this build holds the kernel's sm_90a code (a build without 90a has an empty one).
template <typename T, int D> bool forward_compiled();

inline int forward_head_dim_bucket(int64_t d) { return d <= 64 ? 64 : 128; }

} // namespace sm90
} // namespace fcsa
