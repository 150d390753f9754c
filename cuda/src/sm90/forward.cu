// forward.cu: the Hopper forward's host side: whether it covers a problem, its tensor
// maps, the key-norm pass and the launch. No allocation, no synchronization: safe in
// graph capture (the tensor maps travel by value in the kernel's parameters).
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../backends.h"
#include "../common/key_norm.cuh"
#include "../common/numeric.cuh"
#include "forward.cuh"
#include "launch.h"
#include "tensor_map.h"

namespace fcsa {
namespace sm90 {
namespace {

static_assert(ForwardConfig<__half, 64>::kBlockN == kKeyTile && ForwardConfig<__half, 128>::kBlockN == kKeyTile,
              "key tiles of the key-norm stride");

template <typename T> bool compiled(int64_t d) {
    return forward_head_dim_bucket(d) == 64 ? forward_compiled<T, 64>() : forward_compiled<T, 128>();
}

template <typename T> size_t smem_bytes(int64_t d) {
    return forward_head_dim_bucket(d) == 64 ? ForwardConfig<T, 64>::kSmemBytes : ForwardConfig<T, 128>::kSmemBytes;
}

// Query rows per tile of the kernel for head dim d (both dtypes alike).
int block_m(int64_t d) {
    static_assert(ForwardConfig<__half, 64>::kBlockM == ForwardConfig<__nv_bfloat16, 64>::kBlockM &&
                      ForwardConfig<__half, 128>::kBlockM == ForwardConfig<__nv_bfloat16, 128>::kBlockM,
                  "tiles alike in both dtypes");
    return forward_head_dim_bucket(d) == 64 ? ForwardConfig<__half, 64>::kBlockM : ForwardConfig<__half, 128>::kBlockM;
}

// The workspace: the key-norm pass's floats, then under a key mask each batch's key
// counts, or for packed sequences the tile table.
size_t key_counts_bytes(const Problem &p) { return p.mask.present() ? size_t(2 * p.b) * sizeof(int) : 0; }

template <typename T, int D> fcsa_status run(const Problem &p, void *workspace, cudaStream_t stream) {
    using C = ForwardConfig<T, D>;
    ForwardParams f{};
    // q in boxes of one consumer's 64 rows
    if (const fcsa_status st = encode_map(&f.q_map, p.q, p.dtype, 64, "cuda-sm90 forward")) return st;
    if (const fcsa_status st = encode_map(&f.k_map, p.k, p.dtype, C::kBlockN, "cuda-sm90 forward")) return st;
    if (const fcsa_status st = encode_map(&f.v_map, p.v, p.dtype, C::kBlockN, "cuda-sm90 forward")) return st;
    f.q = p.q.data;
    f.k = p.k.data;
    f.v = p.v.data;
    f.out = p.out.data;
    f.lse = static_cast<float *>(p.lse.data);
    for (int i = 0; i < 3; ++i) {
        f.q_stride[i] = p.q.stride[i];
        f.k_stride[i] = p.k.stride[i];
        f.v_stride[i] = p.v.stride[i];
        f.out_stride[i] = p.out.stride[i];
        f.lse_stride[i] = p.lse.stride[i];
    }
    float *inv_norm = static_cast<float *>(workspace);
    f.k_inv_norm = inv_norm;
    f.k_inv_norm_stride = key_norm_stride(p);
    // Under a key mask each batch's reach and number of visible keys follow the norms in
    // the workspace.
    int *key_counts = p.mask.present() ? reinterpret_cast<int *>(inv_norm + key_norm_floats(p)) : nullptr;
    f.key_counts = key_counts;
    if (p.varlen())
        if (const fcsa_status st = sm80::build_varlen_tiles(p, C::kBlockM, false, inv_norm + key_norm_floats(p), stream,
                                                            &f.varlen))
            return st;
    f.batch = int(p.b);
    f.heads = int(p.h);
    f.heads_per_kv = int(p.heads_per_kv());
    f.nq = int(p.nq);
    f.nk = int(p.nk);
    f.d = int(p.d);
    f.num_m_tiles = p.varlen() ? 1 : int((p.nq + C::kBlockM - 1) / C::kBlockM); // (packed: the table's)
    f.scale = p.scale;
    f.causal = p.causal;
    // Ping-pong between the consumers (one's softmax under the others' GEMMs): +1-8% at
    // d = 128, +1-4% with d = 64's three consumers (notes). FCSA_SM90_PINGPONG=0 turns it
    // off, to measure.
    const char *ping_pong = std::getenv("FCSA_SM90_PINGPONG");
    f.ping_pong = ping_pong == nullptr || ping_pong[0] != '0';
    f.vec_out = p.out.rows_16byte_aligned(2);
    if (const fcsa_status st =
            common::run_key_norm_pass<T>(p, inv_norm, f.k_inv_norm_stride, stream, "cuda-sm90 forward", key_counts))
        return st;
    if (key_counts != nullptr) return launch_forward<T, D, true, false>(f, stream);
    return p.varlen() ? launch_forward<T, D, false, true>(f, stream) : launch_forward<T, D, false, false>(f, stream);
}

template <typename T> fcsa_status run_bucket(const Problem &p, void *workspace, cudaStream_t stream) {
    return forward_head_dim_bucket(p.d) == 64 ? run<T, 64>(p, workspace, stream) : run<T, 128>(p, workspace, stream);
}

} // namespace
} // namespace sm90

fcsa_status sm90_forward_supports(const Problem &p) {
    auto refuse = [](const char *why) {
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "cuda-sm90 forward: %s", why);
    };
    if (const char *why = sm90::device_problem(p.device_index)) return refuse(why);
    if (p.dtype != FCSA_DTYPE_FLOAT16 && p.dtype != FCSA_DTYPE_BFLOAT16) return refuse("needs float16 or bfloat16");
    const bool bf16 = p.dtype == FCSA_DTYPE_BFLOAT16;
    if (p.d < 8 || p.d > 128 || p.d % 8 != 0 || p.d_v != p.d)
        return refuse("needs a head dim that is a multiple of 8 up to 128, the same for q, k and v");
    if (!(bf16 ? sm90::compiled<__nv_bfloat16>(p.d) : sm90::compiled<__half>(p.d)))
        return refuse("this build has no sm_90a code");
    if (const char *why = sm90::common_case_problem(p, true, true)) return refuse(why);
    if (const char *why = sm90::packed_tiles_problem(p, sm90::block_m(p.d), false, p.h)) return refuse(why);
    if (p.out.dtype != p.dtype) return refuse("writes out in the inputs' dtype only");
    const float range = bf16 ? sm90::ForwardConfig<__nv_bfloat16, 128>::kBoundedRange
                             : sm90::ForwardConfig<__half, 128>::kBoundedRange;
    if (2.f * std::fabs(p.scale) * common::kLog2e > range)
        return refuse("the scale is too large for probabilities without a running maximum in this dtype");
    const size_t smem = bf16 ? sm90::smem_bytes<__nv_bfloat16>(p.d) : sm90::smem_bytes<__half>(p.d);
    if (int64_t(smem) > sm80_shared_memory_limit(p.device_index)) return refuse("needs more shared memory");
    static_assert(sm90::ForwardConfig<__half, 64>::kBlockN <= 128 && sm90::ForwardConfig<__half, 128>::kBlockN <= 128,
                  "boxes of at most 128 rows (q's: 64), as check_tma_views tries them");
    if (const fcsa_status st = sm90::check_tma_views({{"q", &p.q}, {"k", &p.k}, {"v", &p.v}}, p.dtype, "cuda-sm90 forward"))
        return st;
    return FCSA_STATUS_SUCCESS;
}

size_t sm90_forward_workspace(const Problem &p) {
    if (p.b == 0 || p.h == 0 || p.nq == 0) return 0;
    // (the norms' floats are a multiple of 128: the table after them stays 16-byte aligned)
    return size_t(sm90::key_norm_floats(p)) * sizeof(float) + sm90::key_counts_bytes(p) +
           (p.varlen() ? sm80::varlen_tiles_bytes(p, sm90::block_m(p.d), false) : 0);
}

fcsa_status sm90_forward(const Problem &p, void *workspace, void *stream) {
    if (p.b == 0 || p.h == 0 || p.nq == 0) return FCSA_STATUS_SUCCESS;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    return p.dtype == FCSA_DTYPE_BFLOAT16 ? sm90::run_bucket<__nv_bfloat16>(p, workspace, s)
                                          : sm90::run_bucket<__half>(p, workspace, s);
}

} // namespace fcsa
