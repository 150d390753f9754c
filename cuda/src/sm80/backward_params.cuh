// backward_params.cuh: what the host part of the sm80 backward (backward.cu) hands to
// its kernels (backward_kernels.cuh and backward_shared_scores.cuh, launched from
// backward_launch.cuh and instantiated in backward_d*.cu).
//
// The backward runs as a few launches on the caller's stream:
//   1. prepass      delta_i = <dO_i, O_i>, lse contiguous (+inf for rows that see no
//                   key, so their P is 0), 1 / ||q_i|| where the shared-scores kernel
//                   folds it (Params::q_inv_norm);
//   2. main         one CTA per (key tile, kv head, batch): dK, dV in registers, dQ^
//                   by float atomics (or by 3. when deterministic), dscale partials,
//                   dbias (the shared-scores kernel instead where it applies, see
//                   plan_workspace in backward.cu);
//   3. dq           deterministic only: one CTA per (query tile, head, batch) recomputes
//                   S, P, dP over all keys and owns its rows of dQ^ (no atomics);
//   4. post-passes  dq (and dk when the head dim was split) through the l2norm
//                   backward into q's dtype; dbias from its float32 accumulator;
//                   dscale from the per-CTA partials and the per-row sums
//                   (Params::dscale_rows), in a fixed order.
#pragma once

#include <cstdint>

#include "../problem.h"
#include "varlen.cuh"

namespace fcsa {
namespace sm80_bwd {

// How dbias is produced (see plan_workspace in backward.cu).
enum DbiasMode : int32_t {
    kDbiasNone = 0,
    kDbiasDirect = 1,      // bias has the full (b, h, nq, nk) shape: dS is stored as is
    kDbiasAtomic = 2,      // broadcast dims, float atomics into the float32 accumulator
    kDbiasOwnedKeys = 3    // deterministic: the main kernel's CTAs own their key columns
                           // and loop over the batches / heads that meet in one dbias
                           // entry, adding in a fixed order
};
// (A bias broadcast over the keys has no gradient to compute: softmax does not see a
// shift common to a row's logits, so its dbias is exactly 0 and backward.cu writes it.)

// A (batch, head, row, column) tensor with a contiguous last dimension.
struct Rows {
    const void *data = nullptr;
    int64_t stride_b = 0, stride_h = 0, stride_row = 0;
    bool aligned16 = false; // data and strides allow 16-byte vector copies

    template <typename T>
    __host__ __device__ const T *row(int64_t b, int64_t h, int64_t r) const {
        return static_cast<const T *>(data) + b * stride_b + h * stride_h + r * stride_row;
    }
};

struct OutRows {
    void *data = nullptr;
    int64_t stride_b = 0, stride_h = 0, stride_row = 0;
    bool aligned16 = false; // as Rows::aligned16

    template <typename T> __host__ __device__ T *row(int64_t b, int64_t h, int64_t r) const {
        return static_cast<T *>(data) + b * stride_b + h * stride_h + r * stride_row;
    }
};

struct Params {
    // Sizes.
    int64_t b = 0, h = 0, hk = 0, nq = 0, nk = 0;
    // d: q's and k's head dim; d_v: v's (and dout's, dv's). The kernels' bucket covers
    // both, each zero-padded to it (backward.cu, head_dim_bucket).
    int32_t d = 0, d_v = 0, groups = 1;
    int32_t heads_per_kv = 1;
    bool causal = false;
    bool l2norm = true;
    bool deterministic = false;
    int64_t causal_offset = 0; // row i sees keys j <= i + causal_offset

