// backward.cu: the portable CUDA backward (sm_80 and newer), host side and the small
// passes around the tile kernels (backward_launch.cuh).
//
// sm80_backward enqueues, on the caller's stream and with no allocation or
// synchronization (CUDA-graph capture works):
//   memsets   the float32 accumulators that start at zero (dQ^ with atomics, dbias);
//   prepass   delta = <dO, O> and lse (+inf for rows that see no key), and 1 / ||q||
//             per row where the shared-scores kernel folds it into its scores;
//   main      dK, dV (finished in its epilogue, l2norm backward included), dQ^ by
//             atomics, dbias, dscale partials. k is l2-normalized in shared memory
//             once per CTA, each query tile as it arrives (one iteration ahead of its
//             use) unless its norm is folded; no normalized copy of q or k is ever
//             written to memory;
//   dq        deterministic only: dQ^ without atomics;
//   finish    dq = l2norm backward of dQ^ (and dk where the head dim was split);
//             dbias from its float32 accumulator; dscale summed in a fixed order.
// The workspace holds every intermediate; plan_workspace computes its layout once for
// both the size query and the call. Checked by cuda/tests/check_backward.cu.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../backends.h"
#include "../common/copy.cuh"
#include "../common/numeric.cuh"
#include "../common/row_lanes.cuh"
#include "backward_device.cuh"
#include "backward_params.cuh"

