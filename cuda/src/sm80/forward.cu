// forward.cu: the portable CUDA forward's host side. Turns a validated Problem into
// ForwardParams and launches the kernel instantiated for its dtype and head-dim bucket
// (forward_<dtype>_d<D>.cu). No allocation, no synchronization: safe in graph capture.
#include <cstdint>

#include <cuda_runtime.h>

#include "../backends.h"
#include "forward.cuh"

namespace fcsa {
namespace sm80 {
namespace {

// Rows of q/k/v/out may be read with 16-byte vectors when the base pointer and every
// stride except the contiguous last one are multiples of 16 bytes.
bool rows_16byte_aligned(const View &view, int element_bytes) {
    if (reinterpret_cast<uintptr_t>(view.data) % 16 != 0) return false;
    for (int i = 0; i < 3; ++i)
        if ((view.stride[i] * element_bytes) % 16 != 0) return false;
    return true;
}

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
    f.groups = p.groups;
    f.num_m_tiles = int((p.nq + block_m - 1) / block_m);
    f.scale = p.scale;
    f.causal = p.causal;
    f.l2norm = p.l2norm;
    f.logits_bounded = p.logits_bounded();
    f.bias_is_f32 = p.bias.present() && p.bias.dtype == FCSA_DTYPE_FLOAT32;
    f.vec_q = rows_16byte_aligned(p.q, element_bytes);
    f.vec_k = rows_16byte_aligned(p.k, element_bytes);
    f.vec_v = rows_16byte_aligned(p.v, element_bytes);
    f.vec_out = rows_16byte_aligned(p.out, element_bytes);
    return f;
}

template <typename T, int D> fcsa_status run(const Problem &p, cudaStream_t stream) {
    return launch_forward<T, D>(make_params(p, ForwardConfig<T, D>::kBlockM), stream);
}

template <typename T> fcsa_status run_bucket(const Problem &p, cudaStream_t stream) {
    switch (forward_head_dim_bucket(p.d)) {
    case 32: return run<T, 32>(p, stream);
    case 64: return run<T, 64>(p, stream);
    case 96: return run<T, 96>(p, stream);
    case 128: return run<T, 128>(p, stream);
    case 192: return run<T, 192>(p, stream);
    default: return run<T, 256>(p, stream);
    }
}

template <typename T> size_t smem_bucket(int64_t d) {
    switch (forward_head_dim_bucket(d)) {
    case 32: return ForwardConfig<T, 32>::kSmemBytes;
    case 64: return ForwardConfig<T, 64>::kSmemBytes;
    case 96: return ForwardConfig<T, 96>::kSmemBytes;
    case 128: return ForwardConfig<T, 128>::kSmemBytes;
    case 192: return ForwardConfig<T, 192>::kSmemBytes;
    default: return ForwardConfig<T, 256>::kSmemBytes;
    }
}

} // namespace

size_t forward_smem_bytes(int32_t dtype, int64_t d) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT32: return smem_bucket<float>(d);
    case FCSA_DTYPE_FLOAT16: return smem_bucket<__half>(d);
    case FCSA_DTYPE_BFLOAT16: return smem_bucket<__nv_bfloat16>(d);
    default: return 0;
    }
}

} // namespace sm80

size_t sm80_forward_workspace(const Problem &) { return 0; }

fcsa_status sm80_forward(const Problem &p, void *, void *stream) {
    if (p.b == 0 || p.h == 0 || p.nq == 0) return FCSA_STATUS_SUCCESS; // nothing to write
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (p.dtype) {
    case FCSA_DTYPE_FLOAT32: return sm80::run_bucket<float>(p, s);
    case FCSA_DTYPE_FLOAT16: return sm80::run_bucket<__half>(p, s);
    case FCSA_DTYPE_BFLOAT16: return sm80::run_bucket<__nv_bfloat16>(p, s);
    default:
        return set_error(FCSA_STATUS_INTERNAL_ERROR, "cuda-sm80 forward: unexpected dtype %d", int(p.dtype));
    }
}

} // namespace fcsa
