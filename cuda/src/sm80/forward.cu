// forward.cu: the portable CUDA forward's host side. Turns a validated Problem into
// ForwardParams and launches the kernel instantiated for its dtype and head-dim buckets
// (forward_<dtype>_d<D>[_v<DV>].cu, forward_buckets), after the key-norm pass where that
// applies. No allocation,
// no synchronization: safe in graph capture.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../backends.h"
#include "../common/key_norm.cuh"
#include "forward.cuh"

namespace fcsa {
namespace sm80 {
namespace {

// ---- the key-norm pass (common/key_norm.cuh)
//
// On the H100, computing the key norms in the kernel per key tile cost 9% at d = 128
// and 5% at d = 64 (n = 16k, notes v7). The pass pays from 16 query tiles of 128 rows
// per key: nq >= 2048, twice that with causal (half the tiles see a given key). Below,
// it measured -6% to +1%.
constexpr int64_t kKeyNormPassMinQueries = 2048;

// Floats per (batch, kv head) row of the result: nk padded to a multiple of 64 (the
// widest key tile), so that the kernel copies whole tiles' worth.
int64_t key_norm_stride(const Problem &p) { return (p.nk + 63) / 64 * 64; }

ForwardParams make_params(const Problem &p, int block_m) {
    const int element_bytes = p.dtype == FCSA_DTYPE_FLOAT32 ? 4 : 2;
    ForwardParams f{};
    f.q = p.q.data;
    f.k = p.k.data;
    f.v = p.v.data;
    f.out = p.out.data;
    f.lse = static_cast<float *>(p.lse.data);
    f.mask = static_cast<const uint8_t *>(p.mask.data);
    f.bias = p.bias.data;
    f.scale_t = static_cast<const float *>(p.scale_t.data);
    for (int i = 0; i < 3; ++i) {
        f.q_stride[i] = p.q.stride[i];
        f.k_stride[i] = p.k.stride[i];
        f.v_stride[i] = p.v.stride[i];
        f.out_stride[i] = p.out.stride[i];
        f.lse_stride[i] = p.lse.stride[i];
    }
    f.mask_stride[0] = p.mask.stride[0];
    f.mask_stride[1] = p.mask.stride[3];
    for (int i = 0; i < 4; ++i) f.bias_stride[i] = p.bias.stride[i];
    f.scale_stride = p.scale_t.stride[1];
    f.batch = int(p.b);
    f.heads = int(p.h);
    f.heads_per_kv = int(p.heads_per_kv());
    f.nq = int(p.nq);
    f.nk = int(p.nk);
    f.d = int(p.d);
    f.d_v = int(p.d_v);
    f.groups = p.groups;
    f.num_m_tiles = int((p.nq + block_m - 1) / block_m);
    f.scale = p.scale;
    f.causal = p.causal;
    f.l2norm = p.l2norm;
    f.logits_bounded = p.logits_bounded();
    f.bias_is_f32 = p.bias.present() && p.bias.dtype == FCSA_DTYPE_FLOAT32;
    f.out_f32 = p.out.dtype == FCSA_DTYPE_FLOAT32 && p.dtype != FCSA_DTYPE_FLOAT32;
    f.vec_q = p.q.rows_16byte_aligned(element_bytes);
    f.vec_k = p.k.rows_16byte_aligned(element_bytes);
    f.vec_v = p.v.rows_16byte_aligned(element_bytes);
    f.vec_out = p.out.rows_16byte_aligned(element_bytes);
    return f;
}

// The key norms' bytes, a multiple of 256 (64 floats per row): what follows stays aligned.
size_t key_norm_bytes(const Problem &p) { return size_t(p.b * p.hk * key_norm_stride(p)) * sizeof(float); }

// Whether this call runs the key-norm pass (the workspace query asks the same).
bool key_norm_pass(const Problem &p) {
    const int element_bytes = p.dtype == FCSA_DTYPE_FLOAT32 ? 4 : 2;
    // (At most as many blocks as rows of 64 keys, the widest rows' count: the grid fits.)
    const int64_t blocks = p.b * p.hk * (key_norm_stride(p) / 64);
    const int64_t min_queries = p.causal ? 2 * kKeyNormPassMinQueries : kKeyNormPassMinQueries;
    // Packed sequences: by their mean query length (a key is read by its own sequence's
    // query tiles only).
    const int64_t queries = p.varlen() ? p.nq / (p.sequences > 0 ? p.sequences : 1) : p.nq;
    return p.l2norm && p.groups == 1 && p.nk > 0 && queries >= min_queries && blocks <= INT32_MAX &&
           p.k.rows_16byte_aligned(element_bytes);
}

template <typename T, int D, int DV> fcsa_status run(const Problem &p, void *workspace, cudaStream_t stream) {
    ForwardParams params = make_params(p, ForwardConfig<T, D, DV>::kBlockM);
    char *tables = static_cast<char *>(workspace); // packed sequences: after the key norms
    if (key_norm_pass(p)) {
        float *inv_norm = static_cast<float *>(workspace);
        tables += key_norm_bytes(p);
        if (const fcsa_status st = common::run_key_norm_pass<T>(p, inv_norm, key_norm_stride(p), stream,
                                                                      "cuda-sm80 forward"))
            return st;
        params.k_inv_norm = inv_norm;
        params.k_inv_norm_stride = key_norm_stride(p);
    }
    if (p.varlen())
        if (const fcsa_status st =
                build_varlen_tiles(p, ForwardConfig<T, D, DV>::kBlockM, false, tables, stream, &params.varlen))
            return st;
    return launch_forward<T, D, DV>(params, stream);
}

template <typename T> fcsa_status run_bucket(const Problem &p, void *workspace, cudaStream_t stream) {
    const ForwardBuckets buckets = forward_buckets(p.d, p.d_v);
    if (buckets.d != buckets.d_v) return run<T, 192, 128>(p, workspace, stream); // the one unequal pair
    switch (buckets.d) {
    case 32: return run<T, 32, 32>(p, workspace, stream);
    case 64: return run<T, 64, 64>(p, workspace, stream);
    case 96: return run<T, 96, 96>(p, workspace, stream);
    case 128: return run<T, 128, 128>(p, workspace, stream);
    case 192: return run<T, 192, 192>(p, workspace, stream);
    default: return run<T, 256, 256>(p, workspace, stream);
    }
}

template <typename T> size_t smem_bucket(int64_t d, int64_t d_v) {
    const ForwardBuckets buckets = forward_buckets(d, d_v);
    if (buckets.d != buckets.d_v) return ForwardConfig<T, 192, 128>::kSmemBytes;
    switch (buckets.d) {
    case 32: return ForwardConfig<T, 32>::kSmemBytes;
    case 64: return ForwardConfig<T, 64>::kSmemBytes;
    case 96: return ForwardConfig<T, 96>::kSmemBytes;
    case 128: return ForwardConfig<T, 128>::kSmemBytes;
    case 192: return ForwardConfig<T, 192>::kSmemBytes;
    default: return ForwardConfig<T, 256>::kSmemBytes;
    }
}

} // namespace

size_t forward_smem_bytes(int32_t dtype, int64_t d, int64_t d_v) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT32: return smem_bucket<float>(d, d_v);
    case FCSA_DTYPE_FLOAT16: return smem_bucket<__half>(d, d_v);
    case FCSA_DTYPE_BFLOAT16: return smem_bucket<__nv_bfloat16>(d, d_v);
    default: return 0;
    }
}

} // namespace sm80

size_t sm80_forward_workspace(const Problem &p) {
    if (p.b == 0 || p.h == 0 || p.nq == 0) return 0;
    // The key norms, then for packed sequences the table for the smallest query tile of
    // any instantiation (the most tiles).
    const size_t norms = sm80::key_norm_pass(p) ? sm80::key_norm_bytes(p) : 0;
    return norms + (p.varlen() ? sm80::varlen_tiles_bytes(p, sm80::kSmallestBlockM, false) : 0);
}

fcsa_status sm80_forward(const Problem &p, void *workspace, void *stream) {
    if (p.b == 0 || p.h == 0 || p.nq == 0) return FCSA_STATUS_SUCCESS; // nothing to write
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (p.dtype) {
    case FCSA_DTYPE_FLOAT32: return sm80::run_bucket<float>(p, workspace, s);
    case FCSA_DTYPE_FLOAT16: return sm80::run_bucket<__half>(p, workspace, s);
    case FCSA_DTYPE_BFLOAT16: return sm80::run_bucket<__nv_bfloat16>(p, workspace, s);
    default:
        return set_error(FCSA_STATUS_INTERNAL_ERROR, "cuda-sm80 forward: unexpected dtype %d", int(p.dtype));
    }
}

} // namespace fcsa