namespace fcsa {
namespace sm80_bwd {
namespace {

using common::chunks_per_lane;
using common::for_lane_rows;
using common::load_chunk;
using common::row_lane_width;
using common::row_lanes;
using common::RowLanes;

constexpr int kPassThreads = 256;
constexpr int kMaxHeadDim = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_full_shape(const View &bias, const Problem &p) {
    const int64_t full[4] = {p.b, p.h, p.nq, p.nk};
    for (int i = 0; i < 4; ++i)
        if (bias.shape[i] != full[i]) return false;
    return true;
}

// A bias of one column: a shift common to each row's logits, which softmax does not see.
bool key_broadcast_bias(const Problem &p) { return p.bias.present() && p.bias.shape[3] == 1; }

// The head-dim bucket the kernels are instantiated for (0: none fits).
int head_dim_bucket(int32_t dtype, int64_t d) {
    if (d <= 0 || d % 8 != 0 || d > kMaxHeadDim) return 0;
    if (d <= 32) return 32;
    if (d <= 64) return 64;
    if (d <= 96 && dtype != FCSA_DTYPE_FLOAT32) return 96;
    if (d <= 128) return 128;
    return 256;
}

// The bucket of a problem: one that covers both q/k's d and v's d_v, the narrower
// zero-padded to it (the tile kernels take a single width; 0: d or d_v fits none).
int head_dim_bucket(const Problem &p) {
    if (head_dim_bucket(p.dtype, p.d) == 0 || head_dim_bucket(p.dtype, p.d_v) == 0) return 0;
    return head_dim_bucket(p.dtype, p.d > p.d_v ? p.d : p.d_v);
}

template <typename T, bool kCompact> LaunchShape shape_for(int bucket) {
    switch (bucket) {
    case 32: return launch_shape<T, 32, kCompact>();
    case 64: return launch_shape<T, 64, kCompact>();
    case 96:
        if constexpr (common::ElementTraits<T>::kIs16Bit) return launch_shape<T, 96, kCompact>();
        break;
    case 128: return launch_shape<T, 128, kCompact>();
    case 256: return launch_shape<T, 256, kCompact>();
    }
    return LaunchShape{};
}

LaunchShape shape_for(int32_t dtype, int bucket, bool compact) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT16: return compact ? shape_for<__half, true>(bucket) : shape_for<__half, false>(bucket);
    case FCSA_DTYPE_BFLOAT16:
        return compact ? shape_for<__nv_bfloat16, true>(bucket) : shape_for<__nv_bfloat16, false>(bucket);
    default: return compact ? shape_for<float, true>(bucket) : shape_for<float, false>(bucket);
    }
}

int smem_needed(const LaunchShape &shape) { return shape.main_smem > shape.dq_smem ? shape.main_smem : shape.dq_smem; }

// Where each intermediate lives in the workspace (byte offsets, 256-byte aligned).
struct Plan {
    int bucket = 0;
    bool compact = false; // the 99 KB shapes
    LaunchShape shape;
    int64_t main_key_tiles = 0;
    int32_t dbias_mode = kDbiasNone;
    int32_t shared_scores_rows = 0; // the shared-scores kernel's query tile (0: the main kernel)
    bool fold_q_norm = false;   // it folds q's norm into its scores (Params::q_inv_norm)
    size_t lse = 0, delta = 0, q_inv_norm = 0, dq_acc = 0, dk_acc = 0, dscale = 0, dscale_rows = 0, dbias_acc = 0;
    size_t varlen_keys = 0, varlen_queries = 0; // packed sequences: the tile tables (varlen.cuh)
    size_t dq_acc_bytes = 0, dbias_acc_bytes = 0;
    bool dk_acc_used = false; // split head dim with l2norm, or the Hopper kernel: dk is finished by a row pass
    bool hopper = false;      // the main kernel is the Hopper one (sm90/backward.cu)
    size_t k_inv_norm = 0;    // its 1 / ||k|| per key
    size_t hopper_key_tiles = 0; // packed sequences: its key-tile table
    size_t total = 0;
};

// smem_limit: the device's shared memory per block; the full shapes when they fit,
// else the compact ones (the caller checks that those fit). hopper: the Hopper main
// kernel runs (sm90_backward_supports said yes), with q's norm folded as the
// shared-scores kernel folds it, dK^ in float32 and 1 / ||k|| per key.
Plan plan_workspace(const Problem &p, int smem_limit, bool hopper) {
    Plan plan;
    plan.hopper = hopper;
    plan.bucket = head_dim_bucket(p);
    if (plan.bucket == 0) return plan;
    plan.shape = shape_for(p.dtype, plan.bucket, false);
    if (smem_needed(plan.shape) > smem_limit) {
        plan.compact = true;
        plan.shape = shape_for(p.dtype, plan.bucket, true);
    }
    // Packed sequences: the main kernel's CTAs (and dscale's partials) are the entries of
    // the key-tile table, up to its bound.
    plan.main_key_tiles = p.varlen() ? sm80::varlen_max_tiles(p, plan.shape.main_keys, true)
                                     : ceil_div(p.nk, plan.shape.main_keys);
    // The shared-scores kernel where it fits: 128 query rows per tile where that shape
    // exists and fits (d = 64 on H100-class GPUs), else 64.
    if (!p.bias.present() && !p.dbias.present() && !p.dscale.present()) {
        auto fits = [&](int smem) { return smem > 0 && smem <= smem_limit; };
        plan.shared_scores_rows =
            fits(plan.shape.shared_scores_128_smem) ? 128 : fits(plan.shape.shared_scores_smem) ? 64 : 0;
    }
    // With one norm per row, S = (q . k^) / ||q|| and dK^ = sum (scale dS / ||q||) q: the
    // shared-scores kernel takes the raw q tiles and 1 / ||q|| per row (from the prepass),
    // so no query tile is normalized in shared memory. bf16 only: in f16, dS / ||q||
    // leaves its range (subnormal for ordinary norms of ~100, infinite for tiny ones).
    plan.fold_q_norm =
        hopper || (plan.shared_scores_rows > 0 && p.l2norm && p.groups == 1 && p.dtype == FCSA_DTYPE_BFLOAT16);
    // (A bias broadcast over the keys gets dbias = 0, written by backward(): kDbiasNone.)
    if (p.dbias.present() && !key_broadcast_bias(p)) {
        if (is_full_shape(p.bias, p))
            plan.dbias_mode = kDbiasDirect;
        else if (!p.deterministic)
            plan.dbias_mode = kDbiasAtomic;
        else
            plan.dbias_mode = kDbiasOwnedKeys;
    }
    size_t offset = 0;
    auto take = [&offset](size_t bytes) {
        const size_t at = offset;
        offset += (bytes + 255) / 256 * 256;
        return at;
    };
    const size_t query_rows = size_t(p.b * p.h * p.nq), key_rows = size_t(p.b * p.hk * p.nk);
    plan.lse = take(query_rows * 4);
    plan.delta = take(query_rows * 4);
    if (plan.fold_q_norm) plan.q_inv_norm = take(query_rows * 4);
    plan.dq_acc_bytes = query_rows * size_t(p.d) * 4;
    plan.dq_acc = take(plan.dq_acc_bytes);
    plan.dk_acc_used = hopper || (p.l2norm && plan.shape.column_splits > 1);
    if (plan.dk_acc_used) plan.dk_acc = take(key_rows * size_t(p.d) * 4);
    if (hopper) plan.k_inv_norm = take(size_t(sm90_backward_key_norm_floats(p)) * 4);
    if (p.dscale.present()) {
        plan.dscale = take(size_t(p.b * p.h * plan.main_key_tiles) * 4);
        plan.dscale_rows = take(query_rows * 8);
    }
    if (plan.dbias_mode != kDbiasNone && plan.dbias_mode != kDbiasDirect) {
        const View &db = p.dbias;
        plan.dbias_acc_bytes = size_t(db.shape[0] * db.shape[1] * db.shape[2] * db.shape[3]) * 4;
        plan.dbias_acc = take(plan.dbias_acc_bytes);
    }
    if (p.varlen()) {
        // (the Hopper main kernel reads a table of its own tiles in place of the portable one's)
        if (hopper) plan.hopper_key_tiles = take(sm80::varlen_tiles_bytes(p, sm90_backward_key_tile(), true));
        else plan.varlen_keys = take(sm80::varlen_tiles_bytes(p, plan.shape.main_keys, true));
        if (p.deterministic) plan.varlen_queries = take(sm80::varlen_tiles_bytes(p, plan.shape.dq_queries, false));
    }
    plan.total = offset;
    return plan;
}

Rows rows_of(const View &v, size_t elem) {
    Rows r;
    r.data = v.data;
    r.stride_b = v.stride[0];
    r.stride_h = v.stride[1];
    r.stride_row = v.stride[2];
    r.aligned16 = v.rows_16byte_aligned(int64_t(elem));
    return r;
}

OutRows out_rows_of(const View &v, size_t elem) {
    OutRows r;
    r.data = v.data;
    r.stride_b = v.stride[0];
    r.stride_h = v.stride[1];
    r.stride_row = v.stride[2];
    r.aligned16 = v.rows_16byte_aligned(int64_t(elem));
    return r;
}

// ---------------------------------------------------------------- passes

struct PrepassArgs {
    int64_t b, h, nq;
    int32_t d, d_v; // q's head dim (its norm), out's and dout's (delta)
    Rows out, dout, q;
    bool out_f32; // out in float32 for 16-bit inputs (the forward's unrounded O)
    const float *lse;
    int64_t lse_stride[3];
    float *lse_out, *delta;
    float *q_inv_norm; // or nullptr
};

// One warp per query row: delta = <dO, O> and lse, contiguous; 1 / max(||q||, eps) where
// the shared-scores kernel folds it into its scores.
template <typename T> __global__ void __launch_bounds__(kPassThreads) prepass_kernel(const PrepassArgs a) {
    const int lane = threadIdx.x & 31;
    const int64_t query_rows = a.b * a.h * a.nq;
    const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
    for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < query_rows; row += warps) {
        const int64_t i = row % a.nq, head = (row / a.nq) % a.h, batch = row / (a.nq * a.h);
        const T *dout = a.dout.row<T>(batch, head, i);
        float dot = 0.f;
        if (a.out_f32) {
            const float *o = a.out.row<float>(batch, head, i);
            for (int c = lane; c < a.d_v; c += 32) dot = fmaf(o[c], common::to_float(dout[c]), dot);
        } else {
            const T *o = a.out.row<T>(batch, head, i);
            for (int c = lane; c < a.d_v; c += 32) dot = fmaf(common::to_float(o[c]), common::to_float(dout[c]), dot);
        }
        dot = warp_sum(dot);
        float inv_norm = 0.f;
        if (a.q_inv_norm != nullptr) {
            const T *q = a.q.row<T>(batch, head, i);
            float sum_sq = 0.f;
            for (int c = lane; c < a.d; c += 32) sum_sq = fmaf(common::to_float(q[c]), common::to_float(q[c]), sum_sq);
            inv_norm = common::safe_inverse_norm<T, float>(warp_sum(sum_sq), q, 0, 0, a.d);
        }
        if (lane == 0) {
            const float lse = a.lse[batch * a.lse_stride[0] + head * a.lse_stride[1] + i * a.lse_stride[2]];
            // A row that sees no key has lse = -inf and P = exp(s - lse) must be 0.
            a.lse_out[row] = lse == -INFINITY ? INFINITY : lse;
            a.delta[row] = dot;
            if (a.q_inv_norm != nullptr) a.q_inv_norm[row] = inv_norm;
        }
    }
}