    // The caller's inputs; with l2norm the kernels normalize q and k tiles in shared
    // memory, and the l2norm backward reads the raw rows again.
    Rows q, k, v, dout;
    const float *lse = nullptr;      // [b][h][nq]: the forward's lse, +inf for empty rows
    const float *delta = nullptr;    // [b][h][nq]
    // [b][h][nq]: 1 / max(||q_i||, eps), where the shared-scores kernel folds q's norm
    // into its scores instead of normalizing query tiles (bf16, l2norm, one group;
    // see plan_workspace); nullptr otherwise.
    const float *q_inv_norm = nullptr;
    const uint8_t *mask = nullptr;   // nullptr: every key visible
    int64_t mask_stride_b = 0, mask_stride_key = 1;

    float scale = 8.f;               // when scale_t is absent
    const float *scale_t = nullptr;  // per head (stride 1) or scalar (stride 0)
    int64_t scale_stride = 0;

    const void *bias = nullptr;
    bool bias_f32 = false;
    int64_t bias_stride[4] = {0, 0, 0, 0};

    // Outputs.
    OutRows dk, dv;
    float *dq_acc = nullptr;  // [b][h][nq][d] float32: dq^ (atomics, or the dq kernel)
    float *dk_acc = nullptr;  // [b][hk][nk][d] float32 when the head dim is split and l2norm
    float *dscale_partial = nullptr; // [b][h][key tiles of the main kernel], or nullptr
    // With dscale, [b][h][nq][2]: per query row, R_i = sum_j dS_ij and C_i = sum_j P_ij
    // cos_ij (added by the main kernel, or stored by the dq kernel when deterministic).
    // delta_i = <dO_i, O_i> misses the rounding of P in the forward's 16-bit P V, so a
    // row's dS does not sum to 0 as softmax's gradient does: dS - P R does, and dscale is
    // sum dS cos - sum_i R_i C_i.
    float *dscale_rows = nullptr;
    int32_t dbias_mode = kDbiasNone;
    void *dbias = nullptr;           // kDbiasDirect: the caller's dbias
    bool dbias_f32 = false;
    int64_t dbias_stride[4] = {0, 0, 0, 0};
    float *dbias_acc = nullptr;      // other modes: float32, dbias' shape, contiguous
    int64_t dbias_acc_stride[4] = {0, 0, 0, 0}; // 0 on every dimension of size 1
    bool dbias_sum_rows = false; // bias broadcast over nq > 1 rows: sum them

    // Work partition of the deterministic dbias mode: how many batches / kv heads one
    // CTA loops over (1 otherwise).
    int32_t main_batches_per_cta = 1, main_kv_heads_per_cta = 1;

    // Query rows per tile of the shared-scores kernel, which then runs instead of the
    // main kernel (64 or 128); 0: the main kernel.
    int32_t shared_scores_rows = 0;

    // Packed sequences (Problem::varlen): the main kernel's key tiles and the dq kernel's
    // query tiles, from these tables (varlen.cuh); tiles == nullptr otherwise. No mask,
    // bias or dbias then, and b == 1.
    sm80::VarlenTiles varlen_keys, varlen_queries;
};

// Tile shapes of one (dtype, head-dim bucket); the host sizes grids and workspaces from
// these, the kernels are built from them.
struct LaunchShape {
    int32_t main_keys = 0;   // keys per main CTA
    int32_t dq_queries = 0;  // query rows per dq CTA
    int32_t column_splits = 1; // the head dim is split over this many main CTAs
    int32_t main_smem = 0, dq_smem = 0; // dynamic shared memory, bytes
    // The shared-scores kernel's, with 64 and with 128 query rows per tile; 0 where it
    // has no such shape.
    int32_t shared_scores_smem = 0, shared_scores_128_smem = 0;
};

// kCompact: the shapes sized for GPUs with 99 KB of shared memory per block.
template <typename T, int kHeadDim, bool kCompact> LaunchShape launch_shape();
// Each returns a cudaError_t (as int) of its launch.
template <typename T, int kHeadDim, bool kCompact> int launch_main(const Params &p, void *stream);
template <typename T, int kHeadDim, bool kCompact> int launch_dq(const Params &p, void *stream);

} // namespace sm80_bwd
} // namespace fcsa
