// backward.cu: the Hopper backward's host side: whether it covers a problem, its tensor
// maps, the key-norm pass and the launch of its main kernel (the rest of the backward is
// the portable one's: sm80/backward.cu calls sm90_backward_main in place of its own main
// kernel). No allocation, no synchronization: safe in graph capture.
#include <cstdint>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../backends.h"
#include "../common/key_norm.cuh"
#include "backward.cuh"
#include "launch.h"
#include "tensor_map.h"

namespace fcsa {
namespace sm90 {
namespace {

using Config = BackwardConfig<__nv_bfloat16, 128>;
static_assert(Config::kBlockN == kKeyTile, "key tiles of the key-norm stride");

fcsa_status run(const Problem &p, const Sm90BackwardBuffers &w, cudaStream_t stream) {
    using C = Config;
    constexpr const char *kWho = "cuda-sm90 backward";
    BackwardParams f{};
    if (const fcsa_status st = encode_map(&f.q_map, p.q, p.dtype, C::kBlockM, kWho)) return st;
    if (const fcsa_status st = encode_map(&f.dout_map, p.dout, p.dtype, C::kBlockM, kWho)) return st;
    if (const fcsa_status st = encode_map(&f.k_map, p.k, p.dtype, C::kBlockN, kWho)) return st;
    if (const fcsa_status st = encode_map(&f.v_map, p.v, p.dtype, C::kBlockN, kWho)) return st;
    f.lse = w.lse;
    f.delta = w.delta;
    f.q_inv_norm = w.q_inv_norm;
    f.k_inv_norm = w.k_inv_norm;
    f.k_inv_norm_stride = key_norm_stride(p);
    f.dq_acc = w.dq_acc;
    f.dk_acc = w.dk_acc;
    f.dv = p.dv.data;
    for (int i = 0; i < 3; ++i) f.dv_stride[i] = p.dv.stride[i];
    f.batch = int(p.b);
    f.heads = int(p.h);
    f.heads_per_kv = int(p.heads_per_kv());
    f.nq = int(p.nq);
    f.nk = int(p.nk);
    f.d = int(p.d);
    f.scale = p.scale;
    f.causal = p.causal;
    if (p.varlen())
        if (const fcsa_status st = sm80::build_varlen_tiles(p, C::kBlockN, true, w.key_tiles, stream, &f.varlen))
            return st;
    if (const fcsa_status st =
            common::run_key_norm_pass<__nv_bfloat16>(p, w.k_inv_norm, f.k_inv_norm_stride, stream, kWho))
        return st;
    return p.varlen() ? launch_backward<__nv_bfloat16, 128, true>(f, stream)
                      : launch_backward<__nv_bfloat16, 128, false>(f, stream);
}

} // namespace
} // namespace sm90

fcsa_status sm90_backward_supports(const Problem &p) {
    auto refuse = [](const char *why) {
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "cuda-sm90 backward: %s", why);
    };
    if (const char *why = sm90::device_problem(p.device_index)) return refuse(why);
    // float16 would need scale dS / ||q|| in float16, which leaves its range for large
    // norms (the portable path normalizes float16 query tiles instead).
    if (p.dtype != FCSA_DTYPE_BFLOAT16) return refuse("needs bfloat16");
    // (d = 64 measured slower here than on the portable path: backward.cuh.)
    if (p.d != 128 || p.d_v != 128) return refuse("needs a head dim of 128 for q, k and v");
    if (!sm90::backward_compiled<__nv_bfloat16, 128>()) return refuse("this build has no sm_90a code");
    // (dbias and dscale come with a bias and a scale tensor, which the common case has not)
    if (const char *why = sm90::common_case_problem(p, false, true)) return refuse(why);
    if (const char *why = sm90::packed_tiles_problem(p, sm90::Config::kBlockN, true, p.hk)) return refuse(why);
    if (p.deterministic) return refuse("adds dq by atomics: deterministic runs on the portable path");
    if (p.nq < 1) return refuse("needs at least one query row");
    if (!p.dv.rows_16byte_aligned(2)) return refuse("writes dv with 16-byte-aligned rows only");
    if (sm90::Config::kSmemBytes > sm80_shared_memory_limit(p.device_index)) return refuse("needs more shared memory");
    static_assert(sm90::Config::kBlockM <= 128 && sm90::Config::kBlockN <= 128,
                  "boxes of at most 128 rows, as check_tma_views tries them");
    if (const fcsa_status st = sm90::check_tma_views({{"q", &p.q}, {"k", &p.k}, {"v", &p.v}, {"dout", &p.dout}},
                                                     p.dtype, "cuda-sm90 backward"))
        return st;
    return FCSA_STATUS_SUCCESS;
}

int64_t sm90_backward_key_norm_floats(const Problem &p) { return sm90::key_norm_floats(p); }
int sm90_backward_key_tile() { return sm90::Config::kBlockN; }

fcsa_status sm90_backward_main(const Problem &p, const Sm90BackwardBuffers &buffers, void *stream) {
    return sm90::run(p, buffers, static_cast<cudaStream_t>(stream));
}

} // namespace fcsa