// ---- the same passes with 16-byte loads and stores (aligned rows, one l2norm group)
//
// The warp-per-row kernels above read 2 bytes per lane and reduce one row at a time:
// at b h n d = 33.5M (the benchmark shapes) they ran at 1.1-1.6 TB/s, 130 us for the
// prepass and 250 us for the finishing pass on the H100, a third of the backward at
// n = 512. Here a row is spread over a group of lanes with 16-byte chunks (RowLanes,
// common/row_lanes.cuh).
template <typename T> __global__ void __launch_bounds__(kPassThreads) prepass_vector_kernel(const PrepassArgs a) {
    constexpr int E = common::Chunk<T>::N;
    // Lanes sized for the wider of q's and out's rows; each array reads its own chunks.
    const RowLanes lanes = row_lanes<T>(a.d > a.d_v ? a.d : a.d_v);
    const int chunks_out = a.d_v / E, chunks_q = a.d / E;
    for_lane_rows(lanes, a.h, a.nq, a.b * a.h * a.nq, [&](int64_t row, bool here, int64_t batch, int64_t head,
                                                          int64_t i) {
        const T *o = a.out.row<T>(batch, head, i), *dout = a.dout.row<T>(batch, head, i);
        float dot = 0.f, sum_sq = 0.f;
#pragma unroll
        for (int m = 0; m < chunks_per_lane<T>(); ++m) {
            const int c = lanes.sub + lanes.width * m;
            if (here && c < chunks_out) {
                float fo[E], fd[E];
                load_chunk(o, c, fo);
                load_chunk(dout, c, fd);
#pragma unroll
                for (int e = 0; e < E; ++e) dot = fmaf(fo[e], fd[e], dot);
            }
            if (here && c < chunks_q && a.q_inv_norm != nullptr) {
                float fq[E];
                load_chunk(a.q.row<T>(batch, head, i), c, fq);
#pragma unroll
                for (int e = 0; e < E; ++e) sum_sq = fmaf(fq[e], fq[e], sum_sq);
            }
        }
        dot = lanes_sum(dot, lanes.width);
        float inv_norm = 0.f;
        if (a.q_inv_norm != nullptr)
            inv_norm = common::safe_inverse_norm<T, float>(lanes_sum(sum_sq, lanes.width), a.q.row<T>(batch, head, i),
                                                           0, 0, here ? a.d : 0);
        if (here && lanes.sub == 0) {
            const float lse = a.lse[batch * a.lse_stride[0] + head * a.lse_stride[1] + i * a.lse_stride[2]];
            a.lse_out[row] = lse == -INFINITY ? INFINITY : lse; // as prepass_kernel
            a.delta[row] = dot;
            if (a.q_inv_norm != nullptr) a.q_inv_norm[row] = inv_norm;
        }
    });
}

