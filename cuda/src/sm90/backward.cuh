// backward.cuh: the Hopper backward's main kernel (sm_90a): parameters, tile shapes and
// the entry points each instantiation file defines.
//
// It takes the place of the portable backward's main kernel in the common case
// (sm90_backward_supports: bfloat16, head dim 128, l2norm with one group, no bias,
// key mask or scale tensor, not deterministic), between the portable backward's own
// passes (sm80/backward.cu): the prepass gives lse, delta and 1 / ||q|| per query row,
// the key-norm pass 1 / ||k|| per key; this kernel gives dV, dK^ (float32, finished by
// the l2norm backward's row pass) and dQ^ / ||q|| (float32 atomics, likewise).
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cuda_runtime.h>

#include "../common/sm90/wgmma.cuh"
#include "../sm80/varlen.cuh"
#include "fcsa.h"

namespace fcsa {
namespace sm90 {

struct BackwardParams {
    // q, dout (d, nq, h, b) in boxes of 64 columns by 64 rows; k, v (d, nk, hk, b) by 128.
    CUtensorMap q_map, k_map, v_map, dout_map;
    // Per query row, contiguous [b][h][nq] (the prepass): lse (+inf for a row that sees
    // no key), delta = <dO, O>, 1 / ||q||.
    const float *lse, *delta, *q_inv_norm;
    const float *k_inv_norm; // [b][hk][k_inv_norm_stride] (the key-norm pass)
    int64_t k_inv_norm_stride;
    float *dq_acc;           // [b][h][nq][d]: dQ^ / ||q||, added to (atomics)
    float *dk_acc;           // [b][hk][nk][d]: dK^, written
    void *dv;                // (b, hk, nk, d) in T, written
    int64_t dv_stride[3];    // batch, kv head, row (elements)
    int batch, heads, heads_per_kv, nq, nk, d;
    float scale;
    bool causal;
    sm80::VarlenTiles varlen; // packed sequences: the key-tile table (b == 1 in the maps)
};

// Three warpgroups: a producer (one thread issues the copies; its warp also lays out
// each query tile's row factors) and two consumers of 64 keys each. A CTA owns 128 keys
// of one (batch, kv head): K and V arrive once, then Q and dO tiles of 64 rows, with the
// factors, stream through kStages buffers, for every query head of the kv head.
// (d = 64 was built too, with 64- and with 128-row query tiles and dQ over each
// consumer's own keys: 0.75-0.83x the portable path, so it runs there; benchmarks/NOTES.md.)
template <typename T, int D> struct BackwardConfig {
    static_assert(D == 128, "the head dim of the Hopper backward");
    static constexpr int kConsumers = 2;
    static constexpr int kThreads = 128 * (1 + kConsumers);
    static constexpr int kBlockN = 64 * kConsumers; // keys per CTA
    static constexpr int kBlockM = 64;              // query rows per tile
    static constexpr int kStages = 2;
    // setmaxnreg budgets: 128 * 24 + 256 * 240 = 64512 of the 65536 registers.
    static constexpr int kProducerRegisters = 24;
    static constexpr int kConsumerRegisters = 240;
    // dQ^ = dS K^: each consumer takes 64 of its columns over all 128 keys.
    static constexpr int kDqColumns = 64;
    // dS^T of tile t is written in step t and read by both consumers' dQ^ in step t + 1.
    // A consumer writing tile t has seen the other's dS^T of t - 2 ready, so the other
    // may still be reading t - 3's: four buffers.
    static constexpr int kDsBuffers = 4;

    using KTile = common::sm90::SwizzledTile128<T, kBlockN, D>;  // K (as k^) and V
    using QTile = common::sm90::SwizzledTile128<T, kBlockM, D>;  // Q and dO
    using DsTile = common::sm90::SwizzledTile128<T, kBlockN, kBlockM>; // dS^T: [key][query row]
    // Per query row of a tile: (scale log2(e) / ||q||, lse log2(e), scale / ||q||,
    // delta scale / ||q||), the factors of P and dS.
    static constexpr int kFactorBytes = kBlockM * 16;

    static constexpr int kOffsetV = KTile::kBytes;
    static constexpr int kOffsetQ = kOffsetV + KTile::kBytes;
    static constexpr int kOffsetDout = kOffsetQ + kStages * QTile::kBytes;
    static constexpr int kOffsetDs = kOffsetDout + kStages * QTile::kBytes;
    static constexpr int kOffsetFactors = kOffsetDs + kDsBuffers * DsTile::kBytes;
    static constexpr int kOffsetBarriers = kOffsetFactors + kStages * kFactorBytes;
    static constexpr int kBarriers = 1 + 2 * kStages + kDsBuffers; // K and V; a stage's full and empty; dS ready
    // + 1024: the kernel aligns the dynamic shared memory's start to the swizzle's 1024 bytes.
    static constexpr int kSmemBytes = kOffsetBarriers + kBarriers * 8 + 1024;
    static_assert(kOffsetQ % 1024 == 0 && kOffsetDout % 1024 == 0 && kOffsetDs % 1024 == 0 &&
                      QTile::kBytes % 1024 == 0 && DsTile::kBytes % 1024 == 0,
                  "swizzled tiles start on 1024-byte atoms");
};

// Launches the kernel for one (T, D); defined in backward_<dtype>_d<D>.cu (kPacked:
// packed sequences, in backward_<dtype>_d<D>_packed.cu).
template <typename T, int D, bool kPacked>
fcsa_status launch_backward(const BackwardParams &params, cudaStream_t stream);
// Whether this build holds the kernel's sm_90a code.
template <typename T, int D> bool backward_compiled();

} // namespace sm90
} // namespace fcsa