struct FinishRowsArgs {
    int64_t b, heads, rows;
    int32_t d, groups;
    bool l2norm;
    Rows x;             // the caller's q or k
    const float *dx_hat; // contiguous [b][heads][rows][d]
    bool dx_hat_scaled;  // dx_hat holds dx^ / max(||x||, eps) (Plan::fold_q_norm)
    OutRows out;
};

// dq (or dk) = l2norm backward of the float32 accumulator, one warp per row.
template <typename T> __global__ void __launch_bounds__(kPassThreads) finish_rows_kernel(const FinishRowsArgs a) {
    const int lane = threadIdx.x & 31;
    const int64_t total = a.b * a.heads * a.rows;
    const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
    for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < total; row += warps) {
        const int64_t i = row % a.rows, head = (row / a.rows) % a.heads, batch = row / (a.rows * a.heads);
        l2norm_backward_row<T, kMaxHeadDim>(a.x.row<T>(batch, head, i), a.dx_hat + row * a.d,
                                            a.out.row<T>(batch, head, i), a.d, a.groups, a.l2norm,
                                            a.dx_hat_scaled, lane);
    }
}

// finish_rows_kernel for one l2norm group and 16-byte aligned rows of x and out (dx_hat
// is contiguous float rows, d a multiple of 8: aligned too). The same arithmetic as
// l2norm_backward_row, with <x^, dx^> formed as <x, dx^> / ||x||.
template <typename T>
__global__ void __launch_bounds__(kPassThreads) finish_rows_vector_kernel(const FinishRowsArgs a) {
    constexpr int E = common::Chunk<T>::N, kPer = chunks_per_lane<T>();
    const RowLanes lanes = row_lanes<T>(a.d);
    for_lane_rows(lanes, a.heads, a.rows, a.b * a.heads * a.rows, [&](int64_t row, bool here, int64_t batch,
                                                                      int64_t head, int64_t i) {
        const T *x_row = a.x.row<T>(batch, head, i);
        const float *dx_hat = a.dx_hat + row * a.d;
        float x[kPer][E], dy[kPer][E];
#pragma unroll
        for (int m = 0; m < kPer; ++m) {
            const int c = lanes.sub + lanes.width * m;
            if (here && c < lanes.chunks) {
                load_chunk(x_row, c, x[m]);
                load_floats(dx_hat + c * E, dy[m]);
            } else {
#pragma unroll
                for (int e = 0; e < E; ++e) x[m][e] = dy[m][e] = 0.f;
            }
        }
        if (a.l2norm)
            l2norm_backward_lanes<T, kPer, E>(x, dy, lanes.width, a.dx_hat_scaled, x_row, here ? a.d : 0);
        T *out = a.out.row<T>(batch, head, i);
#pragma unroll
        for (int m = 0; m < kPer; ++m) {
            const int c = lanes.sub + lanes.width * m;
            if (here && c < lanes.chunks) *reinterpret_cast<uint4 *>(out + c * E) = common::float_to_chunk<T>(dy[m]);
        }
    });
}

struct Strided4 {
    void *data;
    int64_t shape[4], stride[4];
};

// dbias (its own shape and strides, in T or float) from the contiguous float32 sums.
template <typename T>
__global__ void __launch_bounds__(kPassThreads) dbias_convert_kernel(const float *acc, Strided4 dbias, bool f32) {
    const int64_t total = dbias.shape[0] * dbias.shape[1] * dbias.shape[2] * dbias.shape[3];
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
        int64_t rest = e, index = 0;
        for (int dim = 3; dim >= 0; --dim) {
            index += (rest % dbias.shape[dim]) * dbias.stride[dim];
            rest /= dbias.shape[dim];
        }
        store_from_float<T>(dbias.data, index, acc[e], f32);
    }
}

// Zeros in every element of a strided 4-D tensor (elem_size 2 or 4 bytes).
__global__ void __launch_bounds__(kPassThreads) zero_kernel(Strided4 x, int elem_size) {
    const int64_t total = x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3];
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
        int64_t rest = e, index = 0;
        for (int dim = 3; dim >= 0; --dim) {
            index += (rest % x.shape[dim]) * x.stride[dim];
            rest /= x.shape[dim];
        }
        if (elem_size == 4)
            static_cast<float *>(x.data)[index] = 0.f;
        else
            static_cast<uint16_t *>(x.data)[index] = 0;
    }
}

// dscale[hs] = sum over batches, (heads,) key tiles of the main kernel's partials, in a
// fixed order: one block per output, a fixed split over threads and a fixed tree.
__global__ void __launch_bounds__(kPassThreads)
    dscale_reduce_kernel(const float *partial, const float *rows, int64_t b, int64_t h, int64_t nq, int64_t key_tiles,
                         bool per_head, float *dscale, int64_t dscale_stride) {
    __shared__ float sums[kPassThreads];
    const int64_t out = blockIdx.x;
    const int64_t heads = per_head ? 1 : h;
    const int64_t terms = b * heads * key_tiles;
    float sum = 0.f;
    for (int64_t e = threadIdx.x; e < terms; e += blockDim.x) {
        const int64_t tile = e % key_tiles, head = per_head ? out : (e / key_tiles) % h;
        const int64_t batch = e / (key_tiles * heads);
        sum += partial[(batch * h + head) * key_tiles + tile];
    }
    // minus sum_i R_i C_i (Params::dscale_rows): the part of the rows' dS that delta's
    // rounding left, times the rows' mean cosine under P.
    const int64_t row_terms = b * heads * nq;
    for (int64_t e = threadIdx.x; e < row_terms; e += blockDim.x) {
        const int64_t i = e % nq, head = per_head ? out : (e / nq) % h, batch = e / (nq * heads);
        const float2 rc = reinterpret_cast<const float2 *>(rows)[(batch * h + head) * nq + i];
        sum = fmaf(-rc.x, rc.y, sum);
    }
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (int width = kPassThreads / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) dscale[out * dscale_stride] = sums[0];
}

unsigned pass_blocks(int64_t work_items, int64_t items_per_block) {
    const int64_t blocks = ceil_div(work_items, items_per_block);
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

Strided4 strided4(const View &v) {
    Strided4 s;
    s.data = v.data;
    for (int i = 0; i < 4; ++i) {
        s.shape[i] = v.shape[i];
        s.stride[i] = v.stride[i];
    }
    return s;
}

fcsa_status check_launch(cudaError_t err, const char *what) {
    if (err == cudaSuccess) return FCSA_STATUS_SUCCESS;
    return set_error(FCSA_STATUS_CUDA_ERROR, "sm80 backward: %s failed: %s", what, cudaGetErrorString(err));
}

fcsa_status zero_fill(const View &v, cudaStream_t stream) {
    if (!v.present()) return FCSA_STATUS_SUCCESS;
    const Strided4 s = strided4(v);
    const int64_t total = s.shape[0] * s.shape[1] * s.shape[2] * s.shape[3];
    if (total == 0) return FCSA_STATUS_SUCCESS;
    const int elem = v.dtype == FCSA_DTYPE_FLOAT32 ? 4 : 2;
    zero_kernel<<<pass_blocks(total, kPassThreads * 4), kPassThreads, 0, stream>>>(s, elem);
    return check_launch(cudaGetLastError(), "zero fill");
}

// Rows per block of the 16-byte passes (row_lanes).
int64_t vector_rows_per_block(int64_t d, size_t elem) { return kPassThreads / row_lane_width(int(d * elem / 16)); }

// dq (or dk) from its float32 accumulator through the l2norm backward; `vector`: the
// 16-byte kernel applies.
template <typename T> fcsa_status finish_rows(const FinishRowsArgs &a, bool vector, cudaStream_t stream) {
    const int64_t rows = a.b * a.heads * a.rows;
    if (vector)
        finish_rows_vector_kernel<T>
            <<<pass_blocks(rows, vector_rows_per_block(a.d, sizeof(T))), kPassThreads, 0, stream>>>(a);
    else
        finish_rows_kernel<T><<<pass_blocks(rows, kPassThreads / 32), kPassThreads, 0, stream>>>(a);
    return check_launch(cudaGetLastError(), "finishing kernel");
}

// The main (dq = false) or dq kernel of one (T, bucket, size class).
template <typename T, bool kCompact> int run_kernel(bool dq, int bucket, const Params &p, void *stream) {
    switch (bucket) {
    case 32: return dq ? launch_dq<T, 32, kCompact>(p, stream) : launch_main<T, 32, kCompact>(p, stream);
    case 64: return dq ? launch_dq<T, 64, kCompact>(p, stream) : launch_main<T, 64, kCompact>(p, stream);
    case 96:
        if constexpr (common::ElementTraits<T>::kIs16Bit)
            return dq ? launch_dq<T, 96, kCompact>(p, stream) : launch_main<T, 96, kCompact>(p, stream);
        break;
    case 128: return dq ? launch_dq<T, 128, kCompact>(p, stream) : launch_main<T, 128, kCompact>(p, stream);
    case 256: return dq ? launch_dq<T, 256, kCompact>(p, stream) : launch_main<T, 256, kCompact>(p, stream);
    }
    return cudaErrorInvalidValue;
}

template <typename T> int run_kernel(bool dq, const Plan &plan, const Params &p, void *stream) {
    return plan.compact ? run_kernel<T, true>(dq, plan.bucket, p, stream)
                        : run_kernel<T, false>(dq, plan.bucket, p, stream);
}

template <typename T> fcsa_status backward(const Problem &pr, const Plan &plan, char *ws, cudaStream_t stream) {
    const size_t elem = sizeof(T);
    // ---- the accumulators that start at zero
    if (!pr.deterministic) {
        if (cudaError_t e = cudaMemsetAsync(ws + plan.dq_acc, 0, plan.dq_acc_bytes, stream))
            return check_launch(e, "memset of the dq accumulator");
    }
    if (pr.dscale.present()) {
        if (cudaError_t e = cudaMemsetAsync(ws + plan.dscale_rows, 0, size_t(pr.b * pr.h * pr.nq) * 8, stream))
            return check_launch(e, "memset of the dscale row sums");
    }
    if (pr.dbias.present() && plan.dbias_mode == kDbiasNone) {
        if (fcsa_status s = zero_fill(pr.dbias, stream)) return s;
    }
    if (plan.dbias_acc_bytes > 0) {
        if (cudaError_t e = cudaMemsetAsync(ws + plan.dbias_acc, 0, plan.dbias_acc_bytes, stream))
            return check_launch(e, "memset of the dbias accumulator");
    }

    // ---- prepass
    PrepassArgs pre{};
    pre.b = pr.b;
    pre.h = pr.h;
    pre.nq = pr.nq;
    pre.d = int32_t(pr.d);
    pre.d_v = int32_t(pr.d_v);
    pre.out_f32 = pr.out.dtype == FCSA_DTYPE_FLOAT32 && pr.dtype != FCSA_DTYPE_FLOAT32;
    pre.out = rows_of(pr.out, pre.out_f32 ? 4 : elem);
    pre.dout = rows_of(pr.dout, elem);
    pre.q = rows_of(pr.q, elem);
    pre.lse = static_cast<const float *>(pr.lse.data);
    for (int i = 0; i < 3; ++i) pre.lse_stride[i] = pr.lse.stride[i];
    pre.lse_out = reinterpret_cast<float *>(ws + plan.lse);
    pre.delta = reinterpret_cast<float *>(ws + plan.delta);
    pre.q_inv_norm = plan.fold_q_norm ? reinterpret_cast<float *>(ws + plan.q_inv_norm) : nullptr;
    const int64_t query_rows = pr.b * pr.h * pr.nq;
    // (A float32 out takes the warp-per-row kernel: the 16-byte one reads out in T.)
    if (!pre.out_f32 && pre.out.aligned16 && pre.dout.aligned16 && (pre.q_inv_norm == nullptr || pre.q.aligned16))
        prepass_vector_kernel<T><<<pass_blocks(query_rows, vector_rows_per_block(pr.d > pr.d_v ? pr.d : pr.d_v, elem)),
                                   kPassThreads, 0, stream>>>(pre);
    else
        prepass_kernel<T><<<pass_blocks(query_rows, kPassThreads / 32), kPassThreads, 0, stream>>>(pre);
    if (fcsa_status s = check_launch(cudaGetLastError(), "prepass kernel")) return s;

    // ---- main and dq kernels
    Params p;
    p.b = pr.b;
    p.h = pr.h;
    p.hk = pr.hk;
    p.nq = pr.nq;
    p.nk = pr.nk;
    p.d = int32_t(pr.d);
    p.d_v = int32_t(pr.d_v);
    p.groups = pr.groups;
    p.heads_per_kv = int32_t(pr.h / pr.hk);
    p.causal = pr.causal;
    p.l2norm = pr.l2norm;
    p.deterministic = pr.deterministic;
    p.causal_offset = pr.causal_offset();
    p.shared_scores_rows = plan.shared_scores_rows;
    p.q = rows_of(pr.q, elem);
    p.k = rows_of(pr.k, elem);
    p.v = rows_of(pr.v, elem);
    p.dout = rows_of(pr.dout, elem);
    p.lse = pre.lse_out;
    p.delta = pre.delta;
    p.q_inv_norm = pre.q_inv_norm;
    if (pr.mask.present()) {
        p.mask = static_cast<const uint8_t *>(pr.mask.data);
        p.mask_stride_b = pr.mask.stride[0];
        p.mask_stride_key = pr.mask.stride[3];
    }
    p.scale = pr.scale;
    if (pr.scale_t.present()) {
        p.scale_t = static_cast<const float *>(pr.scale_t.data);
        p.scale_stride = pr.scale_t.stride[1];
    }
    if (pr.bias.present()) {
        p.bias = pr.bias.data;
        p.bias_f32 = pr.bias.dtype == FCSA_DTYPE_FLOAT32;
        for (int i = 0; i < 4; ++i) p.bias_stride[i] = pr.bias.stride[i];
    }
    p.dk = out_rows_of(pr.dk, elem);
    p.dv = out_rows_of(pr.dv, elem);
    p.dq_acc = reinterpret_cast<float *>(ws + plan.dq_acc);
    p.dk_acc = plan.dk_acc_used ? reinterpret_cast<float *>(ws + plan.dk_acc) : nullptr;
    p.dscale_partial = pr.dscale.present() ? reinterpret_cast<float *>(ws + plan.dscale) : nullptr;
    p.dscale_rows = pr.dscale.present() ? reinterpret_cast<float *>(ws + plan.dscale_rows) : nullptr;
    p.dbias_mode = plan.dbias_mode;
    if (plan.dbias_mode != kDbiasNone) {
        const View &db = pr.dbias;
        p.dbias = db.data;
        p.dbias_f32 = db.dtype == FCSA_DTYPE_FLOAT32;
        for (int i = 0; i < 4; ++i) p.dbias_stride[i] = db.stride[i];
        p.dbias_sum_rows = db.shape[2] == 1 && pr.nq > 1;
        if (plan.dbias_mode != kDbiasDirect) {
            p.dbias_acc = reinterpret_cast<float *>(ws + plan.dbias_acc);
            // Contiguous over dbias' own shape, 0 on its dimensions of size 1.
            int64_t stride = 1;
            for (int i = 3; i >= 0; --i) {
                p.dbias_acc_stride[i] = db.shape[i] == 1 ? 0 : stride;
                stride *= db.shape[i];
            }
        }
        const bool batch_broadcast = db.shape[0] == 1 && pr.b > 1;
        const bool head_broadcast = db.shape[1] == 1 && pr.h > 1;
        if (plan.dbias_mode == kDbiasOwnedKeys) {
            p.main_batches_per_cta = batch_broadcast ? int32_t(pr.b) : 1;
            p.main_kv_heads_per_cta = head_broadcast ? int32_t(pr.hk) : 1;
        }
    }

    if (pr.varlen()) {
        // The tile tables; dscale's partials of spare CTAs (past the table's entries) stay 0.
        if (!plan.hopper)
            if (fcsa_status s = sm80::build_varlen_tiles(pr, plan.shape.main_keys, true, ws + plan.varlen_keys,
                                                         stream, &p.varlen_keys))
                return s;
        if (pr.deterministic)
            if (fcsa_status s = sm80::build_varlen_tiles(pr, plan.shape.dq_queries, false, ws + plan.varlen_queries,
                                                         stream, &p.varlen_queries))
                return s;
        if (p.dscale_partial != nullptr)
            if (cudaError_t e = cudaMemsetAsync(p.dscale_partial, 0, size_t(pr.h * plan.main_key_tiles) * 4, stream))
                return check_launch(e, "memset of the dscale partials");
        if (plan.main_key_tiles * plan.shape.column_splits > INT32_MAX)
            return set_error(FCSA_STATUS_NOT_SUPPORTED, "cuda-sm80 backward: too many packed key tiles for the grid");
    }
    if (plan.hopper) {
        Sm90BackwardBuffers buffers;
        buffers.lse = p.lse;
        buffers.delta = p.delta;
        buffers.q_inv_norm = p.q_inv_norm;
        buffers.k_inv_norm = reinterpret_cast<float *>(ws + plan.k_inv_norm);
        buffers.dq_acc = p.dq_acc;
        buffers.dk_acc = p.dk_acc;
        buffers.key_tiles = pr.varlen() ? ws + plan.hopper_key_tiles : nullptr;
        if (fcsa_status s = sm90_backward_main(pr, buffers, stream)) return s;
    } else if (fcsa_status s = check_launch(cudaError_t(run_kernel<T>(false, plan, p, stream)), "main kernel")) {
        return s;
    }
    if (pr.deterministic) {
        if (fcsa_status s = check_launch(cudaError_t(run_kernel<T>(true, plan, p, stream)), "dq kernel")) return s;
    }

    // ---- finishing passes
    FinishRowsArgs fq{};
    fq.b = pr.b;
    fq.heads = pr.h;
    fq.rows = pr.nq;
    fq.d = int32_t(pr.d);
    fq.groups = pr.groups;
    fq.l2norm = pr.l2norm;
    fq.x = p.q;
    fq.dx_hat = p.dq_acc;
    fq.dx_hat_scaled = plan.fold_q_norm && !pr.deterministic; // the dq kernel writes dq^ itself
    fq.out = out_rows_of(pr.dq, elem);
    const bool vector_finish = pr.groups == 1 || !pr.l2norm;
    if (fcsa_status s = finish_rows<T>(fq, vector_finish && p.q.aligned16 && fq.out.aligned16, stream))
        return s;
    if (p.dk_acc != nullptr) {
        FinishRowsArgs fk = fq;
        fk.heads = pr.hk;
        fk.rows = pr.nk;
        fk.x = p.k;
        fk.dx_hat = p.dk_acc;
        fk.dx_hat_scaled = false;
        fk.out = out_rows_of(pr.dk, elem);
        if (fcsa_status s = finish_rows<T>(fk, vector_finish && p.k.aligned16 && fk.out.aligned16, stream))
            return s;
    }
    if (p.dbias_acc != nullptr) {
        const Strided4 db = strided4(pr.dbias);
        const int64_t total = db.shape[0] * db.shape[1] * db.shape[2] * db.shape[3];
        dbias_convert_kernel<T><<<pass_blocks(total, kPassThreads * 4), kPassThreads, 0, stream>>>(p.dbias_acc, db,
                                                                                                  p.dbias_f32);
        if (fcsa_status s = check_launch(cudaGetLastError(), "dbias finishing kernel")) return s;
    }
    if (p.dscale_partial != nullptr) {
        const bool per_head = pr.dscale.shape[1] == pr.h;
        dscale_reduce_kernel<<<unsigned(per_head ? pr.h : 1), kPassThreads, 0, stream>>>(
            p.dscale_partial, p.dscale_rows, pr.b, pr.h, pr.nq, plan.main_key_tiles, per_head,
            static_cast<float *>(pr.dscale.data), pr.dscale.stride[1]);
        if (fcsa_status s = check_launch(cudaGetLastError(), "dscale reduction")) return s;
    }
    return FCSA_STATUS_SUCCESS;
}

} // namespace
} // namespace sm80_bwd

size_t sm80_backward_workspace(const Problem &p, bool hopper) {
    if (p.b == 0 || p.h == 0 || p.nq == 0 || p.nk == 0) return 0;
    return sm80_bwd::plan_workspace(p, sm80_shared_memory_limit(p.device_index), hopper).total;
}

fcsa_status sm80_backward(const Problem &p, void *workspace, void *stream_ptr, bool hopper) {
    using namespace sm80_bwd;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    if (p.dtype != FCSA_DTYPE_FLOAT32 && p.dtype != FCSA_DTYPE_FLOAT16 && p.dtype != FCSA_DTYPE_BFLOAT16)
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "sm80 backward: unsupported dtype %d", int(p.dtype));
    if (head_dim_bucket(p) == 0)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "sm80 backward: head dims d = %lld, d_v = %lld are not both multiples of 8 in [8, %d]",
                         (long long)p.d, (long long)p.d_v, kMaxHeadDim);

    // Nothing to attend to (or nobody attending): every gradient is zero.
    if (p.b == 0 || p.h == 0 || p.nq == 0 || p.nk == 0) {
        for (const View *v : {&p.dq, &p.dk, &p.dv, &p.dbias, &p.dscale})
            if (fcsa_status s = zero_fill(*v, stream)) return s;
        return FCSA_STATUS_SUCCESS;
    }

    const int smem_limit = sm80_shared_memory_limit(p.device_index);
    if (smem_limit < 0) return check_launch(cudaErrorInvalidDevice, "querying the shared memory per block");
    const Plan plan = plan_workspace(p, smem_limit, hopper);
    if (smem_needed(plan.shape) > smem_limit)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "sm80 backward: head dims d = %lld, d_v = %lld need %d bytes of shared memory per block, "
                         "CUDA device %d allows %d",
                         (long long)p.d, (long long)p.d_v, smem_needed(plan.shape), int(p.device_index), smem_limit);

    char *ws = static_cast<char *>(workspace);
    switch (p.dtype) {
    case FCSA_DTYPE_FLOAT16: return backward<__half>(p, plan, ws, stream);
    case FCSA_DTYPE_BFLOAT16: return backward<__nv_bfloat16>(p, plan, ws, stream);
    default: return backward<float>(p, plan, ws, stream);
    }
}

} // namespace fcsa
